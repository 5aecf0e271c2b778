"""The `cache-teacher` run loop: teacher forward → position-chunked sampling → shard writer.

Per batch of sequences: the decoder runs once (`final_hidden`, with snapshot hooks), then
the LM head and the sampler run over chunks of at most `position_chunk` positions, so the
(B, T, V) logits never exist; only the sparse targets move to the host, and a writer
thread packs, compresses and writes them while the teacher computes the next batch.

What is stored for a sequence does not depend on which task wrote it or how many tasks
there are: batches start at each shard's first row, so every task sees the same batches.
Nor on `batch_size`, as long as BLAS gives a row the same result whatever the matrix
height: the decoder on CPU does at usual sequence lengths (tested), and the LM head is
applied to pieces of one sequence at a time, whose shapes depend on the sequence length
and `position_chunk` only, never on the batch. `position_chunk` itself changes those shapes
and may change the last bits of the logits (so of the recorded covered mass, very rarely a
draw), like the device and dtype do: keep them fixed within one cache. cuBLAS may pick other
kernels for other batch shapes: on GPU keep one `batch_size` for all tasks of a cache too.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from kdpipe.schemas import cache_format as cf
from kdpipe.schemas.cache_config import CacheTeacherConfig
from kdpipe.schemas.config import write_resolved
from kdpipe.schemas.errors import KdpipeError
from kdpipe.schemas.out_dir import free_bytes, is_disk_full
from kdpipe.teacher_cache.plan import CachePlan, TaskShard, plan_cache
from kdpipe.teacher_cache.sampling import SparseTargets, sample_rs_kd, select_top_k, select_top_p_k
from kdpipe.teacher_cache.snapshots import encode_bf16, encode_fp8, snapshot_positions
from kdpipe.teacher_cache.writer import BackgroundShardWriter, EncodedBatch, fixed_point_mass_sum, write_manifest

# Top-level shard entries per reported category, as `kdpipe inspect` splits them.
_LOGITS_TOPS = (cf.NUM_ENTRIES, cf.SEQ_ENTRY_OFFSETS, cf.ENTRIES, cf.GHOST)
_SNAPSHOT_TOPS = (cf.SNAP_POSITIONS, cf.SNAP_GROUP)


@dataclasses.dataclass(kw_only=True)
class CacheSummary:
    """What one `cache-teacher` process did."""

    out: Path
    device: str
    dry_run: bool
    shards_written: int  # by this process (repaired ones included)
    shards_repaired: int  # complete shards that failed their checksums and were redone
    shards_skipped: int  # already complete
    shards_taken: int  # completed by another process while this one was writing them (its copy was discarded)
    sequences: int  # written by this process
    tokens: int
    logits_bytes: int  # on disk, of the shards written by this process
    snapshot_bytes: int
    token_id_bytes: int
    wall_s: float  # the whole call: checks, teacher load, shard loop
    loop_s: float  # the shard loop alone: forward, sampling, writing (what scales with the corpus)

    def describe(self) -> str:
        """The paragraph printed at the end of a run."""
        if self.dry_run:
            return "dry run: nothing computed or written."
        per_token = max(self.tokens, 1)
        taken = f", {self.shards_taken} completed meanwhile by another process" if self.shards_taken else ""
        repaired = f" ({self.shards_repaired} repaired)" if self.shards_repaired else ""
        return (
            f"cache-teacher wrote {self.shards_written} shards{repaired} to {self.out} and skipped "
            f"{self.shards_skipped} already complete{taken}: {self.sequences:,} sequences, {self.tokens:,} tokens in "
            f"{self.wall_s:.1f} s ({self.tokens / max(self.wall_s, 1e-9):,.0f} tokens/s) on {self.device}; bytes per token "
            f"on disk: logits {self.logits_bytes / per_token:.2f}, snapshots {self.snapshot_bytes / per_token:.2f}, "
            f"token ids {self.token_id_bytes / per_token:.2f}."
        )


def cache_teacher(config: CacheTeacherConfig, *, console: Console | None = None) -> CacheSummary:
    """Write this task's shards of the cache `config` describes (or only print the plan with dry_run)."""
    console = console or Console()
    started = time.perf_counter()
    plan = plan_cache(config)
    console.print(plan.describe(), highlight=False, soft_wrap=True)
    summary = CacheSummary(
        out=Path(config.out), device=plan.device, dry_run=config.dry_run, shards_written=0, shards_repaired=0,
        shards_skipped=len(plan.complete), shards_taken=0, sequences=0, tokens=0, logits_bytes=0,
        snapshot_bytes=0, token_id_bytes=0, wall_s=0.0, loop_s=0.0,
    )  # fmt: skip
    if config.dry_run:
        plan.teacher.close()
        return summary
    try:
        _write_cache(plan, summary, console)
    except OSError as err:
        if not is_disk_full(err):
            raise
        raise _disk_full_error(plan, summary) from None
    finally:
        plan.teacher.close()
    summary.wall_s = time.perf_counter() - started
    console.print(summary.describe(), highlight=False, soft_wrap=True)
    return summary


def _write_cache(plan: CachePlan, summary: CacheSummary, console: Console) -> None:
    """Manifest, config, --repair's discards, then this task's pending shards (`summary` counts them as they complete)."""
    config, out = plan.config, Path(plan.config.out)
    if plan.out_state == "replace":
        shutil.rmtree(out)
    write_manifest(out, plan.manifest)
    _write_config(config, out)
    todo = plan.pending
    if config.repair:
        bad = [shard for shard, _ in plan.repairs]  # verified once, by plan_cache
        for shard in bad:
            console.print(f"repair: shard {shard.name} fails verification; redoing it", highlight=False)
            _discard_shard(out, shard)
        summary.shards_repaired = len(bad)
        summary.shards_skipped -= len(bad)
        order = {shard: i for i, shard in enumerate(plan.task_shards)}
        todo = sorted(todo + bad, key=order.__getitem__)
    for shard in plan.task_shards:
        _remove_stale_tmp_dirs(out, shard)
    loop_started = time.perf_counter()
    _write_shards(plan, todo, summary, console)
    summary.loop_s = time.perf_counter() - loop_started


def _disk_full_error(plan: CachePlan, summary: CacheSummary) -> KdpipeError:
    """One line for a full disk (or quota): what is free, what is left, and that a re-run resumes.

    The writer has already removed the unfinished shard's tmp dir; complete shards stay valid.
    The space still needed is extrapolated from the shards this run completed, when there are any.
    """
    out = Path(plan.config.out)
    free = free_bytes(out)
    left = len(plan.pending) + summary.shards_repaired - summary.shards_written - summary.shards_taken
    need = ""
    if summary.shards_written:
        per_shard = (summary.logits_bytes + summary.snapshot_bytes + summary.token_id_bytes) / summary.shards_written
        need = f" (about {round(per_shard * left):,} bytes, by the size of the shards written so far)"
    return KdpipeError(
        f"out of disk space (or quota) writing the teacher cache {out}: {free:,} bytes free, "
        f"{left} of this task's shards still to write{need}; free space and re-run the same command, "
        "which keeps the complete shards and resumes"
    )


def _write_shards(plan: CachePlan, todo: list[TaskShard], summary: CacheSummary, console: Console) -> None:
    out, manifest, batch_size = Path(plan.config.out), plan.manifest, plan.config.batch_size
    seq_len = manifest.token_store.seq_len
    encoder = BatchEncoder(plan)
    columns = (
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("sequences"),
        TextColumn("{task.fields[tokens_per_s]:>10,.0f} tokens/s"), TimeElapsedColumn(), TimeRemainingColumn(),
    )  # fmt: skip
    with encoder.capturing(), Progress(*columns, console=console) as progress:
        bar = progress.add_task("cache-teacher", total=sum(s.row_stop - s.row_start for s in todo), tokens_per_s=0.0)
        started = time.perf_counter()
        for shard in todo:
            progress.update(bar, description=f"shard {shard.name}")
            split = plan.store.split(shard.split)
            with BackgroundShardWriter(out, manifest, shard.split, shard.index, shard.row_start, shard.row_stop) as writer:
                for start in range(shard.row_start, shard.row_stop, batch_size):
                    stop = min(start + batch_size, shard.row_stop)
                    writer.append(encoder.encode(shard.split, start, split.tokens(start, stop)))
                    summary.sequences += stop - start
                    summary.tokens += (stop - start) * seq_len
                    progress.update(bar, advance=stop - start, tokens_per_s=summary.tokens / (time.perf_counter() - started))
                won = writer.finalize()
            summary.shards_written += won
            summary.shards_taken += not won
            if won:
                _add_shard_bytes(cf.shard_dir(out, shard.split, shard.index), summary)


class BatchEncoder:
    """Turns a batch of token sequences into the host-side `EncodedBatch` the shard writer takes."""

    def __init__(self, plan: CachePlan) -> None:
        self.teacher = plan.teacher
        self.manifest = plan.manifest
        self.position_chunk = plan.config.position_chunk
        self.count_dtype = np.dtype(plan.manifest.layout.count_dtype)
        self._where = f"token store {plan.config.tokens}"

    def capturing(self) -> AbstractContextManager[None]:
        """The teacher's snapshot hooks, installed for the `with` block (nothing when the cache has no snapshots)."""
        snapshot = self.manifest.snapshot
        return self.teacher.capturing(snapshot.layers, snapshot.terms) if snapshot.layers else nullcontext()

    def encode(self, split: str, row_start: int, tokens_BT: np.ndarray) -> EncodedBatch:
        """Targets (and snapshots) of sequences `row_start, row_start + 1, ...` of `split`."""
        m = self.manifest
        b, seq_len = tokens_BT.shape
        vocab_size = m.teacher.vocab_size
        if tokens_BT.size and (int(tokens_BT.min()) < 0 or int(tokens_BT.max()) >= vocab_size):
            raise KdpipeError(
                f"{self._where} split {split} sequences {row_start}..{row_start + b - 1} hold token ids outside "
                f"[0, {vocab_size}), the teacher's LM head; re-run prepare-data with the teacher's tokenizer"
            )
        stream = cf.SPLIT_STREAMS[split]
        seq_index_B = torch.arange(row_start, row_start + b, dtype=torch.int64)
        snap_positions_BK = None
        with torch.inference_mode():
            if m.snapshot.layers:
                snap_positions_BK = snapshot_positions(
                    seed=m.sampler.seed, stream=stream, seq_index=seq_index_B, seq_len=seq_len, fraction=m.snapshot.fraction
                )
            hidden_BTD, captured = self.teacher.forward(torch.from_numpy(tokens_BT).to(torch.int64), snap_positions_BK)
            targets = self._sparse_targets(hidden_BTD, stream, row_start)
        snapshots: dict[int, dict[str, np.ndarray]] = {}
        scales: dict[int, dict[str, np.ndarray]] = {}
        if snap_positions_BK is not None:
            for layer, terms in captured.items():
                for term, x_BKD in terms.items():
                    if m.snapshot.dtype == "bf16":
                        snapshots.setdefault(layer, {})[term] = encode_bf16(x_BKD)  # (b, K, d) uint16
                    else:
                        codes, scale = encode_fp8(x_BKD)  # (b, K, d) uint8, (b, K) float32
                        snapshots.setdefault(layer, {})[term] = codes
                        scales.setdefault(layer, {})[term] = scale
        ghost = targets.ghost.reshape(b, seq_len).numpy().astype(np.float16) if targets.ghost is not None else None
        return EncodedBatch(
            tokens=np.ascontiguousarray(tokens_BT, dtype=np.int32),
            num_entries=targets.num_entries.reshape(b, seq_len).numpy().astype(self.count_dtype),
            entry_ids=targets.ids.numpy(),
            entry_values=targets.values.numpy(),
            ghost=ghost,
            covered_mass_sum=fixed_point_mass_sum(targets.covered_mass.numpy()),
            snap_positions=None if snap_positions_BK is None else snap_positions_BK.numpy().astype(np.int32),
            snapshots=snapshots,
            snapshot_scales=scales,
        )

    def _sparse_targets(self, hidden_BTD: torch.Tensor, stream: int, row_start: int) -> SparseTargets:
        """LM head + sampler over groups of at most `position_chunk` positions → targets on the host.

        The head runs on pieces of a single sequence (shape set by seq_len and the chunk,
        never by the batch), copied into one (P, V) buffer per group when sequences are
        shorter than the chunk.
        """
        b, seq_len, _ = hidden_BTD.shape
        chunk = self.position_chunk
        pieces = [(i, t0, min(t0 + chunk, seq_len)) for i in range(b) for t0 in range(0, seq_len, chunk)]
        groups: list[list[tuple[int, int, int]]] = []
        rows = chunk
        for piece in pieces:
            if rows + piece[2] - piece[1] > chunk:
                groups.append([])
                rows = 0
            groups[-1].append(piece)
            rows += piece[2] - piece[1]
        results = []
        for group in groups:
            if len(group) == 1:
                i, t0, t1 = group[0]
                logits_PV = self.teacher.logits(hidden_BTD[i, t0:t1])  # (P, V) float32
            else:
                num_rows = sum(t1 - t0 for _, t0, t1 in group)
                logits_PV = torch.empty(num_rows, self.manifest.teacher.vocab_size, dtype=torch.float32, device=hidden_BTD.device)
                row = 0
                for i, t0, t1 in group:
                    logits_PV[row : row + t1 - t0] = self.teacher.logits(hidden_BTD[i, t0:t1])
                    row += t1 - t0
            seq_index_P = torch.cat([torch.full((t1 - t0,), row_start + i, dtype=torch.int64) for i, t0, t1 in group])
            position_P = torch.cat([torch.arange(t0, t1, dtype=torch.int64) for _, t0, t1 in group])
            results.append(self._sample(logits_PV, stream, seq_index_P, position_P))
            del logits_PV
        ghost = None if results[0].ghost is None else torch.cat([r.ghost for r in results]).cpu()
        return SparseTargets(
            ids=torch.cat([r.ids for r in results]).cpu(),
            values=torch.cat([r.values for r in results]).cpu(),
            num_entries=torch.cat([r.num_entries for r in results]).cpu(),
            covered_mass=torch.cat([r.covered_mass for r in results]).cpu(),
            ghost=ghost,
        )

    def _sample(self, logits_PV: torch.Tensor, stream: int, seq_index_P: torch.Tensor, position_P: torch.Tensor) -> SparseTargets:
        s = self.manifest.sampler
        if s.mode == "rs-kd":
            return sample_rs_kd(
                logits_PV, num_draws=s.num_draws, temperature=s.temperature, seed=s.seed, stream=stream,
                seq_index=seq_index_P, position=position_P,
            )  # fmt: skip
        if s.mode == "top-k":
            return select_top_k(logits_PV, k=s.top_k, temperature=s.temperature, ghost=s.ghost)
        return select_top_p_k(logits_PV, p=s.top_p, k=s.top_k, temperature=s.temperature, ghost=s.ghost)


def _write_config(config: CacheTeacherConfig, out: Path) -> None:
    """CACHE/config.yaml: the options that decide the cache, re-loadable with --config to resume it.

    Task slot and one-off actions are left out, so every task of an array writes the same file;
    paths are made absolute so the file works from any directory.
    """
    shared = dataclasses.replace(
        config, teacher=Path(config.teacher).resolve(), tokens=Path(config.tokens).resolve(), out=out.resolve(),
        shard_index=None, num_shards=None, overwrite=False, repair=False, dry_run=False,
    )  # fmt: skip
    tmp = out / f"{cf.TMP_PREFIX}{cf.CONFIG_FILE}-{os.getpid()}"
    try:
        write_resolved(shared, tmp)
        os.replace(tmp, out / cf.CONFIG_FILE)
    finally:
        tmp.unlink(missing_ok=True)  # a write that failed (full disk) leaves no tmp file behind


def _discard_shard(out: Path, shard: TaskShard) -> None:
    """Move a bad complete shard aside (atomic for concurrent readers), then delete it."""
    aside = cf.new_tmp_shard_dir(out, shard.split, shard.index)
    os.rename(cf.shard_dir(out, shard.split, shard.index), aside)
    shutil.rmtree(aside)


def _remove_stale_tmp_dirs(out: Path, shard: TaskShard) -> None:
    """In-progress dirs a killed run of this task left behind (this task is the only writer of its shards)."""
    root = cf.shards_root(out, shard.split)
    if root.is_dir():
        for path in root.iterdir():
            if cf.tmp_shard_index(path.name) == shard.index:
                shutil.rmtree(path, ignore_errors=True)


def _add_shard_bytes(directory: Path, summary: CacheSummary) -> None:
    """Add a written shard's file sizes to the summary, split as `kdpipe inspect` splits them."""
    for path in directory.rglob("*"):
        if not path.is_file():
            continue
        top = path.relative_to(directory).parts[0]
        size = path.stat().st_size
        if top == cf.TOKENS:
            summary.token_id_bytes += size
        elif top in _SNAPSHOT_TOPS:
            summary.snapshot_bytes += size
        elif top in _LOGITS_TOPS:
            summary.logits_bytes += size
