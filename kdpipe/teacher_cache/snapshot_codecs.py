"""Snapshot storage codecs: bf16 bits as uint16, fp8 e4m3 codes as uint8 with one float32 scale per vector.

Zarr has no bf16 or fp8 dtype, so values are stored as raw bits. Kept apart from hook
capture so the cache reader needs neither forward hooks nor transformers.
"""

from __future__ import annotations

import numpy as np
import torch

from kdpipe.schemas.errors import KdpipeError

FP8_MAX = 448.0
"""Largest finite float8_e4m3fn value; each vector's amax is scaled onto it."""


def encode_bf16(x: torch.Tensor) -> np.ndarray:
    """The bf16 bits of `x` (rounded to nearest even) as uint16, same shape."""
    return x.detach().to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16)


def decode_bf16(bits: np.ndarray) -> torch.Tensor:
    """float32 values of bf16 bits stored as uint16 (exact: bf16 is a prefix of float32)."""
    return torch.from_numpy(np.ascontiguousarray(bits).view(np.int16)).view(torch.bfloat16).float()


def encode_fp8(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """float8 e4m3 codes (..., d) uint8 and one float32 scale (...) per vector, scale = amax / 448.

    Scaling each vector onto e4m3's full range keeps its 3 mantissa bits: relative error
    <= 2^-4 for every element above 2^-6·scale, absolute error <= 2^-10·scale below
    (subnormals). An all-zero vector gets scale 0 and decodes to zeros.
    """
    x = x.detach().float()
    amax = x.abs().amax(dim=-1)  # (...)
    if not bool(torch.isfinite(amax).all()):
        raise KdpipeError(
            "snapshot activations contain inf or NaN and cannot be stored in fp8; run the teacher in bfloat16 or float32"
        )
    scale = amax / FP8_MAX
    safe_scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scaled = (x / safe_scale[..., None]).clamp(-FP8_MAX, FP8_MAX)  # rounding could step just past 448
    codes = scaled.to(torch.float8_e4m3fn).view(torch.uint8)
    return codes.cpu().numpy(), scale.cpu().numpy()


def decode_fp8(codes: np.ndarray, scale: np.ndarray) -> torch.Tensor:
    """float32 values (..., d) from e4m3 codes (..., d) uint8 and per-vector scales (...)."""
    values = torch.from_numpy(np.ascontiguousarray(codes)).view(torch.float8_e4m3fn).float()
    return values * torch.from_numpy(np.asarray(scale, dtype=np.float32))[..., None]
