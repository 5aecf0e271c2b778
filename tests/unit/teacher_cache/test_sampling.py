"""Samplers against independent references: a pure-Python Philox, float64 softmax, numpy sorts.

RS-KD on CPU runs the numba kernel (`rs_kd_kernel`); its torch twin (the CUDA path) is run on
CPU here too, and the two are compared bit for bit where their inputs are equal.
"""

import numpy as np
import pytest
import torch

from kdpipe.schemas.errors import KdpipeError
from kdpipe.teacher_cache.rs_kd_kernel import exp_weights, keyed_uniforms
from kdpipe.teacher_cache.sampling import (
    _CDF_BLOCK,
    _inverse_cdf,
    _philox4x32_10,
    _rs_kd_torch,
    counter_uniforms,
    sample_rs_kd,
    select_top_k,
    select_top_p_k,
)

MASK32 = 0xFFFFFFFF

# Random123 tests/kat_vectors (github.com/DEShawResearch/random123), the philox4x32 10 lines:
# counter (4 words), key (2 words), expected output (4 words).
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((MASK32,) * 4, (MASK32,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


def reference_philox(counter: tuple[int, ...], key: tuple[int, int]) -> tuple[int, ...]:
    """Philox4x32-10 written from the paper with Python big ints (full 64-bit products)."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & MASK32, (p0 >> 32) ^ c3 ^ k1, p0 & MASK32
        k0, k1 = (k0 + 0x9E3779B9) & MASK32, (k1 + 0xBB67AE85) & MASK32
    return c0, c1, c2, c3


def reference_uniforms(seed: int, stream: int, seq_index: int, position: int, num_draws: int) -> list[float]:
    """The documented key layout, one draw at a time: counter (j//2, position, seq lo, seq hi)."""
    out = []
    for j in range(num_draws):
        words = reference_philox((j // 2, position, seq_index & MASK32, seq_index >> 32), (seed, stream))
        hi, lo = words[2 * (j % 2)], words[2 * (j % 2) + 1]
        out.append(((hi >> 11) * 2**32 + lo) / 2**53)
    return out


def softmax64(logits: torch.Tensor, temperature: float) -> np.ndarray:
    z = logits.double().numpy() / temperature
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def rs_kd(logits, seq_index, position=None, *, seed=7, num_draws=50, temperature=1.0):
    position = torch.zeros_like(seq_index) if position is None else position
    return sample_rs_kd(
        logits, num_draws=num_draws, temperature=temperature, seed=seed, stream=0,
        seq_index=seq_index, position=position,
    )


def split_rows(num_entries: torch.Tensor, flat: torch.Tensor) -> list[np.ndarray]:
    return np.split(flat.numpy(), np.cumsum(num_entries.numpy())[:-1])


def rows_of(targets) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per-position (ids, values) pairs of a SparseTargets."""
    ids = split_rows(targets.num_entries, targets.ids)
    return list(zip(ids, split_rows(targets.num_entries, targets.values), strict=True))


@pytest.mark.parametrize("counter,key,expected", PHILOX_KAT)
def test_philox_matches_random123_known_answers(counter, key, expected):
    words = _philox4x32_10(tuple(torch.tensor([c]) for c in counter), key)
    assert tuple(int(w) for w in words) == expected
    assert reference_philox(counter, key) == expected


def test_counter_uniforms_match_pure_python_reference():
    seq_index = torch.tensor([0, 1, 5, 2**32 + 3, 2**40 + 12345, 2**62 + 1])
    position = torch.tensor([0, 4095, 17, 1, 2**31, MASK32])
    for seed, stream in [(0, 0), (1234, 1), (MASK32, MASK32)]:
        got = counter_uniforms(seed, stream, seq_index, position, num_draws=7)
        assert got.dtype == torch.float64 and got.shape == (6, 7)
        for row in range(6):
            expected = reference_uniforms(seed, stream, int(seq_index[row]), int(position[row]), 7)
            assert got[row].tolist() == expected
    assert float(got.min()) >= 0.0 and float(got.max()) < 1.0


def test_counter_uniforms_reject_out_of_range_seed():
    with pytest.raises(KdpipeError, match="seed"):
        counter_uniforms(2**32, 0, torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64), 3)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_rs_kd_is_unbiased(temperature):
    """Mean of c_i/N over 4000 independently keyed positions converges to softmax(z/τ).

    Statistic: the pooled count X_i of id i over n = 4000·50 draws is Binomial(n, p_i), with
    p_i from an independent float64 softmax. Bernstein's inequality bounds
    P(|X_i - n·p_i| >= t) <= 2·exp(-t² / (2·(n·p_i·(1-p_i) + t/3))); t_i is set so each bound
    is alpha/V with alpha = 1e-6, so (union bound over the 20 ids) a correct sampler fails
    this test with probability below 1e-6 per temperature. No normal approximation involved.
    """
    vocab_size, num_positions, num_draws, alpha = 20, 4000, 50, 1e-6
    order = torch.randperm(vocab_size, generator=torch.Generator().manual_seed(0))
    logits = torch.linspace(-1.5, 1.5, vocab_size)[order]
    probs = softmax64(logits[None], temperature)[0]
    targets = rs_kd(
        logits.expand(num_positions, vocab_size), torch.arange(num_positions),
        temperature=temperature, num_draws=num_draws,
    )
    pooled = np.bincount(targets.ids.numpy(), weights=targets.values.numpy(), minlength=vocab_size)
    num_samples = num_positions * num_draws
    assert pooled.sum() == num_samples
    log_term = np.log(2 * vocab_size / alpha)
    variance = num_samples * probs * (1 - probs)
    tolerance = log_term / 3 + np.sqrt(log_term**2 / 9 + 2 * log_term * variance)
    deviation = np.abs(pooled - num_samples * probs)
    assert np.all(deviation < tolerance), deviation / tolerance


def test_rs_kd_structure_counts_order_and_covered_mass():
    generator = torch.Generator().manual_seed(1)
    num_positions, vocab_size, num_draws = 64, 300, 50
    logits = torch.randn(num_positions, vocab_size, generator=generator) * 3
    logits[:, -10:] = float("-inf")  # zero-probability ids (e.g. padded vocab) are never drawn
    targets = rs_kd(logits, torch.arange(num_positions), num_draws=num_draws, temperature=0.8)
    assert targets.ids.dtype == torch.int64 and targets.values.dtype == torch.int32
    assert targets.num_entries.dtype == torch.int32 and targets.ghost is None
    assert int(targets.num_entries.sum()) == targets.ids.numel() == targets.values.numel()
    probs = softmax64(logits, 0.8)
    for row, (ids, counts) in enumerate(rows_of(targets)):
        assert counts.sum() == num_draws and counts.min() >= 1
        assert np.all(np.diff(ids) > 0)
        assert ids.max() < vocab_size - 10
        assert targets.covered_mass[row].item() == pytest.approx(probs[row, ids].sum(), rel=1e-5)


def test_rs_kd_is_deterministic_and_independent_of_chunking():
    generator = torch.Generator().manual_seed(2)
    num_positions = 64
    logits = torch.randn(num_positions, 500, generator=generator).to(torch.bfloat16) * 4
    seq_index = torch.arange(num_positions) // 16 + 1000
    position = torch.arange(num_positions) % 16
    whole = rs_kd(logits, seq_index, position)
    again = rs_kd(logits, seq_index, position)
    chunks = [rs_kd(logits[s : s + 16], seq_index[s : s + 16], position[s : s + 16]) for s in (0, 16, 32, 48)]
    for field in ("ids", "values", "num_entries", "covered_mass"):
        assert torch.equal(getattr(whole, field), getattr(again, field))
        assert torch.equal(getattr(whole, field), torch.cat([getattr(c, field) for c in chunks]))
    # Reversing the rows together with their keys reverses the per-position results.
    flipped = rs_kd(logits.flip(0), seq_index.flip(0), position.flip(0))
    for (got_ids, got_counts), (ids, counts) in zip(rows_of(flipped)[::-1], rows_of(whole), strict=True):
        np.testing.assert_array_equal(got_ids, ids)
        np.testing.assert_array_equal(got_counts, counts)
    for other in (rs_kd(logits, seq_index, position, seed=8), rs_kd(logits, seq_index, position + 1)):
        assert not (torch.equal(other.ids, whole.ids) and torch.equal(other.values, whole.values))


def dense_top(logits: torch.Tensor, temperature: float, k: int, p: float | None):
    """Reference truncation: float64 probabilities, order by (prob desc, id asc), prefix >= p."""
    probs = softmax64(logits, temperature)
    rows = []
    for row in probs:
        order = np.lexsort((np.arange(row.size), -row))  # last key is primary
        size = k
        if p is not None:
            prefix = np.cumsum(row[order])
            assert np.abs(prefix[:k] - p).min() > 1e-5, "test logits put a prefix mass too close to p"
            reached = np.flatnonzero(prefix[:k] >= p)
            size = int(reached[0]) + 1 if reached.size else k
        ids = np.sort(order[:size])
        rows.append((ids, row[ids]))
    return rows


@pytest.mark.parametrize("ghost", [True, False])
def test_top_k_against_dense_reference(ghost):
    logits = torch.randn(16, 400, generator=torch.Generator().manual_seed(3)) * 2
    targets = select_top_k(logits, k=12, temperature=1.5, ghost=ghost)
    assert targets.values.dtype == torch.float32 and torch.all(targets.num_entries == 12)
    reference = dense_top(logits, 1.5, 12, None)
    for row, ((ids, values), (ref_ids, ref_probs)) in enumerate(zip(rows_of(targets), reference, strict=True)):
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_allclose(values, ref_probs, rtol=1e-5)
        assert targets.covered_mass[row].item() == pytest.approx(ref_probs.sum(), rel=1e-5)
        if ghost:
            assert targets.ghost[row].item() == pytest.approx(1 - ref_probs.sum(), abs=1e-6)
    assert (targets.ghost is None) == (not ghost)


def test_top_p_k_against_dense_reference():
    # Row scales from flat to peaked so that some rows stop at p and others hit the cap k.
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(24, 300, generator=generator) * torch.linspace(0.5, 6.0, 24)[:, None]
    targets = select_top_p_k(logits, p=0.9, k=20, temperature=1.0, ghost=True)
    reference = dense_top(logits, 1.0, 20, 0.9)
    sizes = [ids.size for ids, _ in reference]
    assert min(sizes) < 20 and max(sizes) == 20, "test rows must exercise both the p cut and the k cap"
    assert targets.num_entries.tolist() == sizes
    for row, ((ids, values), (ref_ids, ref_probs)) in enumerate(zip(rows_of(targets), reference, strict=True)):
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_allclose(values, ref_probs, rtol=1e-5)  # not renormalised
        assert targets.ghost[row].item() == pytest.approx(1 - ref_probs.sum(), abs=1e-6)


def test_ties_go_to_lower_ids_and_p_boundary_is_inclusive():
    """Uniform logits over 8 ids give probabilities of exactly 1/8 in fp32 and float64.

    Convention: prefix mass >= p stops (so p = 0.5 keeps exactly 4 ids), and among equal
    probabilities the lower id ranks first (so those are ids 0..3).
    """
    logits = torch.zeros(2, 8)
    top_p_k = select_top_p_k(logits, p=0.5, k=6, temperature=1.0, ghost=True)
    assert top_p_k.ids.tolist() == [0, 1, 2, 3] * 2
    assert top_p_k.ghost.tolist() == [0.5, 0.5]
    top_k = select_top_k(logits, k=3, temperature=1.0, ghost=False)
    assert top_k.ids.tolist() == [0, 1, 2] * 2
    # Ties inside an otherwise ordered row: ids 5 and 2 share the second-largest logit.
    logits = torch.tensor([[0.0, 1.0, 2.0, 0.5, 3.0, 2.0]])
    assert select_top_k(logits, k=2, temperature=1.0, ghost=False).ids.tolist() == [2, 4]


def test_config_mistakes_raise_kdpipe_errors():
    logits = torch.zeros(1, 8)
    with pytest.raises(KdpipeError, match="temperature"):
        select_top_k(logits, k=2, temperature=0.0, ghost=False)
    with pytest.raises(KdpipeError, match="k=9"):
        select_top_k(logits, k=9, temperature=1.0, ghost=False)
    with pytest.raises(KdpipeError, match="p="):
        select_top_p_k(logits, p=1.5, k=2, temperature=1.0, ghost=False)
    with pytest.raises(KdpipeError, match="num_draws"):
        rs_kd(logits, torch.zeros(1, dtype=torch.int64), num_draws=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    """Keyed uniforms are bit-identical across devices; sampled ids and counts agree unless a
    uniform lands within fp32-softmax rounding of a CDF step (~1e-7 per draw here)."""
    seq_index, position = torch.arange(64) + 2**33, torch.arange(64) * 3
    cpu = counter_uniforms(5, 1, seq_index, position, 50)
    assert torch.equal(counter_uniforms(5, 1, seq_index.cuda(), position.cuda(), 50).cpu(), cpu)
    logits = torch.randn(64, 1000, generator=torch.Generator().manual_seed(5)) * 3
    on_cpu, on_cuda = rs_kd(logits, seq_index, position), rs_kd(logits.cuda(), seq_index, position)
    for field in ("ids", "values", "num_entries"):
        assert torch.equal(getattr(on_cuda, field).cpu(), getattr(on_cpu, field))
    torch.testing.assert_close(on_cuda.covered_mass.cpu(), on_cpu.covered_mass)
    top_cpu = select_top_p_k(logits, p=0.9, k=30, temperature=1.0, ghost=True)
    top_cuda = select_top_p_k(logits.cuda(), p=0.9, k=30, temperature=1.0, ghost=True)
    assert torch.equal(top_cuda.ids.cpu(), top_cpu.ids)
    torch.testing.assert_close(top_cuda.values.cpu(), top_cpu.values)


def test_rs_kd_is_unbiased_across_cdf_blocks():
    """The two-level CDF (block, then id in block) samples a vocab spanning several full
    blocks, a partial last block and a zero-probability block without bias.

    Same Bernstein bound as above: alpha = 1e-6 for all ids together.
    """
    vocab_size, num_positions, num_draws, alpha = 3 * _CDF_BLOCK + 17, 4000, 50, 1e-6
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(vocab_size, generator=generator) * 2
    logits[_CDF_BLOCK : 2 * _CDF_BLOCK] = float("-inf")  # a whole block with no mass
    logits[5::7] = float("-inf")  # zero-probability ids between ones with mass
    probs = softmax64(logits[None], 1.0)[0]
    targets = rs_kd(logits.expand(num_positions, vocab_size), torch.arange(num_positions), num_draws=num_draws)
    pooled = np.bincount(targets.ids.numpy(), weights=targets.values.numpy(), minlength=vocab_size)
    num_samples = num_positions * num_draws
    assert pooled.sum() == num_samples and np.all(pooled[probs == 0] == 0)
    log_term = np.log(2 * vocab_size / alpha)
    variance = num_samples * probs * (1 - probs)
    tolerance = log_term / 3 + np.sqrt(log_term**2 / 9 + 2 * log_term * variance)
    deviation = np.abs(pooled - num_samples * probs)
    assert np.all(deviation < tolerance), deviation / tolerance


def test_numba_uniforms_match_pure_python_reference():
    out = np.empty(7)
    for seed, stream in [(0, 0), (1234, 1), (MASK32, MASK32)]:
        for seq_index, position in [(0, 0), (5, 17), (2**32 + 3, 1), (2**62 + 1, MASK32)]:
            keyed_uniforms(seed, stream, seq_index, position, out)
            assert out.tolist() == reference_uniforms(seed, stream, seq_index, position, 7)


def test_kernel_exponential_is_within_one_ulp():
    """Weights are exp(z/τ - max) in fp32 within one ulp of exp of the fp32 argument (an
    exhaustive run over all fp32 in [-87, 0] gave 0.992 ulp), exactly 1 at the max, 0 below -87."""
    generator = np.random.default_rng(0)
    row = np.concatenate([[0.0, -1e-30, -87.0, -87.00001, -200.0, -np.inf], generator.uniform(-87, 0, 100_000)])
    row = row.astype(np.float32)
    for temperature in (1.0, 0.7):
        weights, exponent_bits = np.empty_like(row), np.empty(row.size, dtype=np.int32)
        exp_weights(row, np.float32(temperature), weights, exponent_bits)
        argument = row / np.float32(temperature)  # fp32, as the kernel; the row max is 0
        exact = np.exp(argument.astype(np.float64))
        live = argument >= -87
        ulp = np.spacing(exact.astype(np.float32)).astype(np.float64)
        assert np.all(np.abs(weights[live] - exact[live]) / ulp[live] < 1.0)
        assert weights[0] == 1.0 and np.all(weights[~live] == 0.0)


def dense_counts(targets, num_positions: int, vocab_size: int) -> np.ndarray:
    """(P, V) counts of a SparseTargets."""
    counts = np.zeros((num_positions, vocab_size), dtype=np.int64)
    rows = np.repeat(np.arange(num_positions), targets.num_entries.numpy())
    np.add.at(counts, (rows, targets.ids.numpy()), targets.values.numpy())
    return counts


@pytest.mark.parametrize("vocab_size", [8, 3 * _CDF_BLOCK + 17, 1000])
def test_cpu_kernel_draws_what_the_torch_path_draws_from_the_same_weights(vocab_size):
    """The kernel's block sums, CDFs and searches are the torch path's, operation for operation:
    torch's `_inverse_cdf` fed the kernel's own weights at the same uniforms draws the same ids.
    Rows mix peaked, flat and zero-weight stretches, so draws cross blocks and hit the clamps."""
    num_positions, num_draws, temperature = 96, 50, 0.8
    generator = torch.Generator().manual_seed(6)
    logits = torch.randn(num_positions, vocab_size, generator=generator) * torch.linspace(0.1, 8.0, num_positions)[:, None]
    logits[::3, vocab_size // 3 : vocab_size // 2] = float("-inf")
    logits[1::5] = torch.where(torch.rand(vocab_size, generator=generator) < 0.5, 0.0, float("-inf"))
    logits[1::5, 0] = 0.0
    seq_index, position = torch.arange(num_positions) + 2**33, torch.arange(num_positions) * 7
    got = rs_kd(logits, seq_index, position, num_draws=num_draws, temperature=temperature)

    weights = np.zeros((num_positions, vocab_size), dtype=np.float32)
    exponent_bits = np.empty(vocab_size, dtype=np.int32)
    for row in range(num_positions):
        exp_weights(logits[row].numpy(), np.float32(temperature), weights[row], exponent_bits)
    uniforms = counter_uniforms(7, 0, seq_index, position, num_draws)
    draws, total = _inverse_cdf(torch.from_numpy(weights), uniforms)
    expected = np.zeros((num_positions, vocab_size), dtype=np.int64)
    np.add.at(expected, (np.repeat(np.arange(num_positions), num_draws), draws.flatten().numpy()), 1)
    np.testing.assert_array_equal(dense_counts(got, num_positions, vocab_size), expected)
    covered = (weights.astype(np.float64) * (expected > 0)).sum(axis=1) / total.squeeze(1).numpy()
    np.testing.assert_allclose(got.covered_mass.numpy(), covered, rtol=1e-6)


def test_cpu_kernel_and_torch_path_agree_on_exact_weights():
    """Logits of 0 and -inf give weights 1 and 0 on both paths exactly (torch's exp and the
    kernel's agree there), so the whole samplers must agree bit for bit, covered mass included."""
    num_positions, vocab_size = 64, 2 * _CDF_BLOCK + 40
    generator = torch.Generator().manual_seed(8)
    support = torch.rand(num_positions, vocab_size, generator=generator) < torch.linspace(0.02, 0.9, num_positions)[:, None]
    support[:, 5] = True
    logits = torch.where(support, 0.0, float("-inf"))
    seq_index, position = torch.arange(num_positions), torch.arange(num_positions) % 9
    cpu = rs_kd(logits, seq_index, position, temperature=1.3)
    twin, bad = _rs_kd_torch(logits, 50, 1.3, 7, 0, seq_index, position)
    assert not bad.any()
    for field in ("ids", "values", "num_entries", "covered_mass"):
        assert torch.equal(getattr(cpu, field), getattr(twin, field)), field


def test_rs_kd_agrees_with_a_float64_inverse_cdf_up_to_rounding():
    """Against a single-level float64 CDF of a float64 softmax at the same uniforms: a draw
    may only differ where its uniform falls within fp32 rounding of a CDF step (~1e-7), which
    here is expected for fewer than one draw in 10^4."""
    num_positions, vocab_size, num_draws = 256, 2000, 50
    logits = torch.randn(num_positions, vocab_size, generator=torch.Generator().manual_seed(9)) * 4
    seq_index, position = torch.arange(num_positions), torch.zeros(num_positions, dtype=torch.int64)
    got = dense_counts(rs_kd(logits, seq_index, position, num_draws=num_draws), num_positions, vocab_size)
    cdf = np.cumsum(softmax64(logits, 1.0), axis=1)
    uniforms = counter_uniforms(7, 0, seq_index, position, num_draws).numpy()
    expected = np.zeros_like(got)
    for row in range(num_positions):
        ids = np.searchsorted(cdf[row], uniforms[row] * cdf[row, -1], side="right")
        np.add.at(expected[row], ids, 1)
    moved = np.abs(got - expected).sum() // 2
    assert moved <= 2, f"{moved} of {num_positions * num_draws} draws differ from the float64 reference"


def test_rs_kd_does_not_depend_on_thread_count():
    logits = torch.randn(200, 700, generator=torch.Generator().manual_seed(10)) * 3
    seq_index, position = torch.arange(200) // 50, torch.arange(200) % 50
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = rs_kd(logits, seq_index, position)
        torch.set_num_threads(2)
        two = rs_kd(logits, seq_index, position)
    finally:
        torch.set_num_threads(threads)
    for field in ("ids", "values", "num_entries", "covered_mass"):
        assert torch.equal(getattr(one, field), getattr(two, field))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "all -inf"])
def test_rows_without_a_distribution_raise(bad):
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(11))
    if bad == "all -inf":
        logits[2] = float("-inf")
    else:
        logits[2, 17] = bad
    seq_index, position = torch.tensor([3, 3, 4, 4]), torch.tensor([0, 1, 0, 1])
    with pytest.raises(KdpipeError, match="sequence 4 position 0"):
        rs_kd(logits, seq_index, position)
    _, rows_without = _rs_kd_torch(logits, 50, 1.0, 7, 0, seq_index, position)
    assert rows_without.tolist() == [False, False, True, False]
