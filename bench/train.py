"""Benchmark `train-student` step costs side by side, on one cache made by the real pipeline.

    python bench/train.py [--quick] [--json PATH]   # small Llama-shaped teacher on CPU, one torch thread

    python bench/train.py --teacher smollm2 --hidden-size 288 --untied-head --seq-len 512 --batch-size 2 \
        --sequences 16 --rounds 5 --warmup 1               # the real SmolLM2-135M teacher (~10 min)

(bench/gpu.py runs the same steps on a GPU with Qwen2.5-3B / LRC-1.7B shapes.)

Measured in one run, step by step in alternation (each round runs one optimizer step of
every configuration and reads a few loader batches, in an order that rotates every round),
median over rounds of wall seconds and of process CPU seconds (steadier on a shared machine):

1. KD+LM vs LM-only on the same LRC student (goal <= 1.10): what the KD term adds.
2. LRC from the cache (KD + LM + clone loss at the cached snapshot positions) vs plain
   training of the exported architecture (a `LlamaForCausalLM` of the student's own config,
   `hidden_size = d_S`, LM loss only) (goal <= 1.25): what cloning through frozen teacher
   weights costs over training the final model directly.
3. `StudentLoader` batches/s (num_workers 0, decoding shards in the training process) as a
   multiple of the batches/s the LRC KD+LM+clone step consumes (goal >= 5).

`--json PATH` writes the ratios (of process CPU seconds: one torch thread, no loader
workers, so CPU time is the step's own work whatever else runs on the machine) in the
format `bench/suite.py` collects.

Each training configuration is a real run built by `build_trainer` (the `StudentLoss` module,
AdamW, schedules) fed with batches read from the cache beforehand, and a step is
`Trainer._train_step`: the exact step `fit` runs (zero_grad, forward, losses, backward,
clipping, AdamW) without its logging and checkpoint cadence, called directly so that the
configurations can alternate step by step on a shared machine.

The teacher has random weights with its LM head sharpened so rs-kd draws ~12 unique ids per
position (as `bench/cache.py` does, whose teacher and token store builders are reused here);
the token store holds random ids, cached by `cache_teacher` with the default snapshots.
With `--teacher DIR|smollm2`, a saved teacher with real weights instead (`smollm2`: the
packaged SmolLM2-135M-Instruct), on standard-library code (`bench/cache.py`'s text store).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
from rich.console import Console

from kdpipe.schemas.cache_config import CacheTeacherConfig
from kdpipe.schemas.train_config import TrainStudentConfig
from kdpipe.student_train.loader import StudentBatch, StudentLoader
from kdpipe.student_train.parallelize import DistContext, init_distributed
from kdpipe.student_train.run import build_trainer
from kdpipe.student_train.trainer import Trainer
from kdpipe.teacher_cache import open_cache
from kdpipe.teacher_cache.run import cache_teacher

# name -> (student kind, lm weight, kd weight, clone weight)
RUNS = {
    "lrc_lm": ("lrc", 1.0, 0.0, 0.0),
    "lrc_kd_lm": ("lrc", 1.0, 1.0, 0.0),
    "lrc_kd_lm_clone": ("lrc", 1.0, 1.0, 0.5),
    "plain_lm": ("plain", 1.0, 0.0, 0.0),
    "plain_kd_lm": ("plain", 1.0, 1.0, 0.0),
}

# --quick: a quarter of the tokens per step and a third of the rounds (about 20 s on one core).
QUICK = dict(sequences=16, batch_size=4, rounds=6, warmup=1)

# Goals of the ratios (DESIGN: RS-KD costs ~10% over plain CE at 300M; LRC must not cost
# much more than training the exported model; the loader must keep far ahead of the step).
KD_GOAL, LRC_GOAL, LOADER_GOAL = 1.10, 1.25, 5.0


def load_cache_bench() -> ModuleType:
    """bench/cache.py as a module: its sharpened random teacher and random token store."""
    spec = importlib.util.spec_from_file_location("bench_cache", Path(__file__).with_name("cache.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # before running it: dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def cpu_description() -> str:
    """CPU model from /proc/cpuinfo and the cores this process may use."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model}, {usable} usable cores ({os.cpu_count()} online)"


def machine_info(device: str) -> dict[str, object]:
    """The `machine` entry of the JSON result."""
    info: dict[str, object] = {
        "cpu": cpu_description(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def write_json(path: Path, bench: str, machine: dict[str, object], rows: list[dict[str, object]]) -> None:
    """The result file every bench script writes with --json (see bench/suite.py)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"bench": bench, "machine": machine, "rows": rows}, indent=2) + "\n")


def result_row(metric: str, value: float, goal: str | None, unit: str) -> dict[str, object]:
    return {"metric": metric, "value": float(value), "goal": goal, "unit": unit}


def build_cache(root: Path, args: argparse.Namespace) -> Path:
    """Teacher, token store and cache (default snapshots: every 4th layer, 1/32 of positions).

    With --teacher, that saved teacher on standard-library code (bench/cache.py's text store);
    else a random-weight teacher of --config on random ids.
    """
    bench_cache = load_cache_bench()
    store_dir, cache_dir = root / "store", root / "cache"
    if args.teacher:
        args.teacher_dir = bench_cache.real_shape(args.teacher).teacher
    else:
        args.teacher_dir = root / "teacher"
        bench_cache.build_teacher(args.teacher_dir, args.config, args.device, args.seq_len)
    vocab = json.loads((args.teacher_dir / "config.json").read_text())["vocab_size"]
    if args.teacher:
        bench_cache.build_text_store(store_dir, args.teacher_dir, args.seq_len, args.sequences, vocab)
    else:
        bench_cache.build_store(store_dir, args.teacher_dir, args.seq_len, args.sequences, vocab)
    config = CacheTeacherConfig(
        teacher=args.teacher_dir, tokens=store_dir, out=cache_dir, device=args.device, batch_size=args.batch_size,
        sequences_per_shard=args.sequences, sequences_per_chunk=args.batch_size,
    )  # fmt: skip
    cache_teacher(config, console=Console(file=io.StringIO()))
    return cache_dir


def build_run(
    name: str, root: Path, cache_dir: Path, ctx: DistContext, *, hidden_size: int, plain_config: Path, batch_size: int,
    device: str, tie_embeddings: bool | None = None,
) -> Trainer:  # fmt: skip
    """The trainer of configuration `name` of `RUNS`, as `train-student` builds it, in ROOT/run-NAME."""
    kind, lm, kd, clone = RUNS[name]
    shape = {"hidden_size": hidden_size, "tie_embeddings": tie_embeddings} if kind == "lrc" else {"student_config": plain_config}
    config = TrainStudentConfig(
        cache=cache_dir, out=root / f"run-{name}", student=kind, **shape, steps=10**6, batch_size=batch_size,
        lr=1e-4, lm_weight=lm, kd_weight=kd, clone_weight=clone, num_workers=0, device=device,
    )  # fmt: skip
    return build_trainer(config, ctx)


def build_runs(root: Path, cache_dir: Path, args: argparse.Namespace) -> dict[str, Trainer]:
    """Every configuration of `RUNS`; the plain ones on the LRC student's exported config."""
    ctx = init_distributed(args.device)
    plain_config = root / "plain-student.json"
    options = dict(hidden_size=args.hidden_size, plain_config=plain_config, batch_size=args.batch_size, device=args.device,
                   tie_embeddings=False if args.untied_head else None)  # fmt: skip
    trainers = {"lrc_lm": build_run("lrc_lm", root, cache_dir, ctx, **options)}
    # The exported architecture: the LRC student's own HF config (d_S, explicit head_dim).
    plain_config.write_text(json.dumps(trainers["lrc_lm"].module.student.config.to_dict(), default=str))
    for name in RUNS:
        if name not in trainers:
            trainers[name] = build_run(name, root, cache_dir, ctx, **options)
    return trainers


def read_batches(cache_dir: Path, batch_size: int) -> list[StudentBatch]:
    """One epoch of train batches, read once so that step times exclude reading."""
    loader = StudentLoader(open_cache(cache_dir), split="train", batch_size=batch_size, seed=0)
    return list(itertools.islice(loader, loader.batches_per_epoch))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleave(
    steps: dict[str, Callable[[int], None]], *, rounds: int, warmup: int, device: str
) -> dict[str, dict[str, list[float]]]:
    """Wall and process-CPU seconds of every step, called once per round, warm-up rounds dropped.

    The order rotates every round, so that no step always runs first or last; the device
    is synchronised before and after each step, so a step's time is its own.
    """
    names = list(steps)
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in names}
    for round_index in range(warmup + rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            sync(device)
            wall, cpu = time.perf_counter(), time.process_time()
            steps[name](round_index)
            sync(device)
            times[name]["wall"].append(time.perf_counter() - wall)
            times[name]["cpu"].append(time.process_time() - cpu)
    return {name: {clock: values[warmup:] for clock, values in clocks.items()} for name, clocks in times.items()}


def loader_step(cache_dir: Path, batch_size: int, batches_per_call: int) -> Callable[[int], None]:
    """A step that reads `batches_per_call` batches with a fresh `StudentLoader` (num_workers 0)."""
    loader = StudentLoader(open_cache(cache_dir), split="train", batch_size=batch_size, seed=1, num_workers=0)
    reading = iter(loader)
    next(reading)  # opens the shard's Zarr arrays

    def step(_: int) -> None:
        for _ in range(batches_per_call):
            next(reading)

    return step


def measure(
    trainers: dict[str, Trainer], batches: list[StudentBatch], cache_dir: Path, args: argparse.Namespace
) -> dict[str, dict[str, list[float]]]:
    """Seconds per step of each configuration and per loader batch, one entry per round."""
    steps: dict[str, Callable[[int], None]] = {
        name: (lambda r, t=trainer: t._train_step([batches[r % len(batches)]])) for name, trainer in trainers.items()
    }
    steps["loader"] = loader_step(cache_dir, args.batch_size, args.loader_batches)
    times = interleave(steps, rounds=args.rounds, warmup=args.warmup, device=args.device)
    times["loader"] = {clock: [s / args.loader_batches for s in values] for clock, values in times["loader"].items()}
    return times


def result_rows(times: dict[str, dict[str, list[float]]]) -> list[dict[str, object]]:
    """The ratios for bench/suite.py, of median process CPU seconds."""
    cpu = {name: statistics.median(clocks["cpu"]) for name, clocks in times.items()}
    return [
        result_row("train step LRC, KD+LM / LM-only (CPU s)", cpu["lrc_kd_lm"] / cpu["lrc_lm"], f"<= {KD_GOAL:.2f}", "ratio"),
        result_row("train step plain, KD+LM / LM-only (CPU s)", cpu["plain_kd_lm"] / cpu["plain_lm"], f"<= {KD_GOAL:.2f}", "ratio"),
        result_row(
            "train step LRC KD+LM+clone / plain exported arch LM-only (CPU s)",
            cpu["lrc_kd_lm_clone"] / cpu["plain_lm"], f"<= {LRC_GOAL:.2f}", "ratio",
        ),  # fmt: skip
        result_row(
            "loader batches/s / LRC KD+LM+clone steps/s (CPU s)", cpu["lrc_kd_lm_clone"] / cpu["loader"], f">= {LOADER_GOAL:g}", "ratio"
        ),
    ]


def report(times: dict[str, dict[str, list[float]]], args: argparse.Namespace, trainers: dict[str, Trainer], cache_dir: Path) -> str:
    """The ratio table (markdown, wall and process-CPU medians) and the per-configuration medians."""
    wall = {name: statistics.median(clocks["wall"]) for name, clocks in times.items()}
    cpu = {name: statistics.median(clocks["cpu"]) for name, clocks in times.items()}
    student = trainers["lrc_lm"].module.student
    teacher = json.loads((args.teacher_dir / "config.json").read_text())
    trainable = {name: sum(p.numel() for p in t.module.parameters() if p.requires_grad) for name, t in trainers.items()}
    manifest = open_cache(cache_dir).manifest
    lines = [
        f"machine: {cpu_description()}; {platform.platform()}, Python {platform.python_version()}, torch {torch.__version__}, "
        f"device {args.device}, {torch.get_num_threads()} torch thread(s), float32",
        f"teacher: {teacher['model_type']}, hidden {teacher['hidden_size']}, intermediate {teacher['intermediate_size']}, "
        f"{teacher['num_hidden_layers']} layers, vocab {teacher['vocab_size']}; student d_S {student.config.hidden_size} "
        f"{'untied' if args.untied_head else 'tied as the teacher'} head "
        f"(trainable params: LRC {trainable['lrc_lm'] / 1e6:.2f}M, plain {trainable['plain_lm'] / 1e6:.2f}M); "
        f"cache: rs-kd, snapshots of layers {list(manifest.snapshot.layers)} at 1/32 of positions; "
        f"batch {args.batch_size} x seq {args.seq_len}; median of {args.rounds} rotating rounds after {args.warmup} warm-up",
        "",
        "| measure | numerator wall s | denominator wall s | wall ratio | CPU ratio | goal | met (wall / CPU) |",
        "|---|---:|---:|---:|---:|---|---|",
    ]

    def row(label: str, num: str, den: str, goal: float | None) -> None:
        ratios = wall[num] / wall[den], cpu[num] / cpu[den]
        met = " / ".join("yes" if r <= goal else "NO" for r in ratios) if goal else ""
        goal_text = f"<= {goal:.2f}" if goal else ""
        lines.append(f"| {label} | {wall[num]:.4f} | {wall[den]:.4f} | {ratios[0]:.2f} | {ratios[1]:.2f} | {goal_text} | {met} |")

    row("LRC step, KD+LM / LM-only", "lrc_kd_lm", "lrc_lm", KD_GOAL)
    row("plain step, KD+LM / LM-only", "plain_kd_lm", "plain_lm", KD_GOAL)
    row("LRC KD+LM+clone step / plain exported arch, LM-only step", "lrc_kd_lm_clone", "plain_lm", LRC_GOAL)
    row("LRC KD+LM+clone step / plain exported arch, KD+LM step", "lrc_kd_lm_clone", "plain_kd_lm", None)
    multiple = wall["lrc_kd_lm_clone"] / wall["loader"], cpu["lrc_kd_lm_clone"] / cpu["loader"]
    met = " / ".join("yes" if m >= LOADER_GOAL else "NO" for m in multiple)
    lines.append(
        f"| loader batches/s (num_workers 0) / LRC KD+LM+clone steps/s | {1 / wall['loader']:.1f}/s | "
        f"{1 / wall['lrc_kd_lm_clone']:.2f}/s | {multiple[0]:.1f}x | {multiple[1]:.1f}x | >= {LOADER_GOAL:g}x | {met} |"
    )
    lines += ["", "median wall seconds: " + json.dumps({k: round(v, 4) for k, v in wall.items()})]
    lines.append("median CPU seconds: " + json.dumps({k: round(v, 4) for k, v in cpu.items()}))
    spread = {k: [round(min(c["wall"]), 4), round(max(c["wall"]), 4)] for k, c in times.items()}
    lines.append("min/max wall seconds: " + json.dumps(spread))
    return "\n".join(lines)


def main() -> None:
    quick = argparse.ArgumentParser(add_help=False)
    quick.add_argument("--quick", action="store_true")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], parents=[quick])
    parser.add_argument("--config", type=Path, help="HF config.json of the teacher shape (default: Llama, hidden 256, vocab 8000)")
    parser.add_argument("--teacher", metavar="DIR|smollm2",
                        help="a saved teacher instead (real weights, on standard-library code); smollm2: the packaged "
                        "SmolLM2-135M-Instruct, e.g. with --hidden-size 288 --untied-head --seq-len 512 --batch-size 2")  # fmt: skip
    parser.add_argument("--untied-head", action="store_true", help="LRC student with its own LM head (--no-tie-embeddings)")
    parser.add_argument("--hidden-size", type=int, default=128, help="the LRC student's d_S")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--sequences", type=int, default=64, help="sequences in the cache (one shard)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--loader-batches", type=int, default=4, help="loader batches read per round")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    parser.add_argument("--json", type=Path, help="write the ratios here for bench/suite.py")
    if quick.parse_known_args()[0].quick:
        parser.set_defaults(**QUICK)  # explicit flags still win
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="kdpipe-bench-train-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        cache_dir = build_cache(root, args)
        # Again: starting numba's OpenMP pool (the rs-kd kernel) resets the process's OpenMP thread count.
        torch.set_num_threads(args.threads)
        trainers = build_runs(root, cache_dir, args)
        batches = read_batches(cache_dir, args.batch_size)
        print(f"setup (teacher, cache, {len(trainers)} students): {time.perf_counter() - started:.1f} s")
        times = measure(trainers, batches, cache_dir, args)
        print(report(times, args, trainers, cache_dir))
    if args.json:
        write_json(args.json, "train", machine_info(args.device), result_rows(times))


if __name__ == "__main__":
    main()
