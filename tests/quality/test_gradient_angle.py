"""RS-KD's student gradient against full distillation's, and Top-K's (DESIGN.md, RS-KD).

Anshumann et al. 2025 measure the angle between the batch gradient a student gets from
sparse targets and the one full distillation gives it: 58° for Top-K at K=12, 4° for RS-KD
at ~12 unique ids. These tests measure that angle with the real components — targets from
`sample_rs_kd` / `select_top_k`, the gradient from `kd_lm_loss` — against an independent
dense float64 reference, in a setting built to behave like LM distillation:

- Teacher: a linear LM head over context vectors, logits `W_T·x + u`. The prior `u` is Zipf
  over a 4096-token vocabulary (`-log(1 + rank)`, ids in random order), so every
  distribution is peaked with a long tail, as a trained LM's is: mean entropy 2.06 nats,
  top-1 0.50, 12.9% of the mass outside the 12 most probable ids, 12.8 unique ids per
  position at N=50 (the paper reports ~12). `test_teacher_is_peaked_and_long_tailed` pins
  these. A random-init tiny teacher is near-uniform instead, and every sparse method
  looks alike on it.
- Context reuse: the 2048 positions are jittered copies of 64 context vectors drawn with
  Zipf frequencies. In a real batch of millions of tokens the same kinds of context recur
  and their gradients add up, so RS-KD's independent per-position noise averages out while
  Top-K's identical truncation does not. With 2048 i.i.d. contexts little is shared (each
  position's gradient is nearly orthogonal to the others' in the 266K-parameter head) and
  RS-KD's noise weighs almost as much as Top-K's bias: 6.9° against 8.3° (256 contexts:
  2.6° against 5.5°).
- Student: the teacher's head with 20% relative noise on its weights, shrunk by 0.9 — a
  student partway through distillation, less confident than its teacher (KL 0.39 nats).
  Gradients are taken with respect to its whole head, weight and bias.

Measured (CPU, torch 2.13, the seeds below; `pytest -s` prints them): RS-KD 5.47° / 2.13° /
1.06° at N = 10 / 50 / 200; Top-K at K=13 (RS-KD's mean unique ids at N=50) 5.06°; the mean
of RS-KD gradients over 32 seeds 0.37°. The ordering is the paper's; the Top-K angle is
smaller than its 58°, which depends on how close the student is and on the teacher's tail.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from kdpipe.student_train.losses import SparseTargetBatch, kd_lm_loss, normalise_targets
from kdpipe.teacher_cache.sampling import SparseTargets, sample_rs_kd, select_top_k

pytestmark = pytest.mark.slow

VOCAB_SIZE = 4096
HIDDEN_SIZE = 64
NUM_POSITIONS = 2048
NUM_CONTEXTS = 64
"""Distinct context vectors the positions are jittered copies of (Zipf frequencies)."""
CONTEXT_JITTER = 0.3
"""Per-position noise on a context vector, relative to the vector's scale."""
CONTEXT_SCALE = 5.5
"""Scale of the context term against the Zipf prior; sets how peaked the teacher is."""
STUDENT_SHRINK = 0.9
"""Student head = teacher head × this: a student less confident than its teacher."""
STUDENT_NOISE = 0.2
"""Relative noise on the student's head weights: how far from the teacher it still is."""
SAMPLER_CHUNK = 512
"""Positions per sampler call, as the cache writer calls it (chunking never changes the targets)."""


@dataclass(frozen=True)
class Setting:
    """Teacher logits, the student's head over fixed hidden states, and the full-KD gradient."""

    hidden_PD: torch.Tensor  # (P, D) float32
    teacher_logits_PV: torch.Tensor  # (P, V) float32
    student_weight_VD: torch.Tensor  # (V, D) float32
    student_bias_V: torch.Tensor  # (V,) float32
    full_kd_grad: torch.Tensor  # (V·D + V,) float64, gradient of the dense KD mean w.r.t. (weight, bias)


def build_setting() -> Setting:
    """The teacher, the student and the dense float64 reference gradient (see the module docstring)."""
    gen = torch.Generator().manual_seed(0)
    zipf_rank_V = torch.randperm(VOCAB_SIZE, generator=gen)
    prior_V = -torch.log1p(zipf_rank_V.float())  # (V,) Zipf: p ∝ 1/(1 + rank)
    teacher_weight_VD = torch.randn(VOCAB_SIZE, HIDDEN_SIZE, generator=gen) / HIDDEN_SIZE**0.5
    contexts_CD = torch.randn(NUM_CONTEXTS, HIDDEN_SIZE, generator=gen)
    context_freq_C = 1.0 / torch.arange(1, NUM_CONTEXTS + 1, dtype=torch.float32)
    context_of_P = torch.multinomial(context_freq_C, NUM_POSITIONS, replacement=True, generator=gen)
    # Per-position confidence spread: some positions near-certain, others open.
    radius_P = torch.empty(NUM_POSITIONS).uniform_(math.log(0.5), math.log(2.0), generator=gen).exp()
    jitter_PD = CONTEXT_JITTER * torch.randn(NUM_POSITIONS, HIDDEN_SIZE, generator=gen)
    hidden_PD = (contexts_CD[context_of_P] + jitter_PD) * (CONTEXT_SCALE * radius_P[:, None])
    teacher_logits_PV = hidden_PD @ teacher_weight_VD.T + prior_V
    weight_noise_VD = torch.randn(VOCAB_SIZE, HIDDEN_SIZE, generator=gen) / HIDDEN_SIZE**0.5
    student_weight_VD = STUDENT_SHRINK * (teacher_weight_VD + STUDENT_NOISE * weight_noise_VD)
    student_bias_V = STUDENT_SHRINK * prior_V
    full = dense_kd_grad(hidden_PD, student_weight_VD, student_bias_V, torch.softmax(teacher_logits_PV.double(), -1))
    return Setting(hidden_PD, teacher_logits_PV, student_weight_VD, student_bias_V, full)


def dense_kd_grad(
    hidden_PD: torch.Tensor, weight_VD: torch.Tensor, bias_V: torch.Tensor, target_PV: torch.Tensor
) -> torch.Tensor:
    """Gradient of mean_n −Σ_v target[n, v]·log softmax(W·h_n + b)_v, in float64, by hand.

    d/dz = softmax(z)·Σ_v target − target per position (Σ target = 1 here), then the chain
    rule through the linear head. Independent of `kd_lm_loss` by construction.
    """
    hidden, weight, bias = hidden_PD.double(), weight_VD.double(), bias_V.double()
    grad_weight_VD = torch.zeros_like(weight)
    grad_bias_V = torch.zeros_like(bias)
    for start in range(0, hidden.shape[0], SAMPLER_CHUNK):
        end = start + SAMPLER_CHUNK
        target_CV = target_PV[start:end].double()
        logit_grad_CV = torch.softmax(hidden[start:end] @ weight.T + bias, -1) * target_CV.sum(-1, keepdim=True)
        logit_grad_CV -= target_CV
        grad_weight_VD += logit_grad_CV.T @ hidden[start:end]
        grad_bias_V += logit_grad_CV.sum(0)
    return torch.cat([grad_weight_VD.flatten(), grad_bias_V]) / hidden.shape[0]


def student_grad(setting: Setting, targets: SparseTargetBatch) -> torch.Tensor:
    """Gradient of `kd_lm_loss`'s KD mean w.r.t. the student's head (weight, bias), flattened."""
    weight_VD = setting.student_weight_VD.clone().requires_grad_()
    bias_V = setting.student_bias_V.clone().requires_grad_()
    terms = kd_lm_loss(setting.hidden_PD, weight_VD, labels_N=None, targets=targets, lm_bias_V=bias_V)
    terms.kd.backward()
    return torch.cat([weight_VD.grad.flatten(), bias_V.grad]).double()


def rs_kd_targets(setting: Setting, *, num_draws: int, seed: int) -> SparseTargets:
    """RS-KD targets for every position, sampled in chunks as the cache writer does."""
    chunks = []
    for start in range(0, NUM_POSITIONS, SAMPLER_CHUNK):
        end = min(start + SAMPLER_CHUNK, NUM_POSITIONS)
        chunks.append(
            sample_rs_kd(
                setting.teacher_logits_PV[start:end], num_draws=num_draws, temperature=1.0, seed=seed, stream=0,
                seq_index=torch.arange(start, end), position=torch.zeros(end - start, dtype=torch.long),
            )
        )  # fmt: skip
    return SparseTargets(
        ids=torch.cat([c.ids for c in chunks]),
        values=torch.cat([c.values for c in chunks]),
        num_entries=torch.cat([c.num_entries for c in chunks]),
        covered_mass=torch.cat([c.covered_mass for c in chunks]),
        ghost=None,
    )


def batch_of(targets: SparseTargets, weights_E: torch.Tensor) -> SparseTargetBatch:
    """The trainer's ragged batch from a sampler's output and per-entry weights."""
    offsets = torch.zeros(targets.num_entries.numel() + 1, dtype=torch.long)
    offsets[1:] = targets.num_entries.cumsum(0)
    return SparseTargetBatch(ids=targets.ids, weights=weights_E, offsets=offsets, ghost=None)


def rs_kd_batch(targets: SparseTargets, num_draws: int) -> SparseTargetBatch:
    """RS-KD weights c_i/N, as the cache reader yields them."""
    return normalise_targets(batch_of(targets, targets.values.float() / num_draws), mode="rs-kd")


def top_k_batch(setting: Setting, k: int) -> SparseTargetBatch:
    """Top-K probabilities renormalised to sum to 1 per position: the trainer's reading of a cache without ghost."""
    targets = select_top_k(setting.teacher_logits_PV, k=k, temperature=1.0, ghost=False)
    return normalise_targets(batch_of(targets, targets.values), mode="top-k")


def angle_deg(a: torch.Tensor, b: torch.Tensor) -> float:
    cosine = torch.dot(a, b) / (a.norm() * b.norm())
    return math.degrees(math.acos(float(cosine.clamp(-1.0, 1.0))))


def relative_error(estimate: torch.Tensor, reference: torch.Tensor) -> float:
    return float((estimate - reference).norm() / reference.norm())


@pytest.fixture(scope="module")
def setting() -> Setting:
    return build_setting()


def mean_unique_ids(targets: SparseTargets) -> float:
    return float(targets.num_entries.float().mean())


def test_teacher_is_peaked_and_long_tailed(setting):
    """The setting is LM-like, not near-uniform: otherwise the angles below mean nothing.

    Measured: entropy 2.06 nats, top-1 0.50, 12.9% of the mass outside the top 12 and 4.8%
    outside the top 50, 12.8 unique ids at N=50; student KL(teacher ‖ student) 0.39 nats.
    """
    log_p_PV = torch.log_softmax(setting.teacher_logits_PV.double(), -1)
    p_PV = log_p_PV.exp()
    entropy = float(-(p_PV * log_p_PV).sum(-1).mean())
    top_1 = float(p_PV.max(-1).values.mean())
    outside_12 = float(1 - p_PV.topk(12, -1).values.sum(-1).mean())
    outside_50 = float(1 - p_PV.topk(50, -1).values.sum(-1).mean())
    unique_50 = mean_unique_ids(rs_kd_targets(setting, num_draws=50, seed=1))
    student_logits_PV = setting.hidden_PD.double() @ setting.student_weight_VD.double().T
    log_q_PV = torch.log_softmax(student_logits_PV + setting.student_bias_V.double(), -1)
    student_kl = float((p_PV * (log_p_PV - log_q_PV)).sum(-1).mean())
    print(
        f"\nteacher: entropy {entropy:.2f} nats, top-1 {top_1:.2f}, mass outside top-12 {outside_12:.3f}, "
        f"outside top-50 {outside_50:.3f}, unique ids at N=50 {unique_50:.1f}; student KL {student_kl:.2f} nats"
    )
    # Bounds around the paper's teacher (~12 unique ids at N=50) and a trained LM's entropy.
    assert 1.5 < entropy < 2.6
    assert 0.35 < top_1 < 0.65
    assert 0.05 < outside_12 < 0.25 and outside_50 > 0.02  # a real tail, beyond any small K
    assert 10.0 < unique_50 < 15.0
    assert 0.2 < student_kl < 0.8


def test_rs_kd_gradient_approaches_full_kd_as_draws_grow(setting):
    """RS-KD's batch gradient is close to full KD's, and closer with more draws.

    Measured angles: 5.5° / 2.1° / 1.1° at N = 10 / 50 / 200 (sampling noise ∝ 1/√N, so the
    ratios are near √5 and √4). Norm ratios within 1% of 1: weights that were not c_i/N
    (raw counts) would scale the gradient N-fold without turning it.
    """
    angles = {}
    for num_draws in (10, 50, 200):
        grad = student_grad(setting, rs_kd_batch(rs_kd_targets(setting, num_draws=num_draws, seed=1), num_draws))
        angles[num_draws] = angle_deg(grad, setting.full_kd_grad)
        norm_ratio = float(grad.norm() / setting.full_kd_grad.norm())
        print(f"\nRS-KD N={num_draws}: angle to full KD {angles[num_draws]:.2f}°, norm ratio {norm_ratio:.3f}")
        assert abs(norm_ratio - 1.0) < 0.05
    assert angles[50] < 3.5
    assert angles[10] > 1.6 * angles[50] and angles[50] > 1.5 * angles[200]


def test_rs_kd_beats_top_k_at_equal_storage(setting):
    """At the same number of stored entries, RS-KD's gradient is far closer to full KD's.

    K is RS-KD's mean number of unique ids at N=50, rounded (12.8 → 13), so both caches
    store as many entries to within 4%. Measured: RS-KD 2.1°, Top-K 5.1° (renormalised, no ghost). Top-K's error is a
    bias: it drops the tail (the student is taught that those ids have probability 0) and
    inflates the head, the same way at every occurrence of a context.
    """
    rs_kd = rs_kd_targets(setting, num_draws=50, seed=1)
    k = round(mean_unique_ids(rs_kd))
    rs_kd_angle = angle_deg(student_grad(setting, rs_kd_batch(rs_kd, 50)), setting.full_kd_grad)
    top_k_angle = angle_deg(student_grad(setting, top_k_batch(setting, k)), setting.full_kd_grad)
    print(
        f"\nstored entries per position: RS-KD N=50 {mean_unique_ids(rs_kd):.1f}, Top-K {k}; "
        f"angle to full KD: RS-KD {rs_kd_angle:.2f}°, Top-K {top_k_angle:.2f}°"
    )
    assert rs_kd_angle < top_k_angle / 1.8


def test_rs_kd_is_unbiased_over_seeds(setting):
    """The mean of RS-KD gradients over S seeds converges to full KD's; Top-K's cannot.

    The KD loss is linear in the target weights, so the mean of S per-seed gradients is the
    gradient of the mean target Σ_s c_s/(S·N); the test checks that identity at S=2 and then
    takes one gradient per S. Measured at N=50, S = 1 / 2 / 8 / 32: relative error 0.038 /
    0.027 / 0.013 / 0.0065 (angle 2.13° → 0.37°), ∝ 1/√S as for an unbiased estimator.
    Top-K's gradient is deterministic: its error stays at 0.096 (5.06°) however many runs
    are averaged. A sampler biased by as little as a 3% temperature error levels off at
    0.022 from S=8 on and fails here.
    """
    num_draws, seed_counts = 50, (1, 2, 8, 32)
    counts_PV = torch.zeros(NUM_POSITIONS, VOCAB_SIZE)  # exact integer sums in float32
    per_seed_grads = []
    errors, angles = {}, {}
    first_targets = rs_kd_targets(setting, num_draws=num_draws, seed=1)
    k = round(mean_unique_ids(first_targets))
    for num_seeds in range(1, seed_counts[-1] + 1):
        targets = first_targets if num_seeds == 1 else rs_kd_targets(setting, num_draws=num_draws, seed=num_seeds)
        rows_E = torch.repeat_interleave(torch.arange(NUM_POSITIONS), targets.num_entries)
        counts_PV.index_put_((rows_E, targets.ids), targets.values.float(), accumulate=True)
        if num_seeds <= 2:
            per_seed_grads.append(student_grad(setting, rs_kd_batch(targets, num_draws)))
        if num_seeds not in seed_counts:
            continue
        rows_M, ids_M = counts_PV.nonzero(as_tuple=True)
        offsets = torch.zeros(NUM_POSITIONS + 1, dtype=torch.long)
        offsets[1:] = torch.bincount(rows_M, minlength=NUM_POSITIONS).cumsum(0)
        mean_weights_M = counts_PV[rows_M, ids_M] / (num_seeds * num_draws)
        mean_grad = student_grad(setting, SparseTargetBatch(ids_M, mean_weights_M, offsets, ghost=None))
        if num_seeds == 2:
            assert relative_error(mean_grad, sum(per_seed_grads) / 2) < 1e-4
        errors[num_seeds] = relative_error(mean_grad, setting.full_kd_grad)
        angles[num_seeds] = angle_deg(mean_grad, setting.full_kd_grad)
        print(f"\nRS-KD mean of {num_seeds} seeds: angle {angles[num_seeds]:.2f}°, "
              f"relative error {errors[num_seeds]:.4f}")
    top_k_grad = student_grad(setting, top_k_batch(setting, k))
    top_k_error = relative_error(top_k_grad, setting.full_kd_grad)
    top_k_angle = angle_deg(top_k_grad, setting.full_kd_grad)
    print(f"Top-K K={k} (any number of seeds): angle {top_k_angle:.2f}°, relative error {top_k_error:.4f}")
    assert errors[1] > errors[2] > errors[8] > errors[32]
    # 1/√S predicts a factor 5.7 from 1 to 32 seeds; a bias floor would stop it.
    assert errors[32] < errors[1] / 4
    assert angles[32] < 0.6
    assert top_k_error > 8 * errors[32]
