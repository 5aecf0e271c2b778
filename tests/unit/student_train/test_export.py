"""Export: the LRC student reloads as a plain Hugging Face model that computes the same logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerFast

from kdpipe.schemas.errors import KdpipeError
from kdpipe.student_train.export import export_student
from kdpipe.student_train.lrc import LRCSpec, LRCStudent
from tests.unit.student_train.tiny_teachers import FAMILIES, VOCAB, tiny_teacher

D_S = 32


def _trained_student(family: str, tie: bool | None = None) -> LRCStudent:
    """A student whose norms are no longer all ones, so a dropped norm would show."""
    student = LRCStudent(tiny_teacher(family), LRCSpec(hidden_size=D_S, tie_embeddings=tie))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in student.named_parameters():
            if "norm" in name:
                param.add_(0.2 * torch.randn(param.shape, generator=g))
    return student.eval()


def _tokenizer_dir(tmp_path: Path) -> Path:
    vocab = {f"w{i}": i for i in range(VOCAB - 1)} | {"<unk>": VOCAB - 1}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer"
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>").save_pretrained(path)
    return path


def _greedy(student: LRCStudent, ids_BT: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding with the student itself (full recompute each step): the reference for generate()."""
    for _ in range(steps):
        logits_BV = student(ids_BT).hidden[:, -1] @ student.lm_head_weight().T
        ids_BT = torch.cat([ids_BT, logits_BV.argmax(-1, keepdim=True)], dim=1)
    return ids_BT


@pytest.mark.parametrize(("family", "tie"), [(f, None) for f in FAMILIES] + [("llama", False), ("qwen2", True)])
def test_exported_model_reloads_with_the_students_logits(tmp_path: Path, family: str, tie: bool | None) -> None:
    student = _trained_student(family, tie)
    out_dir = export_student(student, tmp_path / "student", tokenizer_dir=None)
    assert (out_dir / "model.safetensors").is_file()
    model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    assert model.config.model_type == student.config.model_type
    assert model.config.hidden_size == D_S
    assert model.config.head_dim == student.head_dim
    assert model.config.tie_word_embeddings == student.tied
    assert model.dtype == torch.float32
    if student.tied:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    ids_BT = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(0))  # longer than mistral's window
    with torch.no_grad():
        expected_BTV = student(ids_BT).hidden @ student.lm_head_weight().T
        logits_BTV = model(ids_BT).logits
        torch.testing.assert_close(logits_BTV, expected_BTV, atol=1e-5, rtol=1e-5)

        generated = model.generate(ids_BT[:1, :6], max_new_tokens=5, do_sample=False)
        assert generated.shape == (1, 11)
        torch.testing.assert_close(generated, _greedy(student, ids_BT[:1, :6], 5), rtol=0, atol=0)


def test_export_casts_to_the_requested_dtype_and_copies_the_tokenizer(tmp_path: Path) -> None:
    student = _trained_student("qwen3")
    tokenizer_dir = _tokenizer_dir(tmp_path)
    out_dir = export_student(student, tmp_path / "student", tokenizer_dir=tokenizer_dir, dtype=torch.bfloat16)
    tensors = load_file(out_dir / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    weights = student.student_weights()
    for name, tensor in tensors.items():
        torch.testing.assert_close(tensor, weights[name].to(torch.bfloat16), rtol=0, atol=0)
    assert (out_dir / "tokenizer.json").read_bytes() == (tokenizer_dir / "tokenizer.json").read_bytes()
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    assert tokenizer.convert_tokens_to_ids("w5") == 5
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    assert model.dtype == torch.bfloat16


def test_export_refuses_an_existing_directory_and_a_tokenizerless_one(tmp_path: Path) -> None:
    student = _trained_student("llama")
    existing = tmp_path / "exists"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(KdpipeError, match="already exists"):
        export_student(student, existing, tokenizer_dir=None)
    assert (existing / "keep.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(KdpipeError, match="tokenizer directory"):
        export_student(student, tmp_path / "out", tokenizer_dir=empty)
    assert not (tmp_path / "out").exists()


def test_a_crash_during_export_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    student = _trained_student("llama")

    def crash(self: PreTrainedModel, save_directory: Path, **kwargs: object) -> None:
        Path(save_directory).mkdir(parents=True)
        (Path(save_directory) / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        export_student(student, tmp_path / "student", tokenizer_dir=None)
    assert list(tmp_path.iterdir()) == []
