"""The shard-aware streaming loader over a teacher cache: exact, resumable data order.

Data order is a pure function of (seed, epoch, rank, world size, batch size), so a
loader's whole state is one integer, the next batch index (`step`) of this rank:

- Units are the (shard, chunk) pairs of one split, `sequences_per_chunk` rows each (the
  last chunk of a shard may be shorter): a unit is what one Zarr chunk read returns.
- Epoch e permutes all units with `numpy.random.Generator(PCG64(SeedSequence([seed, e])))`.
- Units are dealt round-robin: rank r gets perm[r::world_size]. Rank r's row stream for
  the epoch is its units' rows, concatenated in that order.
- Batch b of rank r is rows [b·B, (b+1)·B) of its stream; a batch may span units.
- Every rank gets the same number of batches per epoch, fixed for the whole run:
  floor(R_min / B), where R_min is the number of rows in the floor(U / world_size)
  smallest units. Each rank holds at least floor(U / world_size) units, so R_min is a
  lower bound on every rank's rows in every epoch (it differs from the exact per-epoch
  minimum only through the shorter last chunks of shards), and global step s is simply
  epoch s // batches_per_epoch, batch s % batches_per_epoch.
- Dropped remainder: each epoch a rank uses only the first batches_per_epoch·B rows of
  its stream; the rest of its stream (its extra unit when U is not a multiple of the
  world size, the slack of short chunks, and the last partial batch) is not seen that
  epoch. The next epoch re-permutes, so different rows are dropped.

`CacheBatches` is a map-style dataset over step indices (a worker only needs the step
to build its batch, so any number of workers yields the same batches), and
`StudentLoader` drives a DataLoader over steps start_step, start_step + 1, … Zarr
groups are opened lazily in each process that reads (never before a fork).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from kdpipe.schemas.errors import KdpipeError
from kdpipe.student_train.losses import IGNORE_INDEX, SparseTargetBatch
from kdpipe.teacher_cache import CachedBatch, CacheShard, TeacherCache


class StudentBatch(NamedTuple):
    """One batch of B cached sequences of length T, as torch tensors (CPU)."""

    input_ids: Tensor  # (B, T) int64
    labels: Tensor  # (B, T) int64: input_ids shifted left, IGNORE_INDEX at the last position
    targets: SparseTargetBatch  # over the B*T flat positions p = i*T + t; ghost (B*T,) or None
    snap_positions: Tensor | None  # (B, K) int64, None without snapshots
    snapshots: dict[int, dict[str, Tensor]]  # layer -> term -> (B, K, d) float32
    step: int  # this batch's index in the rank's stream (the loader resumes after it)
    epoch: int


class _Unit(NamedTuple):
    """Unit table of a split: one entry per (shard, chunk), in shard then chunk order."""

    shard: np.ndarray  # (U,) int64 shard index
    row_start: np.ndarray  # (U,) int64 first row within the shard
    num_rows: np.ndarray  # (U,) int64


def _unit_table(cache: TeacherCache, split: str) -> _Unit:
    shard, row_start, num_rows = [], [], []
    for info in cache.shards(split):
        handle = cache.open_shard(split, info.index)  # lazy: opens no zarr
        for chunk in range(handle.num_chunks):
            start, stop = handle.chunk_rows(chunk)
            shard.append(info.index)
            row_start.append(start)
            num_rows.append(stop - start)
    as_array = lambda values: np.asarray(values, dtype=np.int64)  # noqa: E731
    return _Unit(as_array(shard), as_array(row_start), as_array(num_rows))


def epoch_permutation(seed: int, epoch: int, num_units: int) -> np.ndarray:
    """The unit order of one epoch: a pure function of (seed, epoch)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch]))).permutation(num_units)


def _slice(rows: CachedBatch, start: int, stop: int) -> CachedBatch:
    """Rows [start, stop) of a decoded batch (entry offsets rebased to 0)."""
    if (start, stop) == (0, rows.tokens.shape[0]):
        return rows
    T = rows.tokens.shape[1]
    offsets = rows.target_offsets[start * T : stop * T + 1]  # (n*T+1,)
    first, last = int(offsets[0]), int(offsets[-1])
    return CachedBatch(
        tokens=rows.tokens[start:stop],
        target_ids=rows.target_ids[first:last],
        target_weights=rows.target_weights[first:last],
        target_offsets=offsets - first,
        ghost=None if rows.ghost is None else rows.ghost[start:stop],
        snap_positions=None if rows.snap_positions is None else rows.snap_positions[start:stop],
        snapshots={layer: {term: v[start:stop] for term, v in terms.items()} for layer, terms in rows.snapshots.items()},
    )


def _concat(pieces: list[CachedBatch]) -> CachedBatch:
    """Rows of several reads as one batch; entry offsets are shifted past earlier pieces."""
    if len(pieces) == 1:
        return pieces[0]
    entry_starts = np.cumsum([0] + [p.target_ids.size for p in pieces])
    offsets = np.concatenate([p.target_offsets[:-1] + start for p, start in zip(pieces, entry_starts)] + [entry_starts[-1:]])
    first = pieces[0]
    return CachedBatch(
        tokens=np.concatenate([p.tokens for p in pieces]),
        target_ids=np.concatenate([p.target_ids for p in pieces]),
        target_weights=np.concatenate([p.target_weights for p in pieces]),
        target_offsets=offsets,
        ghost=None if first.ghost is None else np.concatenate([p.ghost for p in pieces]),
        snap_positions=None if first.snap_positions is None else np.concatenate([p.snap_positions for p in pieces]),
        snapshots={
            layer: {term: np.concatenate([p.snapshots[layer][term] for p in pieces]) for term in terms}
            for layer, terms in first.snapshots.items()
        },
    )


def _owned(array: np.ndarray, dtype: torch.dtype) -> Tensor:
    """A tensor with its own memory: batches may be modified in place by the trainer,
    while the arrays they come from may be views of a cached unit."""
    return torch.from_numpy(array).to(dtype, copy=True)


def _student_batch(rows: CachedBatch, step: int, epoch: int) -> StudentBatch:
    input_ids = _owned(rows.tokens, torch.int64)  # (B, T)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = input_ids[:, 1:]  # position t predicts token t+1; the last has no label
    targets = SparseTargetBatch(
        ids=_owned(rows.target_ids, torch.int64),
        weights=_owned(rows.target_weights, torch.float32),
        offsets=_owned(rows.target_offsets, torch.int64),  # (B*T+1,)
        ghost=None if rows.ghost is None else _owned(rows.ghost, torch.float32).reshape(-1),  # (B*T,)
    )
    snap_positions = None if rows.snap_positions is None else _owned(rows.snap_positions, torch.int64)
    snapshots = {
        layer: {term: _owned(values, torch.float32) for term, values in terms.items()}
        for layer, terms in rows.snapshots.items()
    }
    return StudentBatch(input_ids, labels, targets, snap_positions, snapshots, step, epoch)


class CacheBatches(Dataset[StudentBatch]):
    """Rank `rank`'s batches of one split, indexed by step = epoch · batches_per_epoch + batch."""

    def __init__(self, cache: TeacherCache, *, split: str, batch_size: int, seed: int, rank: int, world_size: int) -> None:
        self.cache = cache
        self.split = split
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.units = _unit_table(cache, split)
        num_units = self.units.num_rows.size
        units_per_rank = num_units // world_size
        rows_lower_bound = int(np.sort(self.units.num_rows)[:units_per_rank].sum())
        self.batches_per_epoch = rows_lower_bound // batch_size
        if self.batches_per_epoch == 0:
            raise KdpipeError(
                f"cache {cache.path} split {split!r} has {cache.splits[split]} sequences in {num_units} chunks: too few for "
                f"{world_size} rank(s) × batch size {batch_size}; lower the batch size or cache more sequences"
            )
        self._plan_epoch = -1
        self._plan_units = np.zeros(0, dtype=np.int64)
        self._plan_row_ends = np.zeros(0, dtype=np.int64)
        self._shards: dict[int, CacheShard] = {}
        self._shards_pid = os.getpid()
        self._last_unit: tuple[int, CachedBatch] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_shards"], state["_last_unit"] = {}, None  # each process opens and reads its own
        return state

    def _rank_stream(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's units of `epoch`, in stream order, and the stream row where each ends."""
        if epoch != self._plan_epoch:
            perm = epoch_permutation(self.seed, epoch, self.units.num_rows.size)
            self._plan_units = perm[self.rank :: self.world_size]
            self._plan_row_ends = np.cumsum(self.units.num_rows[self._plan_units])
            self._plan_epoch = epoch
        return self._plan_units, self._plan_row_ends

    def _shard(self, index: int) -> CacheShard:
        if self._shards_pid != os.getpid():  # forked after a read: never reuse the parent's handles
            self._shards, self._shards_pid = {}, os.getpid()
        if index not in self._shards:
            self._shards[index] = self.cache.open_shard(self.split, index)
        return self._shards[index]

    def _read_unit(self, unit: int) -> CachedBatch:
        """All rows of a unit, decoded once and kept until the next unit is needed.

        Zarr decodes whole chunks anyway, and consecutive batches of one process usually
        fall in the same unit when the batch is smaller than a chunk: one read serves them all.
        """
        if self._last_unit is None or self._last_unit[0] != unit:
            start = int(self.units.row_start[unit])
            rows = self._shard(int(self.units.shard[unit])).read(start, start + int(self.units.num_rows[unit]))
            self._last_unit = (unit, rows)
        return self._last_unit[1]

    def __getitem__(self, step: int) -> StudentBatch:
        assert step >= 0, f"step {step}"
        epoch, batch = divmod(step, self.batches_per_epoch)
        units, row_ends = self._rank_stream(epoch)
        first, stop = batch * self.batch_size, (batch + 1) * self.batch_size
        assert stop <= row_ends[-1], "batches_per_epoch exceeds this rank's rows"
        pieces = []
        position = int(np.searchsorted(row_ends, first, side="right"))  # first unit ending after `first`
        while first < stop:
            unit = int(units[position])
            unit_start = int(row_ends[position] - self.units.num_rows[unit])  # stream row of the unit's first row
            take_from, take_to = first - unit_start, min(stop, int(row_ends[position])) - unit_start
            pieces.append(_slice(self._read_unit(unit), take_from, take_to))
            first = unit_start + take_to
            position += 1
        return _student_batch(_concat(pieces), step, epoch)


class _StepSampler(Sampler[int]):
    """Steps start, start + 1, … without end (epochs continue indefinitely)."""

    def __init__(self, start: int) -> None:
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return itertools.count(self.start)


def _single(item: StudentBatch | KdpipeError) -> StudentBatch | KdpipeError:
    """collate_fn: every dataset item is already a whole batch."""
    return item


class _ErrorsAsValues(Dataset[StudentBatch | KdpipeError]):
    """Returns a user error instead of raising it, so the loader re-raises the original
    one-line `KdpipeError` (DataLoader would wrap a worker's error in its traceback text)."""

    def __init__(self, batches: CacheBatches) -> None:
        self.batches = batches

    def __getitem__(self, step: int) -> StudentBatch | KdpipeError:
        try:
            return self.batches[step]
        except KdpipeError as err:
            return err


class StudentLoader:
    """Batches of one rank, in the exact order of the run; `state_dict` resumes it exactly.

    `step` counts the batches this rank has yielded (micro-batches, under gradient
    accumulation). Every rank is at the same step, so the state saved by rank 0 restores
    every rank.
    """

    def __init__(
        self,
        cache: TeacherCache,
        *,
        split: str,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
        num_workers: int = 0,
        prefetch_factor: int = 2,
        persistent_workers: bool = True,
        pin_memory: bool = False,
    ) -> None:
        """`batch_size` is sequences per rank per batch; worker options are passed to the DataLoader."""
        if batch_size < 1:
            raise KdpipeError(f"batch size {batch_size} must be >= 1: fix the batch_size option")
        if not 0 <= rank < world_size:
            raise KdpipeError(f"rank {rank} is outside world size {world_size}: launch with torchrun or fix rank/world_size")
        if seed < 0:
            raise KdpipeError(f"data seed {seed} must be >= 0: fix the seed option")
        if num_workers < 0 or prefetch_factor < 1:
            raise KdpipeError(f"loader num_workers {num_workers} must be >= 0 and prefetch_factor {prefetch_factor} >= 1")
        if start_step < 0:
            raise KdpipeError(f"loader start step {start_step} must be >= 0")
        cache.shards(split)  # a missing split is a KdpipeError naming the splits the cache has
        cache.require_complete()
        self.cache = cache
        self.dataset = CacheBatches(cache, split=split, batch_size=batch_size, seed=seed, rank=rank, world_size=world_size)
        self._next_step = start_step
        self._sampler = _StepSampler(start_step)
        workers = dict(prefetch_factor=prefetch_factor, persistent_workers=persistent_workers) if num_workers else {}
        self._loader = DataLoader(
            _ErrorsAsValues(self.dataset), batch_size=None, sampler=self._sampler, num_workers=num_workers,
            collate_fn=_single, pin_memory=pin_memory, **workers,
        )  # fmt: skip

    @property
    def step(self) -> int:
        """The step of the next batch this loader will yield."""
        return self._next_step

    @property
    def epoch(self) -> int:
        """The epoch of the next batch."""
        return self._next_step // self.batches_per_epoch

    @property
    def batches_per_epoch(self) -> int:
        """Batches every rank yields per epoch (see the module docstring for the dropped rows)."""
        return self.dataset.batches_per_epoch

    @property
    def tokens_per_batch(self) -> int:
        """Token positions in one batch of this rank (B · T)."""
        return self.dataset.batch_size * self.cache.seq_len

    def __iter__(self) -> Iterator[StudentBatch]:
        """Yield batches from the current step on, forever; re-iterating continues where the last stopped."""
        self._sampler.start = self._next_step
        for batch in self._loader:
            if isinstance(batch, KdpipeError):
                raise batch
            assert batch.step == self._next_step, f"loader yielded step {batch.step}, expected {self._next_step}"
            self._next_step = batch.step + 1
            yield batch

    def close(self) -> None:
        """Stop the worker processes now (iterating again starts new ones).

        A run that ends in an error keeps its frames, and so this loader, alive in the
        traceback; the workers have the stop signals blocked (see `Trainer._next_batches`), so
        the interpreter's exit, which terminates them with SIGTERM and joins them, would hang.
        """
        iterator = self._loader._iterator  # DataLoader keeps the iterator of persistent workers here
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self._loader._iterator = None

    def state_dict(self) -> dict[str, Any]:
        """JSON-able position of the loader and what it depends on."""
        d = self.dataset
        return {
            "step": self._next_step,
            "seed": d.seed,
            "world_size": d.world_size,
            "rank": d.rank,
            "batch_size": d.batch_size,
            "cache_fingerprint": self.cache.manifest.fingerprint,
            "split": d.split,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at the saved step; refuse a state from another cache or data layout."""
        ours = self.state_dict()
        if state["cache_fingerprint"] != ours["cache_fingerprint"]:
            raise KdpipeError(
                f"run was started on cache with fingerprint {state['cache_fingerprint'][:16]}, this cache "
                f"({self.cache.path}) is {ours['cache_fingerprint'][:16]}; resume with the original cache or start a new run"
            )
        for key in ("split", "seed", "world_size", "batch_size"):
            if state[key] != ours[key]:
                raise KdpipeError(
                    f"run was started with loader {key} {state[key]!r}, this run has {ours[key]!r}: the data order "
                    f"would change; resume with {key} {state[key]!r} or start a new run"
                )
        self._next_step = int(state["step"])
