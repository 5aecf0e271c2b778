"""The transformers teacher backend against the plain Hugging Face models it wraps."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from transformers import BertConfig, LlamaConfig, T5Config

from kdpipe.schemas.errors import KdpipeError
from kdpipe.teacher_cache.backend import TeacherInfo, TeacherModel, check_tokenizer_compat


@pytest.fixture(scope="module")
def loaded(tiny_teacher):
    """Factory: the TeacherModel of a tiny family, loaded once per module (CPU, float32)."""
    cache: dict[str, TeacherModel] = {}

    def get(family: str) -> TeacherModel:
        if family not in cache:
            cache[family] = TeacherModel.load(tiny_teacher(family).path)
        return cache[family]

    return get


def _random_ids(vocab: int, batch: int = 3, seq_len: int = 17, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def test_final_hidden_then_logits_equal_hf_forward(teacher_family, tiny_teacher, loaded):
    reference = tiny_teacher(teacher_family).model
    teacher = loaded(teacher_family)
    ids_BT = _random_ids(teacher.info.vocab_size)
    expected_BTV = reference(ids_BT).logits.float()

    hidden_BTD = teacher.final_hidden(ids_BT)
    assert hidden_BTD.shape == (3, 17, teacher.info.hidden_size)
    # Logits in two position chunks, as the cache writer computes them.
    flat_PD = hidden_BTD.reshape(-1, hidden_BTD.shape[-1])
    logits_PV = torch.cat([teacher.logits(flat_PD[:20]), teacher.logits(flat_PD[20:])])
    assert logits_PV.dtype == torch.float32
    torch.testing.assert_close(logits_PV.reshape(expected_BTV.shape), expected_BTV, rtol=1e-5, atol=1e-5)


def test_final_hidden_never_runs_the_lm_head(loaded):
    teacher = loaded("qwen2")
    calls = []
    handle = teacher.model.get_output_embeddings().register_forward_hook(lambda *args: calls.append(1))
    try:
        teacher.final_hidden(_random_ids(300))
    finally:
        handle.remove()
    assert calls == []


def test_gemma2_logits_are_softcapped(tiny_teacher, loaded):
    teacher = loaded("gemma2")
    cap = teacher.model.config.final_logit_softcapping
    hidden_PD = teacher.final_hidden(_random_ids(300))[0]
    raw_PV = hidden_PD @ teacher.model.get_output_embeddings().weight.T
    # The cap must bend these logits visibly, or this test could not catch a missing softcap.
    assert (raw_PV.abs().max() > 2 * cap).item()
    torch.testing.assert_close(teacher.logits(hidden_PD), torch.tanh(raw_PV / cap) * cap)


def test_info_describes_the_teacher(teacher_family, tiny_teacher, loaded):
    built = tiny_teacher(teacher_family)
    config = built.model.config
    info = loaded(teacher_family).info
    assert info.model_type == teacher_family
    assert info.num_layers == config.num_hidden_layers
    assert (info.hidden_size, info.intermediate_size) == (64, 128)
    assert info.vocab_size == built.model.get_output_embeddings().weight.shape[0] == config.vocab_size
    assert info.max_positions == 128
    assert len(info.config_hash) == len(info.weights_hash) == 16
    assert loaded(teacher_family).dtype == torch.float32  # dtype "auto" on CPU


def test_structure_discovery_finds_blocks_mlp_and_attention(teacher_family, loaded):
    teacher = loaded(teacher_family)
    # Independent reference: the attribute names these HF families happen to use.
    blocks = teacher.model.model.layers
    assert teacher.layers() == list(blocks)
    for layer, block in enumerate(blocks):
        assert teacher.ffn(layer) is block.mlp
        assert teacher.attention(layer) is block.self_attn
    with pytest.raises(KdpipeError, match=r"layer 99 is out of range.*0\.\.\d"):
        teacher.ffn(99)


def test_hashes_track_weights_and_config_not_save_dtype(tiny_teacher, loaded, tmp_path):
    built = tiny_teacher("llama")
    original = loaded("llama").info
    assert TeacherModel.load(built.path).info == original  # deterministic

    bf16_dir = tmp_path / "bf16"
    copy.deepcopy(built.model).to(torch.bfloat16).save_pretrained(bf16_dir)  # the fixture's model is shared
    bf16 = TeacherModel.load(bf16_dir).info
    assert bf16.config_hash == original.config_hash  # saved dtype is not part of the config fingerprint
    assert bf16.weights_hash != original.weights_hash

    other_dir = tmp_path / "other-rope"
    shutil.copytree(built.path, other_dir)
    config = built.model.config.to_dict() | {"rope_parameters": {"rope_type": "default", "rope_theta": 1234.0}}
    LlamaConfig.from_dict(config).save_pretrained(other_dir)
    other = TeacherModel.load(other_dir).info
    assert other.config_hash != original.config_hash
    assert other.weights_hash == original.weights_hash


def test_bfloat16_on_cpu_gives_float32_logits_close_to_fp32(tiny_teacher, loaded):
    fp32 = loaded("mistral")
    bf16 = TeacherModel.load(tiny_teacher("mistral").path, device="cpu", dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16
    ids_BT = _random_ids(300)
    logits_bf16 = bf16.logits(bf16.final_hidden(ids_BT).reshape(-1, 64))
    logits_fp32 = fp32.logits(fp32.final_hidden(ids_BT).reshape(-1, 64))
    assert logits_bf16.dtype == torch.float32
    # bf16 weights and activations through 4 layers: a few bf16 ulps of the logit scale.
    error = (logits_bf16 - logits_fp32).abs().max().item()
    assert error < 0.05 * logits_fp32.abs().max().item(), error


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(KdpipeError, match="does not exist.*local model directory"):
        TeacherModel.load(tmp_path / "nope")


def test_directory_without_config_is_a_clear_error(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(KdpipeError, match="no config.json"):
        TeacherModel.load(tmp_path)


def test_encoder_only_config_is_refused(tmp_path):
    BertConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128).save_pretrained(tmp_path)
    with pytest.raises(KdpipeError, match=r"\(bert\) is not a causal language model"):
        TeacherModel.load(tmp_path)


def test_encoder_decoder_config_is_refused(tmp_path):
    T5Config(d_model=64, d_ff=128, num_layers=1, num_heads=4).save_pretrained(tmp_path)
    with pytest.raises(KdpipeError, match="encoder-decoder model \\(t5\\)"):
        TeacherModel.load(tmp_path)


def test_unknown_model_type_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "not-a-real-model"}')
    with pytest.raises(KdpipeError, match="cannot be read by transformers"):
        TeacherModel.load(tmp_path)


def test_missing_weights_are_a_clear_error(tiny_teacher, tmp_path):
    tiny_teacher("llama").model.config.save_pretrained(tmp_path)
    with pytest.raises(KdpipeError, match="no weight files"):
        TeacherModel.load(tmp_path)


def test_missing_weight_shard_is_a_clear_error(tiny_teacher, tmp_path):
    tiny_teacher("llama").model.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1, "the tiny model should have been split into shards"
    shards[-1].unlink()
    with pytest.raises(KdpipeError, match=f"missing \\({shards[-1].name}\\)"):
        TeacherModel.load(tmp_path)


def test_bad_device_and_dtype_are_clear_errors(tiny_teacher):
    path = tiny_teacher("llama").path
    with pytest.raises(KdpipeError, match="dtype 'fp7' is not supported"):
        TeacherModel.load(path, dtype="fp7")
    with pytest.raises(KdpipeError, match="not a torch device"):
        TeacherModel.load(path, device="gpu-please")
    if not torch.cuda.is_available():
        with pytest.raises(KdpipeError, match="CUDA is not available"):
            TeacherModel.load(path, device="cuda")


def _info(vocab_size: int, max_positions: int = 128) -> TeacherInfo:
    return TeacherInfo("qwen2", 2, 64, 128, vocab_size, max_positions, "c" * 16, "w" * 16)


def test_padded_lm_head_is_compatible():
    check_tokenizer_compat(_info(320), tokenizer_vocab_size=300, max_token_id=299, seq_len=128)
    check_tokenizer_compat(_info(300), tokenizer_vocab_size=300, max_token_id=299, seq_len=64)


@pytest.mark.parametrize(
    ("vocab", "max_id", "seq_len", "message"),
    [
        (301, 299, 64, "tokenizer has 301 tokens but .* has only 300 rows"),
        (300, 300, 64, "token id 300 but .* 300 rows"),
        (300, 299, 129, "sequence length 129 exceeds .* max positions 128"),
    ],
)
def test_incompatible_tokenizer_or_length_is_refused(vocab, max_id, seq_len, message):
    with pytest.raises(KdpipeError, match=message):
        check_tokenizer_compat(_info(300), tokenizer_vocab_size=vocab, max_token_id=max_id, seq_len=seq_len)

