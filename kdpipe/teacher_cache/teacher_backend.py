"""What a teacher backend gives `cache-teacher`, and the backend that runs the teacher in transformers.

A backend turns a batch of token ids into two things: the final normed hidden states
(B, T, d) and the snapshot tensors (B, K, d) at the requested positions. Everything after
that (the position-chunked LM head with the teacher's own head weight, the samplers,
encoding, the shard writer) is shared code in `run.py`, so caches written by different
backends of one teacher are interchangeable: the teacher fingerprint never depends on the
backend, and the manifest only records which one created the cache.

Backends: `transformers` (here: the whole model on one device, hooks on its blocks) and
`vllm` (`vllm_backend.py`: tensor-parallel teachers; imported only when asked for).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from importlib import metadata
from typing import Literal, Protocol

import torch

from kdpipe.teacher_cache.backend import TeacherInfo, TeacherModel
from kdpipe.teacher_cache.snapshots import SnapshotCapture

BackendName = Literal["transformers", "vllm"]

Snapshots = dict[int, dict[str, torch.Tensor]]
"""layer → {"ffn_in"[, "ffn_out"][, "attn_in", "attn_out"]} → (B, K, d) in the model dtype."""


class TeacherBackend(Protocol):
    """The teacher as `cache-teacher` drives it; see the module docstring."""

    name: BackendName
    info: TeacherInfo

    @property
    def device(self) -> torch.device:
        """Where `forward` returns hidden states and `logits` runs the head."""

    @property
    def dtype(self) -> torch.dtype:
        """The teacher's compute dtype."""

    def versions(self) -> dict[str, str]:
        """Versions of the packages that computed the cache, recorded in the manifest."""

    def check_snapshot_layers(self, layers: list[int], attention: bool) -> None:
        """Raise KdpipeError now if these layers' FFN (and attention) modules cannot be hooked."""

    def capturing(self, layers: list[int], terms: tuple[str, ...]) -> contextlib.AbstractContextManager[None]:
        """Snapshot hooks for `terms` (of "ffn_in", "ffn_out", "attn_in", "attn_out") installed for the `with` block."""

    def forward(self, input_ids_BT: torch.Tensor, positions_BK: torch.Tensor | None) -> tuple[torch.Tensor, Snapshots]:
        """Final normed hidden states (B, T, d) and, inside `capturing`, snapshots at `positions_BK`."""

    def logits(self, hidden_PD: torch.Tensor) -> torch.Tensor:
        """Float32 logits (P, V) of a chunk of final hidden states, with the teacher's own head."""

    def close(self) -> None:
        """Release the teacher (worker processes, device memory)."""


def package_versions(*names: str) -> dict[str, str]:
    """Installed versions of `names` (distribution names), for the manifest."""
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


class TransformersBackend:
    """The teacher as a transformers model on one device; snapshots through `SnapshotCapture` hooks."""

    name: BackendName = "transformers"

    def __init__(self, model: TeacherModel) -> None:
        self.model = model
        self.info = model.info
        self._capture: SnapshotCapture | None = None

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def versions(self) -> dict[str, str]:
        return package_versions("kdpipe", "torch", "transformers")

    def check_snapshot_layers(self, layers: list[int], attention: bool) -> None:
        for layer in layers:
            self.model.ffn(layer)
            if attention:
                self.model.attention(layer)

    @contextlib.contextmanager
    def capturing(self, layers: list[int], terms: tuple[str, ...]) -> Iterator[None]:
        with SnapshotCapture(self.model, layers, attention="attn_in" in terms, ffn_output="ffn_out" in terms) as capture:
            self._capture = capture
            try:
                yield
            finally:
                self._capture = None

    def forward(self, input_ids_BT: torch.Tensor, positions_BK: torch.Tensor | None) -> tuple[torch.Tensor, Snapshots]:
        if self._capture is None or positions_BK is None:
            return self.model.final_hidden(input_ids_BT), {}
        self._capture.set_positions(positions_BK)
        hidden_BTD = self.model.final_hidden(input_ids_BT)
        return hidden_BTD, self._capture.captured

    def logits(self, hidden_PD: torch.Tensor) -> torch.Tensor:
        return self.model.logits(hidden_PD)

    def close(self) -> None:
        pass
