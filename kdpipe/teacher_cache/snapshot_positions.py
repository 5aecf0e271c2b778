"""Which snapshot layers and positions: parsing layer specs and the deterministic position subset.

Positions are chosen by a counter-based hash of (seed, stream, sequence index, position), so
the subset does not depend on batch composition, shard count or which worker wrote it. Kept
apart from hook capture so planning and reading need no forward hooks.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from kdpipe.schemas.errors import KdpipeError

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def parse_layer_spec(spec: str, num_layers: int) -> list[int]:
    """Layers named by `spec`, sorted and unique.

    Forms: "none", "all", "every:N" (0, N, 2N, ...), and comma lists of layers ("0,3,-1",
    negative counts from the end; "last" = -1) and inclusive ranges ("2-5", "-4--1"),
    mixable ("0,every:8,last").
    """
    text = spec.strip().lower()
    if text == "none":
        return []
    if text == "all":
        return list(range(num_layers))
    if not text:
        raise KdpipeError("snapshot layer spec is empty; use 'none', 'all', 'every:N', or layers like '0,3,-1' or '2-5'")
    valid = f"valid layers are 0..{num_layers - 1} (or -{num_layers}..-1)"
    layers: set[int] = set()

    def resolve(layer: int) -> int:
        if not -num_layers <= layer < num_layers:
            raise KdpipeError(f"snapshot layer {layer} does not exist: {valid}")
        return layer % num_layers

    for item in (part.strip() for part in text.split(",")):
        if match := re.fullmatch(r"every:(\d+)", item):
            step = int(match.group(1))
            if step < 1:
                raise KdpipeError(f"snapshot layer spec {item!r}: the step must be >= 1")
            layers.update(range(0, num_layers, step))
        elif item == "last":
            layers.add(num_layers - 1)
        elif re.fullmatch(r"-?\d+", item):
            layers.add(resolve(int(item)))
        elif match := re.fullmatch(r"(-?\d+)-(-?\d+)", item):
            first, last = resolve(int(match.group(1))), resolve(int(match.group(2)))
            if first > last:
                raise KdpipeError(f"snapshot layer range {item!r} is empty (it resolves to {first}-{last}); write it low-high")
            layers.update(range(first, last + 1))
        else:
            raise KdpipeError(
                f"snapshot layer spec item {item!r} is not understood; "
                "use 'all', 'every:N', 'last', a layer like '3' or '-1', or a range like '2-5'"
            )
    return sorted(layers)


def snapshot_positions(*, seed: int, stream: int, seq_index: torch.Tensor, seq_len: int, fraction: float) -> torch.Tensor:
    """Positions (B, K) int64 to snapshot for each sequence, sorted ascending, K = max(1, round(fraction·seq_len)).

    Each position t of sequence s gets the rank key hash(seed, stream, s, t) and the K
    smallest keys win: a uniform random K-subset that is a pure function of
    (seed, stream, s), the same for every layer, whatever batch `s` arrives in. `stream`
    separates independent uses of one seed (so snapshot positions are not correlated with,
    say, the sampler's draws).
    """
    if not 0.0 < fraction <= 1.0:
        raise KdpipeError(f"snapshot position fraction {fraction} must be in (0, 1]")
    num_keep = max(1, round(fraction * seq_len))
    batch = seq_index.shape[0]
    if num_keep >= seq_len:
        return torch.arange(seq_len, dtype=torch.int64).expand(batch, seq_len).clone()
    assert seed >= 0 and stream >= 0 and bool((seq_index >= 0).all()), (seed, stream, seq_index)
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps by design
        seq_B = seq_index.cpu().numpy().astype(np.uint64)
        key_B = _mix64(_mix64(_mix64(np.uint64(seed) + _GOLDEN) ^ np.uint64(stream)) ^ seq_B)  # (B,)
        key_T = _mix64(np.arange(seq_len, dtype=np.uint64) + _GOLDEN)  # (T,)
        # For a fixed sequence, t ↦ rank is a bijection: no ties, so the subset is well defined.
        rank_BT = _mix64(key_B[:, None] ^ key_T[None, :])  # (B, T)
    chosen_BK = np.argpartition(rank_BT, num_keep - 1, axis=1)[:, :num_keep]
    return torch.from_numpy(np.sort(chosen_BK, axis=1).astype(np.int64))


def _mix64(x: np.ndarray | np.uint64) -> np.ndarray:
    """splitmix64's finaliser: a bijective 64-bit mix with full avalanche."""
    x = np.asarray(x, dtype=np.uint64)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))
