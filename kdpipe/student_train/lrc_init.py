"""The shared projection basis of `--lrc-init shared`, computed from the teacher cache alone.

Why one basis: an LRC student's residual stream is a d_S-dimensional view of the teacher's.
If every projection that writes the residual (embedding, o, down) and every one that reads
it (q, k, v, gate, up, head) uses the same orthonormal basis U (d_T, d_S), the student
computes the teacher's function restricted to span(U); per-matrix bases (each matrix's own
singular vectors) make each layer read in a basis other layers did not write in, and start
worse than random. The best U for that restriction keeps most of the residual stream's
energy: the top-d_S eigenvectors of the second moment of the rms-normalised residual
(every RMSNorm divides by the rms first, so directions matter, not magnitudes).

Where the samples come from: a cached FFN input is the teacher's post-attention RMSNorm
output, γ_post ⊙ h/rms(h); divided elementwise by the teacher's γ_post it is an
rms-normalised residual sample h/rms(h). No teacher forward runs in stage two.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kdpipe.schemas.errors import KdpipeError
from kdpipe.schemas.train_config import INIT_SEQUENCES
from kdpipe.teacher_cache import TeacherCache

TINY_NORM_WEIGHT = 1e-6
"""A post-attention norm entry below this fraction of the largest one (or zero) has erased its
coordinate of the residual from the cached FFN input: such a layer's samples are left out."""


@dataclass(frozen=True, slots=True)
class SharedBasis:
    """An orthonormal basis of the student's residual stream inside the teacher's."""

    vectors: Tensor
    """(d_T, d_S) fp32, orthonormal columns U, strongest direction first."""
    second_moment: Tensor
    """(d_T, d_T) fp32 second moment of the rms-normalised residual samples h/rms(h) (trace d_T)."""
    num_samples: int
    """How many residual samples it was computed from."""

    @property
    def kept_mean_square(self) -> float:
        """Mean square of U^T·x over the samples x (e·d_T; sets the student's norm init)."""
        return float(torch.einsum("ts,tu,us->", self.vectors, self.second_moment, self.vectors))

    @property
    def energy(self) -> float:
        """Fraction of the samples' mean square the basis keeps."""
        return self.kept_mean_square / float(self.second_moment.trace())


def shared_basis(samples_ND: Tensor, hidden_size: int) -> SharedBasis:
    """The top-`hidden_size` eigenvectors of the second moment of rms-normalised samples (N, d_T)."""
    n, d_T = samples_ND.shape
    assert 0 < hidden_size < d_T and n > 0, f"{n} samples of width {d_T}, basis width {hidden_size}"
    x_ND = samples_ND.double()
    moment_DD = x_ND.T @ x_ND / n  # (d_T, d_T)
    _, vectors_DD = torch.linalg.eigh(moment_DD)  # ascending eigenvalues
    top_DS = vectors_DD.flip(-1)[:, :hidden_size]  # (d_T, d_S)
    return SharedBasis(vectors=top_DS.float().contiguous(), second_moment=moment_DD.float(), num_samples=n)


def residual_samples(ffn_in_ND: Tensor, post_norm_weight_D: Tensor) -> Tensor:
    """rms-normalised residual samples (N, d_T) from FFN inputs γ_post ⊙ h/rms(h) (N, d_T).

    Dividing by γ_post undoes the norm's scale; rescaling each sample to rms 1 removes the
    norm's epsilon and the storage rounding, so every sample weighs the same in the moment.
    """
    x_ND = ffn_in_ND.detach().double() / post_norm_weight_D.detach().double()
    rms_N1 = x_ND.square().mean(-1, keepdim=True).sqrt()
    keep_N = rms_N1.squeeze(-1) > 0  # an all-zero input (a padding position) carries no direction
    return (x_ND[keep_N] / rms_N1[keep_N]).float()


def _recoverable(post_norm_weight_D: Tensor) -> bool:
    magnitude_D = post_norm_weight_D.abs().float()
    return bool(magnitude_D.min() > TINY_NORM_WEIGHT * magnitude_D.max())


def cached_residual_samples(cache: TeacherCache, post_norm_weights: list[Tensor], embedding_VD: Tensor) -> Tensor:
    """Residual samples (N, d_T) at the snapshot positions of the first `INIT_SEQUENCES` training sequences.

    One sample per position and snapshotted layer (its cached FFN input over the teacher's
    post-attention norm weight `post_norm_weights[i]`), plus the embedding row of the token
    there: the residual at depth 0, counted as one more layer. Without it the basis misses
    the token-embedding directions every later layer still carries (on SmolLM2-135M at
    d_S 288 it starts at 8.1 instead of 7.4). Layers whose norm weight erases a coordinate
    (`TINY_NORM_WEIGHT`) are left out.
    """
    snapshot = cache.manifest.snapshot
    if not snapshot.layers or "ffn_in" not in snapshot.terms:
        raise KdpipeError(
            f"cache {cache.path} has no FFN-input snapshots, which --lrc-init shared reads; cache the teacher with "
            "--snapshot-layers (e.g. every:4) or use --lrc-init random"
        )
    layers = [layer for layer in snapshot.layers if _recoverable(post_norm_weights[layer])]
    if not layers:
        raise KdpipeError(
            f"cache {cache.path}: every snapshotted layer's post-attention norm has a (near-)zero weight, so its FFN "
            "inputs do not determine the residual stream; snapshot other layers (--snapshot-layers) or use --lrc-init random"
        )
    samples: list[Tensor] = []
    remaining = INIT_SEQUENCES
    for info in cache.shards("train"):
        if remaining == 0:
            break
        if not info.complete:
            continue
        shard = cache.open_shard("train", info.index)
        rows = min(remaining, info.row_stop - info.row_start)
        batch = shard.read(0, rows)
        remaining -= rows
        assert batch.snap_positions is not None
        token_ids = torch.from_numpy(batch.tokens).long().gather(1, torch.from_numpy(batch.snap_positions))  # (n, K)
        samples.append(residual_samples(embedding_VD[token_ids.reshape(-1)].cpu(), torch.ones(embedding_VD.shape[1])))
        for layer in layers:
            ffn_in_NKD = torch.from_numpy(batch.snapshots[layer]["ffn_in"])  # (n, K, d_T)
            samples.append(residual_samples(ffn_in_NKD.reshape(-1, ffn_in_NKD.shape[-1]), post_norm_weights[layer]))
    if not samples or sum(len(s) for s in samples) == 0:
        raise KdpipeError(f"cache {cache.path} has no complete training shard to read FFN inputs from; finish the cache first")
    return torch.cat(samples)


LOGIT_SCALES = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
"""Final-norm scales the shared init tries (a truncated residual stream makes the student overconfident)."""

CALIBRATION_SEQUENCES = 2
"""Training sequences on which the shared init picks its final-norm scale."""


@torch.no_grad()
def best_logit_scale(hidden_ND: Tensor, head_VD: Tensor, labels_N: Tensor, *, chunk_size: int = 256) -> float:
    """The scale in `LOGIT_SCALES` whose logits s·(hidden @ head^T) give the lowest next-token cross-entropy.

    The dropped part of the residual (1 - e of its energy) adds error to every logit; a
    softer start costs less than a confidently wrong one (on SmolLM2-135M at d_S 288 the
    best scale, ~0.7, takes the held-out loss from 7.6 to 7.0).
    """
    totals = torch.zeros(len(LOGIT_SCALES), dtype=torch.float64)
    scales = torch.tensor(LOGIT_SCALES, dtype=torch.float32, device=hidden_ND.device)
    for start in range(0, hidden_ND.shape[0], chunk_size):
        logits_CV = hidden_ND[start : start + chunk_size].float() @ head_VD.float().T  # (C, V)
        labels_C = labels_N[start : start + chunk_size]
        for i, scale in enumerate(scales):
            totals[i] += float(torch.nn.functional.cross_entropy(scale * logits_CV, labels_C, reduction="sum"))
    return LOGIT_SCALES[int(totals.argmin())]


def calibration_tokens(cache: TeacherCache) -> Tensor:
    """(n, T) token ids of the first `CALIBRATION_SEQUENCES` training sequences of the cache."""
    info = next(info for info in cache.shards("train") if info.complete)
    shard = cache.open_shard("train", info.index)
    rows = min(CALIBRATION_SEQUENCES, info.row_stop - info.row_start)
    return torch.from_numpy(shard.read(0, rows).tokens).long()
