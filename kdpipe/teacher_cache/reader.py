"""Read a teacher cache: validate the manifest, find complete shards, decode rows.

`open_cache` checks the manifest (format, schema version, fingerprint) and lists the shards
whose directory carries a `complete.json`; tmp directories of unfinished shards are never
looked at. `CacheShard` opens its Zarr group lazily, inside the first `read` and again after
a fork, because zarr objects created before a fork misbehave in loader workers. Damage that
shows up while reading (a missing file, a chunk that fails to decompress or its checksum,
arrays whose shapes disagree with `complete.json`) is a `KdpipeError` naming the shard.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import zarr

from kdpipe.schemas import cache_format as cf
from kdpipe.schemas.cache_format import CacheManifest, ShardRecord
from kdpipe.schemas.errors import KdpipeError
from kdpipe.teacher_cache.packing import delta_decode_ids, unpack_entries
from kdpipe.teacher_cache.writer import entry_layout_of


class ShardInfo(NamedTuple):
    """Where one shard sits in its split and whether it is complete."""

    split: str
    index: int
    row_start: int
    row_stop: int
    complete: bool


class CachedBatch(NamedTuple):
    """Decoded cache rows of n consecutive sequences of length T."""

    tokens: np.ndarray  # (n, T) int32
    target_ids: np.ndarray  # (E,) int64, position-major
    target_weights: np.ndarray  # (E,) float32: rs-kd counts/N (sum 1 per position); top-k modes: probabilities
    target_offsets: np.ndarray  # (n*T+1,) int64: entries of flat position p = i*T+t are [offsets[p], offsets[p+1])
    ghost: np.ndarray | None  # (n, T) float32 leftover mass, top-k modes with ghost only
    snap_positions: np.ndarray | None  # (n, K) int64
    snapshots: dict[int, dict[str, np.ndarray]]  # layer -> term -> (n, K, d) float32


def open_cache(path: Path | str) -> TeacherCache:
    """Open and validate a teacher cache directory."""
    path = Path(path)
    manifest_path = path / cf.MANIFEST_FILE
    if not manifest_path.is_file():
        raise KdpipeError(f"{path} is not a teacher cache (no {cf.MANIFEST_FILE}); run `kdpipe cache-teacher --out {path}` first")
    manifest = CacheManifest.from_json(manifest_path.read_text(encoding="utf-8"), where=str(manifest_path))
    return TeacherCache(path, manifest)


class TeacherCache:
    """A validated cache directory; shard completeness is read once, at open."""

    def __init__(self, path: Path, manifest: CacheManifest) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self.seq_len = manifest.token_store.seq_len
        self.vocab_size = manifest.teacher.vocab_size
        self.mode = manifest.sampler.mode
        self.splits: dict[str, int] = dict(manifest.token_store.splits)  # split -> number of sequences
        self._complete = {
            (split, index)
            for split, index in manifest.global_shards()
            if (cf.shard_dir(self.path, split, index) / cf.COMPLETE_FILE).is_file()
        }

    def shards(self, split: str) -> list[ShardInfo]:
        """All shards of a split, complete or not, in row order."""
        self._check_split(split)
        return [
            ShardInfo(split, index, *self.manifest.shard_rows(split, index), (split, index) in self._complete)
            for index in range(self.manifest.num_shards(split))
        ]

    def missing_shards(self) -> list[tuple[str, int]]:
        """(split, index) of every shard not complete, in global order."""
        return [key for key in self.manifest.global_shards() if key not in self._complete]

    def require_complete(self) -> None:
        """Refuse a cache with missing shards, naming them."""
        missing = self.missing_shards()
        if missing:
            names = ", ".join(f"{split}/{index:05d}" for split, index in missing[:5]) + (", ..." if len(missing) > 5 else "")
            total = len(self.manifest.global_shards())
            raise KdpipeError(
                f"cache {self.path} is incomplete: {len(missing)} of {total} shards missing ({names}); "
                "run `kdpipe cache-teacher` again with the same options to finish it"
            )

    def open_shard(self, split: str, index: int) -> CacheShard:
        """A lazily opened complete shard."""
        self._check_split(split)
        if not 0 <= index < self.manifest.num_shards(split):
            raise KdpipeError(f"cache {self.path} has no shard {split}/{index}: split {split} has {self.manifest.num_shards(split)} shards")
        if (split, index) not in self._complete:
            raise KdpipeError(
                f"shard {cf.shard_dir(self.path, split, index)} is not complete; run `kdpipe cache-teacher` again to finish the cache"
            )
        return CacheShard(self.path, self.manifest, split, index)

    def _check_split(self, split: str) -> None:
        if split not in self.splits:
            raise KdpipeError(f"cache {self.path} has no split {split!r}; it has {', '.join(self.splits)}")


class _OpenShard(NamedTuple):
    record: ShardRecord
    arrays: dict[str, Any]  # name -> zarr.Array
    seq_entry_offsets: np.ndarray  # (n+1,) int64


class CacheShard:
    """One complete shard; zarr is opened in the first `read` of each process."""

    def __init__(self, cache_dir: Path, manifest: CacheManifest, split: str, index: int) -> None:
        self.directory = cf.shard_dir(cache_dir, split, index)
        self.manifest = manifest
        self.split, self.index = split, index
        self.row_start, self.row_stop = manifest.shard_rows(split, index)
        self.num_sequences = self.row_stop - self.row_start
        self.num_chunks = -(-self.num_sequences // manifest.layout.sequences_per_chunk)
        self._layout = entry_layout_of(manifest)
        self._open: _OpenShard | None = None
        self._opened_in_pid = -1

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_open"] = None  # never ship zarr objects to another process
        return state

    def chunk_rows(self, chunk: int) -> tuple[int, int]:
        """Rows [start, stop) of chunk `chunk` within the shard (the loader's unit)."""
        assert 0 <= chunk < self.num_chunks, f"chunk {chunk} of {self.num_chunks}"
        rows = self.manifest.layout.sequences_per_chunk
        return chunk * rows, min((chunk + 1) * rows, self.num_sequences)

    def read(self, start: int, stop: int) -> CachedBatch:
        """Decode rows [start, stop) of this shard."""
        assert 0 <= start <= stop <= self.num_sequences, f"rows [{start}, {stop}) of {self.num_sequences}"
        opened = self._ensure_open()
        try:
            return self._read(opened, start, stop)
        except (KdpipeError, AssertionError):
            raise
        except Exception as err:  # zarr/numcodecs raise many types; the user needs the shard's name
            raise self._damaged(_first_line(err)) from None

    def _ensure_open(self) -> _OpenShard:
        if self._open is None or self._opened_in_pid != os.getpid():
            try:
                self._open = self._open_group()
            except (KdpipeError, AssertionError):
                raise
            except Exception as err:
                raise self._damaged(_first_line(err)) from None
            self._opened_in_pid = os.getpid()
        return self._open

    def _open_group(self) -> _OpenShard:
        m = self.manifest
        record_path = self.directory / cf.COMPLETE_FILE
        if not record_path.is_file():
            raise self._damaged(f"{cf.COMPLETE_FILE} is gone")
        record = ShardRecord.from_json(record_path.read_text(encoding="utf-8"), where=str(record_path))
        if (record.split, record.index, record.row_start, record.row_stop) != (self.split, self.index, self.row_start, self.row_stop):
            raise self._damaged(f"{cf.COMPLETE_FILE} describes another shard ({record.split}/{record.index})")
        missing = [name for name in record.files if not (self.directory / name).is_file()]
        if missing:
            raise self._damaged(f"file {missing[0]} is missing")
        group = zarr.open_group(self.directory, mode="r")
        n, T = self.num_sequences, m.token_store.seq_len
        expected: dict[str, tuple[tuple[int, ...], str]] = {
            cf.TOKENS: ((n, T), "int32"),
            cf.NUM_ENTRIES: ((n, T), m.layout.count_dtype),
            cf.SEQ_ENTRY_OFFSETS: ((n + 1,), "int64"),
            cf.ENTRIES: (self._entries_shape(record.num_entries), "uint8"),
        }
        if m.sampler.ghost and m.sampler.mode != "rs-kd":
            expected[cf.GHOST] = ((n, T), "float16")
        if m.snapshot.layers:
            K, d = m.snapshot.positions_per_sequence, m.teacher.hidden_size
            expected[cf.SNAP_POSITIONS] = ((n, K), "int32")
            for layer in m.snapshot.layers:
                for term in m.snapshot.terms:
                    expected[cf.snapshot_array(layer, term)] = ((n, K, d), "uint16" if m.snapshot.dtype == "bf16" else "uint8")
                    if m.snapshot.dtype == "fp8":
                        expected[cf.snapshot_scale_array(layer, term)] = ((n, K), "float32")
        arrays = {}
        for name, (shape, dtype) in expected.items():
            array = group[name]
            if not isinstance(array, zarr.Array):
                raise self._damaged(f"{name} is a group, not an array")
            if array.shape != shape or str(array.dtype) != dtype:
                raise self._damaged(f"array {name} is {array.dtype}{array.shape}, {cf.COMPLETE_FILE} implies {dtype}{shape}")
            arrays[name] = array
        offsets = np.asarray(arrays[cf.SEQ_ENTRY_OFFSETS][:])  # (n+1,)
        if offsets[0] != 0 or offsets[-1] != record.num_entries or np.any(np.diff(offsets) < 0):
            raise self._damaged(f"{cf.SEQ_ENTRY_OFFSETS} disagrees with the {record.num_entries} entries of {cf.COMPLETE_FILE}")
        return _OpenShard(record, arrays, offsets)

    def _read(self, opened: _OpenShard, start: int, stop: int) -> CachedBatch:
        m, arrays = self.manifest, opened.arrays
        tokens = np.asarray(arrays[cf.TOKENS][start:stop])  # (n, T)
        counts = np.asarray(arrays[cf.NUM_ENTRIES][start:stop]).reshape(-1)  # (n*T,)
        first, last = int(opened.seq_entry_offsets[start]), int(opened.seq_entry_offsets[stop])
        if int(counts.sum(dtype=np.int64)) != last - first:
            raise self._damaged(f"{cf.NUM_ENTRIES} of rows [{start}, {stop}) disagrees with {cf.SEQ_ENTRY_OFFSETS}")
        ids, values = self._entries(arrays[cf.ENTRIES], first, last, counts)  # (E,), (E,)
        if ids.size and int(ids.max()) >= self.manifest.teacher.vocab_size:
            raise self._damaged(f"token id {int(ids.max())} is outside the teacher vocabulary")
        if m.sampler.mode == "rs-kd":
            weights = (values / np.float32(m.sampler.num_draws)).astype(np.float32)
        else:
            weights = values.astype(np.float32)
        offsets = np.zeros(counts.size + 1, dtype=np.int64)  # (n*T+1,)
        np.cumsum(counts, dtype=np.int64, out=offsets[1:])
        ghost = np.asarray(arrays[cf.GHOST][start:stop], dtype=np.float32) if cf.GHOST in arrays else None
        snap_positions = None
        snapshots: dict[int, dict[str, np.ndarray]] = {}
        if m.snapshot.layers:
            snap_positions = np.asarray(arrays[cf.SNAP_POSITIONS][start:stop]).astype(np.int64)  # (n, K)
            for layer in m.snapshot.layers:
                snapshots[layer] = {term: self._decode(arrays, layer, term, start, stop) for term in m.snapshot.terms}
        return CachedBatch(tokens, ids, weights, offsets, ghost, snap_positions, snapshots)

    def _entries_shape(self, num_entries: int) -> tuple[int, ...]:
        if self.manifest.schema_version == 1:
            return (num_entries * self._layout.bytes_per_entry,)
        return (num_entries, self._layout.bytes_per_entry)

    def _entries(self, entries: Any, first: int, last: int, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Records [first, last) → ((E,) int64 ids, (E,) values); `counts`: (P,) entries per position."""
        if self.manifest.schema_version == 1:  # flat records holding the ids themselves
            bpe = self._layout.bytes_per_entry
            return unpack_entries(np.asarray(entries[first * bpe : last * bpe]), self._layout)
        records = np.asarray(entries[first:last])  # (E, bytes_per_entry)
        gaps, values = unpack_entries(records.reshape(-1), self._layout)
        return delta_decode_ids(gaps, counts, self._layout.id_bits), values

    def _decode(self, arrays: dict[str, Any], layer: int, term: str, start: int, stop: int) -> np.ndarray:
        # Imported here: the codecs' module pulls in torch and transformers (snapshot capture),
        # which `kdpipe inspect`/`verify` and snapshot-free caches never need.
        from kdpipe.teacher_cache.snapshot_codecs import decode_bf16, decode_fp8

        bits = np.asarray(arrays[cf.snapshot_array(layer, term)][start:stop])  # (n, K, d)
        if self.manifest.snapshot.dtype == "bf16":
            return decode_bf16(bits).numpy()
        scale = np.asarray(arrays[cf.snapshot_scale_array(layer, term)][start:stop])  # (n, K)
        return decode_fp8(bits, scale).numpy()

    def _damaged(self, why: str) -> KdpipeError:
        return KdpipeError(
            f"cache shard {self.directory} is damaged ({why}); run `kdpipe verify {self.directory.parents[2]}` "
            "and redo bad shards with `kdpipe cache-teacher --repair`"
        )


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
