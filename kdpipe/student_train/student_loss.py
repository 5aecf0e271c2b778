"""The train module's forward: the student and every loss term in one `nn.Module`.

DDP and FSDP wrap this module, so they see the whole computation: the LM head and the
clone targets use student parameters outside the student's own forward. A step's loss is
`w_lm·CE + w_kd·KD + α·clone`; in eval the same forward feeds an `EvalAccumulator`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from kdpipe.student_train.builders import Student, lm_head_bias
from kdpipe.student_train.clone_loss import CloneScale, clone_loss_terms
from kdpipe.student_train.loader import StudentBatch
from kdpipe.student_train.losses import kd_lm_loss, normalise_targets
from kdpipe.student_train.metrics import EvalAccumulator


class LossWeights(NamedTuple):
    """The loss weights of one step."""

    lm: float
    kd: float
    clone: float


class StudentLoss(nn.Module):
    """Student forward plus losses; in eval, student forward plus eval metrics."""

    def __init__(
        self, student: Student, *, mode: str, kd_temperature: float, chunk_size: int, use_lm: bool, use_kd: bool, use_clone: bool,
        clone_scale: CloneScale = "absolute",
    ) -> None:
        super().__init__()
        self.student = student
        self.mode = mode
        self.kd_temperature = kd_temperature
        self.chunk_size = chunk_size
        self.use_lm, self.use_kd, self.use_clone = use_lm, use_kd, use_clone
        self.clone_scale = clone_scale

    def forward(
        self, batch: StudentBatch, weights: LossWeights | None = None, accumulator: EvalAccumulator | None = None
    ) -> dict[str, Tensor] | None:
        """Train: {"loss": weighted total, "loss/lm" | "loss/kd" | "loss/clone" | "loss/clone/{term}": detached}.
        Eval (`accumulator` given): adds to it and returns None."""
        capture = batch.snap_positions if self.use_clone and accumulator is None else None
        out = self.student(batch.input_ids, capture_positions_BK=capture)
        hidden_ND = out.hidden.reshape(-1, out.hidden.shape[-1])  # (B*T, D)
        head_VD, bias_V = self.student.lm_head_weight(), lm_head_bias(self.student)
        labels_N = batch.labels.reshape(-1)  # (B*T,)
        if accumulator is not None:
            accumulator.update(hidden_ND, head_VD, labels_N, batch.targets, bias_V)
            return None
        assert weights is not None
        total = hidden_ND.new_zeros((), dtype=torch.float32)
        logged: dict[str, Tensor] = {}
        if self.use_lm or self.use_kd:
            terms = kd_lm_loss(
                hidden_ND,
                head_VD,
                labels_N=labels_N if self.use_lm else None,
                targets=normalise_targets(batch.targets, mode=self.mode) if self.use_kd else None,
                kd_temperature=self.kd_temperature,
                chunk_size=self.chunk_size,
                lm_bias_V=bias_V,
            )
            total = total + weights.lm * terms.lm + weights.kd * terms.kd
            if self.use_lm:
                logged["loss/lm"] = terms.lm.detach()
            if self.use_kd:
                logged["loss/kd"] = terms.kd.detach()
        if self.use_clone:
            # Targets at the cached snapshot positions, the same positions the forward captured.
            targets = {layer: self.student.clone_targets(layer, batch.snapshots[layer]) for layer in out.activations}
            parts = clone_loss_terms(out.activations, targets, scale=self.clone_scale)
            clone = torch.stack(list(parts.values())).sum()
            total = total + weights.clone * clone
            logged["loss/clone"] = clone.detach()
            for term in sorted({term for _, term in parts}):
                logged[f"loss/clone/{term}"] = torch.stack([v for (_, t), v in parts.items() if t == term]).sum().detach()
        return {"loss": total, **logged}
