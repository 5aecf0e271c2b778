"""Eval metrics against dense float64 references written independently with numpy."""

import json
import math

import numpy as np
import pytest
import torch

from kdpipe.schemas.errors import KdpipeError
from kdpipe.student_train.losses import IGNORE_INDEX, SparseTargetBatch
from kdpipe.student_train.metrics import NUM_BINS, EvalAccumulator

V, D = 37, 8


def _log_softmax64(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def _random_case(n: int, seed: int, *, mode: str, ghost: bool):
    """Hidden states, LM head, labels (some ignored) and ragged targets (some positions empty)."""
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(n, D)).astype(np.float32)
    weight = (rng.normal(size=(V, D)) * 0.7).astype(np.float32)
    labels = rng.integers(0, V, size=n)
    labels[rng.random(n) < 0.2] = IGNORE_INDEX
    ids, weights, counts = [], [], []
    for _ in range(n):
        k = 0 if rng.random() < 0.15 else int(rng.integers(1, 6))
        ids.append(rng.choice(V, size=k, replace=False))
        if mode == "rs-kd":  # counts of 20 draws spread over k ids
            c = rng.multinomial(20 - k, np.ones(k) / k) + 1 if k else np.zeros(0)
            weights.append(c / 20.0)
        else:  # unnormalised head probabilities
            weights.append(rng.uniform(0.05, 0.3, size=k))
        counts.append(k)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    ghost_mass = rng.uniform(0.0, 0.4, size=n) if ghost else None
    targets = SparseTargetBatch(
        ids=torch.from_numpy(np.concatenate(ids).astype(np.int64)),
        weights=torch.from_numpy(np.concatenate(weights).astype(np.float32)),
        offsets=torch.from_numpy(offsets.astype(np.int64)),
        ghost=None if ghost_mass is None else torch.from_numpy(ghost_mass.astype(np.float32)),
    )
    return hidden, weight, labels, targets


def _reference(hidden, weight, labels, targets):
    """Dense float64: mean CE, mean KL(teacher ‖ student), ECE, accuracy and per-bin counts."""
    logp = _log_softmax64(hidden.astype(np.float64) @ weight.astype(np.float64).T)
    p = np.exp(logp)
    keep = labels != IGNORE_INDEX
    ce = -logp[keep, labels[keep]].mean()
    conf, pred = p.max(axis=1)[keep], p.argmax(axis=1)[keep]
    correct = (pred == labels[keep]).astype(np.float64)
    edges = np.linspace(0.0, 1.0, NUM_BINS + 1)
    ece, counts = 0.0, []
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (conf > lo) & (conf <= hi)
        counts.append(int(in_bin.sum()))
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    offsets = targets.offsets.numpy()
    ids, w_all = targets.ids.numpy(), targets.weights.numpy().astype(np.float64)
    kls = []
    for n in range(len(labels)):
        a, b = offsets[n], offsets[n + 1]
        if a == b:
            continue
        w, i = w_all[a:b], ids[a:b]
        g = 0.0 if targets.ghost is None else float(targets.ghost[n])
        total = w.sum() + g
        w, g = w / total, g / total
        kl = float(np.sum(w * (np.log(w) - logp[n, i])))
        if g > 0:
            kl += g * (np.log(g) - np.log(1.0 - p[n, i].sum()))
        kls.append(kl)
    return {"lm_loss": ce, "kl": np.mean(kls), "ece": ece, "accuracy": correct.mean(), "count": counts}


def _as_torch(hidden, weight, labels):
    return torch.from_numpy(hidden), torch.from_numpy(weight), torch.from_numpy(labels.astype(np.int64))


@pytest.mark.parametrize(("mode", "ghost"), [("rs-kd", False), ("top-k", False), ("top-p-k", True)])
def test_metrics_match_dense_float64_reference_over_two_batches(mode, ghost):
    batches = [_random_case(23, seed, mode=mode, ghost=ghost) for seed in (1, 2)]
    acc = EvalAccumulator(mode=mode, chunk_size=5)
    for hidden, weight, labels, targets in batches:
        # Both batches share one LM head (the same student): use the first batch's.
        acc.update(*_as_torch(hidden, batches[0][1], labels), targets)
    result = acc.result()

    hidden = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[2] for b in batches])
    t0, t1 = batches[0][3], batches[1][3]
    targets = SparseTargetBatch(
        ids=torch.cat([t0.ids, t1.ids]),
        weights=torch.cat([t0.weights, t1.weights]),
        offsets=torch.cat([t0.offsets, t1.offsets[1:] + t0.offsets[-1]]),
        ghost=None if not ghost else torch.cat([t0.ghost, t1.ghost]),
    )
    ref = _reference(hidden, batches[0][1], labels, targets)
    for key in ("lm_loss", "kl", "ece", "accuracy"):
        assert result[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-6), key
    assert result["reliability"]["count"] == ref["count"]
    assert result["num_lm_tokens"] == int((labels != IGNORE_INDEX).sum())
    assert result["num_kd_positions"] == int((targets.offsets[1:] > targets.offsets[:-1]).sum())
    json.dumps(result, allow_nan=False)  # strict JSON for the metrics log


def test_kl_is_zero_when_student_equals_full_teacher_targets():
    """Targets covering the whole vocabulary with the student's own probabilities: KL = 0."""
    rng = np.random.default_rng(3)
    hidden, weight = rng.normal(size=(6, D)), rng.normal(size=(V, D))
    p = np.exp(_log_softmax64(hidden @ weight.T))
    targets = SparseTargetBatch(
        ids=torch.arange(V).repeat(6),
        weights=torch.from_numpy(p.reshape(-1)).float(),
        offsets=torch.arange(0, 6 * V + 1, V),
        ghost=None,
    )
    acc = EvalAccumulator(mode="top-k", chunk_size=4)
    acc.update(torch.from_numpy(hidden), torch.from_numpy(weight), torch.full((6,), IGNORE_INDEX), targets)
    assert abs(acc.result()["kl"]) < 1e-6
    assert acc.result()["lm_loss"] is None and acc.result()["ece"] is None


def test_ece_and_reliability_on_a_constructed_case():
    """Logits are log-probabilities (identity head), so confidences and correctness are chosen by hand.

    bin 13 (0.867, 0.933]: conf 0.9 twice, one right → |0.5 − 0.9|·2
    bin  7 (0.467, 0.533]: conf 0.5, right          → |1 − 0.5|·1
    bin  6 (0.400, 0.467]: conf 0.42, wrong         → |0 − 0.42|·1
    ECE = (0.8 + 0.5 + 0.42) / 4 = 0.43; a fifth, unlabelled position is ignored.
    """
    probs = torch.tensor(
        [
            [0.9, 0.05, 0.03, 0.02],
            [0.9, 0.05, 0.03, 0.02],
            [0.5, 0.3, 0.1, 0.1],
            [0.42, 0.3, 0.18, 0.1],
            [0.97, 0.01, 0.01, 0.01],
        ],
        dtype=torch.float64,
    )
    labels = torch.tensor([0, 1, 0, 2, IGNORE_INDEX])
    acc = EvalAccumulator(mode="rs-kd", chunk_size=2)
    acc.update(probs.log(), torch.eye(4, dtype=torch.float64), labels, None)
    result = acc.result()
    assert result["ece"] == pytest.approx(0.43, abs=1e-12)
    assert result["accuracy"] == pytest.approx(0.5)
    rel = result["reliability"]
    assert rel["count"] == [0] * 6 + [1, 1] + [0] * 5 + [2, 0]
    assert rel["confidence"][13] == pytest.approx(0.9) and rel["accuracy"][13] == 0.5
    assert rel["confidence"][6] == pytest.approx(0.42) and rel["accuracy"][6] == 0.0
    assert rel["accuracy"][0] is None
    assert rel["bin_lower"][13] == pytest.approx(13 / 15) and rel["bin_upper"][13] == pytest.approx(14 / 15)
    assert result["kl"] is None
    assert result["lm_loss"] == pytest.approx(-math.log(0.9 * 0.05 * 0.5 * 0.18) / 4)


def test_totals_merge_by_sum_like_an_all_reduce():
    hidden, weight, labels, targets = _random_case(20, 5, mode="rs-kd", ghost=False)
    whole = EvalAccumulator(mode="rs-kd")
    whole.update(*_as_torch(hidden, weight, labels), targets)
    halves = []
    for rows in (slice(0, 11), slice(11, 20)):
        part = EvalAccumulator(mode="rs-kd", chunk_size=3)
        o = targets.offsets
        sub = SparseTargetBatch(
            ids=targets.ids[o[rows.start] : o[rows.stop]],
            weights=targets.weights[o[rows.start] : o[rows.stop]],
            offsets=o[rows.start : rows.stop + 1] - o[rows.start],
            ghost=None,
        )
        part.update(*_as_torch(hidden[rows], weight, labels[rows]), sub)
        halves.append(part)
    halves[0].totals += halves[1].totals
    for key in ("lm_loss", "kl", "ece"):
        assert halves[0].result()[key] == pytest.approx(whole.result()[key], rel=1e-6)


def test_bad_options_are_one_line_errors():
    with pytest.raises(KdpipeError, match="chunk size"):
        EvalAccumulator(mode="rs-kd", chunk_size=0)
    with pytest.raises(KdpipeError, match="unknown KD target mode"):
        EvalAccumulator(mode="top-q")
