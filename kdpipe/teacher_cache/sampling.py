"""Turn a chunk of teacher logits into sparse distillation targets.

Three modes, from the papers in DESIGN.md:

- `sample_rs_kd`: Random-Sampling KD (Anshumann et al. 2025). N draws with replacement from
  softmax(z/τ); the stored unique ids and counts give the unbiased estimate c_i/N of the
  teacher distribution.
- `select_top_k` and `select_top_p_k`: the biased truncation baselines (top-p-k from Peng et
  al. 2024), with an optional leftover-mass "ghost" bucket.

Every function takes one chunk of positions `(P, V)`; the caller computes logits in position
chunks so that a full `(B, T, V)` fp32 tensor never exists. Peak extra memory is about
16 bytes per logit for the top-k modes (fp32 probabilities plus an int64 sort key); RS-KD on
CPU needs none for fp32 logits (a numba kernel, `rs_kd_kernel`, holds one row's weights per
thread), on CUDA about 6 (fp32 weights, fp32 block sums, a NaN mask; float64 CDFs are per block).

RS-KD randomness is counter-based (Philox4x32-10, Salmon et al. 2011, the generator behind
cuRAND and torch's CUDA RNG): the uniform for draw j at a position is a pure function of
(seed, stream, seq_index, position, j). What is stored for a position therefore depends
only on its logits row and its key, never on batch size, chunking, shard, thread count or
device (up to the last bits of the exponential, see `rs_kd_kernel`).
"""

from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch

from kdpipe.schemas.errors import KdpipeError
from kdpipe.teacher_cache.rs_kd_kernel import (
    CDF_BLOCK as _CDF_BLOCK,
    PHILOX_M0 as _PHILOX_M0,
    PHILOX_M1 as _PHILOX_M1,
    PHILOX_ROUNDS as _PHILOX_ROUNDS,
    PHILOX_W0 as _PHILOX_W0,
    PHILOX_W1 as _PHILOX_W1,
    rs_kd_rows,
)

_MASK32 = 0xFFFFFFFF
# Rows per sampler thread at least: a row costs ~20 µs at V = 8000, a thread start ~50 µs.
_MIN_ROWS_PER_THREAD = 64


class SparseTargets(NamedTuple):
    """Ragged sparse targets for P positions, flattened position-major."""

    ids: torch.Tensor  # (E,) int64, ascending within each position
    values: torch.Tensor  # (E,) int32 counts (rs-kd) or float32 probabilities (top-k modes)
    num_entries: torch.Tensor  # (P,) int32, entries per position, sums to E
    covered_mass: torch.Tensor  # (P,) float32, teacher mass (at τ) of the stored ids
    ghost: torch.Tensor | None  # (P,) float32, 1 - stored mass; top-k modes with ghost only


def _mulhilo32(a: torch.Tensor, multiplier: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of `a * multiplier` for a in [0, 2^32), without overflow.

    The 64-bit product does not fit in a signed int64, so the constant is split into 16-bit
    halves: every partial product stays below 2^49 and all values stay non-negative, which
    keeps torch's arithmetic right shift equal to a logical one on CPU and CUDA alike.
    """
    low_part = a * (multiplier & 0xFFFF)  # < 2^48
    high_part = a * (multiplier >> 16)  # < 2^48, weight 2^16
    low_sum = low_part + ((high_part & 0xFFFF) << 16)  # < 2^49
    lo = low_sum & _MASK32
    hi = (high_part >> 16) + (low_sum >> 32)
    return hi, lo


def _philox4x32_10(
    counter: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], key: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-10 block: four uint32 counter words (int64 tensors) → four uint32 words.

    Counter words broadcast against each other; the key is two Python ints in [0, 2^32).
    """
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for round_index in range(_PHILOX_ROUNDS):
        if round_index > 0:
            k0 = (k0 + _PHILOX_W0) & _MASK32
            k1 = (k1 + _PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo32(c0, _PHILOX_M0)
        hi1, lo1 = _mulhilo32(c2, _PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def counter_uniforms(
    seed: int, stream: int, seq_index: torch.Tensor, position: torch.Tensor, num_draws: int
) -> torch.Tensor:
    """Uniforms in [0, 1) for `num_draws` draws at each of P keyed positions → (P, N) float64.

    Philox key = (seed, stream); counter = (j // 2, position, seq_index low, seq_index high).
    One Philox block yields four 32-bit words = two 53-bit uniforms, so draws 2m and 2m+1
    share counter m. The map from (seed, stream, seq_index, position, j) to counter and key
    is injective, so no two draws of a cache ever reuse random bits.
    """
    if not 0 <= seed <= _MASK32:
        raise KdpipeError(f"sampler seed {seed} is out of range: use an integer in [0, 2^32)")
    assert 0 <= stream <= _MASK32, f"stream {stream} must fit in 32 bits"
    assert seq_index.shape == position.shape and seq_index.ndim == 1
    assert num_draws >= 1
    if position.numel() > 0:
        assert int(seq_index.min()) >= 0 and 0 <= int(position.min())
        assert int(position.max()) <= _MASK32, "positions must fit in 32 bits"
    seq_index = seq_index.to(torch.int64)[:, None]  # (P, 1)
    num_blocks = (num_draws + 1) // 2
    counter = (
        torch.arange(num_blocks, dtype=torch.int64, device=seq_index.device)[None, :],  # (1, M)
        position.to(torch.int64)[:, None],  # (P, 1)
        seq_index & _MASK32,  # (P, 1)
        (seq_index >> 32) & _MASK32,  # (P, 1)
    )
    w0, w1, w2, w3 = _philox4x32_10(counter, (seed, stream))  # each (P, M)
    # 53 random bits: the top 21 bits of one word above all 32 bits of the next.
    bits_even = ((w0 >> 11) << 32) | w1  # (P, M)
    bits_odd = ((w2 >> 11) << 32) | w3  # (P, M)
    bits = torch.stack([bits_even, bits_odd], dim=-1).flatten(1)[:, :num_draws]  # (P, N)
    return bits.to(torch.float64) * 2.0**-53


def _check_logits(logits_PV: torch.Tensor, temperature: float) -> None:
    assert logits_PV.ndim == 2, f"expected (P, V) logits, got shape {tuple(logits_PV.shape)}"
    if not temperature > 0:
        raise KdpipeError(f"sampler temperature {temperature} must be > 0: fix the sampler config")


def _teacher_probs(logits_PV: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(z/τ) in float32 → (P, V); torch's softmax subtracts the row max first."""
    return torch.softmax(logits_PV.float() / temperature, dim=-1)


def _block_sums(blocks_PnB: torch.Tensor) -> torch.Tensor:
    """Sums of fp32 weight blocks → (P, n) fp32, by a pairwise tree in a fixed order.

    Converting the whole (P, V) chunk to float64 is what made the sampler slow, so block
    sums stay in fp32. The tree is made of elementwise adds only, so a row's sums do not
    depend on the chunk shape, the SIMD width or the device, as a reduction kernel's may.
    Each sum carries at most log2(block) fp32 roundings: relative error below 4.2e-7.
    """
    sums = blocks_PnB
    while sums.shape[-1] > 1:
        half = sums.shape[-1] // 2
        sums = sums[..., :half] + sums[..., half:]
    return sums.squeeze(-1)


def _inverse_cdf(weights_PV: torch.Tensor, uniforms_PN: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids drawn from the rows of non-negative `weights_PV` by inverse CDF at `uniforms_PN`
    → ((P, N) int64 ids, (P, 1) float64 normalisers).

    Two levels, so that no float64 (P, V) tensor exists: a float64 CDF over the fp32 sums of
    blocks of `_CDF_BLOCK` ids picks the block, then a float64 CDF inside that block alone
    picks the id, with the residual uniform rescaled to the in-block total. Given the block
    the draw is exact inverse-CDF sampling; a block's weight carries the fp32 error of its
    sum (< 4.2e-7 relative, the size of the fp32 softmax's own rounding). The ids drawn for a
    given uniform can differ from a single float64 CDF over the row, since the sums differ.
    """
    num_positions, vocab_size = weights_PV.shape
    num_full = vocab_size // _CDF_BLOCK
    tail_PB = weights_PV.new_zeros(num_positions, _CDF_BLOCK)  # last block, zero-padded past V
    tail_PB[:, : vocab_size - num_full * _CDF_BLOCK] = weights_PV[:, num_full * _CDF_BLOCK :]
    full_PnB = weights_PV[:, : num_full * _CDF_BLOCK].reshape(num_positions, num_full, _CDF_BLOCK)
    block_mass_Pn = torch.cat([_block_sums(full_PnB), _block_sums(tail_PB[:, None, :])], dim=1)
    block_cdf_Pn = torch.cumsum(block_mass_Pn, dim=-1, dtype=torch.float64)  # (P, n + 1)
    total_P1 = block_cdf_Pn[:, -1:].contiguous()  # (P, 1)
    targets_PN = uniforms_PN * total_P1  # (P, N)
    # right=True returns the first block whose CDF exceeds the target, so a block (or, below,
    # an id) whose interval is empty (zero weight) is never drawn. u * total can round up to
    # total; such draws go to the last block with mass, the first to reach the total.
    block_PN = torch.searchsorted(block_cdf_Pn, targets_PN, right=True)
    last_block_P1 = torch.searchsorted(block_cdf_Pn, total_P1, right=False)
    block_PN = torch.minimum(block_PN, last_block_P1)
    block_start_Pn = torch.nn.functional.pad(block_cdf_Pn[:, :-1], (1, 0))  # (P, n + 1)
    # Fraction of the chosen block's mass below the target, in [0, 1) up to rounding.
    fraction_PN = (targets_PN - block_start_Pn.gather(1, block_PN)) / block_mass_Pn.gather(1, block_PN)

    block_weights_PNB = tail_PB[:, None, :].expand(-1, block_PN.shape[1], -1)  # (P, N, B)
    if num_full > 0:
        rows_P1 = torch.arange(num_positions, device=weights_PV.device)[:, None]
        from_full_PNB = full_PnB[rows_P1, block_PN.clamp(max=num_full - 1)]  # (P, N, B)
        block_weights_PNB = torch.where((block_PN < num_full)[..., None], from_full_PNB, block_weights_PNB)
    block_cdf_PNB = torch.cumsum(block_weights_PNB, dim=-1, dtype=torch.float64)  # (P, N, B)
    in_block_total_PN1 = block_cdf_PNB[..., -1:].contiguous()
    offset_PN1 = torch.searchsorted(block_cdf_PNB, fraction_PN[..., None] * in_block_total_PN1, right=True)
    # A fraction that rounds to 1 goes to the block's last id with mass, as at the top level.
    last_offset_PN1 = torch.searchsorted(block_cdf_PNB, in_block_total_PN1, right=False)
    offset_PN = torch.minimum(offset_PN1, last_offset_PN1).squeeze(-1)
    return block_PN * _CDF_BLOCK + offset_PN, total_P1


def sample_rs_kd(
    logits_PV: torch.Tensor,
    *,
    num_draws: int,
    temperature: float,
    seed: int,
    stream: int,
    seq_index: torch.Tensor,
    position: torch.Tensor,
) -> SparseTargets:
    """RS-KD targets: unique ids of N draws from softmax(z/τ) with their counts.

    Inverse-CDF sampling with a two-level float64 CDF (see `_inverse_cdf`) over the weights
    exp(z/τ - max), at the N keyed uniforms, so no (N, V) random tensor and no
    float64 (P, V) tensor ever exist. CPU tensors go through the numba kernel
    `rs_kd_kernel.rs_kd_rows` (one pass per row, on as many threads as torch uses), others
    through torch ops; both run the same arithmetic but for the exponential's last bits. Row r
    of the result depends only on `logits_PV[r]` and its key `(seed, stream, seq_index[r],
    position[r])`. A row without a distribution (NaN or +inf logits, all -inf) is an error.
    """
    _check_logits(logits_PV, temperature)
    if num_draws < 1:
        raise KdpipeError(f"rs-kd num_draws {num_draws} must be >= 1: fix the sampler config")
    if not 0 <= seed <= _MASK32:
        raise KdpipeError(f"sampler seed {seed} is out of range: use an integer in [0, 2^32)")
    num_positions = logits_PV.shape[0]
    assert seq_index.shape == (num_positions,) and position.shape == (num_positions,)
    if logits_PV.device.type == "cpu":
        targets = _rs_kd_cpu(logits_PV, num_draws, temperature, seed, stream, seq_index, position)
        bad_P = torch.isnan(targets.covered_mass)
    else:
        targets, bad_P = _rs_kd_torch(logits_PV, num_draws, temperature, seed, stream, seq_index, position)
    if bool(bad_P.any()):
        row = int(bad_P.nonzero()[0])
        raise KdpipeError(
            f"teacher logits of sequence {int(seq_index[row])} position {int(position[row])} are NaN, +inf or all "
            f"-inf (or overflow at temperature {temperature}): check the teacher weights and dtype"
        )
    return targets


def _rs_kd_cpu(
    logits_PV: torch.Tensor, num_draws: int, temperature: float, seed: int, stream: int,
    seq_index: torch.Tensor, position: torch.Tensor,
) -> SparseTargets:  # fmt: skip
    """The numba kernel over a CPU chunk; rows without a distribution get covered mass NaN."""
    num_positions = logits_PV.shape[0]
    assert 0 <= stream <= _MASK32, f"stream {stream} must fit in 32 bits"
    if num_positions > 0:
        assert int(seq_index.min()) >= 0 and 0 <= int(position.min()) and int(position.max()) <= _MASK32
    ids_PN = np.empty((num_positions, num_draws), dtype=np.int64)
    counts_PN = np.empty((num_positions, num_draws), dtype=np.int32)
    num_entries_P = np.empty(num_positions, dtype=np.int32)
    covered_P = np.empty(num_positions, dtype=np.float64)
    logits = logits_PV.detach().float().contiguous().numpy()
    seq_indices = seq_index.to(torch.int64).contiguous().numpy()
    positions = position.to(torch.int64).contiguous().numpy()

    def sample_rows(rows: slice) -> None:
        rs_kd_rows(
            logits[rows], np.float32(temperature), seed, stream, seq_indices[rows], positions[rows],
            ids_PN[rows], counts_PN[rows], num_entries_P[rows], covered_P[rows],
        )  # fmt: skip

    # As many threads as torch uses (the kernel releases the GIL), each on a contiguous range
    # of at least _MIN_ROWS_PER_THREAD rows. Plain threads, not numba's parallel loops: those
    # start an OpenMP pool that resets the thread count torch itself then uses.
    num_threads = max(1, min(torch.get_num_threads(), num_positions // _MIN_ROWS_PER_THREAD))
    bounds = [num_positions * i // num_threads for i in range(num_threads + 1)]
    ranges = [slice(start, stop) for start, stop in zip(bounds[:-1], bounds[1:])]
    if num_threads == 1:
        sample_rows(ranges[0])
    else:
        with ThreadPoolExecutor(num_threads) as pool:
            list(pool.map(sample_rows, ranges))
    kept_PN = np.arange(num_draws) < num_entries_P[:, None]
    return SparseTargets(
        ids=torch.from_numpy(ids_PN[kept_PN]),
        values=torch.from_numpy(counts_PN[kept_PN]),
        num_entries=torch.from_numpy(num_entries_P),
        covered_mass=torch.from_numpy(covered_P.astype(np.float32)),
        ghost=None,
    )


def _rs_kd_torch(
    logits_PV: torch.Tensor, num_draws: int, temperature: float, seed: int, stream: int,
    seq_index: torch.Tensor, position: torch.Tensor,
) -> tuple[SparseTargets, torch.Tensor]:  # fmt: skip
    """The torch implementation → (targets, (P,) bool rows without a distribution)."""
    weights_PV = logits_PV.float() / temperature  # (P, V) fp32, a new tensor; τ rounded to fp32 as in the kernel
    weights_PV.sub_(weights_PV.amax(dim=-1, keepdim=True)).exp_()  # max weight 1
    bad_P = torch.isnan(weights_PV).any(dim=-1)
    if bool(bad_P.any()):  # searching NaN CDFs could index out of range: stop here
        return SparseTargets(*(torch.empty(0),) * 4, ghost=None), bad_P.cpu()
    uniforms_PN = counter_uniforms(
        seed, stream, seq_index.to(logits_PV.device), position.to(logits_PV.device), num_draws
    )
    draws_PN, total_P1 = _inverse_cdf(weights_PV, uniforms_PN)  # (P, N), (P, 1)

    sorted_PN, _ = torch.sort(draws_PN, dim=-1)  # (P, N)
    run_start_PN = torch.ones_like(sorted_PN, dtype=torch.bool)
    run_start_PN[:, 1:] = sorted_PN[:, 1:] != sorted_PN[:, :-1]
    start_flat_E = run_start_PN.flatten().nonzero().squeeze(1)  # (E,)
    # Column 0 of every row starts a run, so the run after a row's last run begins at the
    # next row: the differences of consecutive starts are the counts, row ends included.
    end_flat_E = torch.cat([start_flat_E, start_flat_E.new_tensor([sorted_PN.numel()])])[1:]
    counts_E = (end_flat_E - start_flat_E).to(torch.int32)
    ids_E = sorted_PN.flatten()[start_flat_E]
    num_entries_P = run_start_PN.sum(dim=-1, dtype=torch.int32)

    sampled_weights_PN = weights_PV.gather(1, sorted_PN).to(torch.float64)  # (P, N)
    covered_P = (sampled_weights_PN * run_start_PN).sum(dim=-1) / total_P1.squeeze(1)  # (P,) float64
    targets = SparseTargets(
        ids=ids_E, values=counts_E, num_entries=num_entries_P, covered_mass=covered_P.to(torch.float32), ghost=None
    )
    return targets, bad_P.cpu()


def _top_k_by_prob(probs_PV: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most probable ids per row, most probable first → ((P, k) int64, (P, k) float32).

    Ties go to the lower id: the sort key packs the probability's bit pattern (monotone for
    non-negative floats) above the reversed id, so every key is distinct and the order is
    the same on every device. bf16 teachers produce many exactly equal logits, so ties at
    the cut are common and must not be left to the top-k kernel.
    """
    vocab_size = probs_PV.shape[-1]
    reversed_ids_V = torch.arange(vocab_size - 1, -1, -1, device=probs_PV.device)  # (V,)
    key_PV = (probs_PV.view(torch.int32).to(torch.int64) << 32) | reversed_ids_V  # (P, V)
    top_keys_Pk, _ = torch.topk(key_PV, k, dim=-1, sorted=True)
    ids_Pk = (vocab_size - 1) - (top_keys_Pk & _MASK32)
    return ids_Pk, probs_PV.gather(1, ids_Pk)


def _truncated_targets(
    probs_PV: torch.Tensor, ids_Pk: torch.Tensor, keep_Pk: torch.Tensor, ghost: bool
) -> SparseTargets:
    """Pack the kept ids of each row (a prefix of `ids_Pk`) in ascending id order."""
    vocab_size = probs_PV.shape[-1]
    # Dropped ids become V so that sorting moves them behind the kept ones.
    ascending_Pk, _ = torch.sort(torch.where(keep_Pk, ids_Pk, vocab_size), dim=-1)
    num_entries_P = keep_Pk.sum(dim=-1, dtype=torch.int32)
    kept_Pk = torch.arange(ids_Pk.shape[-1], device=ids_Pk.device) < num_entries_P[:, None]
    kept_probs_Pk = probs_PV.gather(1, ascending_Pk.clamp(max=vocab_size - 1)) * kept_Pk
    covered_P = kept_probs_Pk.to(torch.float64).sum(dim=-1)  # (P,)
    # The fp32 softmax can sum a hair above 1; the leftover mass is never negative.
    ghost_P = (1.0 - covered_P).clamp(min=0.0).to(torch.float32) if ghost else None
    return SparseTargets(
        ids=ascending_Pk[kept_Pk],
        values=kept_probs_Pk[kept_Pk],
        num_entries=num_entries_P,
        covered_mass=covered_P.to(torch.float32),
        ghost=ghost_P,
    )


def _check_k(k: int, vocab_size: int) -> None:
    if not 1 <= k <= vocab_size:
        raise KdpipeError(f"sampler k={k} must be in [1, vocab size {vocab_size}]: fix the sampler config")


def select_top_k(logits_PV: torch.Tensor, *, k: int, temperature: float, ghost: bool) -> SparseTargets:
    """The k most probable ids of softmax(z/τ) per position, with their probabilities.

    Exactly k entries per position; ties at the cut go to the lower id.
    """
    _check_logits(logits_PV, temperature)
    _check_k(k, logits_PV.shape[-1])
    probs_PV = _teacher_probs(logits_PV, temperature)  # (P, V)
    ids_Pk, _ = _top_k_by_prob(probs_PV, k)
    keep_Pk = torch.ones_like(ids_Pk, dtype=torch.bool)
    return _truncated_targets(probs_PV, ids_Pk, keep_Pk, ghost)


def select_top_p_k(
    logits_PV: torch.Tensor, *, p: float, k: int, temperature: float, ghost: bool
) -> SparseTargets:
    """Top-p then top-k (Peng et al. 2024): the smallest most-probable prefix whose mass
    reaches p (inclusive: mass >= p), capped at k entries.

    Prefix masses are float64 sums of the fp32 probabilities; ties go to the lower id.
    Probabilities are stored as they are, not renormalised: renormalising is the trainer's
    choice, and the ghost bucket (when asked for) keeps the leftover mass.
    """
    _check_logits(logits_PV, temperature)
    _check_k(k, logits_PV.shape[-1])
    if not 0.0 < p <= 1.0:
        raise KdpipeError(f"top-p-k p={p} must be in (0, 1]: fix the sampler config")
    probs_PV = _teacher_probs(logits_PV, temperature)  # (P, V)
    # The prefix never exceeds k entries, so the k most probable ids are all it can use.
    ids_Pk, probs_Pk = _top_k_by_prob(probs_PV, k)
    prefix_mass_Pk = torch.cumsum(probs_Pk, dim=-1, dtype=torch.float64)  # (P, k)
    target_P1 = torch.full_like(prefix_mass_Pk[:, :1], p)
    # First prefix index whose mass is >= p; k when no prefix within k gets there.
    reach_P1 = torch.searchsorted(prefix_mass_Pk, target_P1, right=False)
    num_kept_P1 = (reach_P1 + 1).clamp(max=k)
    keep_Pk = torch.arange(k, device=ids_Pk.device) < num_kept_P1
    return _truncated_targets(probs_PV, ids_Pk, keep_Pk, ghost)
