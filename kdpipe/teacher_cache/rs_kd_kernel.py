"""The RS-KD sampler on CPU: one numba pass per position from fp32 logits to unique ids and counts.

`sampling.sample_rs_kd` runs this for CPU tensors and a torch implementation of the same
algorithm for CUDA ones. Per position (row of logits z, key k):

1. m = max_i z_i/τ; weights w_i = exp(z_i/τ - m) in fp32 (τ as fp32, as torch divides),
   unnormalised, so the largest weight is exactly 1 and no softmax (P, V) tensor is written.
2. Block masses: fp32 sums of blocks of `CDF_BLOCK` weights by a fixed pairwise tree; the
   block CDF is their float64 running sum, its last value the normaliser.
3. The N uniforms of the key (Philox4x32-10, as `sampling.counter_uniforms`), sorted. Each
   picks a block by inverse CDF, then an id inside it by a float64 running sum of that
   block's weights (`sampling._inverse_cdf` documents the two levels and the ties). Inverse
   CDF is monotone in the uniform, so sorted uniforms give sorted ids: the unique ids and
   counts fall out in order, and a block is summed once however many draws land in it.

Steps 2-3 are the torch path's arithmetic operation for operation (same tree, same float64
running sums, same comparisons), so equal weights give equal draws; the tests check that.
Only the exponential differs: torch's vectorised exp there, the polynomial below here. Both
are within one ulp of exp of the fp32 argument; the argument z/τ - m itself carries the fp32
rounding every fp32 softmax has (up to ~2e-6 relative on the weight at |z/τ - m| ~ 30).
The polynomial is written so that LLVM vectorises it without fast-math: no reassociation,
no FMA contraction, so a row's weights are the same on every x86 CPU and thread count.

Weights below exp(-87) ≈ 1.6e-38 (relative to the top weight) are set to 0, where fp32 turns
subnormal: their total is below V·1.6e-38, far under the fp32 rounding of the normaliser.
A row whose logits hold NaN or +inf, or are all -inf, has no distribution: its normaliser
comes out NaN and the caller is told (covered mass NaN).
"""

import numba
import numpy as np

# Ids per block of the two-level CDF: a power of two, for the pairwise block sums.
CDF_BLOCK = 64
# Philox4x32 round multipliers and Weyl key increments (Random123, philox.h).
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10

_MASK32 = np.uint64(0xFFFFFFFF)
_M0, _M1, _W0, _W1 = np.uint64(PHILOX_M0), np.uint64(PHILOX_M1), np.uint64(PHILOX_W0), np.uint64(PHILOX_W1)
_TWO_POW_MINUS_53 = 2.0**-53

# expf after Cephes (S. Moshier, expf.c): exp(x) = 2^n · exp(r), n = round(x·log2 e),
# r = x - n·ln2 with ln2 split in two (C1 has 9 significant bits, so n·C1 is exact for
# |n| <= 126), and a degree-7 polynomial for exp(r) on |r| <= ln2/2.
_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)
_EXP_COEFFS = tuple(np.float32(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1))  # fmt: skip
_EXP_LOWEST = np.float32(-87.0)  # 2^n stays a normal float down here (n >= -126)
# Adding 1.5·2^23 rounds a float in (-2^22, 2^22) to an integer n (ties to even) and leaves
# the float's bits equal to 0x4B400000 + n; shifted left by 23, the constant drops out.
_ROUNDING_MAGIC = np.float32(12582912.0)
_EXPONENT_BIAS_BITS = 127 << 23


@numba.njit(cache=True, nogil=True)
def keyed_uniforms(seed: int, stream: int, seq_index: int, position: int, out: np.ndarray) -> None:
    """Fill out (N,) float64 with the draws' uniforms of one key, as `sampling.counter_uniforms`.

    Philox key (seed, stream), counter (j // 2, position, seq_index low, seq_index high);
    53 bits per uniform from two 32-bit words. uint64 holds every 32x32-bit product exactly.
    """
    c1 = np.uint64(position)
    c2 = np.uint64(seq_index) & _MASK32
    c3 = np.uint64(seq_index) >> np.uint64(32)
    num_draws = out.shape[0]
    for block in range((num_draws + 1) // 2):
        x0, x1, x2, x3 = np.uint64(block), c1, c2, c3
        k0, k1 = np.uint64(seed), np.uint64(stream)
        for round_index in range(PHILOX_ROUNDS):
            if round_index > 0:
                k0 = (k0 + _W0) & _MASK32
                k1 = (k1 + _W1) & _MASK32
            p0 = x0 * _M0
            p1 = x2 * _M1
            x0, x1, x2, x3 = (p1 >> np.uint64(32)) ^ x1 ^ k0, p1 & _MASK32, (p0 >> np.uint64(32)) ^ x3 ^ k1, p0 & _MASK32
        out[2 * block] = np.float64(((x0 >> np.uint64(11)) << np.uint64(32)) | x1) * _TWO_POW_MINUS_53
        if 2 * block + 1 < num_draws:
            out[2 * block + 1] = np.float64(((x2 >> np.uint64(11)) << np.uint64(32)) | x3) * _TWO_POW_MINUS_53


@numba.njit(cache=True, nogil=True)
def _row_max(row: np.ndarray) -> np.float32:
    """Max of a fp32 row in 8 independent accumulators, which LLVM keeps in one vector
    register (max is exact in any order; a NaN never wins a comparison, and shows up later)."""
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = row[0]
    num_full = row.shape[0] // 8 * 8
    for start in range(0, num_full, 8):
        m0 = row[start] if row[start] > m0 else m0
        m1 = row[start + 1] if row[start + 1] > m1 else m1
        m2 = row[start + 2] if row[start + 2] > m2 else m2
        m3 = row[start + 3] if row[start + 3] > m3 else m3
        m4 = row[start + 4] if row[start + 4] > m4 else m4
        m5 = row[start + 5] if row[start + 5] > m5 else m5
        m6 = row[start + 6] if row[start + 6] > m6 else m6
        m7 = row[start + 7] if row[start + 7] > m7 else m7
    best = m0
    for lane_max in (m1, m2, m3, m4, m5, m6, m7):
        best = lane_max if lane_max > best else best
    for i in range(num_full, row.shape[0]):
        best = row[i] if row[i] > best else best
    return best


@numba.njit(cache=True, nogil=True)
def exp_weights(row: np.ndarray, temperature: np.float32, weights: np.ndarray, exponent_bits: np.ndarray) -> None:
    """weights[:V] = exp(row/τ - max(row/τ)) in fp32, 0 below exp(-87).

    Three vectorisable loops: the polynomial (keeping the rounded n as float bits in
    `exponent_bits`), 2^n from those bits, the product. NaN arguments stay NaN.
    """
    shift = _row_max(row) / temperature  # = max(row/τ): rounding is monotone and τ > 0
    divide = temperature != np.float32(1.0)  # z/1 is z: skip the division (LLVM unswitches the loop)
    rounded = exponent_bits.view(np.float32)
    c0, c1, c2, c3, c4, c5 = _EXP_COEFFS
    for i in range(row.shape[0]):
        x = (row[i] / temperature if divide else row[i]) - shift
        x_clamped = _EXP_LOWEST if x < _EXP_LOWEST else x
        n_magic = x_clamped * _LOG2E + _ROUNDING_MAGIC
        n = n_magic - _ROUNDING_MAGIC
        r = x_clamped - n * _LN2_HI - n * _LN2_LO
        poly = ((((c0 * r + c1) * r + c2) * r + c3) * r + c4) * r + c5
        weights[i] = np.float32(0.0) if x < _EXP_LOWEST else poly * r * r + r + np.float32(1.0)
        rounded[i] = n_magic
    for i in range(row.shape[0]):
        exponent_bits[i] = (exponent_bits[i] << 23) + _EXPONENT_BIAS_BITS
    for i in range(row.shape[0]):
        weights[i] *= rounded[i]


@numba.njit(cache=True, nogil=True)
def _block_sums(weights: np.ndarray, tree_a: np.ndarray, tree_b: np.ndarray, num_blocks: int) -> np.ndarray:
    """(num_blocks,) fp32 block masses of the zero-padded weights: at each level the first
    half of every block plus its second half, as `sampling._block_sums` (a fixed order)."""
    source, target, spare = weights, tree_a, tree_b
    width = CDF_BLOCK
    while width > 1:
        half = width // 2
        for block in range(num_blocks):
            for i in range(half):
                target[block * half + i] = source[block * width + i] + source[block * width + half + i]
        source, target, spare = target, spare, target
        width = half
    return source[:num_blocks]


@numba.njit(cache=True, nogil=True)
def _first_at_least(cdf: np.ndarray, value: float) -> int:
    """First index whose cdf reaches value, else len (searchsorted right=False).

    The draws' searches are `searchsorted(right=True)` (first cdf above the target), walked
    linearly; they fall back to this one where the target reached the total.
    """
    low, high = 0, cdf.shape[0]
    while low < high:
        middle = (low + high) // 2
        if cdf[middle] >= value:
            high = middle
        else:
            low = middle + 1
    return low


@numba.njit(cache=True, nogil=True)
def rs_kd_rows(
    logits_PV: np.ndarray,
    temperature: np.float32,
    seed: int,
    stream: int,
    seq_index_P: np.ndarray,
    position_P: np.ndarray,
    ids_PN: np.ndarray,
    counts_PN: np.ndarray,
    num_entries_P: np.ndarray,
    covered_P: np.ndarray,
) -> None:
    """Sample every row of fp32 logits (P, V) into the first num_entries_P[p] slots of
    ids_PN (int64, ascending) and counts_PN (int32); covered_P (float64) gets the weight of
    the stored ids over the normaliser, NaN for a row without a distribution.

    Rows are independent: callers may run disjoint row ranges on several threads (nogil).
    """
    num_positions, vocab_size = logits_PV.shape
    num_draws = ids_PN.shape[1]
    num_blocks = (vocab_size + CDF_BLOCK - 1) // CDF_BLOCK
    weights = np.zeros(num_blocks * CDF_BLOCK, dtype=np.float32)  # the padding past V stays 0
    exponent_bits = np.empty(vocab_size, dtype=np.int32)
    tree_a = np.empty(num_blocks * CDF_BLOCK // 2, dtype=np.float32)
    tree_b = np.empty(num_blocks * CDF_BLOCK // 4, dtype=np.float32)
    block_cdf = np.empty(num_blocks, dtype=np.float64)
    in_block_cdf = np.empty(CDF_BLOCK, dtype=np.float64)
    uniforms = np.empty(num_draws, dtype=np.float64)
    for row in range(num_positions):
        exp_weights(logits_PV[row], temperature, weights, exponent_bits)
        block_mass = _block_sums(weights, tree_a, tree_b, num_blocks)
        running = 0.0
        for block in range(num_blocks):
            running += np.float64(block_mass[block])
            block_cdf[block] = running
        total = running
        if not (total < np.inf):  # NaN (never +inf: at most V weights of at most 1)
            num_entries_P[row] = 0
            covered_P[row] = np.nan
            continue
        keyed_uniforms(seed, stream, seq_index_P[row], position_P[row], uniforms)
        uniforms.sort()
        # Targets ascend, so each search walks on from where the previous one stopped.
        block, offset, summed_block, in_block_total = 0, 0, -1, 0.0
        entries, covered = 0, 0.0
        for draw in range(num_draws):
            target = uniforms[draw] * total
            while block < num_blocks and block_cdf[block] <= target:
                block += 1
            if block == num_blocks:  # u·total rounded up to total: the last block with mass
                block = _first_at_least(block_cdf, total)
            start = block_cdf[block - 1] if block > 0 else 0.0
            fraction = (target - start) / np.float64(block_mass[block])
            if block != summed_block:
                running = 0.0
                for i in range(CDF_BLOCK):
                    running += np.float64(weights[block * CDF_BLOCK + i])
                    in_block_cdf[i] = running
                in_block_total, summed_block, offset = running, block, 0
            in_block_target = fraction * in_block_total
            while offset < CDF_BLOCK and in_block_cdf[offset] <= in_block_target:
                offset += 1
            if offset == CDF_BLOCK:  # the fraction rounded up to 1: the block's last id with mass
                offset = _first_at_least(in_block_cdf, in_block_total)
            token = block * CDF_BLOCK + offset
            if entries > 0 and ids_PN[row, entries - 1] == token:
                counts_PN[row, entries - 1] += 1
            else:
                ids_PN[row, entries] = token
                counts_PN[row, entries] = 1
                covered += np.float64(weights[token])
                entries += 1
        num_entries_P[row] = entries
        covered_P[row] = covered / total
