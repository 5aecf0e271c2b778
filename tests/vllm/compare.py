"""Compare two caches of one teacher position by position: what differs, and by how much.

Two backends compute the same float32 forward in different kernels, so their logits differ
in the last bits. An rs-kd draw lands on another id only when its uniform falls within that
difference of a step of the CDF; top-k ids swap only between near-tied logits; snapshots
differ by at most one bf16 rounding step. These helpers measure exactly those things.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdpipe.teacher_cache import open_cache


@dataclass
class CacheDiff:
    positions: int
    differing_positions: int  # positions whose stored (ids, weights) differ (rs-kd: a moved draw)
    differing_ids: int  # positions whose id sets differ (top-k: a swapped near-tie)
    snapshot_values: int
    snapshot_differing: int  # stored values that differ at all
    snapshot_max_excess: float  # max of (|a - b| - one bf16 step of the larger) / the vector's max |a|: float32 noise

    @property
    def differing_fraction(self) -> float:
        return self.differing_positions / max(self.positions, 1)

    @property
    def differing_ids_fraction(self) -> float:
        return self.differing_ids / max(self.positions, 1)


def bf16_ulp(x: np.ndarray) -> np.ndarray:
    """Spacing of bf16 numbers at |x| (8 bits of mantissa)."""
    exponent = np.floor(np.log2(np.maximum(np.abs(x), 1e-30)))
    return 2.0 ** (exponent - 7)


def diff_caches(a: Path, b: Path) -> CacheDiff:
    """Position-level differences between two complete caches of the same manifest fingerprint."""
    cache_a, cache_b = open_cache(a), open_cache(b)
    assert cache_a.manifest.fingerprint == cache_b.manifest.fingerprint
    positions = differing = differing_ids = values = snap_differing = 0
    max_excess = 0.0
    for split, index in cache_a.manifest.global_shards():
        shard_a, shard_b = cache_a.open_shard(split, index), cache_b.open_shard(split, index)
        batch_a, batch_b = shard_a.read(0, shard_a.num_sequences), shard_b.read(0, shard_b.num_sequences)
        np.testing.assert_array_equal(batch_a.tokens, batch_b.tokens)
        offsets_a, offsets_b = batch_a.target_offsets, batch_b.target_offsets
        for p in range(offsets_a.size - 1):
            ids_a = batch_a.target_ids[offsets_a[p] : offsets_a[p + 1]]
            ids_b = batch_b.target_ids[offsets_b[p] : offsets_b[p + 1]]
            w_a = batch_a.target_weights[offsets_a[p] : offsets_a[p + 1]]
            w_b = batch_b.target_weights[offsets_b[p] : offsets_b[p + 1]]
            same_ids = np.array_equal(ids_a, ids_b)
            differing += not (same_ids and np.array_equal(w_a, w_b))
            differing_ids += not same_ids
        positions += offsets_a.size - 1
        if batch_a.snap_positions is not None:
            np.testing.assert_array_equal(batch_a.snap_positions, batch_b.snap_positions)
            for layer, terms in batch_a.snapshots.items():
                for term, x_a in terms.items():
                    x_b = batch_b.snapshots[layer][term]
                    gap = np.abs(x_a - x_b)
                    scale = np.maximum(np.abs(x_a).max(axis=-1, keepdims=True), 1e-30)  # (n, K, 1)
                    excess = (gap - bf16_ulp(np.maximum(np.abs(x_a), np.abs(x_b)))) / scale
                    max_excess = max(max_excess, float(excess.max()))
                    snap_differing += int((gap > 0).sum())
                    values += x_a.size
    return CacheDiff(positions, differing, differing_ids, values, snap_differing, max_excess)
