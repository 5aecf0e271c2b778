"""The chunked fused LM + KD loss against a dense float64 reference, its memory
behaviour, and target normalisation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdpipe.schemas.errors import KdpipeError
from kdpipe.student_train.losses import (
    IGNORE_INDEX,
    SparseTargetBatch,
    kd_lm_loss,
    normalise_targets,
)


def make_case(
    *, num_positions: int, vocab_size: int, dim: int, ghost: bool, seed: int, bias: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, SparseTargetBatch]:
    """Random hidden states, LM head, labels (some ignored) and ragged targets (some
    positions empty), built position by position with plain Python."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_positions, dim, generator=gen)
    weight = torch.randn(vocab_size, dim, generator=gen) / dim**0.5 * 3  # logits of a few units
    bias_V = torch.randn(vocab_size, generator=gen) if bias else None
    labels = torch.randint(0, vocab_size, (num_positions,), generator=gen)
    labels[torch.rand(num_positions, generator=gen) < 0.3] = IGNORE_INDEX
    ids, weights, offsets, ghosts = [], [], [0], []
    for n in range(num_positions):
        count = 0 if n % 5 == 2 else int(torch.randint(1, 9, (), generator=gen))
        ids += torch.randperm(vocab_size, generator=gen)[:count].tolist()
        raw = torch.rand(count, generator=gen) + 0.05
        if ghost:  # top-k style probabilities with the leftover in the ghost bucket
            mass = float(torch.rand((), generator=gen)) * 0.9 + 0.05
            weights += (raw / raw.sum() * mass).tolist()
            ghosts.append(1.0 - mass)
        else:  # rs-kd style counts / draws
            counts = torch.randint(1, 6, (count,), generator=gen)
            weights += (counts / counts.sum()).tolist()
            ghosts.append(0.0)
        offsets.append(len(ids))
    targets = SparseTargetBatch(
        ids=torch.tensor(ids, dtype=torch.long),
        weights=torch.tensor(weights, dtype=torch.float32),
        offsets=torch.tensor(offsets, dtype=torch.long),
        ghost=torch.tensor(ghosts, dtype=torch.float32) if ghost else None,
    )
    return hidden, weight, bias_V, labels, targets


def dense_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias_V: torch.Tensor | None,
    labels: torch.Tensor | None,
    targets: SparseTargetBatch | None,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(lm, kd) in float64 from full logits, torch.log_softmax and a dense target matrix."""
    logits = hidden.double() @ weight.double().T
    if bias_V is not None:
        logits = logits + bias_V.double()
    num_positions, vocab_size = logits.shape
    lm = logits.new_zeros(())
    if labels is not None and (labels != IGNORE_INDEX).any():
        lm = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
    kd = logits.new_zeros(())
    if targets is None:
        return lm, kd
    dense = torch.zeros(num_positions, vocab_size, dtype=torch.float64)
    stored = torch.zeros(num_positions, vocab_size, dtype=torch.bool)
    kept = []
    for n in range(num_positions):
        lo, hi = int(targets.offsets[n]), int(targets.offsets[n + 1])
        for e in range(lo, hi):
            dense[n, int(targets.ids[e])] += float(targets.weights[e])
            stored[n, int(targets.ids[e])] = True
        if hi > lo:
            kept.append(n)
    log_q = torch.log_softmax(logits / temperature, dim=-1)
    per_position = -(dense * log_q).sum(-1)
    if targets.ghost is not None:
        covered = (log_q.exp() * stored).sum(-1)
        per_position = per_position - targets.ghost.double() * torch.log(1.0 - covered)
    return lm, per_position[kept].mean()


def grads(loss: torch.Tensor, *inputs: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, inputs, retain_graph=True))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    """Relative to the largest entry: fp32 against fp64 agrees to ~1e-6 of the scale."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=rtol * max(scale, 1e-3))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("ghost", [False, True])
@pytest.mark.parametrize("chunk_size", [7, 64])
def test_matches_dense_reference(temperature: float, ghost: bool, chunk_size: int) -> None:
    hidden, weight, _, labels, targets = make_case(num_positions=37, vocab_size=300, dim=16, ghost=ghost, seed=1)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    terms = kd_lm_loss(hidden, weight, labels_N=labels, targets=targets, kd_temperature=temperature,
                       chunk_size=chunk_size)  # fmt: skip
    ref_lm, ref_kd = dense_reference(hidden, weight, None, labels, targets, temperature)

    assert terms.num_lm_tokens == int((labels != IGNORE_INDEX).sum())
    assert terms.num_kd_positions == int((targets.offsets[1:] > targets.offsets[:-1]).sum())
    assert 0 < terms.num_kd_positions < 37 and 0 < terms.num_lm_tokens < 37
    assert_close(terms.lm, ref_lm)
    assert_close(terms.kd, ref_kd)
    for term, ref in ((terms.lm, ref_lm), (terms.kd, ref_kd)):
        for got, want in zip(grads(term, hidden, weight), grads(ref, hidden, weight)):
            assert_close(got, want)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("ghost", [False, True])
def test_weighted_combination_gradients_with_bias(temperature: float, ghost: bool) -> None:
    hidden, weight, bias_V, labels, targets = make_case(
        num_positions=29, vocab_size=200, dim=8, ghost=ghost, seed=2, bias=True
    )
    for t in (hidden, weight, bias_V):
        t.requires_grad_(True)
    terms = kd_lm_loss(hidden, weight, labels_N=labels, targets=targets, kd_temperature=temperature,
                       chunk_size=5, lm_bias_V=bias_V)  # fmt: skip
    ref_lm, ref_kd = dense_reference(hidden, weight, bias_V, labels, targets, temperature)
    got = grads(0.3 * terms.lm + 0.7 * terms.kd, hidden, weight, bias_V)
    want = grads(0.3 * ref_lm + 0.7 * ref_kd, hidden, weight, bias_V)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        assert_close(g, w)


def test_gradcheck_float64() -> None:
    """Backward against finite differences of forward, independent of any reference."""
    hidden, weight, bias_V, labels, targets = make_case(
        num_positions=9, vocab_size=13, dim=3, ghost=True, seed=3, bias=True
    )
    targets = targets._replace(weights=targets.weights.double(), ghost=targets.ghost.double())
    inputs = tuple(t.double().requires_grad_(True) for t in (hidden, weight, bias_V))

    def both(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        terms = kd_lm_loss(h, w, labels_N=labels, targets=targets, kd_temperature=1.7, chunk_size=4, lm_bias_V=b)
        return terms.lm, terms.kd

    assert torch.autograd.gradcheck(both, inputs)


def test_one_term_only() -> None:
    hidden, weight, _, labels, targets = make_case(num_positions=20, vocab_size=100, dim=8, ghost=False, seed=4)
    weight.requires_grad_(True)
    lm_only = kd_lm_loss(hidden, weight, labels_N=labels, targets=None, chunk_size=6)
    kd_only = kd_lm_loss(hidden, weight, labels_N=None, targets=targets, chunk_size=6)
    ref_lm, ref_kd = dense_reference(hidden, weight, None, labels, targets, 1.0)
    assert lm_only.num_kd_positions == 0 and float(lm_only.kd.detach()) == 0.0
    assert kd_only.num_lm_tokens == 0 and float(kd_only.lm.detach()) == 0.0
    assert_close(lm_only.lm, ref_lm)
    assert_close(kd_only.kd, ref_kd)
    assert_close(grads(lm_only.lm + lm_only.kd, weight)[0], grads(ref_lm, weight)[0])
    assert_close(grads(kd_only.kd + kd_only.lm, weight)[0], grads(ref_kd, weight)[0])


def test_no_labelled_position_gives_zero_not_nan() -> None:
    hidden, weight, _, _, targets = make_case(num_positions=10, vocab_size=50, dim=4, ghost=False, seed=5)
    weight.requires_grad_(True)
    labels = torch.full((10,), IGNORE_INDEX)
    terms = kd_lm_loss(hidden, weight, labels_N=labels, targets=targets, chunk_size=3)
    assert terms.num_lm_tokens == 0 and float(terms.lm.detach()) == 0.0
    (grad_weight,) = grads(terms.lm, weight)
    assert torch.equal(grad_weight, torch.zeros_like(weight))


def test_ghost_gradient_stays_finite_when_student_covers_stored_ids() -> None:
    """A student with nearly all mass on the stored ids: the ghost term is clamped, not NaN."""
    vocab_size = 20
    weight = torch.eye(vocab_size, 4) * 200.0  # id 0 gets logit 200 from hidden e_0
    weight.requires_grad_(True)
    hidden = torch.zeros(1, 4)
    hidden[0, 0] = 1.0
    targets = SparseTargetBatch(ids=torch.tensor([0]), weights=torch.tensor([0.6]),
                                offsets=torch.tensor([0, 1]), ghost=torch.tensor([0.4]))  # fmt: skip
    terms = kd_lm_loss(hidden, weight, labels_N=None, targets=targets)
    (grad_weight,) = grads(terms.kd, weight)
    assert torch.isfinite(terms.kd) and float(terms.kd.detach()) > 10.0
    assert torch.isfinite(grad_weight).all()


def test_autocast_bfloat16_close_to_fp32() -> None:
    hidden, weight, _, labels, targets = make_case(num_positions=33, vocab_size=128, dim=16, ghost=True, seed=6)
    weight.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = kd_lm_loss(hidden, weight, labels_N=labels, targets=targets, kd_temperature=2.0, chunk_size=8)
    assert terms.lm.dtype == torch.float32 and terms.kd.dtype == torch.float32
    ref_lm, ref_kd = dense_reference(hidden, weight, None, labels, targets, 2.0)
    assert_close(terms.lm, ref_lm, rtol=3e-2)
    assert_close(terms.kd, ref_kd, rtol=3e-2)
    (grad_weight,) = grads(terms.lm + terms.kd, weight)
    assert grad_weight.dtype == torch.float32
    assert_close(grad_weight, grads(ref_lm + ref_kd, weight)[0], rtol=5e-2)


def test_graph_saves_no_full_logits() -> None:
    """Nothing of (N, V)/4 elements is saved for backward, in 8 chunks (sizes kept small
    enough for a shared CPU; the check is structural, not a timing)."""
    num_positions, vocab_size, dim = 2048, 16_384, 8
    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(num_positions, dim, generator=gen, requires_grad=True)
    weight = torch.randn(vocab_size, dim, generator=gen, requires_grad=True)
    labels = torch.randint(0, vocab_size, (num_positions,), generator=gen)
    ids = torch.randint(0, vocab_size, (num_positions * 4,), generator=gen)
    targets = SparseTargetBatch(ids=ids, weights=torch.full((num_positions * 4,), 0.25),
                                offsets=torch.arange(0, num_positions * 4 + 1, 4), ghost=None)  # fmt: skip
    saved_numels: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved_numels.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        terms = kd_lm_loss(hidden, weight, labels_N=labels, targets=targets, chunk_size=256)
    assert saved_numels and max(saved_numels) == vocab_size * dim  # the LM head itself is the largest
    # Tensors could also hide in attributes of graph nodes, which the hooks do not see.
    limit = num_positions * vocab_size // 4
    nodes, seen = [terms.lm.grad_fn, terms.kd.grad_fn], set()
    while nodes:
        node = nodes.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        for value in vars(node).values() if hasattr(node, "__dict__") else ():
            items = value if isinstance(value, (tuple, list)) else (value,)
            assert all(not isinstance(v, torch.Tensor) or v.numel() < limit for v in items)
        nodes += [next_node for next_node, _ in node.next_functions]
    (terms.lm + terms.kd).backward()
    assert hidden.grad.shape == hidden.shape and torch.isfinite(weight.grad).all()


def test_rejects_ids_outside_vocabulary_and_bad_options() -> None:
    hidden, weight, _, labels, targets = make_case(num_positions=6, vocab_size=30, dim=4, ghost=False, seed=8)
    bad_ids = targets._replace(ids=targets.ids.clone().index_fill_(0, torch.tensor([0]), 30))
    with pytest.raises(KdpipeError, match="teacher target id 30"):
        kd_lm_loss(hidden, weight, labels_N=labels, targets=bad_ids)
    with pytest.raises(KdpipeError, match="label id 31"):
        kd_lm_loss(hidden, weight, labels_N=torch.full((6,), 31), targets=targets)
    with pytest.raises(KdpipeError, match="temperature"):
        kd_lm_loss(hidden, weight, labels_N=labels, targets=targets, kd_temperature=0.0)
    with pytest.raises(KdpipeError, match="chunk size"):
        kd_lm_loss(hidden, weight, labels_N=labels, targets=targets, chunk_size=0)


def _position_sums(batch: SparseTargetBatch) -> list[float]:
    return [float(batch.weights[lo:hi].sum()) for lo, hi in zip(batch.offsets[:-1], batch.offsets[1:])]


def test_normalise_rs_kd_is_unchanged() -> None:
    _, _, _, _, targets = make_case(num_positions=12, vocab_size=40, dim=2, ghost=False, seed=9)
    assert normalise_targets(targets, mode="rs-kd") is targets
    with pytest.raises(KdpipeError, match="ghost"):
        normalise_targets(targets._replace(ghost=torch.zeros(12)), mode="rs-kd")
    with pytest.raises(KdpipeError, match="unknown KD target mode 'topk'"):
        normalise_targets(targets, mode="topk")


def test_normalise_top_k_without_ghost_sums_to_one() -> None:
    targets = SparseTargetBatch(ids=torch.tensor([3, 1, 7, 2]), weights=torch.tensor([0.5, 0.3, 0.1, 0.05]),
                                offsets=torch.tensor([0, 2, 2, 4]), ghost=None)  # fmt: skip
    out = normalise_targets(targets, mode="top-p-k")
    torch.testing.assert_close(out.weights, torch.tensor([0.625, 0.375, 2 / 3, 1 / 3]))
    assert torch.equal(out.ids, targets.ids) and torch.equal(out.offsets, targets.offsets) and out.ghost is None


def test_normalise_top_k_with_ghost_rescales_both() -> None:
    targets = SparseTargetBatch(ids=torch.tensor([3, 1, 7]), weights=torch.tensor([0.4, 0.2, 0.3]),
                                offsets=torch.tensor([0, 2, 2, 3]), ghost=torch.tensor([0.2, 0.5, 0.7]))  # fmt: skip
    out = normalise_targets(targets, mode="top-k")
    torch.testing.assert_close(out.weights, torch.tensor([0.5, 0.25, 0.3]))
    # Position 1 has no entries: its ghost alone is rescaled to 1 (and ignored by the loss).
    torch.testing.assert_close(out.ghost, torch.tensor([0.25, 1.0, 0.7]))
    sums = _position_sums(out)
    assert sums[0] + float(out.ghost[0]) == pytest.approx(1.0) and sums[2] + float(out.ghost[2]) == pytest.approx(1.0)


def test_normalise_leaves_empty_positions_finite() -> None:
    targets = SparseTargetBatch(ids=torch.tensor([5]), weights=torch.tensor([0.2]),
                                offsets=torch.tensor([0, 0, 1]), ghost=torch.tensor([0.0, 0.6]))  # fmt: skip
    out = normalise_targets(targets, mode="top-k")
    torch.testing.assert_close(out.weights, torch.tensor([0.25]))
    torch.testing.assert_close(out.ghost, torch.tensor([0.0, 0.75]))
