"""`kdpipe demo` end to end at toy size: every stage runs, the table and plots come out, a re-run resumes."""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path

import pytest
from rich.console import Console

from kdpipe.demo.run import run_demo
from kdpipe.schemas.demo_config import DemoConfig
from kdpipe.schemas.errors import KdpipeError
from kdpipe.teacher_cache.inspect import cache_stats

STUDENTS = ("lm_only", "top_k_kd", "rs_kd_kd", "lrc_clone_rs_kd")


def _tiny(out: Path) -> DemoConfig:
    return DemoConfig(
        out=out, corpus_bytes=150_000, val_fraction=0.2, vocab_size=320, seq_len=32, teacher_minutes=0.05,
        teacher_max_steps=20, teacher_hidden_size=32, teacher_layers=2, num_draws=8, student_tokens=1024,
        student_hidden_size=16, eval_batches=1,
    )  # fmt: skip


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    config = _tiny(tmp_path_factory.mktemp("demo") / "out")
    return config, run_demo(config, console=Console(quiet=True))


def test_the_demo_writes_a_finite_table_and_plots(demo):
    config, summary = demo
    assert [r.name for r in summary.results] == list(STUDENTS)
    for r in summary.results:
        for value in (r.lm_loss, r.kl, r.ece, r.tokens_per_s, r.cache_logits_bytes_per_token, r.cache_bytes_per_token):
            assert math.isfinite(value) and value >= 0, r
    assert math.isfinite(summary.teacher_val_loss)
    report = summary.report.read_text(encoding="utf-8")
    for name in STUDENTS:
        assert f"| {name} |" in report
    for png in ("loss_curves.png", "calibration.png"):
        assert (summary.report.parent / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [r.cache for r in summary.results] == ["rs-kd", "top-k", "rs-kd", "rs-kd"]


def test_students_share_the_budget_and_only_the_lrc_one_clones(demo):
    config, _ = demo
    final = {}
    for name in STUDENTS:
        records = [json.loads(line) for line in (config.out / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        final[name] = [r for r in records if "loss/lm" in r and "tokens" in r][-1]
    assert {r["tokens"] for r in final.values()} == {1024}
    assert final["lrc_clone_rs_kd"]["loss/clone"] > 0
    assert all(final[name].get("loss/clone") in (None, 0.0) for name in STUDENTS[:3])


def test_the_top_k_cache_keeps_about_as_many_ids_as_rs_kd(demo):
    config, _ = demo
    rs_kd, top_k = cache_stats(config.out / "cache_rs_kd"), cache_stats(config.out / "cache_top_k")
    assert top_k.mean_ids_per_position == pytest.approx(round(rs_kd.mean_ids_per_position), abs=1.0)
    assert rs_kd.snapshot_bytes_per_token > 0 and top_k.snapshot_bytes_per_token == 0


def test_a_rerun_resumes_without_retraining_and_gives_the_same_table(demo):
    config, summary = demo
    teacher_weights = config.out / "teacher" / "model.safetensors"
    before = teacher_weights.stat().st_mtime_ns
    started = time.perf_counter()
    again = run_demo(replace(config, teacher_minutes=9.0), console=Console(quiet=True))  # may differ once the teacher exists
    assert again.results == summary.results
    assert teacher_weights.stat().st_mtime_ns == before
    assert time.perf_counter() - started < summary.seconds


def test_a_rerun_with_other_options_is_refused(demo):
    config, _ = demo
    with pytest.raises(KdpipeError, match="was made with seed=0, this run gives 1"):
        run_demo(replace(config, seed=1), console=Console(quiet=True))
