"""The student's LM cross-entropy and distillation loss from sparse cached teacher targets.

Both terms need log-softmax of the student logits over the FULL vocabulary: the KD
target covers a dozen ids per position, but tokens the teacher never sampled are pushed
down through the normaliser (DESIGN, "KD loss from counts"). A full (N, V) logits tensor
is the largest thing in a training step (8K positions × 128K vocab × 4 bytes = 4 GiB), so
`kd_lm_loss` fuses the LM head with both losses in one `torch.autograd.Function` that
walks the positions in chunks, in the spirit of Liger's fused linear cross-entropy and
Apple's "Cut Your Losses" (Wijmans et al. 2024):

- forward: per chunk, logits = h @ Wᵀ, ONE log-sum-exp shared by CE and KD (a second
  one of z/τ from the same logits chunk when τ != 1); it saves hidden, weight and the
  per-position LSEs, never the logits;
- backward: recomputes each chunk's logits, forms the gradient w.r.t. the logits in
  place (softmax terms minus the label and target scatters) and accumulates the hidden
  and weight gradients chunk by chunk.

The KD term is the cross-entropy form `-Σ_i w_i · log softmax(z/τ)_i`; it differs from
KL(teacher ‖ student) by the teacher entropy, a constant, so gradients are identical.
There is no τ² factor (Hinton et al. 2015 scale soft losses by τ² to keep gradient sizes
comparable across temperatures): the KD weight schedule already sets the scale, and a
caller who wants the convention multiplies its KD weight by τ².
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from kdpipe.schemas.errors import KdpipeError

IGNORE_INDEX = -100
"""Label of positions without an LM target (padding, the last position of a document)."""

TARGET_MODES = ("rs-kd", "top-k", "top-p-k")
"""Sampler modes of the teacher cache (DESIGN, "The teacher cache")."""

_MIN_LEFTOVER_MASS = 1e-30
"""Floor of the student mass outside a position's stored ids in the ghost term.

The leftover mass is summed directly over the unstored ids (not as 1 - Σ stored, which
cancels to noise once the student puts nearly all its mass on the stored ids), so it is
exact down to fp32 underflow; below the floor the term is constant and its gradient 0.
"""


class SparseTargetBatch(NamedTuple):
    """Sparse teacher targets for N positions, ragged: flat entries plus offsets."""

    ids: Tensor  # (E,) int64 vocabulary ids, unique within a position
    weights: Tensor  # (E,) float32: c_i/N for rs-kd (sum to 1 per position); probabilities for top-k modes
    offsets: Tensor  # (N+1,) int64: entries of position n are [offsets[n], offsets[n+1])
    ghost: Tensor | None  # (N,) float32 leftover teacher mass (top-k modes with a ghost bucket), else None


class LossTerms(NamedTuple):
    """Both loss means, and how many positions each averages over (for logging and
    token-weighted averaging across ranks). A mean over no positions is 0."""

    lm: Tensor  # () mean CE over positions whose label is not IGNORE_INDEX
    kd: Tensor  # () mean KD over positions with at least one target entry
    num_lm_tokens: int
    num_kd_positions: int


def _entry_rows(offsets_N1: Tensor, num_entries: int) -> Tensor:
    """The position index of every flat entry, vectorised from the offsets."""
    counts_N = offsets_N1[1:] - offsets_N1[:-1]
    positions_N = torch.arange(counts_N.numel(), device=offsets_N1.device)
    return torch.repeat_interleave(positions_N, counts_N, output_size=num_entries)  # (E,)


def normalise_targets(targets: SparseTargetBatch, *, mode: str) -> SparseTargetBatch:
    """Make each position's targets a distribution, as the cache mode requires.

    rs-kd weights c_i/N already sum to 1 and are returned unchanged. Top-k and top-p-k
    keep only the head of the teacher distribution: without a ghost bucket the weights
    are renormalised to sum to 1 (the truncated distribution PD trains on); with one,
    weights and ghost together are rescaled to sum to 1, so the ghost carries the mass
    the cache did not store. Positions without entries and ghost stay as they are.
    """
    if mode not in TARGET_MODES:
        raise KdpipeError(f"unknown KD target mode {mode!r}: use one of {', '.join(TARGET_MODES)}")
    if mode == "rs-kd":
        if targets.ghost is not None:
            raise KdpipeError("rs-kd targets carry a ghost bucket: only top-k and top-p-k caches have one")
        return targets
    rows_E = _entry_rows(targets.offsets, targets.ids.numel())
    num_positions = targets.offsets.numel() - 1
    total_N = targets.weights.new_zeros(num_positions).index_add_(0, rows_E, targets.weights)
    if targets.ghost is not None:
        total_N = total_N + targets.ghost
    scale_N = torch.where(total_N > 0, 1.0 / total_N.clamp_min(torch.finfo(total_N.dtype).tiny), 0.0)
    ghost_N = None if targets.ghost is None else targets.ghost * scale_N
    return targets._replace(weights=targets.weights * scale_N[rows_E], ghost=ghost_N)


class _Plan(NamedTuple):
    """What the fused function needs besides the differentiable inputs: integer
    bookkeeping computed once, with a single host sync, in `kd_lm_loss`."""

    chunk_size: int
    temperature: float
    num_lm: int
    num_kd: int
    entry_bounds: list[int]  # first entry of every chunk, then E
    has_ghost: bool


def _logits_chunk(hidden_CD: Tensor, weight_VD: Tensor, bias_V: Tensor | None, math_dtype: torch.dtype) -> Tensor:
    """One chunk of logits: the matmul in the input dtype (fp32 accumulation is what
    cuBLAS does for bf16), everything after it in `math_dtype`."""
    logits_CV = hidden_CD @ weight_VD.T
    if bias_V is not None:
        logits_CV = logits_CV + bias_V
    return logits_CV.to(math_dtype)


def _no_autocast(device: torch.device) -> torch.autocast:
    """Autocast off inside the fused function: the dtypes are chosen explicitly there."""
    return torch.autocast(device.type, enabled=False)


class _FusedLinearKdLm(torch.autograd.Function):
    """(lm, kd) means from hidden states and the LM head, in position chunks."""

    @staticmethod
    def forward(
        ctx,
        hidden_ND: Tensor,
        weight_VD: Tensor,
        bias_V: Tensor | None,
        labels_N: Tensor,
        rows_E: Tensor,
        ids_E: Tensor,
        weights_E: Tensor,
        wsum_N: Tensor,
        ghost_N: Tensor,
        plan: _Plan,
    ) -> tuple[Tensor, Tensor]:
        math_dtype = torch.promote_types(hidden_ND.dtype, torch.float32)
        num_positions, tau = hidden_ND.shape[0], plan.temperature
        lse_lm_N = hidden_ND.new_zeros(num_positions, dtype=math_dtype)
        lse_kd_N = lse_lm_N if tau == 1.0 else torch.zeros_like(lse_lm_N)
        rest_N = torch.ones_like(lse_lm_N)  # student mass outside the stored ids
        lm_sum = hidden_ND.new_zeros((), dtype=math_dtype)
        kd_sum = hidden_ND.new_zeros((), dtype=math_dtype)
        with _no_autocast(hidden_ND.device), torch.no_grad():
            for chunk, start in enumerate(range(0, num_positions, plan.chunk_size)):
                end = min(start + plan.chunk_size, num_positions)
                logits_CV = _logits_chunk(hidden_ND[start:end], weight_VD, bias_V, math_dtype)
                lse_C = torch.logsumexp(logits_CV, dim=-1)
                lse_lm_N[start:end] = lse_C
                if plan.num_lm:
                    labels_C = labels_N[start:end]
                    label_logit_C = logits_CV.gather(1, labels_C.clamp_min(0)[:, None]).squeeze(1)
                    lm_sum += torch.where(labels_C != IGNORE_INDEX, lse_C - label_logit_C, 0.0).sum()
                if not plan.num_kd:
                    continue
                e0, e1 = plan.entry_bounds[chunk], plan.entry_bounds[chunk + 1]
                rows_e, ids_e = rows_E[e0:e1] - start, ids_E[e0:e1]
                if tau != 1.0:
                    lse_C = torch.logsumexp(logits_CV / tau, dim=-1)
                    lse_kd_N[start:end] = lse_C
                log_q_e = logits_CV[rows_e, ids_e] / tau - lse_C[rows_e]  # log softmax(z/τ) at targets
                kd_sum -= (weights_E[e0:e1] * log_q_e).sum()
                if plan.has_ghost:
                    q_CV = logits_CV.div_(tau).sub_(lse_C[:, None]).exp_()  # logits are not needed again
                    q_CV[rows_e, ids_e] = 0.0
                    rest_C = q_CV.sum(dim=-1)
                    rest_N[start:end] = rest_C
                    kd_sum -= (ghost_N[start:end] * rest_C.clamp_min(_MIN_LEFTOVER_MASS).log()).sum()
        ctx.save_for_backward(hidden_ND, weight_VD, bias_V, labels_N, rows_E, ids_E, weights_E, wsum_N, ghost_N,
                              lse_lm_N, lse_kd_N, rest_N)  # fmt: skip
        ctx.plan = plan
        return lm_sum / max(plan.num_lm, 1), kd_sum / max(plan.num_kd, 1)

    @staticmethod
    def backward(ctx, grad_lm: Tensor, grad_kd: Tensor) -> tuple[Tensor | None, ...]:
        (hidden_ND, weight_VD, bias_V, labels_N, rows_E, ids_E, weights_E, wsum_N, ghost_N,
         lse_lm_N, lse_kd_N, rest_N) = ctx.saved_tensors  # fmt: skip
        plan: _Plan = ctx.plan
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        math_dtype = lse_lm_N.dtype
        num_positions, tau = hidden_ND.shape[0], plan.temperature
        # d mean / d logits = scale · (softmax − target); the KD softmax is of z/τ, hence 1/τ.
        lm_scale = grad_lm.to(math_dtype) / max(plan.num_lm, 1)
        kd_scale = grad_kd.to(math_dtype) / (max(plan.num_kd, 1) * tau)
        # Ghost term −g·log(rest): d/dz_j = −g/rest · q_j (1[j unstored] − rest), per unit kd_scale.
        ghost_coef_N = torch.where(rest_N > _MIN_LEFTOVER_MASS, ghost_N / rest_N, 0.0)
        grad_hidden = torch.empty_like(hidden_ND) if need_hidden else None
        grad_weight = torch.zeros_like(weight_VD, dtype=math_dtype) if need_weight else None
        grad_bias = torch.zeros_like(bias_V, dtype=math_dtype) if need_bias else None
        with _no_autocast(hidden_ND.device), torch.no_grad():
            for chunk, start in enumerate(range(0, num_positions, plan.chunk_size)):
                end = min(start + plan.chunk_size, num_positions)
                hidden_CD = hidden_ND[start:end]
                logits_CV = _logits_chunk(hidden_CD, weight_VD, bias_V, math_dtype)
                labels_C = labels_N[start:end]
                lm_coef_C = torch.where(labels_C != IGNORE_INDEX, lm_scale, 0.0)  # (C,)
                if plan.num_kd:
                    e0, e1 = plan.entry_bounds[chunk], plan.entry_bounds[chunk + 1]
                    rows_e, ids_e = rows_E[e0:e1] - start, ids_E[e0:e1]
                    # Row coefficient of q at stored ids, and at unstored ids (minus the ghost pull).
                    kd_coef_C = kd_scale * (wsum_N[start:end] + ghost_N[start:end])
                    kd_rest_coef_C = kd_coef_C - kd_scale * ghost_coef_N[start:end]
                    shared = tau == 1.0  # one softmax serves both terms
                    q_CV = (logits_CV if shared else logits_CV / tau).sub_(lse_kd_N[start:end, None]).exp_()
                    lm_part_C = lm_coef_C if shared else torch.zeros_like(lm_coef_C)
                    q_e = q_CV[rows_e, ids_e]
                    grad_CV = q_CV.mul_((kd_rest_coef_C + lm_part_C)[:, None])
                    # Stored ids feel no ghost pull. Assigned, not accumulated: a repeated id gets one value.
                    grad_CV[rows_e, ids_e] = q_e * (kd_coef_C + lm_part_C)[rows_e]
                    grad_CV.index_put_((rows_e, ids_e), -kd_scale * weights_E[e0:e1], accumulate=True)
                    if not shared:
                        grad_CV.add_(logits_CV.sub_(lse_lm_N[start:end, None]).exp_().mul_(lm_coef_C[:, None]))
                else:
                    grad_CV = logits_CV.sub_(lse_lm_N[start:end, None]).exp_().mul_(lm_coef_C[:, None])
                grad_CV.scatter_add_(1, labels_C.clamp_min(0)[:, None], -lm_coef_C[:, None])
                if need_bias:
                    grad_bias += grad_CV.sum(dim=0)
                grad_CV = grad_CV.to(hidden_ND.dtype)
                if need_hidden:
                    grad_hidden[start:end] = grad_CV @ weight_VD
                if need_weight:
                    grad_weight += grad_CV.T @ hidden_CD  # (V, D), accumulated in math_dtype
        if need_weight:
            grad_weight = grad_weight.to(weight_VD.dtype)
        if need_bias:
            grad_bias = grad_bias.to(bias_V.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None, None


def kd_lm_loss(
    hidden_ND: Tensor,
    lm_weight_VD: Tensor,
    *,
    labels_N: Tensor | None,
    targets: SparseTargetBatch | None,
    kd_temperature: float = 1.0,
    chunk_size: int = 1024,
    lm_bias_V: Tensor | None = None,
) -> LossTerms:
    """LM cross-entropy and sparse-target KD of the student, without (N, V) logits.

    `hidden_ND` are the final hidden states (after the final norm) flattened over batch
    and time, `lm_weight_VD` (and `lm_bias_V`) the LM head. `labels_N` are already
    shifted (position t's label is token t+1) with IGNORE_INDEX where there is none;
    `targets` are the teacher's distributions at the same positions (see
    `normalise_targets`). Either may be None and its term is 0.

    lm = mean over labelled positions of −log softmax(z)_label; kd = mean over positions
    with targets of −Σ_i w_i · log softmax(z/τ)_i − ghost · log(1 − Σ_i softmax(z/τ)_i).
    Gradients are exact for any combination w_lm·lm + w_kd·kd. Under autocast the
    matmuls run in the autocast dtype and the softmax math in fp32; the gradients are
    returned in the dtypes of the inputs.
    """
    if kd_temperature <= 0:
        raise KdpipeError(f"KD temperature {kd_temperature} must be > 0: set a positive kd_temperature")
    if chunk_size < 1:
        raise KdpipeError(f"loss chunk size {chunk_size} must be >= 1: set a positive chunk_size")
    assert labels_N is not None or targets is not None, "kd_lm_loss needs labels, targets or both"
    assert hidden_ND.dim() == 2 and lm_weight_VD.dim() == 2 and hidden_ND.shape[1] == lm_weight_VD.shape[1]
    device = hidden_ND.device
    num_positions, vocab_size = hidden_ND.shape[0], lm_weight_VD.shape[0]
    if torch.is_autocast_enabled(device.type):
        compute_dtype = torch.get_autocast_dtype(device.type)
        hidden_ND, lm_weight_VD = hidden_ND.to(compute_dtype), lm_weight_VD.to(compute_dtype)
        lm_bias_V = None if lm_bias_V is None else lm_bias_V.to(compute_dtype)
    assert hidden_ND.dtype == lm_weight_VD.dtype, "hidden states and LM head must share a dtype outside autocast"

    if labels_N is None:
        labels_N = torch.full((num_positions,), IGNORE_INDEX, dtype=torch.long, device=device)
    assert labels_N.shape == (num_positions,)
    labelled_N = labels_N != IGNORE_INDEX
    if targets is None:
        targets = SparseTargetBatch(
            ids=torch.zeros(0, dtype=torch.long, device=device),
            weights=torch.zeros(0, dtype=torch.float32, device=device),
            offsets=torch.zeros(num_positions + 1, dtype=torch.long, device=device),
            ghost=None,
        )
    assert targets.offsets.shape == (num_positions + 1,) and targets.ids.shape == targets.weights.shape
    rows_E = _entry_rows(targets.offsets, targets.ids.numel())
    has_targets_N = targets.offsets[1:] > targets.offsets[:-1]
    math_dtype = torch.promote_types(hidden_ND.dtype, torch.float32)
    weights_E = targets.weights.to(math_dtype)
    wsum_N = torch.zeros(num_positions, dtype=math_dtype, device=device).index_add_(0, rows_E, weights_E)
    ghost_N = torch.zeros(num_positions, dtype=math_dtype, device=device)
    if targets.ghost is not None:  # a ghost without stored ids has log(1 − 0) = 0: left out
        ghost_N = torch.where(has_targets_N, targets.ghost.to(math_dtype), 0.0)

    # One host sync for all integer bookkeeping: counts, id ranges, chunk entry bounds.
    label_range = torch.where(labelled_N, labels_N, 0).aminmax()
    id_range = torch.cat([targets.ids, torch.zeros(1, dtype=targets.ids.dtype, device=device)]).aminmax()
    chunk_starts = torch.arange(0, num_positions, chunk_size, device=device)
    stats = torch.cat([
        torch.stack([labelled_N.sum(), has_targets_N.sum(), label_range.min.long(), label_range.max.long(),
                     id_range.min.long(), id_range.max.long()]),
        targets.offsets[chunk_starts], targets.offsets[-1:],
    ]).tolist()  # fmt: skip
    num_lm, num_kd, min_label, max_label, min_id, max_id, *entry_bounds = stats
    if min_label < 0 or max_label >= vocab_size:
        raise KdpipeError(
            f"label id {max_label if max_label >= vocab_size else min_label} is outside the student vocabulary "
            f"[0, {vocab_size}): the token store's tokenizer does not match this student; use a student with the teacher's tokenizer"
        )
    if min_id < 0 or max_id >= vocab_size:
        raise KdpipeError(
            f"teacher target id {max_id if max_id >= vocab_size else min_id} is outside the student vocabulary "
            f"[0, {vocab_size}): the cache's teacher vocabulary does not fit; use a student with the teacher's tokenizer"
        )
    plan = _Plan(chunk_size, float(kd_temperature), num_lm, num_kd, entry_bounds, targets.ghost is not None)
    lm, kd = _FusedLinearKdLm.apply(
        hidden_ND, lm_weight_VD, lm_bias_V, labels_N, rows_E, targets.ids, weights_E, wsum_N, ghost_N, plan
    )
    return LossTerms(lm=lm, kd=kd, num_lm_tokens=num_lm, num_kd_positions=num_kd)
