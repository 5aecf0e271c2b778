"""`check_safetensors_files`: a whole file passes, a truncated, padded or garbled one is named in one line."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from kdpipe.schemas.errors import KdpipeError
from kdpipe.teacher_cache.weight_files import check_safetensors_files


@pytest.fixture
def weights(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.arange(100, dtype=torch.float32), "b": torch.ones(3, 4)}, str(path), metadata={"format": "pt"})
    return path


def test_whole_file_passes(weights):
    check_safetensors_files(weights.parent)
    check_safetensors_files(weights.parent / "no-such-dir")  # nothing to check; the loader names a missing teacher


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda b: b[: len(b) - 1], "truncated"),
        (lambda b: b[:5], "shorter than the 8-byte header length: truncated"),
        (lambda b: b[:20], "shorter than its"),
        (lambda b: b + b"\0", "has trailing bytes"),
        (lambda b: b"\xff" * 8 + b[8:], "not plausible"),
        (lambda b: b[:8] + b"\x00" + b[9:], "not valid JSON"),
    ],
)
def test_damaged_file_is_named(weights, damage, reason):
    weights.write_bytes(damage(weights.read_bytes()))
    with pytest.raises(KdpipeError, match=reason) as raised:
        check_safetensors_files(weights.parent)
    assert str(weights) in str(raised.value) and "\n" not in str(raised.value)
