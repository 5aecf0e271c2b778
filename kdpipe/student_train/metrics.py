"""Held-out evaluation: LM loss, KL to the cached teacher targets, calibration.

Like the training loss (`kdpipe.student_train.losses`), evaluation never builds (N, V)
logits for all positions: `EvalAccumulator.update` takes the final hidden states and the
LM head and walks the positions in chunks of `chunk_size`, so an eval batch costs the
memory of one (chunk_size, V) block. All sums are kept in one float64 vector (`totals`),
so eval over many batches is a sum, and eval over many ranks is one
`dist.all_reduce(acc.totals)` before `result()`.

Metrics (all of the student at temperature 1, the distribution it will be used with):

- `lm_loss`: mean cross-entropy over labelled positions (label != IGNORE_INDEX).
- `kl`: mean over positions with cached targets of KL(teacher ‖ student) =
  Σ w log w − Σ w log p_S, with the targets made a distribution as in training
  (`normalise_targets`), plus the ghost bucket g log g − g log(mass of the student
  outside the stored ids) when the cache has one. For an rs-kd cache w = c/N is the
  *sampled empirical* distribution, not the teacher's: the cross-entropy part is unbiased,
  but Σ w log w is the empirical negentropy, which over-states the teacher's (the
  empirical distribution is more peaked), so the value is an upper-biased estimate of the
  true KL that shrinks as the number of draws grows. Compare runs on one cache only.
- `ece`: expected calibration error of next-token prediction (Guo et al. 2017):
  confidence = max softmax probability, correct = argmax == label, `NUM_BINS` equal-width
  bins (lo, hi] over [0, 1], ECE = Σ_b (n_b / n) · |accuracy_b − confidence_b|.
- `accuracy`: top-1 next-token accuracy; `reliability`: per-bin mean confidence,
  accuracy and count (None for empty bins) for reliability diagrams.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from kdpipe.schemas.errors import KdpipeError
from kdpipe.student_train.losses import IGNORE_INDEX, TARGET_MODES, SparseTargetBatch, normalise_targets

NUM_BINS = 15
"""Calibration bins (the usual choice since Guo et al. 2017)."""

_MIN_LEFTOVER_MASS = 1e-30
"""Floor of the student mass outside the stored ids in the ghost term (as in the training loss)."""

# Layout of `EvalAccumulator.totals`.
_LM_SUM, _NUM_LM, _KL_SUM, _NUM_KD, _CORRECT = range(5)
_BIN_COUNT = slice(5, 5 + NUM_BINS)
_BIN_CONFIDENCE = slice(5 + NUM_BINS, 5 + 2 * NUM_BINS)
_BIN_CORRECT = slice(5 + 2 * NUM_BINS, 5 + 3 * NUM_BINS)
_NUM_TOTALS = 5 + 3 * NUM_BINS


def confidence_bins(confidence_N: Tensor) -> Tensor:
    """Bin index in [0, NUM_BINS) of each confidence: bins are (b/NUM_BINS, (b+1)/NUM_BINS]."""
    return (torch.ceil(confidence_N * NUM_BINS).long() - 1).clamp(0, NUM_BINS - 1)


def _entry_rows(offsets_N1: Tensor, num_entries: int) -> Tensor:
    """Position index of every flat entry."""
    counts_N = offsets_N1[1:] - offsets_N1[:-1]
    return torch.repeat_interleave(torch.arange(counts_N.numel(), device=offsets_N1.device), counts_N, output_size=num_entries)


class EvalAccumulator:
    """Sums of eval metrics over batches (and, with one all-reduce of `totals`, over ranks)."""

    def __init__(self, *, mode: str, chunk_size: int = 1024, device: torch.device | str = "cpu") -> None:
        """`mode` is the cache's sampler mode (how cached weights become a distribution)."""
        if chunk_size < 1:
            raise KdpipeError(f"eval chunk size {chunk_size} must be >= 1: fix the loss_chunk_size option")
        if mode not in TARGET_MODES:
            raise KdpipeError(f"unknown KD target mode {mode!r}: use one of {', '.join(TARGET_MODES)}")
        self.mode = mode
        self.chunk_size = chunk_size
        self.totals = torch.zeros(_NUM_TOTALS, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(
        self,
        hidden_ND: Tensor,
        lm_weight_VD: Tensor,
        labels_N: Tensor,
        targets: SparseTargetBatch | None,
        lm_bias_V: Tensor | None = None,
    ) -> None:
        """Add N positions: final hidden states, the LM head, shifted labels, and cached targets (or None)."""
        num_positions = hidden_ND.shape[0]
        assert labels_N.shape == (num_positions,) and hidden_ND.shape[1] == lm_weight_VD.shape[1]
        # The matmul runs in the inputs' dtype (bf16 stays bf16: no fp32 copy of a large LM
        # head), everything after it in at least fp32.
        compute_dtype = torch.promote_types(hidden_ND.dtype, lm_weight_VD.dtype)
        hidden_ND, lm_weight_VD = hidden_ND.to(compute_dtype), lm_weight_VD.to(compute_dtype)
        math_dtype = torch.promote_types(compute_dtype, torch.float32)
        totals = self.totals
        if targets is not None:
            targets = normalise_targets(targets, mode=self.mode)
            assert targets.offsets.shape == (num_positions + 1,)
            rows_E = _entry_rows(targets.offsets, targets.ids.numel())
            starts = torch.arange(0, num_positions, self.chunk_size, device=targets.offsets.device)
            entry_bounds = torch.cat([targets.offsets[starts], targets.offsets[-1:]]).tolist()
        for chunk, start in enumerate(range(0, num_positions, self.chunk_size)):
            end = min(start + self.chunk_size, num_positions)
            logits_CV = (hidden_ND[start:end] @ lm_weight_VD.T).to(math_dtype)  # (C, V)
            if lm_bias_V is not None:
                logits_CV = logits_CV + lm_bias_V.to(math_dtype)
            lse_C = torch.logsumexp(logits_CV, dim=-1)

            labels_C = labels_N[start:end]
            labelled_C = labels_C != IGNORE_INDEX
            label_logit_C = logits_CV.gather(1, labels_C.clamp_min(0)[:, None]).squeeze(1)
            max_logit_C, argmax_C = logits_CV.max(dim=-1)
            confidence_C = torch.exp(max_logit_C - lse_C)[labelled_C].double()
            correct_C = (argmax_C == labels_C)[labelled_C].double()
            bins_C = confidence_bins(confidence_C)
            totals[_LM_SUM] += (lse_C - label_logit_C)[labelled_C].double().sum()
            totals[_NUM_LM] += labelled_C.sum()
            totals[_CORRECT] += correct_C.sum()
            totals[_BIN_COUNT].index_add_(0, bins_C, torch.ones_like(confidence_C))
            totals[_BIN_CONFIDENCE].index_add_(0, bins_C, confidence_C)
            totals[_BIN_CORRECT].index_add_(0, bins_C, correct_C)

            if targets is None:
                continue
            e0, e1 = entry_bounds[chunk], entry_bounds[chunk + 1]
            rows_e, ids_e, w_e = rows_E[e0:e1] - start, targets.ids[e0:e1], targets.weights[e0:e1].double()
            log_p_e = (logits_CV[rows_e, ids_e] - lse_C[rows_e]).double()
            has_targets_C = targets.offsets[start + 1 : end + 1] > targets.offsets[start:end]
            kl = (torch.xlogy(w_e, w_e) - w_e * log_p_e).sum()
            if targets.ghost is not None:
                # Student mass outside the stored ids, summed directly (1 − Σ stored cancels to noise).
                p_CV = (logits_CV - lse_C[:, None]).exp_()
                p_CV[rows_e, ids_e] = 0.0
                rest_C = p_CV.sum(dim=-1).double().clamp_min(_MIN_LEFTOVER_MASS)
                g_C = torch.where(has_targets_C, targets.ghost[start:end].double(), 0.0)
                kl = kl + (torch.xlogy(g_C, g_C) - g_C * rest_C.log()).sum()
            totals[_KL_SUM] += kl
            totals[_NUM_KD] += has_targets_C.sum()

    def result(self) -> dict[str, Any]:
        """Means over everything added; None where nothing was seen (strict JSON, no NaN)."""
        t = self.totals.cpu().tolist()
        num_lm, num_kd = t[_NUM_LM], t[_NUM_KD]
        counts, conf_sums, correct_sums = t[_BIN_COUNT], t[_BIN_CONFIDENCE], t[_BIN_CORRECT]
        confidence = [c / n if n else None for c, n in zip(conf_sums, counts)]
        accuracy = [c / n if n else None for c, n in zip(correct_sums, counts)]
        gaps = sum(abs(a - c) * n for a, c, n in zip(accuracy, confidence, counts) if n)
        return {
            "lm_loss": t[_LM_SUM] / num_lm if num_lm else None,
            "kl": t[_KL_SUM] / num_kd if num_kd else None,
            "ece": gaps / num_lm if num_lm else None,
            "accuracy": t[_CORRECT] / num_lm if num_lm else None,
            "num_lm_tokens": int(num_lm),
            "num_kd_positions": int(num_kd),
            "reliability": {
                "bin_lower": [b / NUM_BINS for b in range(NUM_BINS)],
                "bin_upper": [(b + 1) / NUM_BINS for b in range(NUM_BINS)],
                "confidence": confidence,
                "accuracy": accuracy,
                "count": [int(n) for n in counts],
            },
        }
