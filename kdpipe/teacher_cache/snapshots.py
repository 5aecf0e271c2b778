"""FFN (and optional attention) activation snapshots: which layers, which positions, capture, storage codecs.

LRC clones the teacher's intermediate activations. kdpipe stores per selected layer only
the FFN input (the post-attention-norm hidden state) and the FFN output (down-projection
output); the trainer holds the frozen teacher weights and recomputes the gate and up
targets as `W_gate·x_in` and `W_up·x_in`, 3.2× fewer bytes for identical targets.
Snapshots are taken at a deterministic subset of positions per sequence, chosen by a
counter-based hash of (seed, stream, sequence index, position) so that the subset does
not depend on batch composition, shard count or which worker wrote it.

Zarr has no bf16 or fp8 dtype, so values are stored as raw bits: bf16 as uint16, fp8
e4m3 as uint8 codes with one float32 scale per vector.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from types import TracebackType
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from kdpipe.schemas.errors import KdpipeError
from kdpipe.teacher_cache.backend import TeacherModel

FP8_MAX = 448.0
"""Largest finite float8_e4m3fn value; each vector's amax is scaled onto it."""

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


class SnapshotCapture:
    """Forward hooks that keep the selected layers' FFN (and optionally attention) activations at chosen positions.

    Usage::

        with SnapshotCapture(teacher, layers=[0, 5], attention=False) as capture:
            capture.set_positions(pos_BK)
            teacher.final_hidden(input_ids_BT)
            capture.captured[5]["ffn_in"]   # (B, K, d)

    Positions are gathered inside the hooks, so only (B, K, d) per layer and kind is ever
    kept, never the (B, T, d) activations. Each `set_positions` clears what was captured.
    """

    def __init__(self, teacher: TeacherModel, layers: list[int], *, attention: bool = False) -> None:
        self.teacher = teacher
        self.layers = list(layers)
        self.attention = attention
        self.captured: dict[int, dict[str, torch.Tensor]] = {}
        """layer → {"ffn_in", "ffn_out"[, "attn_in", "attn_out"]} → (B, K, d), in the model dtype."""
        self._positions_BK: torch.Tensor | None = None
        self._handles: list[RemovableHandle] = []

    def set_positions(self, positions_BK: torch.Tensor) -> None:
        """Positions to keep in the next forward (B, K) int64; clears previous captures."""
        self._positions_BK = positions_BK.to(self.teacher.device)
        self.captured = {layer: {} for layer in self.layers}

    def __enter__(self) -> SnapshotCapture:
        for layer in self.layers:
            ffn = self.teacher.ffn(layer)
            self._handles.append(ffn.register_forward_hook(self._ffn_hook(layer)))
            if self.attention:
                attn = self.teacher.attention(layer)
                self._handles.append(attn.register_forward_hook(self._attn_hook(layer), with_kwargs=True))
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _gather(self, x_BTD: torch.Tensor) -> torch.Tensor:
        positions_BK = self._positions_BK
        assert positions_BK is not None, "call set_positions before the forward pass"
        assert positions_BK.shape[0] == x_BTD.shape[0], (positions_BK.shape, x_BTD.shape)
        rows_B1 = torch.arange(x_BTD.shape[0], device=x_BTD.device)[:, None]
        return x_BTD[rows_B1, positions_BK]  # (B, K, d), a copy

    def _ffn_hook(self, layer: int) -> Callable[[nn.Module, tuple[Any, ...], torch.Tensor], None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            self.captured[layer]["ffn_in"] = self._gather(args[0])
            self.captured[layer]["ffn_out"] = self._gather(output)

        return hook

    def _attn_hook(self, layer: int) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any], Any], None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            hidden_BTD = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            self.captured[layer]["attn_in"] = self._gather(hidden_BTD)
            self.captured[layer]["attn_out"] = self._gather(output[0])  # after o_proj

        return hook


def encode_bf16(x: torch.Tensor) -> np.ndarray:
    """The bf16 bits of `x` (rounded to nearest even) as uint16, same shape."""
    return x.detach().to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16)


def decode_bf16(bits: np.ndarray) -> torch.Tensor:
    """float32 values of bf16 bits stored as uint16 (exact: bf16 is a prefix of float32)."""
    return torch.from_numpy(np.ascontiguousarray(bits).view(np.int16)).view(torch.bfloat16).float()


def encode_fp8(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """float8 e4m3 codes (..., d) uint8 and one float32 scale (...) per vector, scale = amax / 448.

    Scaling each vector onto e4m3's full range keeps its 3 mantissa bits: relative error
    <= 2^-4 for every element above 2^-6·scale, absolute error <= 2^-10·scale below
    (subnormals). An all-zero vector gets scale 0 and decodes to zeros.
    """
    x = x.detach().float()
    amax = x.abs().amax(dim=-1)  # (...)
    if not bool(torch.isfinite(amax).all()):
        raise KdpipeError(
            "snapshot activations contain inf or NaN and cannot be stored in fp8; run the teacher in bfloat16 or float32"
        )
    scale = amax / FP8_MAX
    safe_scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scaled = (x / safe_scale[..., None]).clamp(-FP8_MAX, FP8_MAX)  # rounding could step just past 448
    codes = scaled.to(torch.float8_e4m3fn).view(torch.uint8)
    return codes.cpu().numpy(), scale.cpu().numpy()


def decode_fp8(codes: np.ndarray, scale: np.ndarray) -> torch.Tensor:
    """float32 values (..., d) from e4m3 codes (..., d) uint8 and per-vector scales (...)."""
    values = torch.from_numpy(np.ascontiguousarray(codes)).view(torch.float8_e4m3fn).float()
    return values * torch.from_numpy(np.asarray(scale, dtype=np.float32))[..., None]
