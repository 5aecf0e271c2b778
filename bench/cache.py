"""Benchmark `cache-teacher` against the bare teacher forward over the same batches, side by side.

    python bench/cache.py                        # small Llama-shaped teacher on CPU
    python bench/cache.py --config bench/configs/qwen2.5-3b.json --device cuda --peak-tflops 989

Measured in one run, alternating, best of `--repeats`:

- bare forward: `final_hidden` + the LM head over the same position pieces, no sampling, no writes;
- forward + sampling: cache-teacher's `BatchEncoder` alone, no writer (isolates the sampler's cost);
- `cache_teacher` with snapshots off, and with the default snapshots (every:4, 1/32 of positions);
  its shard loop only (`CacheSummary.loop_s`), since loading the teacher is paid once per task.

Wall seconds and process CPU seconds (all threads, the writer's included) are both reported:
on a shared machine wall time moves with other jobs, CPU time much less.

Goals: ratios <= 1.15 (snapshots off) and <= 1.3 (default snapshots). Then bytes per token on
disk and peak memory of a whole run at two sequence lengths, each in its own process, next to
the size a full (B, T, V) float32 logits tensor would have had.

The teacher has random weights; its LM head is scaled so that rs-kd at N=50 draws about 12
unique ids per position, the figure Anshumann et al. report for real teachers, because a
random head gives a near-uniform distribution (~50 unique ids) and unrealistic cache sizes.
The token store is synthetic (random ids), written with the store's own writer.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from kdpipe.schemas.cache_config import CacheTeacherConfig
from kdpipe.schemas.token_store import FORMAT, SCHEMA_VERSION, TokenStore, TokenStoreWriter
from kdpipe.schemas.tokenizer import load_tokenizer, tokenizer_fingerprint
from kdpipe.teacher_cache import cache_stats
from kdpipe.teacher_cache.backend import TeacherModel
from kdpipe.teacher_cache.plan import CachePlan, plan_cache
from kdpipe.teacher_cache.run import BatchEncoder, CacheSummary, cache_teacher
from kdpipe.teacher_cache.sampling import sample_rs_kd

SMALL_LLAMA = dict(
    hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=8000, max_position_embeddings=4096, tie_word_embeddings=False,
)  # fmt: skip
TARGET_UNIQUE_IDS = 12.0  # Anshumann et al. 2025, N=50 on real teachers


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE: the bench feeds random ids, the tokenizer only has to match the store's fingerprint."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(["the teacher runs once and the student trains many times from the cache. " * 50], trainer=trainer)
    eos = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=eos, bos_token=eos, pad_token=eos)


def build_teacher(directory: Path, config_path: Path | None, device: str, seq_len: int) -> None:
    """Random-weight teacher saved with a tokenizer; head scaled to ~12 unique ids per position at N=50."""
    if config_path is None:
        config = LlamaConfig(**SMALL_LLAMA)
    else:
        fields = json.loads(config_path.read_text())
        config = AutoConfig.for_model(fields.pop("model_type"), **fields)
        # Untied so the head can be scaled without touching the embeddings; the matmul FLOPs are the same.
        config.tie_word_embeddings = False
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval().requires_grad_(False)
    ids = torch.randint(0, config.vocab_size, (2, seq_len), device=device)
    with torch.inference_mode():
        hidden_PD = model.get_decoder()(input_ids=ids).last_hidden_state.reshape(-1, config.hidden_size)[:512]
        base_PV = (hidden_PD.float() @ model.get_output_embeddings().weight.float().T)  # (P, V)
        positions = torch.arange(base_PV.shape[0])
        lo, hi = 0.0, 8.0  # log2 of the head scale
        for _ in range(20):  # bisection: larger scale → more peaked → fewer unique ids
            mid = (lo + hi) / 2
            sampled = sample_rs_kd(base_PV * 2.0**mid, num_draws=50, temperature=1.0, seed=0, stream=0, seq_index=positions, position=positions)
            lo, hi = (mid, hi) if sampled.num_entries.float().mean() > TARGET_UNIQUE_IDS else (lo, mid)
        model.get_output_embeddings().weight.mul_(2.0 ** ((lo + hi) / 2))
    model.save_pretrained(directory)
    build_tokenizer().save_pretrained(directory)


def build_store(directory: Path, teacher_dir: Path, seq_len: int, num_sequences: int, vocab_size: int) -> None:
    """A token store of random ids in [0, vocab_size) (synthetic: ids beyond the tiny tokenizer are fine here)."""
    tokenizer = load_tokenizer(teacher_dir)  # as cache-teacher will load it (the class follows the model type)
    writer = TokenStoreWriter(directory, seq_len)
    tokens = np.random.default_rng(0).integers(0, vocab_size, (num_sequences, seq_len), dtype=np.int32)
    writer.append_sequences("train", tokens, np.zeros(num_sequences, dtype=np.int32), np.ones(num_sequences, dtype=np.int64))
    splits = {"train": {"num_sequences": num_sequences, "num_padding": 0}, "val": {"num_sequences": 0, "num_padding": 0}}
    writer.finish({
        "format": FORMAT, "schema_version": SCHEMA_VERSION, "fingerprint": f"bench-{seq_len}-{num_sequences}",
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "vocab_size": vocab_size, "seq_len": seq_len,
        "bos_id": None, "eos_id": tokenizer.eos_token_id, "pad_id": tokenizer.eos_token_id, "splits": splits,
    })  # fmt: skip
    tokenizer.save_pretrained(directory / "tokenizer")


def cache_config(teacher: Path, store: Path, out: Path, args: argparse.Namespace, snapshots: str) -> CacheTeacherConfig:
    return CacheTeacherConfig(
        teacher=teacher, tokens=store, out=out, device=args.device, batch_size=args.batch_size,
        position_chunk=args.position_chunk, sequences_per_shard=args.sequences_per_shard, snapshot_layers=snapshots,
    )  # fmt: skip


def bare_forward(teacher: TeacherModel, store: Path, args: argparse.Namespace) -> float:
    """The teacher's own work over the batches cache-teacher runs: decoder, then the head per sequence piece."""
    split = TokenStore.open(store).split("train")
    chunk, per_shard = args.position_chunk, args.sequences_per_shard
    started = time.perf_counter()
    for shard_start in range(0, split.num_sequences, per_shard):
        shard_stop = min(shard_start + per_shard, split.num_sequences)
        for start in range(shard_start, shard_stop, args.batch_size):
            tokens = split.tokens(start, min(start + args.batch_size, shard_stop))
            hidden_BTD = teacher.final_hidden(torch.from_numpy(tokens).to(torch.int64))
            for i in range(hidden_BTD.shape[0]):
                for t0 in range(0, hidden_BTD.shape[1], chunk):
                    teacher.logits(hidden_BTD[i, t0 : t0 + chunk])
    if teacher.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def forward_and_sample(plan: CachePlan, args: argparse.Namespace) -> float:
    """cache-teacher's compute without the writer: the same `BatchEncoder` calls, results dropped."""
    encoder = BatchEncoder(plan)
    split = plan.store.split("train")
    started = time.perf_counter()
    with encoder.capture or nullcontext():
        for shard in plan.task_shards:
            for start in range(shard.row_start, shard.row_stop, args.batch_size):
                encoder.encode("train", start, split.tokens(start, min(start + args.batch_size, shard.row_stop)))
    return time.perf_counter() - started


def run_cache(config: CacheTeacherConfig) -> CacheSummary:
    shutil.rmtree(config.out, ignore_errors=True)
    return cache_teacher(config, console=Console(file=io.StringIO()))


def memory_child(teacher_dir: Path, store: Path, out: Path, args: argparse.Namespace) -> None:
    """Memory growth of the bare forward and of a default cache-teacher run in this process, as JSON.

    A first run warms imports, numba and the allocator; before each measured step the kernel's
    high-water mark is reset (`clear_refs` 5, Linux) and the CUDA peak statistics, so each peak
    is that step's own, measured against the memory held just before it.
    """
    config = cache_config(teacher_dir, store, out, args, "every:4")
    run_cache(config)
    teacher = TeacherModel.load(teacher_dir, device=args.device)
    cuda = torch.cuda.is_available() and args.device.startswith("cuda")
    result = {}
    for name, step in (("bare", lambda: bare_forward(teacher, store, args)), ("cache", lambda: run_cache(config))):
        baseline = _proc_status_mb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            cuda_baseline = torch.cuda.memory_allocated()
        step()
        result[f"{name}_rss_growth_mb"] = _proc_status_mb("VmHWM") - baseline
        if cuda:
            result[f"{name}_cuda_growth_mb"] = (torch.cuda.max_memory_allocated() - cuda_baseline) / 2**20
    print(json.dumps(result))


def _proc_status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise KeyError(field)


def model_matmul_params(teacher: TeacherModel) -> int:
    """Parameters that take part in a matmul per token: all but an untied input embedding."""
    model = teacher.model
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight
    return total - (embedding.numel() if embedding is not model.get_output_embeddings().weight else 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, help="HF config.json of the teacher shape (default: small Llama, hidden 256, vocab 8000)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--sequences", type=int, default=128, help="sequences per timed run")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--position-chunk", type=int, default=1024)
    parser.add_argument("--sequences-per-shard", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-seq-lens", type=int, nargs=2, default=[256, 1024])
    parser.add_argument("--memory-sequences", type=int, default=32)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--peak-tflops", type=float, help="accelerator peak dense bf16 TFLOP/s, for model FLOP utilisation")
    parser.add_argument("--workdir", type=Path, help="keep teacher, stores and caches here (default: a temp dir)")
    parser.add_argument("--memory-child", nargs=3, type=Path, metavar=("TEACHER", "STORE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(*args.memory_child, args)
        return

    root = args.workdir or Path(tempfile.mkdtemp(prefix="kdpipe-bench-cache-"))
    root.mkdir(parents=True, exist_ok=True)
    teacher_dir, store_dir = root / "teacher", root / f"store-{args.seq_len}"
    build_teacher(teacher_dir, args.config, args.device, args.seq_len)
    teacher = TeacherModel.load(teacher_dir, device=args.device)
    vocab, tokens = teacher.info.vocab_size, args.sequences * args.seq_len
    build_store(store_dir, teacher_dir, args.seq_len, args.sequences, vocab)

    # Wall seconds, and process CPU seconds (all threads: the writer thread's work counts), because
    # wall time on a shared machine moves with other jobs while CPU time mostly does not.
    wall: dict[str, list[float]] = {"bare": [], "sample": [], "off": [], "default": []}
    cpu: dict[str, list[float]] = {name: [] for name in wall}
    summaries: dict[str, CacheSummary] = {}
    configs = {name: cache_config(teacher_dir, store_dir, root / f"cache-{name}", args, spec) for name, spec in (("off", "none"), ("default", "every:4"))}
    plan_cpu = {}  # CPU seconds of the checks and teacher load inside cache_teacher, subtracted below
    for name, config in configs.items():
        started = time.process_time()
        plan_cache(config)
        plan_cpu[name] = time.process_time() - started
    sampling_plan = plan_cache(cache_config(teacher_dir, store_dir, root / "unused", args, "none"))
    run_cache(configs["default"])  # warm-up, untimed: numba compiles its packing kernels on first use
    for _ in range(args.repeats):
        for name, step in (("bare", lambda: bare_forward(teacher, store_dir, args)), ("sample", lambda: forward_and_sample(sampling_plan, args))):
            started = time.process_time()
            wall[name].append(step())
            cpu[name].append(time.process_time() - started)
        for name, config in configs.items():
            started = time.process_time()
            summaries[name] = run_cache(config)
            cpu[name].append(time.process_time() - started - plan_cpu[name])
            wall[name].append(summaries[name].loop_s)
    best = {name: min(values) for name, values in wall.items()}
    best_cpu = {name: min(values) for name, values in cpu.items()}
    stats = cache_stats(root / "cache-default")

    print(f"kdpipe cache-teacher benchmark: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__} with {args.threads} threads, device {teacher.device}, dtype {teacher.dtype}")  # fmt: skip
    print(f"teacher: {teacher.info.model_type}, {teacher.info.num_layers} layers, hidden {teacher.info.hidden_size}, vocab {vocab}, "
          f"{model_matmul_params(teacher) / 1e6:.1f}M matmul params; {args.sequences} sequences x {args.seq_len} = {tokens:,} tokens, "
          f"batch {args.batch_size}, best of {args.repeats} (alternating)")  # fmt: skip
    print("| run | wall s | tokens/s | wall ratio to bare | CPU s | CPU ratio to bare | logits B/token | snapshots B/token |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    rows = (("bare", "bare forward (decoder + LM head)", None), ("sample", "forward + rs-kd sampling, no writes", None),
            ("off", "cache-teacher, snapshots off", 1.15), ("default", "cache-teacher, default snapshots", 1.3))  # fmt: skip
    for name, label, goal in rows:
        sizes = f"{summaries[name].logits_bytes / tokens:.2f} | {summaries[name].snapshot_bytes / tokens:.2f}" if name in summaries else " | "
        goal_text = f" (goal <= {goal})" if goal else ""
        print(f"| {label} | {best[name]:.2f} | {tokens / best[name]:,.0f} | {best[name] / best['bare']:.2f}{goal_text} | "
              f"{best_cpu[name]:.2f} | {best_cpu[name] / best_cpu['bare']:.2f}{goal_text} | {sizes} |")  # fmt: skip
    print(f"unique ids per position: mean {stats.mean_ids_per_position:.2f}, p99 {stats.p99_ids_per_position}; "
          f"teacher mass covered {stats.mean_covered_mass:.3f}")  # fmt: skip
    print(f"all wall seconds: {json.dumps({k: [round(v, 2) for v in vs] for k, vs in wall.items()})}")
    print(f"all CPU seconds: {json.dumps({k: [round(v, 2) for v in vs] for k, vs in cpu.items()})}")
    if args.peak_tflops:
        for name, label in (("bare", "bare forward"), ("default", "cache-teacher, default snapshots")):
            flops_per_s = 2 * model_matmul_params(teacher) * tokens / best[name]
            print(f"model FLOP utilisation (2 x matmul params x tokens/s, attention excluded), {label}: "
                  f"{flops_per_s / 1e12:.1f} TFLOP/s = {100 * flops_per_s / (args.peak_tflops * 1e12):.1f}% of {args.peak_tflops} peak")  # fmt: skip

    print(f"\nmemory growth during a run, each in its own process (batch {args.batch_size}, {args.memory_sequences} sequences, "
          f"position chunk {args.position_chunk}, default snapshots):")  # fmt: skip
    print("| seq_len | bare forward: peak RSS growth MB | cache-teacher: peak RSS growth MB | cache-teacher minus bare MB "
          "| CUDA growth bare / cache MB | a full (B, T, V) fp32 logits tensor MB |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|")
    del teacher, sampling_plan
    for seq_len in args.memory_seq_lens:
        store = root / f"memory-store-{seq_len}"
        if not store.exists():
            build_store(store, teacher_dir, seq_len, args.memory_sequences, vocab)
        child = [sys.executable, __file__, "--device", args.device, "--batch-size", str(args.batch_size),
                 "--position-chunk", str(args.position_chunk), "--sequences-per-shard", str(args.sequences_per_shard),
                 "--threads", str(args.threads), "--memory-child", str(teacher_dir), str(store), str(root / f"memory-cache-{seq_len}")]  # fmt: skip
        result = subprocess.run(child, capture_output=True, text=True, check=True)
        m = json.loads(result.stdout.strip().splitlines()[-1])
        cuda = f"{m['bare_cuda_growth_mb']:.0f} / {m['cache_cuda_growth_mb']:.0f}" if "cache_cuda_growth_mb" in m else "-"
        full = args.batch_size * seq_len * vocab * 4 / 2**20
        print(f"| {seq_len} | {m['bare_rss_growth_mb']:.0f} | {m['cache_rss_growth_mb']:.0f} | "
              f"{m['cache_rss_growth_mb'] - m['bare_rss_growth_mb']:.0f} | {cuda} | {full:.0f} |")  # fmt: skip
    if args.workdir is None:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
