"""Snapshot layer specs, positions, capture hooks and storage codecs.

The central check (`test_gate_and_up_recomputed_from_stored_snapshot_match_the_teacher`)
is the product's promise: storing only the FFN input is enough, because the teacher's
real gate and up outputs are `W_gate·x_in` and `W_up·x_in` recomputed from the stored,
encoded, decoded snapshot, within the storage dtype's rounding error.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from kdpipe.schemas.errors import KdpipeError
from kdpipe.teacher_cache.backend import TeacherModel
from kdpipe.teacher_cache.snapshots import (
    FP8_MAX,
    SnapshotCapture,
    decode_bf16,
    decode_fp8,
    encode_bf16,
    encode_fp8,
    parse_layer_spec,
    snapshot_positions,
)

BF16_UNIT_ROUNDOFF = 2.0**-8  # 8-bit significand, round to nearest: |x̂ - x| <= 2^-8 |x|
FP8_UNIT_ROUNDOFF = 2.0**-4  # e4m3: 4-bit significand for normals
FP8_SUBNORMAL_HALF_SPACING = 2.0**-10  # e4m3 subnormal spacing is 2^-9 (in scaled units)
FP32_SLACK = 1e-5  # fp32 matmul rounding of the reference outputs (d = 64)

LLAMA_STYLE = ("llama", "qwen2", "qwen3", "mistral")  # input_layernorm → attn → post_attention_layernorm → mlp


@pytest.fixture(scope="module")
def loaded(tiny_teacher):
    cache: dict[str, TeacherModel] = {}

    def get(family: str) -> TeacherModel:
        if family not in cache:
            cache[family] = TeacherModel.load(tiny_teacher(family).path)
        return cache[family]

    return get


def _ids(batch: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 300, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


# --- layer specs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("none", []),
        ("all", list(range(12))),
        ("every:4", [0, 4, 8]),
        ("0,3,-1", [0, 3, 11]),
        ("2-5", [2, 3, 4, 5]),
        ("-3--1", [9, 10, 11]),
        (" 5, 1,1 ,every:6", [0, 1, 5, 6]),
        ("11", [11]),
        ("0,last", [0, 11]),
    ],
)
def test_parse_layer_spec(spec, expected):
    assert parse_layer_spec(spec, num_layers=12) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("12", r"snapshot layer 12 does not exist: valid layers are 0\.\.11"),
        ("-13", r"snapshot layer -13 does not exist"),
        ("3-40", r"snapshot layer 40 does not exist"),
        ("5-2", r"range '5-2' is empty"),
        ("every:0", "step must be >= 1"),
        ("first", "'first' is not understood"),
        ("", "spec is empty"),
    ],
)
def test_parse_layer_spec_errors(spec, message):
    with pytest.raises(KdpipeError, match=message):
        parse_layer_spec(spec, num_layers=12)


# --- positions -----------------------------------------------------------------------------


def test_positions_are_sorted_unique_subsets_of_the_right_size():
    positions_BK = snapshot_positions(seed=1, stream=0, seq_index=torch.arange(50), seq_len=100, fraction=0.13)
    assert positions_BK.shape == (50, 13) and positions_BK.dtype == torch.int64
    assert bool((positions_BK[:, 1:] > positions_BK[:, :-1]).all())  # sorted, hence no duplicates
    assert int(positions_BK.min()) >= 0 and int(positions_BK.max()) < 100
    # Different sequences get different subsets.
    assert len({tuple(row.tolist()) for row in positions_BK}) == 50


def test_positions_are_deterministic_and_batch_independent():
    alone = snapshot_positions(seed=3, stream=2, seq_index=torch.tensor([7]), seq_len=64, fraction=0.25)
    in_batch = snapshot_positions(seed=3, stream=2, seq_index=torch.tensor([3, 11, 7, 0, 40]), seq_len=64, fraction=0.25)
    again = snapshot_positions(seed=3, stream=2, seq_index=torch.tensor([7]), seq_len=64, fraction=0.25)
    assert torch.equal(alone[0], in_batch[2])
    assert torch.equal(alone, again)
    other_seed = snapshot_positions(seed=4, stream=2, seq_index=torch.tensor([7]), seq_len=64, fraction=0.25)
    other_stream = snapshot_positions(seed=3, stream=5, seq_index=torch.tensor([7]), seq_len=64, fraction=0.25)
    assert not torch.equal(alone, other_seed)
    assert not torch.equal(alone, other_stream)


def test_positions_cover_all_positions_uniformly():
    seq_len, num_seqs, fraction = 32, 4000, 0.25
    positions_BK = snapshot_positions(seed=0, stream=0, seq_index=torch.arange(num_seqs), seq_len=seq_len, fraction=fraction)
    counts = torch.bincount(positions_BK.flatten(), minlength=seq_len).double()
    expected = num_seqs * fraction  # 1000 per position; binomial std ~27
    assert float((counts - expected).abs().max()) < 6 * math.sqrt(expected * (1 - fraction)), counts.tolist()


def test_full_fraction_and_tiny_fraction():
    everything = snapshot_positions(seed=0, stream=0, seq_index=torch.tensor([5, 6]), seq_len=10, fraction=1.0)
    assert torch.equal(everything, torch.arange(10).expand(2, 10))
    one = snapshot_positions(seed=0, stream=0, seq_index=torch.tensor([5, 6]), seq_len=10, fraction=0.001)
    assert one.shape == (2, 1)
    with pytest.raises(KdpipeError, match="fraction 0.0 must be in"):
        snapshot_positions(seed=0, stream=0, seq_index=torch.tensor([5]), seq_len=10, fraction=0.0)


# --- capture -------------------------------------------------------------------------------


def _block_io(block: torch.nn.Module):
    """Forward hook recording a decoder block's full input and output hidden states (B, T, d)."""
    record: dict[str, torch.Tensor] = {}

    def hook(module, args, kwargs, output):
        record["in"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        record["out"] = output[0] if isinstance(output, tuple) else output

    return record, block.register_forward_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("family", LLAMA_STYLE)
def test_captured_activations_equal_the_block_computed_piece_by_piece(family, loaded):
    teacher = loaded(family)
    layers = list(range(teacher.info.num_layers))
    ids_BT = _ids(batch=3, seq_len=24)
    positions_BK = snapshot_positions(seed=0, stream=0, seq_index=torch.tensor([0, 1, 2]), seq_len=24, fraction=0.3)
    rows_B1 = torch.arange(3)[:, None]
    act = ACT2FN[teacher.model.config.hidden_act]

    records, handles = zip(*(_block_io(teacher.layers()[layer]) for layer in layers))
    try:
        with SnapshotCapture(teacher, layers, attention=True) as capture:
            capture.set_positions(positions_BK)
            teacher.final_hidden(ids_BT)
    finally:
        for handle in handles:
            handle.remove()

    for layer, record in zip(layers, records):
        block, got = teacher.layers()[layer], capture.captured[layer]
        assert set(got) == {"ffn_in", "ffn_out", "attn_in", "attn_out"}
        assert all(t.shape == (3, 7, 64) for t in got.values())
        h_in_BKD, h_out_BKD = record["in"][rows_B1, positions_BK], record["out"][rows_B1, positions_BK]
        torch.testing.assert_close(got["attn_in"], block.input_layernorm(h_in_BKD))
        h_mid_BKD = h_in_BKD + got["attn_out"]
        torch.testing.assert_close(got["ffn_in"], block.post_attention_layernorm(h_mid_BKD))
        mlp = block.mlp
        x = got["ffn_in"]
        expected_out = F.linear(act(F.linear(x, mlp.gate_proj.weight)) * F.linear(x, mlp.up_proj.weight), mlp.down_proj.weight)
        torch.testing.assert_close(got["ffn_out"], expected_out)
        torch.testing.assert_close(h_out_BKD, h_mid_BKD + got["ffn_out"])


def test_capture_keeps_only_selected_layers_and_removes_hooks(loaded):
    teacher = loaded("mistral")
    ffns = [teacher.ffn(layer) for layer in range(4)]
    with SnapshotCapture(teacher, [1, 3]) as capture:
        capture.set_positions(torch.tensor([[0, 5], [2, 9]]))
        teacher.final_hidden(_ids(2, 12))
        assert set(capture.captured) == {1, 3}
        assert set(capture.captured[3]) == {"ffn_in", "ffn_out"}
        capture.set_positions(torch.tensor([[1, 2]]))
        assert capture.captured == {1: {}, 3: {}}  # a new batch starts clean
    assert all(not ffn._forward_hooks for ffn in ffns)
    with SnapshotCapture(teacher, [1], ffn_output=False) as capture:  # the default cache content
        capture.set_positions(torch.tensor([[0, 5]]))
        teacher.final_hidden(_ids(1, 12))
        assert set(capture.captured[1]) == {"ffn_in"}


def test_capture_is_the_same_for_a_sequence_alone_or_in_a_batch(loaded):
    teacher = loaded("qwen2")
    ids_BT = _ids(4, 20, seed=5)
    seq_index = torch.tensor([10, 11, 12, 13])
    positions_BK = snapshot_positions(seed=9, stream=0, seq_index=seq_index, seq_len=20, fraction=0.5)
    with SnapshotCapture(teacher, [0, 2]) as capture:
        capture.set_positions(positions_BK)
        teacher.final_hidden(ids_BT)
        batched = {layer: dict(v) for layer, v in capture.captured.items()}
        alone_positions = snapshot_positions(seed=9, stream=0, seq_index=seq_index[2:3], seq_len=20, fraction=0.5)
        capture.set_positions(alone_positions)
        teacher.final_hidden(ids_BT[2:3])
    for layer in (0, 2):
        for kind in ("ffn_in", "ffn_out"):
            torch.testing.assert_close(capture.captured[layer][kind][0], batched[layer][kind][2])


# --- the product's promise: gate/up targets from the stored FFN input ------------------------


def _real_gate_up_and_stored_input(teacher: TeacherModel, layer: int, ids_BT: torch.Tensor, positions_BK: torch.Tensor):
    """The teacher's own gate_proj/up_proj outputs at the positions, and the captured FFN input."""
    mlp = teacher.ffn(layer)
    rows_B1 = torch.arange(ids_BT.shape[0])[:, None]
    real: dict[str, torch.Tensor] = {}
    handles = [
        getattr(mlp, name).register_forward_hook(lambda m, a, out, name=name: real.__setitem__(name, out[rows_B1, positions_BK]))
        for name in ("gate_proj", "up_proj")
    ]
    try:
        with SnapshotCapture(teacher, [layer]) as capture:
            capture.set_positions(positions_BK)
            teacher.final_hidden(ids_BT)
    finally:
        for handle in handles:
            handle.remove()
    return real, capture.captured[layer]["ffn_in"]


@pytest.mark.parametrize("storage", ["bf16", "fp8"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral", "gemma2"])
def test_gate_and_up_recomputed_from_stored_snapshot_match_the_teacher(family, storage, loaded):
    """Per stored vector x (decoded x̂ = x + δ) and projection W: ‖W x̂ − y‖ ≤ ‖W‖₂ ‖δ‖, with

    - bf16: |δ_i| ≤ 2^-8 |x_i| (round to nearest, 8-bit significand) → ‖δ‖ ≤ 2^-8 ‖x‖;
    - fp8 e4m3 with scale s = amax/448: |δ_i| ≤ 2^-4 |x_i| for normals and ≤ 2^-10 s for
      subnormals → ‖δ‖ ≤ 2^-4 ‖x‖ + √d · 2^-10 s.

    The aggregate relative error ‖W X̂ − Y‖_F / ‖Y‖_F is reported and must stay below 1e-2
    for bf16 (≈ 2^-8/√3 expected for uniform rounding) and 2^-4 for fp8.
    """
    teacher = loaded(family)
    layer = teacher.info.num_layers - 1
    seq_index = torch.arange(100, 104)
    ids_BT = _ids(4, 64, seed=7)
    positions_BK = snapshot_positions(seed=1, stream=0, seq_index=seq_index, seq_len=64, fraction=0.25)
    real, x_BKD = _real_gate_up_and_stored_input(teacher, layer, ids_BT, positions_BK)

    if storage == "bf16":
        x_hat = decode_bf16(encode_bf16(x_BKD))
        delta_bound_BK = BF16_UNIT_ROUNDOFF * x_BKD.norm(dim=-1)
        relative_ceiling = 1e-2
    else:
        codes, scale = encode_fp8(x_BKD)
        x_hat = decode_fp8(codes, scale)
        scale_BK = torch.from_numpy(scale)
        delta_bound_BK = FP8_UNIT_ROUNDOFF * x_BKD.norm(dim=-1) + math.sqrt(64) * FP8_SUBNORMAL_HALF_SPACING * scale_BK
        relative_ceiling = FP8_UNIT_ROUNDOFF
    assert bool((x_hat - x_BKD).norm(dim=-1).le(delta_bound_BK * (1 + 1e-6)).all()), "codec error exceeds its bound"

    mlp = teacher.ffn(layer)
    for name in ("gate_proj", "up_proj"):
        weight = getattr(mlp, name).weight  # (f, d)
        y_BKF = real[name]
        recomputed_BKF = F.linear(x_hat, weight, getattr(mlp, name).bias)
        spectral = torch.linalg.matrix_norm(weight, ord=2)
        error_BK = (recomputed_BKF - y_BKF).norm(dim=-1)
        bound_BK = spectral * (delta_bound_BK + FP32_SLACK * x_BKD.norm(dim=-1))
        relative = float((recomputed_BKF - y_BKF).norm() / y_BKF.norm())
        worst = float((error_BK / bound_BK).max())
        assert worst <= 1.0, f"{family} {storage} {name}: error/bound max {worst:.3f} (relative error {relative:.2e})"
        assert relative < relative_ceiling, f"{family} {storage} {name}: relative error {relative:.2e} >= {relative_ceiling:.2e}"
        if storage == "fp8":
            assert relative > 1e-3, f"fp8 relative error {relative:.2e}: suspiciously lossless, was it quantized?"


# --- codecs --------------------------------------------------------------------------------


def test_bf16_bits_equal_torch_bf16_cast():
    x = torch.randn(5, 7, 33) * torch.logspace(-20, 20, 33)
    x[0, 0, :4] = torch.tensor([0.0, -0.0, float("inf"), 1e-40])
    bits = encode_bf16(x)
    assert bits.dtype == np.uint16 and bits.shape == (5, 7, 33)
    assert np.array_equal(bits.view(np.int16), x.to(torch.bfloat16).view(torch.int16).numpy())
    decoded = decode_bf16(bits)
    assert decoded.dtype == torch.float32
    assert torch.equal(decoded, x.to(torch.bfloat16).float())
    assert torch.equal(decode_bf16(encode_bf16(decoded)), decoded)  # bf16 values round-trip exactly


def test_fp8_round_trip_is_within_e4m3_rounding():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 10, 64, generator=gen) * torch.logspace(-6, 6, 10)[:, None]  # scales 1e-6 .. 1e6
    codes, scale = encode_fp8(x)
    assert codes.dtype == np.uint8 and codes.shape == (6, 10, 64)
    assert scale.dtype == np.float32 and scale.shape == (6, 10)
    np.testing.assert_allclose(scale, x.abs().amax(-1).numpy() / FP8_MAX, rtol=1e-6)
    decoded = decode_fp8(codes, scale)
    bound = FP8_UNIT_ROUNDOFF * x.abs() + FP8_SUBNORMAL_HALF_SPACING * torch.from_numpy(scale)[..., None]
    error = (decoded - x).abs()
    assert bool((error <= bound * (1 + 1e-6)).all()), f"max error/bound {float((error / bound).max()):.3f}"
    # Each vector's amax maps onto 448 exactly, so it survives (up to fp32 scaling error).
    torch.testing.assert_close(decoded.abs().amax(-1), x.abs().amax(-1), rtol=1e-6, atol=0)


def test_fp8_zero_vectors_and_exact_values():
    x = torch.zeros(3, 8)
    x[1] = torch.tensor([448.0, -224.0, 1.0, 0.5, 0.0, -2.0, 3.0, 0.125])  # all e4m3-representable at scale 1
    codes, scale = encode_fp8(x)
    assert scale[0] == 0.0 and scale[2] == 0.0
    decoded = decode_fp8(codes, scale)
    assert torch.equal(decoded[0], torch.zeros(8)) and torch.equal(decoded[2], torch.zeros(8))
    assert torch.equal(decoded[1], x[1])


def test_fp8_refuses_non_finite_activations():
    with pytest.raises(KdpipeError, match="inf or NaN"):
        encode_fp8(torch.tensor([[1.0, float("nan")]]))
