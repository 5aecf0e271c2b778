"""Fixed-width bit-packed sparse-target entries: the byte format of the teacher cache.

An entry is one little-endian record of `bytes_per_entry` bytes holding
`id_field | value << id_bits`, where `id_field` is the token id (cache schema 1) or, from
schema 2 on, its difference from the previous id of the same position modulo 2^id_bits
(the samplers emit ids ascending within a position, so the first id is stored as is and
the rest as small gaps: `delta_code_ids`), and `value` is

- rs-kd: `count - 1` in ceil(log2(num_draws)) bits (counts run 1..N), so Qwen's vocab
  (17-18 id bits) with N=50 fits 3 bytes, the budget of Anshumann et al. 2025;
- top-k, top-p-k: the float16 bit pattern of the probability (5 bytes with an 18-bit id).
  Probabilities below float16's smallest subnormal (~6e-8) are stored as 0.

Per-position entry counts are stored separately in `count_dtype(max_entries)`.
Schema 2 also stores the records byte-plane-major per chunk (see the writer), so that the
compressor sees each byte of a record (gap low byte, gap high byte, count) as its own
regular stream: rs-kd logits of SmolLM2-135M on Python code at N=50 take 24.0 bytes/token
instead of 27.5 (bench/entry_layouts.py compares layouts on one cache).
The kernels are numba `nogil` loops so a writer thread can pack one batch while the main
thread runs the teacher on the next.
"""

import math
from dataclasses import dataclass
from typing import Literal

import numba
import numpy as np

from kdpipe.schemas.errors import KdpipeError

_FLOAT16_BITS = 16
# Records are assembled in a signed int64; staying below 63 bits keeps every shift exact.
_MAX_RECORD_BITS = 62


@dataclass(frozen=True)
class EntryLayout:
    """Bit widths of one packed entry."""

    id_bits: int
    """Bits of the token id, ceil(log2(vocab_size))."""
    value_bits: int
    """Bits of the value field: `count - 1` for counts, 16 for float16 probabilities."""
    value_kind: Literal["count", "float16"]
    """What the value field holds."""
    bytes_per_entry: int
    """Record size, ceil((id_bits + value_bits) / 8)."""


def _bits_for(num_values: int) -> int:
    """Bits needed to represent 0..num_values-1 (at least 1)."""
    return max(1, (num_values - 1).bit_length())


def entry_layout(mode: str, vocab_size: int, num_draws: int) -> EntryLayout:
    """The entry layout for a sampler mode; `num_draws` only matters for rs-kd."""
    if vocab_size < 1:
        raise KdpipeError(f"vocab size {vocab_size} must be >= 1: check the teacher config")
    id_bits = _bits_for(vocab_size)
    if mode == "rs-kd":
        if num_draws < 1:
            raise KdpipeError(f"rs-kd num_draws {num_draws} must be >= 1: fix the sampler config")
        value_bits, value_kind = _bits_for(num_draws), "count"
    elif mode in ("top-k", "top-p-k"):
        value_bits, value_kind = _FLOAT16_BITS, "float16"
    else:
        raise KdpipeError(f"unknown sampler mode {mode!r}: use rs-kd, top-k or top-p-k")
    record_bits = id_bits + value_bits
    assert record_bits <= _MAX_RECORD_BITS, f"{record_bits}-bit entries do not fit an int64 record"
    return EntryLayout(id_bits, value_bits, value_kind, math.ceil(record_bits / 8))


def count_dtype(max_entries_per_position: int) -> np.dtype:
    """Smallest unsigned dtype for per-position entry counts (rs-kd: N, top-k modes: k)."""
    if max_entries_per_position <= np.iinfo(np.uint8).max:
        return np.dtype(np.uint8)
    if max_entries_per_position <= np.iinfo(np.uint16).max:
        return np.dtype(np.uint16)
    raise KdpipeError(
        f"{max_entries_per_position} entries per position exceed 65535: lower num_draws or k"
    )


@numba.njit(cache=True, nogil=True)
def _pack_kernel(ids: np.ndarray, fields: np.ndarray, id_bits: int, bytes_per_entry: int) -> np.ndarray:
    """ids, fields: (E,) int64 → (E * bytes_per_entry,) uint8 little-endian records."""
    num_entries = ids.shape[0]
    out = np.empty(num_entries * bytes_per_entry, dtype=np.uint8)
    for e in range(num_entries):
        record = ids[e] | (fields[e] << id_bits)
        base = e * bytes_per_entry
        for b in range(bytes_per_entry):
            out[base + b] = (record >> (8 * b)) & 0xFF
    return out


@numba.njit(cache=True, nogil=True)
def _unpack_kernel(buf: np.ndarray, id_bits: int, value_bits: int, bytes_per_entry: int):
    """(E * bytes_per_entry,) uint8 → ids, fields: (E,) int64 each."""
    num_entries = buf.shape[0] // bytes_per_entry
    ids = np.empty(num_entries, dtype=np.int64)
    fields = np.empty(num_entries, dtype=np.int64)
    id_mask = (np.int64(1) << id_bits) - 1
    value_mask = (np.int64(1) << value_bits) - 1
    for e in range(num_entries):
        base = e * bytes_per_entry
        record = np.int64(0)
        for b in range(bytes_per_entry):
            record |= np.int64(buf[base + b]) << (8 * b)
        ids[e] = record & id_mask
        fields[e] = (record >> id_bits) & value_mask
    return ids, fields


@numba.njit(cache=True, nogil=True)
def _delta_kernel(ids: np.ndarray, num_entries: np.ndarray, id_bits: int, inverse: bool) -> np.ndarray:
    out = np.empty(ids.shape[0], dtype=np.int64)
    mask = (np.int64(1) << id_bits) - 1
    e = 0
    for p in range(num_entries.shape[0]):
        previous = np.int64(0)
        for _ in range(num_entries[p]):
            if inverse:
                previous = (previous + ids[e]) & mask
                out[e] = previous
            else:
                out[e] = (ids[e] - previous) & mask
                previous = ids[e]
            e += 1
    return out


def _check_id_range(ids: np.ndarray, id_bits: int) -> None:
    if ids.size and (ids.min() < 0 or ids.max() >= 1 << id_bits):
        raise ValueError(f"token ids must lie in [0, 2^{id_bits}), got [{ids.min()}, {ids.max()}]")


def _check_num_entries(ids: np.ndarray, num_entries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    num_entries = np.ascontiguousarray(num_entries, dtype=np.int64).reshape(-1)
    if ids.ndim != 1 or int(num_entries.sum()) != ids.shape[0]:
        raise ValueError(f"{ids.shape} ids do not match per-position counts summing to {int(num_entries.sum())}")
    return ids, num_entries


def delta_code_ids(ids: np.ndarray, num_entries: np.ndarray, id_bits: int) -> np.ndarray:
    """(E,) ids, (P,) entries per position → (E,) gaps in [0, 2^id_bits).

    The first id of a position is kept; each other becomes its distance to the previous one
    modulo 2^id_bits. The samplers store ids ascending within a position, so gaps are small;
    the modulus keeps any order lossless. Out-of-range ids mean a sampler bug: ValueError.
    """
    ids, num_entries = _check_num_entries(ids, num_entries)
    _check_id_range(ids, id_bits)
    return _delta_kernel(ids, num_entries, id_bits, False)


def delta_decode_ids(gaps: np.ndarray, num_entries: np.ndarray, id_bits: int) -> np.ndarray:
    """Inverse of `delta_code_ids`: (E,) gaps, (P,) entries per position → (E,) int64 ids."""
    gaps, num_entries = _check_num_entries(gaps, num_entries)
    return _delta_kernel(gaps, num_entries, id_bits, True)


def pack_entries(ids: np.ndarray, values: np.ndarray, layout: EntryLayout) -> np.ndarray:
    """Pack (E,) ids with (E,) int counts or float probabilities → (E * bytes_per_entry,) uint8.

    Out-of-range ids or counts mean a sampler bug, not a user mistake: ValueError.
    """
    if ids.shape != values.shape or ids.ndim != 1:
        raise ValueError(f"ids {ids.shape} and values {values.shape} must be equal-length 1-D arrays")
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    _check_id_range(ids, layout.id_bits)
    if layout.value_kind == "count":
        max_count = 1 << layout.value_bits
        if values.size and (values.min() < 1 or values.max() > max_count):
            raise ValueError(f"counts must lie in [1, {max_count}], got [{values.min()}, {values.max()}]")
        fields = values.astype(np.int64) - 1
    else:
        if values.size and not (np.all(np.isfinite(values)) and values.min() >= 0 and values.max() <= 1):
            raise ValueError("probabilities must be finite and lie in [0, 1]")
        fields = values.astype(np.float16).view(np.uint16).astype(np.int64)
    return _pack_kernel(ids, fields, layout.id_bits, layout.bytes_per_entry)


def unpack_entries(buf: np.ndarray, layout: EntryLayout) -> tuple[np.ndarray, np.ndarray]:
    """(E * bytes_per_entry,) uint8 → ((E,) int64 ids, (E,) int32 counts or float32 probs)."""
    if buf.dtype != np.uint8 or buf.ndim != 1 or buf.size % layout.bytes_per_entry:
        raise ValueError(
            f"expected a 1-D uint8 buffer of whole {layout.bytes_per_entry}-byte entries, "
            f"got {buf.dtype} with shape {buf.shape}"
        )
    buf = np.ascontiguousarray(buf)
    ids, fields = _unpack_kernel(buf, layout.id_bits, layout.value_bits, layout.bytes_per_entry)
    if layout.value_kind == "count":
        return ids, (fields + 1).astype(np.int32)
    return ids, fields.astype(np.uint16).view(np.float16).astype(np.float32)
