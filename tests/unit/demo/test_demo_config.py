"""Demo options whose defaults follow the teacher, and the checks made before any caching."""

from __future__ import annotations

import pytest
from rich.console import Console

from kdpipe.demo.run import run_demo
from kdpipe.schemas.demo_config import GIVEN_TEACHER, OWN_TEACHER, DemoConfig
from kdpipe.schemas.errors import KdpipeError


def test_defaults_follow_the_teacher_and_given_options_win(tmp_path):
    own = DemoConfig(out=tmp_path / "a")
    assert {name: getattr(own, name) for name in OWN_TEACHER} == OWN_TEACHER
    given = DemoConfig(out=tmp_path / "b", teacher=tmp_path / "teacher")
    assert {name: getattr(given, name) for name in GIVEN_TEACHER} == GIVEN_TEACHER
    assert given.student_hidden_size is None and given.lrc_lr is None  # resolved from the teacher, and by train-student
    chosen = DemoConfig(out=tmp_path / "c", teacher=tmp_path / "teacher", student_tokens=4096, student_hidden_size=96, lrc_lr=1e-4)
    assert (chosen.student_tokens, chosen.student_hidden_size, chosen.lrc_lr, chosen.corpus_bytes) == (4096, 96, 1e-4, 1_500_000)
    with pytest.raises(KdpipeError, match="must be > 0"):
        DemoConfig(out=tmp_path / "d", lrc_lr=0.0)


def test_a_teacher_that_is_neither_a_directory_nor_packaged_is_one_line(tmp_path):
    config = DemoConfig(out=tmp_path / "out", teacher=tmp_path / "nowhere", corpus_bytes=60_000, val_fraction=0.2)
    with pytest.raises(KdpipeError, match=r"nowhere is not a Hugging Face model directory .no config.json. nor a packaged teacher .smollm2.$"):
        run_demo(config, console=Console(quiet=True))


def test_a_student_width_the_teacher_family_refuses_is_refused_before_any_caching(tiny_teacher, tmp_path):
    teacher = tiny_teacher("llama").path  # 4 heads, hidden 64
    config = DemoConfig(out=tmp_path / "out", teacher=teacher, student_hidden_size=30, corpus_bytes=60_000, val_fraction=0.2)
    with pytest.raises(KdpipeError, match=r"^--student-hidden-size 30: transformers refuses a llama student .*nearest valid widths: 28, 32$"):
        run_demo(config, console=Console(quiet=True))
    assert not (tmp_path / "out" / "student_tokens").exists()
