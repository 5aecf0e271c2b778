"""Write teacher-cache shards: one Zarr v3 group per shard, made whole before it gets its name.

A `ShardWriter` owns a private tmp directory (`.tmp-{index}-{pid}-{rand}`), appends encoded
batches of consecutive sequences to it, and on `finalize` writes `complete.json` (row range,
entry counts, crc32c of every file) and renames the directory into place. `os.rename` onto a
complete shard fails, so when two writers race for one shard exactly one wins and the other
discards its copy; nothing is ever written into a directory another writer uses.

Shard arrays (n sequences of length T, K snapshot positions of width d; see cache_format):
  tokens (n, T) int32 | num_entries (n, T) uint8/uint16 | seq_entry_offsets (n+1,) int64
  entries (E, bytes_per_entry) uint8 (ids delta-coded per position) | ghost (n, T) float16 | snap_positions (n, K) int32
  snap/{layer}/{term} (n, K, d) uint16 bf16 bits or uint8 fp8 codes | {term}_scale (n, K) float32

Bytes depend only on content, never on batch size: rows are buffered and each chunk of
`sequences_per_chunk` rows (and each `entries_per_chunk` slice of entries) is encoded exactly
once, when it is full or at finalize.

`entries` chunks are stored transposed (a zarr TransposeCodec): byte b of every record of a
chunk, then byte b+1, ... With ids delta-coded within each position, each such plane is a
regular stream (small gaps, their high bytes mostly zero, counts) that zstd compresses well;
a higher zstd level pays off there (measured on a real teacher: bench/entry_layouts.py) and
still compresses far faster than a teacher produces entries.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import queue
import shutil
import threading
from pathlib import Path
from types import TracebackType
from typing import NamedTuple

import numpy as np
import zarr
from zarr.codecs import TransposeCodec, ZstdCodec

from kdpipe.schemas import cache_format as cf
from kdpipe.schemas.cache_format import CacheManifest, ShardRecord
from kdpipe.schemas.checksums import file_checksums
from kdpipe.schemas.errors import KdpipeError
from kdpipe.teacher_cache.packing import EntryLayout, delta_code_ids, pack_entries

# zstd's frame checksum makes a flipped bit in a chunk fail loudly on read, not decode to noise.
_COMPRESSOR = ZstdCodec(level=3, checksum=True)
_ENTRY_COMPRESSOR = ZstdCodec(level=12, checksum=True)
# Covered mass is summed in fixed point so that the shard total is exact and therefore the
# same whichever batches the positions arrived in (float sums depend on grouping).
_MASS_SCALE = 1 << 24


class EncodedBatch(NamedTuple):
    """Host-side targets of consecutive sequences of one shard, in order."""

    tokens: np.ndarray  # (b, T) int32
    num_entries: np.ndarray  # (b, T) count dtype: sparse entries per position
    entry_ids: np.ndarray  # (E,) int64, position-major
    entry_values: np.ndarray  # (E,) int32 counts (rs-kd) | float32 probabilities (top-k modes)
    ghost: np.ndarray | None  # (b, T) float16, top-k modes with ghost only
    covered_mass_sum: float  # fixed_point_mass_sum of the batch's per-position covered mass
    snap_positions: np.ndarray | None  # (b, K) int32, when snapshot layers are non-empty
    snapshots: dict[int, dict[str, np.ndarray]]  # layer -> term -> (b, K, d) uint16 bf16 | uint8 fp8 bits
    snapshot_scales: dict[int, dict[str, np.ndarray]]  # layer -> term -> (b, K) float32, fp8 only


def fixed_point_mass_sum(covered_mass: np.ndarray) -> float:
    """Sum of per-position covered masses on a 2^-24 grid: exact, so independent of batching."""
    scaled = np.rint(np.asarray(covered_mass, dtype=np.float64) * _MASS_SCALE).astype(np.int64)
    return int(scaled.sum()) / _MASS_SCALE


def entry_layout_of(manifest: CacheManifest) -> EntryLayout:
    """The packing layout recorded in a manifest."""
    entry = manifest.layout.entry
    assert entry.value_kind in ("count", "float16"), f"unknown entry value kind {entry.value_kind!r}"
    return EntryLayout(entry.id_bits, entry.value_bits, entry.value_kind, entry.bytes_per_entry)  # type: ignore[arg-type]


class _RowArray:
    """A (n, ...) zarr array filled front to back, one whole chunk of rows per write."""

    def __init__(self, array: zarr.Array, chunk_rows: int) -> None:
        self.array = array
        self.chunk_rows = chunk_rows
        self.rows_written = 0
        self.pending: list[np.ndarray] = []
        self.pending_rows = 0

    def push(self, rows: np.ndarray) -> None:
        self.pending.append(np.array(rows, copy=True))  # the caller may reuse its buffers after append
        self.pending_rows += rows.shape[0]
        if self.pending_rows >= self.chunk_rows:
            self._write(self.pending_rows - self.pending_rows % self.chunk_rows)

    def flush(self) -> None:
        if self.pending_rows:
            self._write(self.pending_rows)

    def _write(self, num_rows: int) -> None:
        buffered = np.concatenate(self.pending) if len(self.pending) > 1 else self.pending[0]
        self.array[self.rows_written : self.rows_written + num_rows] = buffered[:num_rows]
        self.rows_written += num_rows
        rest = buffered[num_rows:]
        self.pending = [rest] if rest.shape[0] else []
        self.pending_rows = rest.shape[0]


class ShardWriter:
    """Writes one shard into a private tmp directory; `finalize` makes it complete atomically."""

    def __init__(self, cache_dir: Path, manifest: CacheManifest, split: str, index: int, row_start: int, row_stop: int) -> None:
        assert (row_start, row_stop) == manifest.shard_rows(split, index), f"rows of shard {split}/{index}"
        self.cache_dir = Path(cache_dir)
        self.manifest = manifest
        self.split, self.index = split, index
        self.row_start, self.row_stop = row_start, row_stop
        self.num_sequences = row_stop - row_start
        self._layout = entry_layout_of(manifest)
        self._rows_received = 0
        self._seq_entry_offsets = [0]
        self._mass_fixed = 0
        self._entry_pending: list[np.ndarray] = []
        self._entry_pending_rows = 0
        self._entry_chunk_rows = cf.entries_per_chunk(self._layout.bytes_per_entry)
        self._closed = False
        self.tmp_dir = cf.new_tmp_shard_dir(self.cache_dir, split, index)
        self.tmp_dir.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._group = zarr.open_group(self.tmp_dir, mode="w-")
            self._rows = self._create_row_arrays()
            bpe = self._layout.bytes_per_entry
            self._entries = self._create(
                cf.ENTRIES, (0, bpe), np.uint8, (self._entry_chunk_rows, bpe), {"entry": dataclasses.asdict(self._layout)},
                filters=(TransposeCodec(order=(1, 0)),), compressor=_ENTRY_COMPRESSOR,
            )
        except BaseException:  # e.g. a full disk while writing the arrays' metadata: no writer exists to abort
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
            raise

    def _create(
        self, name: str, shape: tuple[int, ...], dtype: object, chunks: tuple[int, ...], attrs: dict,
        filters: tuple[TransposeCodec, ...] = (), compressor: ZstdCodec = _COMPRESSOR,
    ) -> zarr.Array:  # fmt: skip
        # Every chunk is stored, even all-zero ones, so a missing chunk file always means damage.
        chunks = tuple(max(1, c) for c in chunks)  # zarr needs positive chunk sides, even for empty axes
        return self._group.create_array(
            name, shape=shape, dtype=dtype, chunks=chunks, filters=filters, compressors=compressor,
            fill_value=0, attributes=attrs, config={"write_empty_chunks": True},
        )  # fmt: skip

    def _create_row_arrays(self) -> dict[str, _RowArray]:
        m = self.manifest
        n, T = self.num_sequences, m.token_store.seq_len
        rows = min(m.layout.sequences_per_chunk, n)
        specs: dict[str, tuple[tuple[int, ...], object, dict]] = {
            cf.TOKENS: ((n, T), np.int32, {}),
            cf.NUM_ENTRIES: ((n, T), np.dtype(m.layout.count_dtype), {}),
        }
        if m.sampler.ghost and m.sampler.mode != "rs-kd":
            specs[cf.GHOST] = ((n, T), np.float16, {})
        if m.snapshot.layers:
            K, d = m.snapshot.positions_per_sequence, m.teacher.hidden_size
            specs[cf.SNAP_POSITIONS] = ((n, K), np.int32, {})
            bits = np.uint16 if m.snapshot.dtype == "bf16" else np.uint8
            logical = {cf.LOGICAL_DTYPE_ATTR: cf.LOGICAL_DTYPES[m.snapshot.dtype]}
            for layer in m.snapshot.layers:
                for term in m.snapshot.terms:
                    specs[cf.snapshot_array(layer, term)] = ((n, K, d), bits, logical)
                    if m.snapshot.dtype == "fp8":
                        specs[cf.snapshot_scale_array(layer, term)] = ((n, K), np.float32, {})
        return {
            name: _RowArray(self._create(name, shape, dtype, (rows, *shape[1:]), attrs), rows)
            for name, (shape, dtype, attrs) in specs.items()
        }

    def append(self, batch: EncodedBatch) -> None:
        """Pack the batch's entries and buffer its rows; full chunks are compressed and written."""
        assert not self._closed, "append after finalize/abort"
        b = batch.tokens.shape[0]
        assert self._rows_received + b <= self.num_sequences, f"shard {self.split}/{self.index} overfilled"
        per_seq = batch.num_entries.reshape(b, -1).sum(axis=1, dtype=np.int64)  # (b,)
        assert int(per_seq.sum()) == batch.entry_ids.shape[0], "num_entries does not match the entries"
        gaps = delta_code_ids(batch.entry_ids, batch.num_entries, self._layout.id_bits)  # (E,)
        packed = pack_entries(gaps, batch.entry_values, self._layout).reshape(-1, self._layout.bytes_per_entry)  # (E, bpe)
        rows: dict[str, np.ndarray] = {cf.TOKENS: batch.tokens, cf.NUM_ENTRIES: batch.num_entries}
        if cf.GHOST in self._rows:
            assert batch.ghost is not None, "this cache stores ghost mass"
            rows[cf.GHOST] = batch.ghost
        if cf.SNAP_POSITIONS in self._rows:
            assert batch.snap_positions is not None, "this cache stores snapshots"
            rows[cf.SNAP_POSITIONS] = batch.snap_positions
            for layer, terms in batch.snapshots.items():
                for term, bits in terms.items():
                    rows[cf.snapshot_array(layer, term)] = bits
            for layer, terms in batch.snapshot_scales.items():
                for term, scale in terms.items():
                    rows[cf.snapshot_scale_array(layer, term)] = scale
        assert rows.keys() == self._rows.keys(), f"batch arrays {sorted(rows)} != shard arrays {sorted(self._rows)}"
        for name, data in rows.items():
            target = self._rows[name].array
            assert data.shape == (b, *target.shape[1:]) and data.dtype == target.dtype, f"{name}: {data.dtype}{data.shape}"
            self._rows[name].push(data)
        self._seq_entry_offsets.extend((self._seq_entry_offsets[-1] + np.cumsum(per_seq)).tolist())
        self._push_entries(packed)
        self._mass_fixed += round(batch.covered_mass_sum * _MASS_SCALE)
        self._rows_received += b

    def _push_entries(self, packed: np.ndarray) -> None:
        self._entry_pending.append(packed)
        self._entry_pending_rows += packed.shape[0]
        if self._entry_pending_rows >= self._entry_chunk_rows:
            self._flush_entries(self._entry_pending_rows - self._entry_pending_rows % self._entry_chunk_rows)

    def _flush_entries(self, num_rows: int) -> None:
        buffered = np.concatenate(self._entry_pending)  # (rows, bpe)
        self._entries.append(buffered[:num_rows])
        rest = buffered[num_rows:]
        self._entry_pending = [rest] if rest.shape[0] else []
        self._entry_pending_rows = rest.shape[0]

    def finalize(self) -> bool:
        """Write the last chunks and complete.json, then rename into place.

        Returns False (and deletes this writer's copy) if another writer completed the shard first.
        """
        assert not self._closed, "finalize after finalize/abort"
        assert self._rows_received == self.num_sequences, (
            f"shard {self.split}/{self.index} got {self._rows_received} of {self.num_sequences} sequences"
        )
        for rows in self._rows.values():
            rows.flush()
        if self._entry_pending_rows:
            self._flush_entries(self._entry_pending_rows)
        offsets = np.asarray(self._seq_entry_offsets, dtype=np.int64)  # (n+1,)
        self._create(cf.SEQ_ENTRY_OFFSETS, offsets.shape, np.int64, offsets.shape, {})[:] = offsets
        record = ShardRecord(
            split=self.split,
            index=self.index,
            row_start=self.row_start,
            row_stop=self.row_stop,
            num_positions=self.num_sequences * self.manifest.token_store.seq_len,
            num_entries=int(offsets[-1]),
            covered_mass_sum=self._mass_fixed / _MASS_SCALE,
            files=(files := file_checksums(self.tmp_dir, exclude={cf.COMPLETE_FILE})),
            sizes={name: (self.tmp_dir / name).stat().st_size for name in files},
        )
        (self.tmp_dir / cf.COMPLETE_FILE).write_text(record.to_json(), encoding="utf-8")
        self._closed = True
        return self._rename_into_place()

    def _rename_into_place(self) -> bool:
        final = cf.shard_dir(self.cache_dir, self.split, self.index)
        for _ in range(2):
            try:
                os.rename(self.tmp_dir, final)
                return True
            except OSError as err:
                if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    shutil.rmtree(self.tmp_dir, ignore_errors=True)
                    raise KdpipeError(f"cannot move shard {self.tmp_dir} to {final}: {err.strerror}") from None
            if (final / cf.COMPLETE_FILE).is_file():
                break  # another writer completed this shard first: its copy is as good as ours
            # A final-named dir without complete.json was damaged after completion: replace it.
            # Moving it aside first keeps every step atomic for a concurrent writer.
            stale = cf.new_tmp_shard_dir(self.cache_dir, self.split, self.index)
            try:
                os.rename(final, stale)
            except FileNotFoundError:
                continue
            shutil.rmtree(stale, ignore_errors=True)
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        return False

    @property
    def closed(self) -> bool:
        """Whether finalize or abort has run."""
        return self._closed

    def abort(self) -> None:
        """Discard this writer's tmp directory (idempotent); a complete shard is never touched."""
        self._closed = True
        shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if not self._closed:
            self.abort()


class BackgroundShardWriter:
    """A `ShardWriter` fed through a bounded queue by one writer thread.

    Packing (numba, nogil), zstd compression and file I/O run while the caller computes the
    next batch; the queue bound caps the batches held in memory. A writer-thread error is
    raised in the caller at its next `append` or at `finalize`, after the tmp dir is removed.
    """

    def __init__(
        self, cache_dir: Path, manifest: CacheManifest, split: str, index: int, row_start: int, row_stop: int,
        max_pending_batches: int = 2,
    ) -> None:  # fmt: skip
        self._writer = ShardWriter(cache_dir, manifest, split, index, row_start, row_stop)
        self._queue: queue.Queue[EncodedBatch | None] = queue.Queue(maxsize=max_pending_batches)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"shard-writer-{split}-{index:05d}", daemon=True)
        self._thread.start()

    @property
    def tmp_dir(self) -> Path:
        return self._writer.tmp_dir

    def _run(self) -> None:
        while (batch := self._queue.get()) is not None:
            if self._error is None:  # after an error, keep draining so the caller never blocks
                try:
                    self._writer.append(batch)
                except BaseException as err:  # re-raised in the caller thread
                    self._error = err

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            self.abort()
            raise self._error

    def append(self, batch: EncodedBatch) -> None:
        """Queue a batch (blocks while `max_pending_batches` are queued)."""
        self._raise_if_failed()
        self._queue.put(batch)

    def finalize(self) -> bool:
        """Wait for queued batches, then `ShardWriter.finalize`."""
        self._stop()
        self._raise_if_failed()
        return self._writer.finalize()

    def abort(self) -> None:
        """Stop the writer thread and discard the tmp directory."""
        self._stop()
        self._writer.abort()

    def __enter__(self) -> BackgroundShardWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if not self._writer.closed:
            self.abort()


def write_manifest(cache_dir: Path, manifest: CacheManifest) -> None:
    """Create `CACHE/manifest.json` if absent; refuse a cache dir holding another cache.

    Every task writes identical bytes; the file appears atomically (tmp file + `os.link`,
    which fails if the name exists), so concurrent tasks never see a half-written manifest.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / cf.MANIFEST_FILE
    if not path.exists():
        tmp = cache_dir / f"{cf.TMP_PREFIX}{cf.MANIFEST_FILE}-{os.getpid()}-{threading.get_ident()}"
        try:
            tmp.write_text(manifest.to_json(), encoding="utf-8")
            os.link(tmp, path)
        except FileExistsError:
            pass  # another task created it first: compare below
        finally:
            tmp.unlink(missing_ok=True)  # also after a failed write (full disk): no tmp file is left
    _check_same_cache(cache_dir, path, manifest)


def _check_same_cache(cache_dir: Path, path: Path, manifest: CacheManifest) -> None:
    text = path.read_text(encoding="utf-8")
    try:
        existing = json.loads(text)
    except json.JSONDecodeError:
        existing = None
    if not isinstance(existing, dict):
        raise KdpipeError(f"{path} is not a readable cache manifest; use --out elsewhere or --overwrite")
    if existing.get("fingerprint") == manifest.fingerprint:
        CacheManifest.from_json(text, where=str(path))  # still refuse a hand-edited manifest
        return
    ours = json.loads(manifest.to_json())
    for data in (existing, ours):
        if isinstance(data.get("teacher"), dict):
            data["teacher"].pop("path", None)  # informational: not a difference
    differing = [key for key in sorted(ours) if key != "fingerprint" and existing.get(key) != ours[key]]
    raise KdpipeError(
        f"{cache_dir} holds a cache of another teacher/config ({', '.join(differing) or 'fingerprint'} differ); "
        "use --out elsewhere or --overwrite"
    )
