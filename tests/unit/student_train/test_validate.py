"""Student checks before any work: LRC widths per family, plain configs that would fail late."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from kdpipe.schemas.errors import KdpipeError
from kdpipe.schemas.train_config import TrainStudentConfig
from kdpipe.student_train.builders import build_plain
from kdpipe.student_train.lrc import LRCSpec, LRCStudent
from kdpipe.student_train.validate import check_lrc_width, check_student, half_lrc_width, nearest_accepted
from tests.unit.teacher_cache.test_store import SEQ_LEN, VOCAB, make_manifest

LRC_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


def _refusal(config, width: int) -> str | None:
    try:
        check_lrc_width(config, width, None)
    except KdpipeError as err:
        return str(err)
    return None


@pytest.mark.parametrize("family", LRC_FAMILIES)
def test_lrc_widths_accepted_are_exactly_those_that_build_and_run(family, tiny_teacher):
    teacher = tiny_teacher(family)
    config = AutoConfig.from_pretrained(teacher.path)
    d_T = config.hidden_size
    ids_BT = torch.randint(0, teacher.tokenizer_vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))
    accepted = [w for w in range(1, d_T + 2) if _refusal(config, w) is None]
    for width in range(1, d_T + 2):
        message = _refusal(config, width)
        if message is None:
            if width not in (accepted[0], accepted[len(accepted) // 2], accepted[-1]):
                continue  # building every width costs half a second each; the ends and the middle stand for them
            student = LRCStudent(teacher.model, LRCSpec(hidden_size=width))
            assert student(ids_BT).hidden.shape == (1, 6, width)
            # What export writes and AutoModelForCausalLM.from_pretrained reads back.
            assert type(student.config).from_dict(student.config.to_dict()).hidden_size == width
            continue
        assert "\n" not in message and message.startswith(f"--hidden-size {width}: ")
        if width < d_T:
            with pytest.raises(Exception):  # what the check saves the user from: a failure deep in transformers
                LRCStudent(teacher.model, LRCSpec(hidden_size=width))
        named = re.search(r"(?:nearest valid widths:|widest valid one is) ([\d, ]+)$", message).group(1).split(", ")
        below, above = [w for w in accepted if w <= width], [w for w in accepted if w > width]
        assert [int(w) for w in named] == ([max(below)] if below else []) + ([min(above)] if above else [])
    refused = [w for w in range(1, d_T + 2) if w not in accepted]
    heads = config.num_attention_heads
    if family == "llama":  # Llama's config insists on a multiple of the heads, even with an explicit head_dim
        assert refused == [w for w in range(1, d_T) if w % heads] + [d_T, d_T + 1]
    else:
        assert refused == [d_T, d_T + 1]


def test_refused_width_names_the_nearest_valid_ones(tiny_teacher):
    config = AutoConfig.from_pretrained(tiny_teacher("llama").path)  # 4 heads, hidden 64
    with pytest.raises(KdpipeError, match=r"--hidden-size 30: transformers refuses a llama student of that width "
                                          r"\(The hidden size \(30\) is not a multiple of the number of attention heads \(4\)\); "
                                          r"nearest valid widths: 28, 32$"):  # fmt: skip
        check_lrc_width(config, 30, None)
    with pytest.raises(KdpipeError, match="narrower than its teacher .hidden size 64.; the widest valid one is 60$"):
        check_lrc_width(config, 64, None)


def test_half_width_is_the_nearest_accepted_width_at_or_below_half(tiny_teacher):
    config = AutoConfig.from_pretrained(tiny_teacher("llama").path)  # 4 heads, hidden 64
    assert half_lrc_width(config) == 32
    config.hidden_size = 60  # half is 30, which 4 heads refuse
    assert half_lrc_width(config) == 28
    config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim = 576, 9, 3, 64  # SmolLM2
    assert half_lrc_width(config) == 288


def test_an_lrc_student_of_an_unsupported_family_is_refused_from_its_config(tiny_teacher, tmp_path):
    manifest = make_manifest(teacher_path=str(tiny_teacher("gemma2").path))
    config = TrainStudentConfig(cache=tmp_path / "cache", out=tmp_path / "run", student="lrc", hidden_size=32, steps=1)
    with pytest.raises(KdpipeError, match="teacher architecture 'gemma2' is not supported"):
        check_student(config, manifest)
    gone = make_manifest(teacher_path=str(tmp_path / "moved"))
    with pytest.raises(KdpipeError, match="moved named in the cache manifest does not exist"):
        check_student(config, gone)


def test_nearest_accepted_looks_both_ways_within_bounds():
    assert nearest_accepted(lambda w: w % 9 == 0, 192, low=1, high=575) == [189, 198]
    assert nearest_accepted(lambda w: w % 9 == 0, 189, low=1, high=575) == [189, 198]
    assert nearest_accepted(lambda w: w % 9 == 0, 574, low=1, high=575) == [567]
    assert nearest_accepted(lambda w: False, 10, low=1, high=20) == []


def _plain(tmp_path: Path, **fields) -> TrainStudentConfig:
    data = dict(model_type="llama", vocab_size=VOCAB, hidden_size=36, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=SEQ_LEN) | fields  # fmt: skip
    path = tmp_path / "student.json"
    path.write_text(json.dumps(data))
    return TrainStudentConfig(cache=tmp_path / "cache", out=tmp_path / "run", student="plain", student_config=path, steps=1)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(hidden_size=100, num_attention_heads=9),
         r"transformers cannot build a 'llama' config \(The hidden size \(100\) is not a multiple of the number of attention "
         r"heads \(9\)\); nearest valid hidden_size: 90, 108$"),  # 99: head_dim 11, RoPE needs an even one
        (dict(num_key_value_heads=4), "num_key_value_heads 4 does not divide num_attention_heads 6 .*; use one of 1, 2, 3, 6$"),
        (dict(num_key_value_heads=12), "num_key_value_heads 12 does not divide num_attention_heads 6"),
        (dict(vocab_size=VOCAB - 1), f"vocabulary has {VOCAB - 1} ids but the cache's teacher has {VOCAB}"),
        (dict(max_position_embeddings=SEQ_LEN - 1), f"max_position_embeddings {SEQ_LEN - 1} is below the cache's sequence length {SEQ_LEN}"),
        (dict(model_type="gemma2", head_dim=6, final_logit_softcapping=30.0), r"\(gemma2\) caps its logits"),
    ],
)  # fmt: skip
def test_plain_configs_that_would_fail_late_are_refused(tmp_path, fields, message):
    config = _plain(tmp_path, **fields)
    with pytest.raises(KdpipeError, match=message) as err:
        check_student(config, make_manifest())
    assert "\n" not in str(err.value) and str(err.value).startswith(f"student config {config.student_config}")


def _llama(**fields) -> PretrainedConfig:
    return AutoConfig.for_model("llama", **{**dict(vocab_size=VOCAB, hidden_size=36, intermediate_size=64, num_hidden_layers=1,
                                                 num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=SEQ_LEN), **fields})  # fmt: skip


def test_the_kv_heads_check_stands_for_a_real_failure():
    """Without the check, the model builds and fails at its first forward, deep inside attention."""
    model = AutoModelForCausalLM.from_config(_llama(num_key_value_heads=4))
    with pytest.raises(RuntimeError):
        model(torch.zeros((1, 4), dtype=torch.long))


def test_an_accepted_plain_config_builds_and_runs(tmp_path):
    check_student(_plain(tmp_path), make_manifest())
    student = build_plain(_llama(), make_manifest())
    assert student(torch.zeros((1, 4), dtype=torch.long)).hidden.shape == (1, 4, 36)
