"""`kdpipe report` on synthetic run directories: the table's numbers, the plots, bad inputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from kdpipe import cli
from kdpipe.pipeline.report import CALIBRATION_FILE, LOSS_CURVES_FILE, load_run, write_report
from kdpipe.schemas.errors import KdpipeError
from kdpipe.teacher_cache import cache_stats
from tests.unit.teacher_cache.test_store import make_manifest, write_cache

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def reliability(ece_shift: float) -> dict:
    confidence = [(b + 0.5) / 15 if b < 10 else None for b in range(15)]
    accuracy = [c * (1 - ece_shift) if c is not None else None for c in confidence]
    return {"confidence": confidence, "accuracy": accuracy, "count": [100 - 5 * b if b < 10 else 0 for b in range(15)]}


def write_run(
    directory: Path,
    *,
    final_loss: float,
    kl: float | None,
    ece: float,
    throughputs: list[float],
    cache: Path | None = None,
    tail: str = "",
) -> Path:
    """A run whose eval at step s has LM loss final_loss + 1/s and KL kl + 1/s; train loss 9 - s."""
    directory.mkdir(parents=True)
    records = []
    for step, tps in enumerate(throughputs, start=1):
        train = {"step": step, "tokens": step * 1000, "loss/lm": 9.0 - step, "loss/kd": 1.0, "lr": 1e-3, "tokens_per_s": tps}
        records.append(train)
        if step % 2 == 0:
            evals = {"eval/lm_loss": final_loss + 1.0 / step, "eval/ece": ece, "eval/reliability": reliability(ece)}
            if kl is not None:
                evals["eval/kl"] = kl + 1.0 / step
            records.append(evals)  # no "tokens": placed at the last train record's
    lines = [json.dumps(r) for r in records]
    (directory / "metrics.jsonl").write_text("\n".join(lines) + "\n" + tail, encoding="utf-8")
    (directory / "config.yaml").write_text(f"cache: {cache}\nsteps: 4\n" if cache else "steps: 4\n", encoding="utf-8")
    return directory


def table_rows(report: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split("|") for line in report.splitlines() if line.startswith("| ") and "---" not in line]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}


def test_report_table_has_each_runs_final_numbers_and_plots(tmp_path):
    cache = tmp_path / "cache"
    write_cache(cache, make_manifest())
    stats = cache_stats(cache)
    baseline = write_run(tmp_path / "lm-only", final_loss=4.5, kl=None, ece=0.02, throughputs=[100.0, 5000.0, 6000.0, 7000.0])
    kd = write_run(tmp_path / "rs-kd", final_loss=4.0, kl=0.3, ece=0.01, throughputs=[50.0, 4000.0, 4200.0, 4400.0], cache=cache,
                   tail='{"step": 5, "tokens": 50')  # fmt: skip  # a killed run's half-written line

    path = write_report([baseline, kd], tmp_path / "report")
    text = path.read_text(encoding="utf-8")
    rows = table_rows(text)
    # tokens, held-out LM loss, KL, ECE, tokens/s, cache mode, cache bytes/token; the last eval counts (step 4)
    assert rows["lm-only"] == ["4,000", "4.7500", "–", "0.0200", "6,000", "–", "–"]
    bytes_per_token = stats.total_bytes / stats.tokens
    assert rows["rs-kd"] == ["4,000", "4.2500", "0.5500", "0.0100", "4,200", stats.mode, f"{bytes_per_token:,.1f}"]
    assert bytes_per_token > 0
    for name in (LOSS_CURVES_FILE, CALIBRATION_FILE):
        data = (tmp_path / "report" / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 20_000
        assert f"]({name})" in text


def test_eval_points_sit_at_the_tokens_of_the_train_record_before_them(tmp_path):
    run = load_run(write_run(tmp_path / "r", final_loss=3.0, kl=0.1, ece=0.05, throughputs=[1.0, 2.0, 3.0, 4.0]))
    assert run.eval_tokens == [2000, 4000] and run.eval_lm_loss == [3.5, 3.25]
    assert run.train_tokens == [1000, 2000, 3000, 4000] and run.train_lm_loss == [8.0, 7.0, 6.0, 5.0]
    assert run.cache is None and run.tokens_per_s == 3.0


def test_runs_without_evals_still_get_a_report(tmp_path):
    run_dir = tmp_path / "early"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "tokens": 10, "loss/lm": 5.0}) + "\n")
    text = write_report([run_dir], tmp_path / "out").read_text()
    assert table_rows(text)["early"] == ["10", "–", "–", "–", "–", "–", "–"]
    assert (tmp_path / "out" / CALIBRATION_FILE).read_bytes().startswith(PNG_MAGIC)


def test_same_named_runs_are_told_apart(tmp_path):
    a = write_run(tmp_path / "a" / "run", final_loss=3.0, kl=None, ece=0.1, throughputs=[1.0, 2.0])
    b = write_run(tmp_path / "b" / "run", final_loss=2.0, kl=None, ece=0.1, throughputs=[1.0, 2.0])
    rows = table_rows(write_report([a, b], tmp_path / "out").read_text())
    assert rows[str(a)][1] == "3.5000" and rows[str(b)][1] == "2.5000"


def test_bad_runs_are_one_line_errors(tmp_path):
    with pytest.raises(KdpipeError, match="no metrics.jsonl"):
        write_report([tmp_path], tmp_path / "out")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "metrics.jsonl").write_text('{"step": 1, "tok\n{"step": 2}\n')
    with pytest.raises(KdpipeError, match="line 1 is not JSON"):
        load_run(damaged)


def test_cli_prints_the_table(tmp_path, monkeypatch, capsys):
    run = write_run(tmp_path / "r", final_loss=3.0, kl=0.2, ece=0.05, throughputs=[1.0, 2.0])
    monkeypatch.setattr(sys, "argv", ["kdpipe", "report", str(run), "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "| r | 2,000 | 3.5000 | 0.7000 | 0.0500 | 2 | – | – |" in out
    assert (tmp_path / "out" / "report.md").is_file()
