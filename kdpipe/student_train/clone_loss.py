"""The LRC clone loss: MSE between student activations and teacher-derived targets.

Both sides are taken at the same snapshot positions: the caller passes the positions the
teacher cache stored to the student forward (`capture_positions_BK`), and builds the
targets from the cached snapshot with `LRCStudent.clone_targets`. Each (layer, term)
present on both sides contributes the mean squared error over its elements; the terms are
summed, as in the LRC paper, so adding a layer adds weight rather than diluting others.

Two scales (`CloneScale`): "absolute" is the paper's plain MSE, whose size depends on the
teacher's activation magnitudes (on SmolLM2-135M the sum over 8 layers × gate/up/ffn_out is
~77 at the start, 4× the KD term, so one α means different things on different teachers);
"relative" takes each position's squared error over its teacher target's squared norm
(detached), averaged over positions and over terms: the mean relative error, 1 for a student
that outputs nothing, 0 for a perfect clone, on any teacher and with any number of layers.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

CloneScale = Literal["relative", "absolute"]


def clone_loss_terms(
    activations: dict[int, dict[str, Tensor]], targets: dict[int, dict[str, Tensor]], *, scale: CloneScale = "absolute"
) -> dict[tuple[int, str], Tensor]:
    """Per (layer, term) MSE (mean over elements) for every pair present on both sides, divided
    or, when `scale` is "relative", the mean over positions of |s - t|² / |t|², divided by the number of terms
    (their sum is then the mean)."""
    terms: dict[tuple[int, str], Tensor] = {}
    for layer in sorted(activations.keys() & targets.keys()):
        student, target = activations[layer], targets[layer]
        for term in sorted(student.keys() & target.keys()):
            s_BKW, t_BKW = student[term], target[term]
            assert s_BKW.shape == t_BKW.shape, f"clone term {term} of layer {layer}: {tuple(s_BKW.shape)} vs {tuple(t_BKW.shape)}"
            if scale == "relative":
                # Per position, so that the loss of a batch is the mean of its micro-batches' (gradient
                # accumulation stays exact); detached: the ffn_out/attn_out targets depend on P, which
                # must not learn to grow them.
                error_BK = (s_BKW.float() - t_BKW.float()).square().sum(-1)
                energy_BK = t_BKW.detach().float().square().sum(-1).clamp_min(torch.finfo(torch.float32).tiny)
                terms[(layer, term)] = (error_BK / energy_BK).mean()
            else:
                terms[(layer, term)] = F.mse_loss(s_BKW.float(), t_BKW.float())
    if scale == "relative":
        terms = {key: value / len(terms) for key, value in terms.items()}
    return terms


def clone_loss(
    activations: dict[int, dict[str, Tensor]], targets: dict[int, dict[str, Tensor]], *, scale: CloneScale = "absolute"
) -> Tensor:
    """Sum over layers and terms of the per-term MSE; zero when nothing is shared."""
    terms = clone_loss_terms(activations, targets, scale=scale)
    if not terms:
        device = next((t.device for layer in activations.values() for t in layer.values()), None)
        return torch.zeros((), device=device)
    return torch.stack(list(terms.values())).sum()


def clone_loss_breakdown(
    activations: dict[int, dict[str, Tensor]], targets: dict[int, dict[str, Tensor]], *, scale: CloneScale = "absolute"
) -> dict[str, float]:
    """Per-term MSE summed over layers, for logging (e.g. {"clone/gate": 0.12, ...})."""
    totals: dict[str, float] = {}
    for (_, term), value in clone_loss_terms(activations, targets, scale=scale).items():
        totals[f"clone/{term}"] = totals.get(f"clone/{term}", 0.0) + float(value.detach())
    return totals
