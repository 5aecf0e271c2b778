"""Tokens/s and model FLOP utilisation on one CUDA GPU: a Qwen2.5-3B teacher caching, an LRC-1.7B student training.

    python bench/gpu.py [--quick] [--json PATH] [--peak-tflops 989]
    python bench/gpu.py --smoke [--json PATH]    # tiny shapes on CPU through the same code paths (tests)

Shapes (random weights; configs in bench/configs/):
- teacher `qwen2.5-3b.json`, built by bench/cache.py's `build_teacher` (LM head untied and
  sharpened so that rs-kd at N=50 draws ~12 unique ids per position, as real teachers do);
- student `lrc-1.7b.json`: LRC-1.7B of Hao et al. 2025 (arXiv 2505.12781, Table 11), the
  LRC student of Qwen2.5-3B: 36 layers, 16 query / 2 KV heads of 128, FFN 11,008, vocabulary
  151,936, tied embeddings, residual width d_S 1,200 instead of 2,048 (1.81B parameters).
  Their run: sequences of 2,048, 32,768 tokens per step on 8 H800, i.e. 2 sequences per GPU
  (this bench's default batch), clone weight 0.5.

Teacher, in rotating order per repeat (median of `--repeats` after one warm-up), over the
same batches of a random token store: the bare forward (`final_hidden` + the LM head per
position piece, as bench/cache.py), cache-teacher's `BatchEncoder` (forward + rs-kd
sampling, targets copied to the host; no snapshots, no writes) and a whole `cache_teacher`
run with the default snapshots (its shard loop, `loop_s`; loading the teacher is paid once
per task). The last run's cache is the one the students train from.

Student: trainers built by `build_trainer` on the last cache and stepped with the
trainer's own `_train_step` (bench/train.py's helpers), alternating step by step within a
group. Groups run one after another because every LRC trainer holds its own bf16 teacher
(6.8 GB) and the plain one 29 GB of fp32 weights and AdamW state: (LRC LM-only, LRC KD+LM)
for the KD cost, (plain exported architecture LM-only, LRC KD+LM+clone, loader) for LRC vs
plain and for the loader's margin over the step.

MFU = model FLOPs per token x tokens/s / (--peak-tflops x 1e12), with the PaLM (appendix B)
count: 2N + 4·L·H·d_head·T per token forward, three times that for a training step; N = the
weights of every matmul (LM head included, embedding lookup not); attention counted in
full, not halved for causality. For the LRC student N is the exported model's: the products
W_T·P it recomputes every step are overhead, not model FLOPs, so LRC and plain MFU compare
directly. The default peak, 989 TFLOP/s, is an H100 SXM's dense bf16.

On the GPU everything runs as kdpipe runs it there: teacher weights and LRC compute in bf16,
the plain student's fp32 master weights under bf16 autocast, SDPA attention. Every timing is
bracketed by torch.cuda.synchronize(); peak memory is torch.cuda.max_memory_allocated of
each phase (reset before it).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import io
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
from rich.console import Console
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from kdpipe.schemas.cache_config import CacheTeacherConfig
from kdpipe.student_train.lrc import student_config
from kdpipe.student_train.parallelize import init_distributed
from kdpipe.teacher_cache.plan import plan_cache
from kdpipe.teacher_cache.run import BatchEncoder, CacheSummary, cache_teacher

BENCH_DIR = Path(__file__).resolve().parent
TEACHER_CONFIG = BENCH_DIR / "configs" / "qwen2.5-3b.json"
STUDENT_CONFIG = BENCH_DIR / "configs" / "lrc-1.7b.json"
H100_BF16_DENSE_TFLOPS = 989.0

# Trainers stepped together (see the module docstring for why not all at once).
GROUPS = (("lrc_lm", "lrc_kd_lm"), ("plain_lm", "lrc_kd_lm_clone"))
LABELS = {
    "plain_lm": "plain exported arch, LM-only",
    "lrc_lm": "LRC, LM-only",
    "lrc_kd_lm": "LRC, KD+LM",
    "lrc_kd_lm_clone": "LRC, KD+LM+clone",
}
# Fields that fix the student's shape: the shipped config must be the LRC student's export.
SHAPE_FIELDS = (
    "model_type", "hidden_size", "head_dim", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "vocab_size", "tie_word_embeddings",
)  # fmt: skip

QUICK = dict(sequences=16, repeats=1, rounds=5, warmup=2)
SMOKE = dict(seq_len=64, sequences=8, teacher_batch_size=4, batch_size=2, repeats=1, rounds=2, warmup=1, loader_batches=2)
SMOKE_TEACHER = dict(
    model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=512, max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=True,
)  # fmt: skip
SMOKE_STUDENT_WIDTH = 32


def load_sibling(name: str) -> ModuleType:
    """bench/NAME.py as a module (the bench directory is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # before running it: dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# bench/train.py: the trainer builder, batch reader, step interleaving and JSON helpers;
# bench/suite.py: the result table.
train, suite = load_sibling("train"), load_sibling("suite")


def read_config(path: Path) -> PretrainedConfig:
    fields = json.loads(path.read_text())
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def check_student_shape(teacher: PretrainedConfig, student: PretrainedConfig, where: Path) -> None:
    """Refuse a student config that is not what the LRC student of `teacher` at its width exports."""
    expected = student_config(teacher, student.hidden_size, head_dim(teacher), bool(student.tie_word_embeddings))
    for field in SHAPE_FIELDS:
        if getattr(student, field, None) != getattr(expected, field, None):
            sys.exit(
                f"bench/gpu.py: {where} has {field}={getattr(student, field, None)!r}, but the LRC student of the teacher "
                f"at hidden_size {student.hidden_size} exports {getattr(expected, field, None)!r}; fix the config"
            )


def matmul_params(config: PretrainedConfig) -> int:
    """N: weights of every linear layer (LM head included, tied or not), counted on the meta device."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def flops_per_token(config: PretrainedConfig, seq_len: int, *, training: bool) -> float:
    """Model FLOPs per token, PaLM appendix B: 2N + 4·L·H·d_head·T forward, x3 for forward + backward."""
    attention = 4 * config.num_hidden_layers * config.num_attention_heads * head_dim(config) * seq_len
    forward = 2 * matmul_params(config) + attention
    return 3 * forward if training else forward


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def free_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def smoke_threads(args: argparse.Namespace) -> None:
    """--smoke runs on one torch thread: its tiny matmuls would only pay OpenMP's synchronisation
    (badly, on a shared machine). Applied again after caching, whose numba kernels reset the
    process's OpenMP thread count."""
    if args.smoke:
        torch.set_num_threads(1)


def cache_config(teacher: Path, store: Path, out: Path, args: argparse.Namespace, snapshots: str) -> CacheTeacherConfig:
    return CacheTeacherConfig(
        teacher=teacher, tokens=store, out=out, device=args.device, batch_size=args.teacher_batch_size,
        sequences_per_shard=args.sequences, snapshot_layers=snapshots,
    )  # fmt: skip


def measure_teacher(teacher_dir: Path, store_dir: Path, root: Path, args: argparse.Namespace) -> tuple[dict, CacheSummary, dict]:
    """Seconds of the bare forward, forward + sampling, and a cache-teacher shard loop, per repeat; the last summary; peaks."""
    plan = plan_cache(cache_config(teacher_dir, store_dir, root / "unused", args, "none"))
    teacher, encoder = plan.teacher.model, BatchEncoder(plan)
    print(f"teacher: {teacher.info.model_type} on {plan.device}, attention {teacher.model.config._attn_implementation}")
    split = plan.store.split("train")
    batches = [
        (start, split.tokens(start, min(start + args.teacher_batch_size, split.num_sequences)))
        for start in range(0, split.num_sequences, args.teacher_batch_size)
    ]
    chunk = plan.config.position_chunk
    default_config = cache_config(teacher_dir, store_dir, root / "cache", args, "every:4")
    summary: CacheSummary | None = None

    def bare() -> float:
        started = time.perf_counter()
        for _, tokens_BT in batches:
            hidden_BTD = teacher.final_hidden(torch.from_numpy(tokens_BT).to(torch.int64))
            for i in range(hidden_BTD.shape[0]):
                for t0 in range(0, hidden_BTD.shape[1], chunk):
                    teacher.logits(hidden_BTD[i, t0 : t0 + chunk])  # (P, V) float32, dropped
        sync(args.device)
        return time.perf_counter() - started

    def sample() -> float:
        started = time.perf_counter()
        for start, tokens_BT in batches:
            encoder.encode("train", start, tokens_BT)  # ends with the targets on the host
        return time.perf_counter() - started

    def cache_run() -> float:
        nonlocal summary
        shutil.rmtree(default_config.out, ignore_errors=True)
        summary = cache_teacher(default_config, console=Console(file=io.StringIO()))
        return summary.loop_s

    steps: dict[str, Callable[[], float]] = {"bare": bare, "sample": sample, "cache": cache_run}
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    peaks: dict[str, float | None] = {}
    names = list(steps)
    for repeat in range(1 + args.repeats):  # the first is a warm-up (kernels, allocator, numba)
        for name in names[repeat % 3 :] + names[: repeat % 3]:
            sync(args.device)
            reset_peak(args.device)
            elapsed = steps[name]()
            peaks[name] = peak_gib(args.device)
            if repeat:
                seconds[name].append(elapsed)
    assert summary is not None
    return seconds, summary, peaks


def measure_students(cache_dir: Path, root: Path, student_path: Path, args: argparse.Namespace) -> tuple[dict, dict]:
    """Wall seconds per step of every configuration in `GROUPS` and per loader batch; peak memory per group."""
    student = read_config(student_path)
    batches = train.read_batches(cache_dir, args.batch_size)
    ctx = init_distributed(args.device)
    times: dict[str, list[float]] = {}
    peaks: dict[tuple[str, ...], float | None] = {}
    for group in GROUPS:
        trainers = {
            name: train.build_run(
                name, root, cache_dir, ctx, hidden_size=student.hidden_size, plain_config=student_path,
                batch_size=args.batch_size, device=args.device, tie_embeddings=bool(student.tie_word_embeddings),
            )  # fmt: skip
            for name in group
        }
        if "plain_lm" in trainers:
            print(f"plain student attention: {trainers['plain_lm'].module.student.model.config._attn_implementation}")
        steps = {name: (lambda r, t=trainer: t._train_step([batches[r % len(batches)]])) for name, trainer in trainers.items()}
        if "lrc_kd_lm_clone" in group:
            steps["loader"] = train.loader_step(cache_dir, args.batch_size, args.loader_batches)
        reset_peak(args.device)
        measured = train.interleave(steps, rounds=args.rounds, warmup=args.warmup, device=args.device)
        peaks[group] = peak_gib(args.device)
        for name, clocks in measured.items():
            per_call = args.loader_batches if name == "loader" else 1
            times[name] = [s / per_call for s in clocks["wall"]]
        del trainers, steps
        free_memory(args.device)
    return times, peaks


def result_rows(
    teacher_s: dict[str, list[float]], summary: CacheSummary, student_s: dict[str, list[float]],
    teacher_cfg: PretrainedConfig, student_cfg: PretrainedConfig, args: argparse.Namespace,
) -> list[dict[str, object]]:  # fmt: skip
    """Tokens/s, MFU and ratios (of median wall seconds) in the format bench/suite.py collects."""
    peak = args.peak_tflops * 1e12
    teacher_tokens = args.sequences * args.seq_len
    teacher_flops = flops_per_token(teacher_cfg, args.seq_len, training=False)
    student_flops = flops_per_token(student_cfg, args.seq_len, training=True)
    t = {name: statistics.median(values) for name, values in teacher_s.items()}
    s = {name: statistics.median(values) for name, values in student_s.items()}

    row = train.result_row
    rows = []
    for name, label in (("bare", "teacher bare forward (decoder + LM head)"), ("cache", "cache-teacher shard loop, default snapshots")):
        rows.append(row(label, teacher_tokens / t[name], None, "tokens/s"))
        rows.append(row(label, teacher_flops * teacher_tokens / t[name] / peak, None, "MFU"))
    rows += [
        row("cache-teacher forward + rs-kd sampling, no writes / bare forward (wall)", t["sample"] / t["bare"], "<= 1.15", "ratio"),
        row("cache-teacher shard loop, default snapshots / bare forward (wall)", t["cache"] / t["bare"], "<= 1.30", "ratio"),
        row("cache logits on disk", summary.logits_bytes / summary.tokens, "<= 40", "bytes/token"),
        row(
            "cache snapshots on disk (default: every 4th layer, 1/32 of positions)", summary.snapshot_bytes / summary.tokens,
            None, "bytes/token",
        ),
    ]  # fmt: skip
    step_tokens = args.batch_size * args.seq_len
    for name, label in LABELS.items():
        rows.append(row(f"train step {label}", step_tokens / s[name], None, "tokens/s"))
        rows.append(row(f"train step {label}", student_flops * step_tokens / s[name] / peak, None, "MFU"))
    rows += [
        row("train step LRC, KD+LM / LM-only (wall)", s["lrc_kd_lm"] / s["lrc_lm"], "<= 1.10", "ratio"),
        row(
            "train step LRC KD+LM+clone / plain exported arch LM-only (wall)", s["lrc_kd_lm_clone"] / s["plain_lm"],
            "<= 1.25", "ratio",
        ),
        row("loader batches/s / LRC KD+LM+clone steps/s (wall)", s["lrc_kd_lm_clone"] / s["loader"], ">= 5", "ratio"),
    ]  # fmt: skip
    return rows


def parse_args() -> argparse.Namespace:
    modes = argparse.ArgumentParser(add_help=False)
    modes.add_argument("--quick", action="store_true", help=f"fewer sequences and rounds: {QUICK}")
    modes.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, a few steps: the same code paths, no CUDA needed")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], parents=[modes])
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (LRC trains on 2,048)")
    parser.add_argument("--sequences", type=int, default=64, help="sequences in the token store (one cache shard)")
    parser.add_argument("--teacher-batch-size", type=int, default=8, help="sequences per teacher forward")
    parser.add_argument("--batch-size", type=int, default=2, help="sequences per training step (LRC-1.7B: 2 per GPU)")
    parser.add_argument("--repeats", type=int, default=3, help="timed teacher repeats after one warm-up (median)")
    parser.add_argument("--rounds", type=int, default=20, help="timed training rounds per group (median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed training rounds per group")
    parser.add_argument("--loader-batches", type=int, default=4, help="loader batches read per round")
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS, help="the GPU's dense bf16 peak, for MFU")
    parser.add_argument("--json", type=Path, help="write the rows here for bench/suite.py")
    chosen = modes.parse_known_args()[0]
    if chosen.quick:
        parser.set_defaults(**QUICK)
    if chosen.smoke:
        parser.set_defaults(**SMOKE)  # explicit flags still win
    args = parser.parse_args()
    args.device = "cpu" if args.smoke else "cuda"
    return args


def main() -> None:
    args = parse_args()
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("bench/gpu.py: CUDA is not available here; run it on a GPU machine, or pass --smoke for tiny shapes on CPU")
    smoke_threads(args)
    bench_cache = train.load_cache_bench()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kdpipe-bench-gpu-") as tmp:
        root = Path(tmp)
        teacher_path, student_path = TEACHER_CONFIG, STUDENT_CONFIG
        if args.smoke:
            teacher_path, student_path = root / "smoke-teacher.json", root / "smoke-student.json"
            teacher_path.write_text(json.dumps(SMOKE_TEACHER))
            tiny = read_config(teacher_path)
            student_path.write_text(json.dumps(student_config(tiny, SMOKE_STUDENT_WIDTH, head_dim(tiny), True).to_dict(), default=str))
        teacher_cfg, student_cfg = read_config(teacher_path), read_config(student_path)
        check_student_shape(teacher_cfg, student_cfg, student_path)

        teacher_dir, store_dir = root / "teacher", root / "store"
        bench_cache.build_teacher(teacher_dir, teacher_path, args.device, args.seq_len)
        bench_cache.build_store(store_dir, teacher_dir, args.seq_len, args.sequences, teacher_cfg.vocab_size)
        print(f"setup (random teacher saved, token store): {time.perf_counter() - started:.0f} s")
        teacher_s, summary, teacher_peaks = measure_teacher(teacher_dir, store_dir, root, args)
        free_memory(args.device)  # the teacher phase's models, before the students are built
        smoke_threads(args)
        student_s, student_peaks = measure_students(root / "cache", root, student_path, args)
    rows = result_rows(teacher_s, summary, student_s, teacher_cfg, student_cfg, args)

    machine = train.machine_info(args.device)
    print(f"\nkdpipe GPU benchmark{' (smoke: tiny shapes on CPU)' if args.smoke else ''}: {json.dumps(machine)}")
    print(
        f"teacher {teacher_path.name}: {matmul_params(teacher_cfg):,} matmul params; student {student_path.name}: "
        f"{matmul_params(student_cfg):,} matmul params, d_S {student_cfg.hidden_size}; seq {args.seq_len}, "
        f"{args.sequences} sequences, teacher batch {args.teacher_batch_size}, train batch {args.batch_size}; "
        f"teacher median of {args.repeats}, training median of {args.rounds} rounds after {args.warmup}; "
        f"peak {args.peak_tflops} TFLOP/s"
    )  # fmt: skip
    if not args.smoke:
        print("peak GPU memory allocated, GiB: " + json.dumps({
            **{f"teacher {k}": round(v, 1) for k, v in teacher_peaks.items()},
            **{f"students {' + '.join(group)}": round(v, 1) for group, v in student_peaks.items()},
        }))  # fmt: skip
    print("all seconds: " + json.dumps({k: [round(x, 4) for x in v] for k, v in {**teacher_s, **student_s}.items()}))
    result = {"bench": "gpu", "machine": machine, "rows": rows}
    print(suite.markdown_table([result]))
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.json:
        train.write_json(args.json, "gpu", machine, rows)


if __name__ == "__main__":
    main()
