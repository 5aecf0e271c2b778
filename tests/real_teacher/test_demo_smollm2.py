"""`kdpipe demo --teacher smollm2`: the demo's four students distilled from the real teacher, at toy size.

The packaged teacher is found by name, the students' width follows it (288, half its 576,
which its 9 heads accept), the LRC student gets train-student's learning rate for the
shared init, and the table and the teacher's own held-out loss come out finite. The full
default budget (24,576 tokens per student, ~13 minutes on 2 cores) is the README's table.
"""

from __future__ import annotations

import json
import math
import sysconfig
from pathlib import Path

import pytest
import yaml

from kdpipe.schemas.train_config import SHARED_INIT_LR
from tests.integration.test_train_cli import in_process

pytestmark = pytest.mark.real_teacher

STUDENTS = ("lm_only", "top_k_kd", "rs_kd_kd", "lrc_clone_rs_kd")


def _corpus(path: Path) -> Path:
    """24 documents of ~600 characters (~200 tokens) of standard-library code: a val split of a few documents,
    where the embedded corpus's hash split may put one long module (thousands of tokens) into val."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = "".join((stdlib / name).read_text(encoding="utf-8") for name in ("colorsys.py", "bisect.py", "fnmatch.py", "shlex.py"))
    chunks = [text[i : i + 600] for i in range(0, 600 * 24, 600)]
    assert len(chunks[-1]) == 600
    path.write_text("".join(json.dumps({"text": chunk}) + "\n" for chunk in chunks), encoding="utf-8")
    return path


def test_demo_with_the_packaged_teacher(real_teacher, tmp_path, capsys):
    out = tmp_path / "demo"
    code = in_process(
        "demo", "--teacher", "smollm2", "--out", out, "--corpus", _corpus(tmp_path / "corpus.jsonl"), "--val-fraction", 0.2, "--seq-len", 64,
        "--student-tokens", 384, "--student-batch-size", 2, "--eval-batches", 1,
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert code in (0, None), printed[-3000:]
    assert "students: width 288, half the teacher's 576" in printed
    teacher_loss = json.loads((out / "teacher_val_loss.json").read_text())["val_loss"]
    assert 0.5 < teacher_loss < 5.0, teacher_loss  # a trained model on Python source (uniform would be 10.8)
    assert f"Teacher held-out LM loss {teacher_loss:.4f}" in printed

    recorded = yaml.safe_load((out / "demo_config.yaml").read_text())
    assert (recorded["teacher"], recorded["student_tokens"], recorded["student_hidden_size"]) == ("smollm2", 384, None)
    lrc = yaml.safe_load((out / "runs" / "lrc_clone_rs_kd" / "config.yaml").read_text())
    assert (lrc["hidden_size"], lrc["lrc_init"], lrc["lr"]) == (288, "shared", SHARED_INIT_LR)
    plain = json.loads((out / "runs" / "plain_student_config.json").read_text())
    assert (plain["hidden_size"], plain["num_hidden_layers"], plain["head_dim"]) == (288, 30, 64)

    evals = {}
    for name in STUDENTS:
        records = [json.loads(line) for line in (out / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        evals[name] = [r for r in records if r["type"] == "eval"][-1]["eval/lm_loss"]
        assert math.isfinite(evals[name])
    # The LRC student starts from the teacher's weights; 3 steps leave random plain students near uniform.
    assert evals["lrc_clone_rs_kd"] < min(evals[name] for name in STUDENTS[:3]) - 1.0, evals
