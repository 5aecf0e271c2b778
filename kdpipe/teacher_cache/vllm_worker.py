"""Hooks that run inside each vLLM worker: final hidden states and snapshots of whole prompts.

vLLM runs the model in worker processes (always with tensor parallelism), so a hook cannot
write into the driver's memory. This class is mixed into every worker through vLLM's
`worker_extension_cls`; the driver calls its methods by name with `collective_rpc`, and the
arguments and results (tensors, lists, strings) cross processes through vLLM's own
serializer, never as pickled code. Hooks keep what they capture in the worker until the
driver takes it after each `generate`.

vLLM flattens the prompts of one scheduler step onto one token axis. Each prompt here is a
whole packed sequence of T tokens computed in a single step (prefix caching and chunked
prefill are off), so a step's tokens hold blocks of T consecutive positions 0..T-1. Each
block is matched to its sequence by its token ids (two identical sequences have identical
activations, so either match is right) — no reliance on the order vLLM schedules them in.

Tensor parallelism: the final normed hidden states, the FFN input (the post-attention norm's
output) and the attention input are computed from the residual stream, which every rank
holds whole; the FFN output (when the cache stores it) and the attention output are taken
after the row-parallel all-reduce of `down_proj` / `o_proj`. All are therefore replicated,
and only rank 0 returns them.

This module imports nothing from vLLM: it finds modules by the attribute names vLLM's
Llama, Qwen2, Qwen3 and Mistral implementations share (`model.layers[i].mlp`,
`.self_attn`, `model.norm`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


def block_starts(positions_N: torch.Tensor, seq_len: int) -> list[int]:
    """Offsets of the runs of positions 0..seq_len-1 in a step's flat position axis."""
    starts = torch.nonzero(positions_N == 0).flatten().tolist()
    n = positions_N.shape[0]
    return [s for s in starts if s + seq_len <= n and int(positions_N[s + seq_len - 1]) == seq_len - 1]


def match_blocks(input_ids_N: torch.Tensor, positions_N: torch.Tensor, tokens_BT: torch.Tensor, taken_B: torch.Tensor) -> list[tuple[int, int]]:
    """(row, offset) of each whole sequence of `tokens_BT` found in this step; marks rows in `taken_B`."""
    seq_len = tokens_BT.shape[1]
    found = []
    for start in block_starts(positions_N, seq_len):
        block_T = input_ids_N[start : start + seq_len]
        rows = torch.nonzero((tokens_BT == block_T).all(dim=1) & ~taken_B).flatten()
        if rows.numel():
            row = int(rows[0])
            taken_B[row] = True
            found.append((row, start))
    return found


def pack_tensor(x: torch.Tensor) -> list[Any]:
    """[dtype name, shape, raw bytes]: what survives vLLM's result path from worker to driver
    (its serializer hands tensors back as plain lists when the receiver expects no type)."""
    return [str(x.dtype).removeprefix("torch."), list(x.shape), x.contiguous().view(torch.uint8).numpy().tobytes()]


def unpack_tensor(packed: list[Any]) -> torch.Tensor:
    """The tensor `pack_tensor` packed (a copy that owns its memory)."""
    dtype, shape, data = packed
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(getattr(torch, dtype)).reshape(shape)


def find_modules(model: nn.Module, layers: list[int], attention: bool) -> tuple[nn.Module, list[nn.Module], str | None]:
    """(final norm, decoder blocks, None), or an error line naming the architecture when they are not there."""
    decoder = getattr(model, "model", None)
    blocks = getattr(decoder, "layers", None)
    norm = getattr(decoder, "norm", None)
    arch = type(model).__name__
    supported = "kdpipe's vLLM hooks support Llama, Qwen2, Qwen3 and Mistral-style models; use --backend transformers"
    if not isinstance(blocks, nn.ModuleList) or not isinstance(norm, nn.Module):
        return model, [], f"vLLM model {arch} has no model.layers / model.norm to hook; {supported}"
    for layer in layers:
        for name in ("mlp", "self_attn") if attention else ("mlp",):
            if not isinstance(getattr(blocks[layer], name, None), nn.Module):
                return model, [], f"vLLM model {arch} layer {layer} has no '{name}' module to hook for snapshots; {supported}"
    return norm, list(blocks), None


class _Capture:
    """What the hooks of one worker keep for the current batch."""

    def __init__(self, tokens_BT: torch.Tensor, positions_BK: torch.Tensor | None) -> None:
        self.tokens_BT = tokens_BT  # (B, T) int64 on the CPU
        self.positions_BK = positions_BK  # (B, K) int64 on the CPU, or None without snapshots
        self.taken_B = torch.zeros(tokens_BT.shape[0], dtype=torch.bool)
        self.step: list[tuple[int, int]] = []  # (row, offset) of the blocks of the step being computed
        self.step_index: torch.Tensor | None = None  # (n_blocks, K) token indices of their snapshot positions
        self.hidden: dict[int, torch.Tensor] = {}  # row -> (T, d)
        self.snaps: dict[str, dict[int, torch.Tensor]] = {}  # "layer/term" -> row -> (K, d)

    def start_step(self, input_ids_N: torch.Tensor, positions_N: torch.Tensor) -> None:
        self.step = match_blocks(input_ids_N.cpu(), positions_N.cpu(), self.tokens_BT, self.taken_B)
        if self.positions_BK is not None and self.step:
            offsets = torch.tensor([start for _, start in self.step])[:, None]
            self.step_index = (offsets + self.positions_BK[[row for row, _ in self.step]]).to(input_ids_N.device)

    def keep_hidden(self, x_ND: torch.Tensor) -> None:
        seq_len = self.tokens_BT.shape[1]
        for row, start in self.step:
            self.hidden[row] = x_ND[start : start + seq_len].to("cpu", copy=True)

    def keep_snapshot(self, key: str, x_ND: torch.Tensor) -> None:
        if self.step_index is None or not self.step:
            return
        gathered = x_ND[self.step_index].cpu()  # (n_blocks, K, d)
        per_row = self.snaps.setdefault(key, {})
        for i, (row, _) in enumerate(self.step):
            per_row[row] = gathered[i]


def _first(output: Any) -> torch.Tensor:
    """vLLM's fused norms return (normed, residual); other modules a tensor."""
    return output[0] if isinstance(output, tuple) else output


class CaptureExtension:
    """Methods added to every vLLM worker (see the module docstring); called with `collective_rpc`."""

    def kdpipe_check_modules(self, layers: list[int], attention: bool) -> str | None:
        """None if the hooks can be installed for these layers, else a one-line error."""
        return find_modules(self.get_model(), layers, attention)[2]  # type: ignore[attr-defined]

    def kdpipe_install_hooks(self, layers: list[int], terms: list[str]) -> str | None:
        """Replace any kdpipe hooks by ones for the final norm and these layers' snapshot `terms`; None or an error line."""
        self.kdpipe_remove_hooks()
        model = self.get_model()  # type: ignore[attr-defined]
        attention = "attn_in" in terms
        norm, blocks, error = find_modules(model, layers, attention)
        if error:
            return error
        handles: list[RemovableHandle] = [
            model.register_forward_pre_hook(self._kdpipe_step_hook, with_kwargs=True),
            norm.register_forward_hook(lambda module, args, output: self._kdpipe_keep(lambda c: c.keep_hidden(_first(output)))),
        ]
        for layer in layers:
            handles.append(blocks[layer].mlp.register_forward_hook(self._kdpipe_ffn_hook(layer, "ffn_out" in terms)))
            if attention:
                handles.append(blocks[layer].self_attn.register_forward_hook(self._kdpipe_attn_hook(layer), with_kwargs=True))
        self._kdpipe_handles = handles
        return None

    def kdpipe_remove_hooks(self) -> None:
        for handle in getattr(self, "_kdpipe_handles", []):
            handle.remove()
        self._kdpipe_handles = []
        self._kdpipe_capture = None

    def kdpipe_set_batch(self, tokens_BT: list[list[int]], positions_BK: list[list[int]] | None) -> None:
        """The sequences (B, T) of the next `generate` and their snapshot positions (B, K)."""
        positions = None if positions_BK is None else torch.tensor(positions_BK, dtype=torch.int64)
        self._kdpipe_capture = _Capture(torch.tensor(tokens_BT, dtype=torch.int64), positions)

    def kdpipe_take_batch(self) -> dict[str, list[Any]] | str | None:
        """Rank 0: {"hidden": (B, T, d), "layer/term": (B, K, d)} as `pack_tensor` lists, or an error line; other ranks: None."""
        capture, self._kdpipe_capture = self._kdpipe_capture, None
        if self.rank != 0:  # type: ignore[attr-defined]
            return None
        if capture is None:
            return "kdpipe_take_batch called without kdpipe_set_batch"
        num_rows = capture.tokens_BT.shape[0]
        missing = [row for row in range(num_rows) if row not in capture.hidden]
        if missing:
            return f"vLLM did not compute sequences {missing} of the batch as whole prompts in one step"
        result = {"hidden": pack_tensor(torch.stack([capture.hidden[row] for row in range(num_rows)]))}
        for key, per_row in capture.snaps.items():
            result[key] = pack_tensor(torch.stack([per_row[row] for row in range(num_rows)]))
        return result

    def _kdpipe_keep(self, keep: Any) -> None:
        capture = getattr(self, "_kdpipe_capture", None)
        if capture is not None:
            keep(capture)

    def _kdpipe_step_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        input_ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        positions = kwargs["positions"] if "positions" in kwargs else args[1]
        self._kdpipe_keep(lambda c: c.start_step(input_ids, positions))

    def _kdpipe_ffn_hook(self, layer: int, ffn_output: bool) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            def keep(capture: _Capture) -> None:
                capture.keep_snapshot(f"{layer}/ffn_in", args[0])
                if ffn_output:
                    capture.keep_snapshot(f"{layer}/ffn_out", _first(output))

            self._kdpipe_keep(keep)

        return hook

    def _kdpipe_attn_hook(self, layer: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[1]

            def keep(capture: _Capture) -> None:
                capture.keep_snapshot(f"{layer}/attn_in", hidden)
                capture.keep_snapshot(f"{layer}/attn_out", _first(output))

            self._kdpipe_keep(keep)

        return hook
