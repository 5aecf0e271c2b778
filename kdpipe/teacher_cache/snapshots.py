"""Snapshot capture: forward hooks that keep the selected teacher layers' FFN (and optional attention) activations.

LRC clones the teacher's intermediate activations. kdpipe stores per selected layer only
the FFN input (the post-attention-norm hidden state), and the FFN output (down-projection
output) only when asked; the trainer holds the frozen teacher weights and recomputes the
gate, up and FFN output targets as `W_gate·x_in`, `W_up·x_in` and
`W_down·(act(W_gate·x_in) ⊙ W_up·x_in)`.
Which layers and positions: `snapshot_positions`; how values are stored: `snapshot_codecs`
(both re-exported here for existing callers).
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from kdpipe.teacher_cache.backend import TeacherModel
from kdpipe.teacher_cache.snapshot_codecs import FP8_MAX, decode_bf16, decode_fp8, encode_bf16, encode_fp8  # noqa: F401 (re-export)
from kdpipe.teacher_cache.snapshot_positions import parse_layer_spec, snapshot_positions  # noqa: F401 (re-export)


class SnapshotCapture:
    """Forward hooks that keep the selected layers' FFN (and optionally attention) activations at chosen positions.

    Usage::

        with SnapshotCapture(teacher, layers=[0, 5], attention=False, ffn_output=False) as capture:
            capture.set_positions(pos_BK)
            teacher.final_hidden(input_ids_BT)
            capture.captured[5]["ffn_in"]   # (B, K, d)

    Positions are gathered inside the hooks, so only (B, K, d) per layer and kind is ever
    kept, never the (B, T, d) activations. Each `set_positions` clears what was captured.
    """

    def __init__(self, teacher: TeacherModel, layers: list[int], *, attention: bool = False, ffn_output: bool = True) -> None:
        self.teacher = teacher
        self.layers = list(layers)
        self.attention = attention
        self.ffn_output = ffn_output
        self.captured: dict[int, dict[str, torch.Tensor]] = {}
        """layer → {"ffn_in"[, "ffn_out"][, "attn_in", "attn_out"]} → (B, K, d), in the model dtype."""
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
            if self.ffn_output:
                self.captured[layer]["ffn_out"] = self._gather(output)

        return hook

    def _attn_hook(self, layer: int) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any], Any], None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            hidden_BTD = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            self.captured[layer]["attn_in"] = self._gather(hidden_BTD)
            self.captured[layer]["attn_out"] = self._gather(output[0])  # after o_proj

        return hook
