"""Benchmark `train-student` step costs side by side, on one cache made by the real pipeline.

    python bench/train.py                      # small Llama-shaped teacher on CPU, one torch thread
    python bench/train.py --config bench/configs/qwen2.5-3b.json --hidden-size 2048 --device cuda

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

Each training configuration is a real run built by `build_trainer` (the `StudentLoss` module,
AdamW, schedules) fed with batches read from the cache beforehand, and a step is
`Trainer._train_step`: the exact step `fit` runs (zero_grad, forward, losses, backward,
clipping, AdamW) without its logging and checkpoint cadence, called directly so that the
configurations can alternate step by step on a shared machine.

The teacher has random weights with its LM head sharpened so rs-kd draws ~12 unique ids per
position (as `bench/cache.py` does, whose teacher and token store builders are reused here);
the token store holds random ids, cached by `cache_teacher` with the default snapshots.
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
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console

from kdpipe.schemas.cache_config import CacheTeacherConfig
from kdpipe.schemas.train_config import TrainStudentConfig
from kdpipe.student_train.loader import StudentBatch, StudentLoader
from kdpipe.student_train.parallelize import init_distributed
from kdpipe.student_train.run import build_trainer
from kdpipe.student_train.trainer import Trainer
from kdpipe.teacher_cache import open_cache
from kdpipe.teacher_cache.run import cache_teacher


def _load_cache_bench():
    """bench/cache.py as a module: its sharpened random teacher and random token store."""
    spec = importlib.util.spec_from_file_location("bench_cache", Path(__file__).with_name("cache.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# name -> (student kind, lm weight, kd weight, clone weight)
RUNS = {
    "lrc_lm": ("lrc", 1.0, 0.0, 0.0),
    "lrc_kd_lm": ("lrc", 1.0, 1.0, 0.0),
    "lrc_kd_lm_clone": ("lrc", 1.0, 1.0, 0.5),
    "plain_lm": ("plain", 1.0, 0.0, 0.0),
    "plain_kd_lm": ("plain", 1.0, 1.0, 0.0),
}


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


def build_cache(root: Path, args: argparse.Namespace) -> Path:
    """Teacher, token store and cache (default snapshots: every 4th layer, 1/32 of positions)."""
    bench_cache = _load_cache_bench()
    teacher_dir, store_dir, cache_dir = root / "teacher", root / "store", root / "cache"
    bench_cache.build_teacher(teacher_dir, args.config, args.device, args.seq_len)
    vocab = json.loads((teacher_dir / "config.json").read_text())["vocab_size"]
    bench_cache.build_store(store_dir, teacher_dir, args.seq_len, args.sequences, vocab)
    config = CacheTeacherConfig(
        teacher=teacher_dir, tokens=store_dir, out=cache_dir, device=args.device, batch_size=args.batch_size,
        sequences_per_shard=args.sequences, sequences_per_chunk=args.batch_size,
    )  # fmt: skip
    cache_teacher(config, console=Console(file=io.StringIO()))
    return cache_dir


def build_runs(root: Path, cache_dir: Path, args: argparse.Namespace) -> dict[str, Trainer]:
    """One trainer per configuration, as `train-student` builds it (the plain one on the LRC's exported config)."""
    ctx = init_distributed(args.device)
    trainers: dict[str, Trainer] = {}
    plain_config = root / "plain-student.json"
    for name, (kind, lm, kd, clone) in RUNS.items():
        shape = {"hidden_size": args.hidden_size} if kind == "lrc" else {"student_config": plain_config}
        config = TrainStudentConfig(
            cache=cache_dir, out=root / f"run-{name}", student=kind, **shape, steps=10**6, batch_size=args.batch_size,
            lr=1e-4, lm_weight=lm, kd_weight=kd, clone_weight=clone, num_workers=0, device=args.device,
        )  # fmt: skip
        trainers[name] = build_trainer(config, ctx)
        if name == "lrc_lm":
            # The exported architecture: the LRC student's own HF config (d_S, explicit head_dim).
            student = trainers[name].module.student
            plain_config.write_text(json.dumps(student.config.to_dict(), default=str))
    return trainers


def read_batches(cache_dir: Path, args: argparse.Namespace) -> list[StudentBatch]:
    """One epoch of train batches, read once so that step times exclude reading."""
    loader = StudentLoader(open_cache(cache_dir), split="train", batch_size=args.batch_size, seed=0)
    return list(itertools.islice(loader, loader.batches_per_epoch))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(
    trainers: dict[str, Trainer], batches: list[StudentBatch], cache_dir: Path, args: argparse.Namespace
) -> dict[str, dict[str, list[float]]]:
    """Wall and process-CPU seconds per step of each configuration and per loader batch, one entry per round.

    The order of the configurations rotates every round, so none always runs first (right
    after the loader's reads) or last.
    """
    names = [*trainers, "loader"]
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in names}
    loader = StudentLoader(open_cache(cache_dir), split="train", batch_size=args.batch_size, seed=1, num_workers=0)
    reading = iter(loader)
    next(reading)  # opens the shard's Zarr arrays

    def loader_batch() -> None:
        for _ in range(args.loader_batches):
            next(reading)

    for round_index in range(args.warmup + args.rounds):
        batch = batches[round_index % len(batches)]
        steps = {name: (lambda t=trainer: t._train_step([batch])) for name, trainer in trainers.items()}
        steps["loader"] = loader_batch
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            sync(args.device)
            wall, cpu = time.perf_counter(), time.process_time()
            steps[name]()
            sync(args.device)
            per = args.loader_batches if name == "loader" else 1
            times[name]["wall"].append((time.perf_counter() - wall) / per)
            times[name]["cpu"].append((time.process_time() - cpu) / per)
    return {name: {k: v[args.warmup :] for k, v in clocks.items()} for name, clocks in times.items()}


def report(times: dict[str, dict[str, list[float]]], args: argparse.Namespace, trainers: dict[str, Trainer], cache_dir: Path) -> str:
    """The ratio table (markdown, wall and process-CPU medians) and the per-configuration medians."""
    wall = {name: statistics.median(clocks["wall"]) for name, clocks in times.items()}
    cpu = {name: statistics.median(clocks["cpu"]) for name, clocks in times.items()}
    student = trainers["lrc_lm"].module.student
    teacher = json.loads((cache_dir.parent / "teacher" / "config.json").read_text())
    trainable = {name: sum(p.numel() for p in t.module.parameters() if p.requires_grad) for name, t in trainers.items()}
    manifest = open_cache(cache_dir).manifest
    lines = [
        f"machine: {cpu_description()}; {platform.platform()}, Python {platform.python_version()}, torch {torch.__version__}, "
        f"device {args.device}, {torch.get_num_threads()} torch thread(s), float32",
        f"teacher: {teacher['model_type']}, hidden {teacher['hidden_size']}, intermediate {teacher['intermediate_size']}, "
        f"{teacher['num_hidden_layers']} layers, vocab {teacher['vocab_size']}; student d_S {student.config.hidden_size} "
        f"(trainable params: LRC {trainable['lrc_lm'] / 1e6:.2f}M, plain {trainable['plain_lm'] / 1e6:.2f}M); "
        f"cache: rs-kd, snapshots of layers {list(manifest.snapshot.layers)} at 1/32 of positions; "
        f"batch {args.batch_size} x seq {args.seq_len}; median of {args.rounds} rotating rounds after {args.warmup} warm-up",
        "",
        "| measure | numerator wall s | denominator wall s | wall ratio | CPU ratio | goal | met (wall / CPU) |",
        "|---|---:|---:|---:|---:|---|---|",
    ]

    def row(label: str, num: str, den: str, goal: str, ok) -> None:
        ratios = wall[num] / wall[den], cpu[num] / cpu[den]
        met = " / ".join("yes" if ok(r) else "NO" for r in ratios) if goal else ""
        lines.append(f"| {label} | {wall[num]:.4f} | {wall[den]:.4f} | {ratios[0]:.2f} | {ratios[1]:.2f} | {goal} | {met} |")

    row("LRC step, KD+LM / LM-only", "lrc_kd_lm", "lrc_lm", "<= 1.10", lambda r: r <= 1.10)
    row("plain step, KD+LM / LM-only", "plain_kd_lm", "plain_lm", "<= 1.10", lambda r: r <= 1.10)
    row("LRC KD+LM+clone step / plain exported arch, LM-only step", "lrc_kd_lm_clone", "plain_lm", "<= 1.25", lambda r: r <= 1.25)
    row("LRC KD+LM+clone step / plain exported arch, KD+LM step", "lrc_kd_lm_clone", "plain_kd_lm", "", None)
    multiple = wall["lrc_kd_lm_clone"] / wall["loader"], cpu["lrc_kd_lm_clone"] / cpu["loader"]
    met = " / ".join("yes" if m >= 5 else "NO" for m in multiple)
    lines.append(
        f"| loader batches/s (num_workers 0) / LRC KD+LM+clone steps/s | {1 / wall['loader']:.1f}/s | "
        f"{1 / wall['lrc_kd_lm_clone']:.2f}/s | {multiple[0]:.1f}x | {multiple[1]:.1f}x | >= 5x | {met} |"
    )
    lines += ["", "median wall seconds: " + json.dumps({k: round(v, 4) for k, v in wall.items()})]
    lines.append("median CPU seconds: " + json.dumps({k: round(v, 4) for k, v in cpu.items()}))
    spread = {k: [round(min(c["wall"]), 4), round(max(c["wall"]), 4)] for k, c in times.items()}
    lines.append("min/max wall seconds: " + json.dumps(spread))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, help="HF config.json of the teacher shape (default: Llama, hidden 256, vocab 8000)")
    parser.add_argument("--hidden-size", type=int, default=128, help="the LRC student's d_S")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--sequences", type=int, default=64, help="sequences in the cache (one shard)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--loader-batches", type=int, default=4, help="loader batches read per round")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="kdpipe-bench-train-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        cache_dir = build_cache(root, args)
        trainers = build_runs(root, cache_dir, args)
        batches = read_batches(cache_dir, args)
        print(f"setup (teacher, cache, {len(trainers)} students): {time.perf_counter() - started:.1f} s")
        times = measure(trainers, batches, cache_dir, args)
        print(report(times, args, trainers, cache_dir))


if __name__ == "__main__":
    main()
