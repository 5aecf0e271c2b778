"""The LRC clone loss: MSE between student activations and teacher-derived targets.

Both sides are taken at the same snapshot positions: the caller passes the positions the
teacher cache stored to the student forward (`capture_positions_BK`), and builds the
targets from the cached snapshot with `LRCStudent.clone_targets`. Each (layer, term)
present on both sides contributes the mean squared error over its elements; the terms are
summed, as in the LRC paper, so adding a layer adds weight rather than diluting others.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def clone_loss_terms(
    activations: dict[int, dict[str, Tensor]], targets: dict[int, dict[str, Tensor]]
) -> dict[tuple[int, str], Tensor]:
    """Per (layer, term) MSE (mean over elements) for every pair present on both sides."""
    terms: dict[tuple[int, str], Tensor] = {}
    for layer in sorted(activations.keys() & targets.keys()):
        student, target = activations[layer], targets[layer]
        for term in sorted(student.keys() & target.keys()):
            s_BKW, t_BKW = student[term], target[term]
            assert s_BKW.shape == t_BKW.shape, f"clone term {term} of layer {layer}: {tuple(s_BKW.shape)} vs {tuple(t_BKW.shape)}"
            terms[(layer, term)] = F.mse_loss(s_BKW.float(), t_BKW.float())
    return terms


def clone_loss(activations: dict[int, dict[str, Tensor]], targets: dict[int, dict[str, Tensor]]) -> Tensor:
    """Sum over layers and terms of the per-term MSE; zero when nothing is shared."""
    terms = clone_loss_terms(activations, targets)
    if not terms:
        device = next((t.device for layer in activations.values() for t in layer.values()), None)
        return torch.zeros((), device=device)
    return torch.stack(list(terms.values())).sum()


def clone_loss_breakdown(
    activations: dict[int, dict[str, Tensor]], targets: dict[int, dict[str, Tensor]]
) -> dict[str, float]:
    """Per-term MSE summed over layers, for logging (e.g. {"clone/gate": 0.12, ...})."""
    totals: dict[str, float] = {}
    for (_, term), value in clone_loss_terms(activations, targets).items():
        totals[f"clone/{term}"] = totals.get(f"clone/{term}", 0.0) + float(value.detach())
    return totals
