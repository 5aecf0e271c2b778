"""The `cache-teacher` config: which teacher, which token store, how to sample, what to snapshot.

Everything that decides the cache's content (sampler, snapshots, seed, shard geometry) is
recorded in the manifest. The task slot and batch size decide only which shards this process
writes and how fast; position chunk, device, dtype and backend may change float rounding (see
kdpipe.teacher_cache.run), so keep them fixed within one cache.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Literal

from kdpipe.schemas.config import option, required
from kdpipe.schemas.errors import KdpipeError

SamplerMode = Literal["rs-kd", "top-k", "top-p-k"]


@dataclasses.dataclass(kw_only=True, slots=True)
class CacheTeacherConfig:
    """Options of `kdpipe cache-teacher`."""

    teacher: Path = required("Teacher model directory (a local Hugging Face causal LM with its tokenizer).")
    tokens: Path = required("Token store directory written by `kdpipe prepare-data` with the teacher's tokenizer.")
    out: Path = required("Cache directory to create or resume.")
    mode: SamplerMode = option("rs-kd", "Sparse target mode: rs-kd (unbiased sampling), top-k or top-p-k (biased baselines).")
    num_draws: int = option(50, "rs-kd: draws with replacement per position (N).")
    temperature: float = option(1.0, "Softmax temperature of the teacher distribution that is sampled or truncated.")
    top_k: int = option(50, "top-k / top-p-k: most probable ids kept per position (k).")
    top_p: float = option(0.95, "top-p-k: smallest most-probable prefix reaching this mass, before the top-k cap.")
    ghost: bool = option(True, "top-k / top-p-k: store the leftover probability mass per position as a ghost bucket.")
    snapshot_layers: str = option(
        "every:4",
        "Layers whose FFN input (and optionally output) is snapshotted: 'none', 'all', 'every:N', "
        "or layers/ranges like '0,5,-1' or '2-5'.",
    )
    snapshot_fraction: float = option(0.03125, "Fraction of positions per sequence that get snapshots (same positions for all layers).")
    snapshot_dtype: Literal["bf16", "fp8"] = option("bf16", "Snapshot storage: bf16 bits, or fp8 e4m3 with a per-vector scale.")
    snapshot_ffn_output: bool = option(
        False,
        "Also store the FFN output of the selected layers (by default the trainer recomputes it from the FFN input "
        "and the teacher weights, which halves the snapshot bytes).",
    )
    snapshot_attention: bool = option(False, "Also snapshot the attention input and output of the selected layers.")
    seed: int = option(0, "Sampler seed (rs-kd draws are keyed by seed, split, sequence and position).")
    batch_size: int = option(8, "Sequences per teacher forward (speed and memory; on CPU the cache bytes do not depend on it).")
    position_chunk: int = option(
        1024, "Positions per LM-head/sampler chunk, bounding logits memory; keep it fixed within a cache (float rounding)."
    )
    sequences_per_shard: int = option(256, "Consecutive sequences per shard (the unit of resume and of Slurm task work).")
    sequences_per_chunk: int = option(32, "Sequences per Zarr chunk inside a shard (the student loader's unit).")
    shard_index: int | None = option(None, "This task's index i (takes shards i, i+n, ...); default SLURM_ARRAY_TASK_ID or 0.")
    num_shards: int | None = option(None, "Number of tasks n sharing the work; default SLURM_ARRAY_TASK_COUNT or 1.")
    device: str = option("auto", "Torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", "Teacher compute dtype: auto is bfloat16 on GPU and float32 on CPU."
    )
    backend: Literal["transformers", "vllm"] = option(
        "transformers",
        "Teacher backend: transformers (one device) or vllm (tensor parallel; needs vLLM installed). Caches are interchangeable.",
    )
    tensor_parallel_size: int = option(1, "vllm: GPUs the teacher is split over (tensor parallelism).")
    gpu_memory_utilization: float = option(
        0.85, "vllm: fraction of each GPU's memory vLLM may take; the rest holds kdpipe's LM head and sampler buffers."
    )
    splits: list[str] | None = option(None, "Token-store splits to cache (default: all of them).")
    overwrite: bool = option(False, "Delete a cache of another teacher/config found at --out and start afresh.")
    repair: bool = option(False, "Re-verify the checksums of complete shards and redo the bad ones.")
    dry_run: bool = option(False, "Print the plan (shards, bytes per token, total bytes, device) and compute nothing.")

    def __post_init__(self) -> None:
        positive = {
            "num_draws": self.num_draws,
            "top_k": self.top_k,
            "batch_size": self.batch_size,
            "position_chunk": self.position_chunk,
            "sequences_per_shard": self.sequences_per_shard,
            "sequences_per_chunk": self.sequences_per_chunk,
        }
        for name, value in positive.items():
            if value < 1:
                raise KdpipeError(f"cache-teacher option {name}={value} must be >= 1")
        if not 0 < self.temperature < math.inf:  # inf would make every target uniform, NaN every target NaN
            raise KdpipeError(f"cache-teacher option temperature={self.temperature} must be a finite number > 0")
        if not 0.0 < self.top_p <= 1.0:
            raise KdpipeError(f"cache-teacher option top_p={self.top_p} must be in (0, 1]")
        if not 0.0 < self.snapshot_fraction <= 1.0:
            raise KdpipeError(
                f"cache-teacher option snapshot_fraction={self.snapshot_fraction} must be in (0, 1]; "
                "use snapshot_layers 'none' for no snapshots"
            )
        if self.tensor_parallel_size < 1:
            raise KdpipeError(f"cache-teacher option tensor_parallel_size={self.tensor_parallel_size} must be >= 1")
        if self.tensor_parallel_size > 1 and self.backend != "vllm":
            raise KdpipeError("cache-teacher option tensor_parallel_size > 1 needs backend 'vllm'")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise KdpipeError(
                f"cache-teacher option gpu_memory_utilization={self.gpu_memory_utilization} must be in (0, 1]"
            )
        if not 0 <= self.seed < 2**32:
            raise KdpipeError(f"cache-teacher option seed={self.seed} must be in [0, 2^32)")

    def task_slot(self) -> tuple[int, int]:
        """(shard_index, num_shards) of this process: flags, else the Slurm array environment, else (0, 1)."""
        index, count = self.shard_index, self.num_shards
        if index is None:
            # Arrays may start anywhere (--array=1-8): the slot is the id minus the array's first id.
            index = _env_int("SLURM_ARRAY_TASK_ID", 0) - _env_int("SLURM_ARRAY_TASK_MIN", 0)
        if count is None:
            count = _env_int("SLURM_ARRAY_TASK_COUNT", 1)
        if count < 1 or not 0 <= index < count:
            raise KdpipeError(f"shard index {index} of {count} tasks is out of range: need 0 <= shard_index < num_shards")
        return index, count


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise KdpipeError(f"environment variable {name}={value!r} is not an integer") from None
