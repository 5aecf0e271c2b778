"""`kdpipe report`: loss curves, calibration diagrams and a Markdown table of student runs.

Reads what `kdpipe train-student` leaves in each run directory:

- `metrics.jsonl`, one JSON object per line. A train record carries `tokens` (cumulative
  training tokens) and `loss/lm` (also `step`, `loss/kd`, `loss/clone`, `lr`, and
  `tokens_per_s`, the throughput since the previous record); an eval record carries keys
  starting with `eval/`: `eval/lm_loss`, `eval/kl`, `eval/ece` and `eval/reliability`
  (`confidence`, `accuracy`, `count` per bin, None for empty bins; see
  `kdpipe.student_train.metrics`). An eval record without `tokens` is placed at the tokens of
  the last train record before it. A key a run never wrote shows as "–"; a truncated last
  line (a run killed mid-write) is ignored; a file that is not UTF-8 JSON lines, or a record
  whose numbers are not numbers, is refused with one line naming the file and line.
- `config.yaml`, the resolved run config, for `cache`: when that cache still exists its
  size per token is read from disk (`kdpipe.teacher_cache.inspect.cache_stats`).

Writes into `--out`: `loss_curves.png` (held-out LM loss and smoothed train LM loss against
tokens, a line per run), `calibration.png` (reliability diagram and confidence histogram of
each run's last eval) and `report.md` (the table and both images). An `--out` that is a file
or cannot be written is refused before any run is read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter

from kdpipe.schemas.errors import KdpipeError
from kdpipe.schemas.run_dir import METRICS_FILE
from kdpipe.schemas.out_dir import check_writable_dir

CONFIG_FILE = "config.yaml"
REPORT_FILE = "report.md"
LOSS_CURVES_FILE = "loss_curves.png"
CALIBRATION_FILE = "calibration.png"

_SMOOTHING_POINTS = 25
"""The train-loss curve is a trailing mean over 1/_SMOOTHING_POINTS of its records."""


@dataclass(slots=True)
class RunMetrics:
    """What one run directory tells about its student."""

    name: str
    path: Path
    train_tokens: list[int] = field(default_factory=list)
    train_lm_loss: list[float] = field(default_factory=list)
    eval_tokens: list[int] = field(default_factory=list)
    eval_lm_loss: list[float] = field(default_factory=list)
    last_eval: dict[str, Any] = field(default_factory=dict)
    """The last eval record (keys without the `eval/` prefix)."""
    tokens: int | None = None
    """Training tokens of the last record."""
    throughputs: list[float] = field(default_factory=list)
    cache: Path | None = None
    cache_mode: str | None = None
    cache_bytes_per_token: float | None = None

    @property
    def tokens_per_s(self) -> float | None:
        """Mean training throughput, leaving out the first record (it includes start-up)."""
        values = self.throughputs[1:] or self.throughputs
        return float(np.mean(values)) if values else None


def load_run(run_dir: Path, name: str | None = None) -> RunMetrics:
    """Parse a run directory's metrics.jsonl and config.yaml (the cache is measured by `write_report`)."""
    run_dir = Path(run_dir)
    metrics_path = run_dir / METRICS_FILE
    if not metrics_path.is_file():
        raise KdpipeError(f"run {run_dir} has no {METRICS_FILE}; pass directories written by `kdpipe train-student`")
    run = RunMetrics(name=name or run_dir.name, path=run_dir)
    not_metrics = "pass run directories written by `kdpipe train-student`"
    try:
        lines = metrics_path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise KdpipeError(f"{metrics_path} is not UTF-8 text (byte {err.start:,} is not); {not_metrics}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break  # the line a killed run was writing
            raise KdpipeError(f"{metrics_path} line {number} is not JSON; the file is damaged, re-run or repair it") from None
        if isinstance(record, dict):
            try:
                _add_record(run, record)
            except (TypeError, ValueError) as err:
                raise KdpipeError(f"{metrics_path} line {number} holds a value that is not a number ({err}); {not_metrics}") from None
    config_path = run_dir / CONFIG_FILE
    if config_path.is_file():
        try:
            config = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
        except (UnicodeDecodeError, yaml.YAMLError):
            raise KdpipeError(f"{config_path} is not a readable YAML file; {not_metrics}") from None
        cache = config.get("cache") if isinstance(config, dict) else None
        run.cache = Path(cache) if cache else None
    return run


def _add_record(run: RunMetrics, record: dict[str, Any]) -> None:
    tokens = record.get("tokens")
    evals = {key[len("eval/") :]: value for key, value in record.items() if key.startswith("eval/")}
    if evals:
        at = tokens if tokens is not None else run.tokens
        if evals.get("lm_loss") is not None and at is not None:
            run.eval_tokens.append(int(at))
            run.eval_lm_loss.append(float(evals["lm_loss"]))
        run.last_eval = evals
    if tokens is not None:
        run.tokens = int(tokens)
    if not evals and tokens is not None and record.get("loss/lm") is not None:
        run.train_tokens.append(int(tokens))
        run.train_lm_loss.append(float(record["loss/lm"]))
    if not evals and record.get("tokens_per_s") is not None:
        run.throughputs.append(float(record["tokens_per_s"]))


def write_report(run_dirs: list[Path], out_dir: Path) -> Path:
    """Read the runs, draw both figures and write report.md into `out_dir`; returns report.md's path."""
    if not run_dirs:
        raise KdpipeError("report needs at least one RUN_DIR (a directory written by `kdpipe train-student`)")
    check_writable_dir(Path(out_dir), "--out")
    names = [Path(d).name for d in run_dirs]
    runs = [load_run(d, name=str(d) if names.count(n) > 1 else n) for d, n in zip(run_dirs, names)]
    _measure_caches(runs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_loss_curves(runs, out_dir / LOSS_CURVES_FILE)
    plot_calibration(runs, out_dir / CALIBRATION_FILE)
    path = out_dir / REPORT_FILE
    path.write_text(_markdown(runs), encoding="utf-8")
    return path


def _measure_caches(runs: list[RunMetrics]) -> None:
    """Bytes per token and mode of each run's cache, measured once per cache; left None when it is gone."""
    from kdpipe.teacher_cache.inspect import cache_stats

    measured: dict[Path, Any] = {}
    for run in runs:
        if run.cache is None or not run.cache.is_dir():
            continue
        key = run.cache.resolve()
        if key not in measured:
            measured[key] = cache_stats(run.cache)
        stats = measured[key]
        run.cache_mode = stats.mode
        run.cache_bytes_per_token = stats.total_bytes / max(stats.tokens, 1)


def markdown_table(runs: list[RunMetrics]) -> str:
    """One row per run: final held-out LM loss, KL to teacher, ECE, tokens/s, cache bytes per token."""
    header = "| run | tokens | held-out LM loss | KL to teacher | ECE | tokens/s | cache | cache bytes/token |"
    rows = [header, "|" + "---|" * 8]
    for run in runs:
        cells = [
            run.name,
            _number(run.tokens, ",.0f"),
            _number(run.last_eval.get("lm_loss"), ".4f"),
            _number(run.last_eval.get("kl"), ".4f"),
            _number(run.last_eval.get("ece"), ".4f"),
            _number(run.tokens_per_s, ",.0f"),
            run.cache_mode or "–",
            _number(run.cache_bytes_per_token, ",.1f"),
        ]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows) + "\n"


def _number(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _markdown(runs: list[RunMetrics]) -> str:
    return (
        "# kdpipe report\n\n"
        f"{markdown_table(runs)}\n"
        "Held-out LM loss: mean next-token cross-entropy (nats) of the last eval. KL to teacher: to the "
        "teacher's cached targets (for rs-kd an upper-biased estimate; compare runs on one cache). ECE: "
        "expected calibration error of the top-1 prediction. tokens/s: training throughput. Cache "
        "bytes/token: every file of the cache's complete shards per cached token.\n\n"
        f"![loss curves]({LOSS_CURVES_FILE})\n\n"
        f"![calibration]({CALIBRATION_FILE})\n"
    )


def _trailing_mean(values: list[float]) -> np.ndarray:
    """Trailing mean over a window of len/_SMOOTHING_POINTS records (shorter at the start)."""
    data = np.asarray(values, dtype=np.float64)
    window = max(1, len(data) // _SMOOTHING_POINTS)
    sums = np.cumsum(np.concatenate([[0.0], data]))
    ends = np.arange(1, len(data) + 1)
    starts = np.maximum(0, ends - window)
    return (sums[ends] - sums[starts]) / (ends - starts)


def _colors(count: int) -> list[Any]:
    from matplotlib import colormaps

    palette = colormaps["tab10"]
    return [palette(i % 10) for i in range(count)]


def _no_data(axes: Any) -> None:
    axes.text(0.5, 0.5, "no data", ha="center", va="center", transform=axes.transAxes, color="gray")


def plot_loss_curves(runs: list[RunMetrics], path: Path) -> None:
    """Held-out LM loss (left) and smoothed train LM loss (right) against training tokens."""
    figure = Figure(figsize=(12, 4.8), layout="constrained")
    held_out, train = figure.subplots(1, 2)
    for run, color in zip(runs, _colors(len(runs))):
        if run.eval_lm_loss:
            held_out.plot(run.eval_tokens, run.eval_lm_loss, "o-", color=color, markersize=4, label=run.name)
        if run.train_lm_loss:
            train.plot(run.train_tokens, _trailing_mean(run.train_lm_loss), "-", color=color, linewidth=1.6, label=run.name)
    held_out.set_title("Held-out LM loss")
    train.set_title("Train LM loss (trailing mean)")
    for axes, data in ((held_out, any(r.eval_lm_loss for r in runs)), (train, any(r.train_lm_loss for r in runs))):
        axes.set_xlabel("training tokens")
        axes.set_ylabel("cross-entropy (nats/token)")
        axes.xaxis.set_major_formatter(EngFormatter(sep=""))
        axes.grid(True, alpha=0.3)
        if data:
            axes.legend(fontsize=9)
        else:
            _no_data(axes)
    figure.savefig(path, dpi=120)


def plot_calibration(runs: list[RunMetrics], path: Path) -> None:
    """Reliability diagram (accuracy per confidence bin, left) and share of positions per bin (right)."""
    figure = Figure(figsize=(12, 5.2), layout="constrained")
    reliability, histogram = figure.subplots(1, 2)
    reliability.plot([0, 1], [0, 1], "--", color="gray", linewidth=1, label="perfectly calibrated")
    drawn = False
    for run, color in zip(runs, _colors(len(runs))):
        bins = run.last_eval.get("reliability") or {}
        confidence, accuracy, count = bins.get("confidence") or [], bins.get("accuracy") or [], bins.get("count") or []
        filled = [(c, a, n) for c, a, n in zip(confidence, accuracy, count) if c is not None and a is not None and n]
        if not filled:
            continue
        drawn = True
        conf, acc, num = (np.asarray(v, dtype=np.float64) for v in zip(*filled))
        ece = run.last_eval.get("ece")
        label = run.name if ece is None else f"{run.name} (ECE {ece:.3f})"
        reliability.plot(conf, acc, "o-", color=color, markersize=4, label=label)
        histogram.plot(conf, num / num.sum(), "o-", color=color, markersize=4, label=run.name)
    reliability.set_title("Reliability (last eval)")
    reliability.set_xlabel("confidence (max probability)")
    reliability.set_ylabel("accuracy of the top-1 token")
    reliability.set_xlim(0, 1)
    reliability.set_ylim(0, 1)
    reliability.set_aspect("equal")
    histogram.set_title("Positions per confidence bin")
    histogram.set_xlabel("confidence (max probability)")
    histogram.set_ylabel("share of positions")
    histogram.set_xlim(0, 1)
    for axes in (reliability, histogram):
        axes.grid(True, alpha=0.3)
        if drawn:
            axes.legend(fontsize=9)
        else:
            _no_data(axes)
    figure.savefig(path, dpi=120)
