"""AdamW as every kdpipe training run sets it up: weight decay on matrices only.

Norm scales and biases are not shrunk (decaying an RMSNorm gain towards 0 only hurts).
Used by train-student and by the demo's teacher, so both optimise the same way.
"""

from __future__ import annotations

import torch


def adamw(module: torch.nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float], eps: float) -> torch.optim.AdamW:
    """AdamW over `module`'s trainable parameters: matrices with `weight_decay`, vectors without."""
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps)
