"""`bench/cache.py --backend vllm`: cache-teacher on the vLLM backend against the transformers backend and
against vLLM's bare forward, side by side in one run (run it in the venv that has vLLM: .venv-vllm).

    .venv-vllm/bin/python bench/cache.py --backend vllm --threads 2 --shapes small

Per shape, alternating, best of `--repeats` (shard loops only: loading a teacher is paid once per task):

- vLLM bare forward: `LLM.generate` of one token per sequence over the same batches, kdpipe's hooks
  removed (vLLM computes logits for the last position only, and samples nothing of kdpipe's);
- vLLM forward + rs-kd sampling: the vLLM backend under cache-teacher's `BatchEncoder`, no writer;
- cache-teacher, vllm backend; cache-teacher, transformers backend (both with the default snapshots).

Goals: the vllm backend's cache-teacher at >= 1.5x the transformers backend's tokens/s, and at
<= 1.10x vLLM's bare forward time. Both backends run the same LM head and sampler on the driver,
so the first goal can only be met where the decoder dominates a position's cost.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

from kdpipe.schemas.token_store import TokenStore
from kdpipe.teacher_cache.plan import plan_cache

GOALS = {"vllm cache-teacher / transformers cache-teacher (tokens/s)": ">= 1.5", "vllm cache-teacher / vLLM bare forward (time)": "<= 1.10"}


def vllm_bare_forward(llm, store: Path, args: argparse.Namespace) -> float:
    """vLLM's own prefill over cache-teacher's batches: one generated token per sequence, nothing captured."""
    import vllm

    split = TokenStore.open(store).split("train")
    params = vllm.SamplingParams(max_tokens=1, detokenize=False)
    started = time.perf_counter()
    for start in range(0, split.num_sequences, args.batch_size):
        rows = split.tokens(start, min(start + args.batch_size, split.num_sequences)).tolist()
        llm.generate([vllm.inputs.TokensPrompt(prompt_token_ids=row) for row in rows], params, use_tqdm=False)
    return time.perf_counter() - started


def measure(shape, root: Path, args: argparse.Namespace) -> dict[str, float]:
    """Best-of seconds of the four runs for one shape, and its token count."""
    import cache as bench  # bench/cache.py: its teacher, store and run helpers

    root.mkdir(parents=True, exist_ok=True)
    sequences = args.sequences or (shape.quick_sequences if args.quick else shape.sequences)
    teacher_dir, store_dir = root / "teacher", root / f"store-{args.seq_len}"
    bench.build_teacher(teacher_dir, shape.fields, args.device, args.seq_len)
    vocab = bench.AutoConfig.from_pretrained(teacher_dir).vocab_size
    bench.build_store(store_dir, teacher_dir, args.seq_len, sequences, vocab)
    configs = {
        backend: dataclasses.replace(bench.cache_config(teacher_dir, store_dir, root / f"cache-{backend}", args, "every:4"), backend=backend)
        for backend in ("transformers", "vllm")
    }  # fmt: skip
    encoder_plan = plan_cache(dataclasses.replace(configs["vllm"], out=root / "unused"))
    llm = encoder_plan.teacher.llm
    seconds: dict[str, list[float]] = {"bare": [], "sample": [], "vllm": [], "transformers": []}
    bench.run_cache(configs["transformers"])  # warm-up: numba compiles its kernels on first use
    repeats = args.repeats or (1 if args.quick else 3)
    try:
        for _ in range(repeats):
            llm.collective_rpc("kdpipe_remove_hooks")
            seconds["bare"].append(vllm_bare_forward(llm, store_dir, args))
            encoder_plan.teacher.install_hooks([], ())
            seconds["sample"].append(bench.forward_and_sample(encoder_plan, args))
            for backend, config in configs.items():
                seconds[backend].append(bench.run_cache(config).loop_s)
    finally:
        encoder_plan.teacher.close()
    best = {name: min(values) for name, values in seconds.items()}
    print(f"all seconds: { {name: [round(v, 2) for v in values] for name, values in seconds.items()} }")
    return best | {"tokens": sequences * args.seq_len}


def main(args: argparse.Namespace) -> None:
    import cache as bench

    shapes = [bench.SHAPES[name] for name in args.shapes]
    root = args.workdir or Path(bench.tempfile.mkdtemp(prefix="kdpipe-bench-vllm-"))
    print(f"kdpipe cache-teacher on vLLM vs transformers: torch {torch.__version__}, {args.threads} threads, device {args.device}, "
          f"seq_len {args.seq_len}, batch {args.batch_size}, default snapshots (every:4, 1/32 of positions)")  # fmt: skip
    for shape in shapes:
        best = measure(shape, root / shape.name, args)
        tokens = best["tokens"]
        print(f"\n{shape.name}: {tokens:,} tokens, best of repeats")
        print("| run | s | tokens/s |")
        print("|---|---:|---:|")
        for name, label in (("bare", "vLLM bare forward (generate, 1 token)"), ("sample", "vLLM backend forward + rs-kd sampling, no writes"),
                            ("vllm", "cache-teacher --backend vllm"), ("transformers", "cache-teacher --backend transformers")):  # fmt: skip
            print(f"| {label} | {best[name]:.2f} | {tokens / best[name]:,.0f} |")
        ratios = {
            "vllm cache-teacher / transformers cache-teacher (tokens/s)": best["transformers"] / best["vllm"],
            "vllm cache-teacher / vLLM bare forward (time)": best["vllm"] / best["bare"],
        }
        for name, value in ratios.items():
            print(f"{name}: {value:.2f} (goal {GOALS[name]})")
