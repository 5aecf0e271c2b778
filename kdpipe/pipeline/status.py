"""`kdpipe status PATH`: how far a teacher cache or a training run has got.

A cache (a directory with manifest.json) reports its shards complete and missing, and
with `verify=True` also the complete shards whose files fail their checksums (that reads
every byte, so it is not the default: status is meant to be polled while jobs run).

A training run directory (one with run.json, see `kdpipe.schemas.run_dir`) reports its
last complete checkpoint, the steps that checkpoint holds against the run's planned
`total_steps`, and the last line of metrics.jsonl. Steps done are counted from the
checkpoint, not from the metrics: steps logged after the last checkpoint are redone (and
their lines dropped) by a resumed run. Checkpoints are checked cheaply, newest first, until
one looks whole (`checkpoint_damage`: every file present with the length its own index
gives); the damaged ones newer than it are reported, and the run is not finished.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

from kdpipe.schemas.cache_format import MANIFEST_FILE
from kdpipe.schemas.errors import KdpipeError
from kdpipe.schemas.run_dir import (
    METRICS_FILE,
    RUN_MANIFEST,
    checkpoint_damage,
    checkpoint_step,
    complete_checkpoints,
    read_run_manifest,
)
from kdpipe.teacher_cache import scan_cache, verify_cache

_TAIL_BYTES = 1 << 16  # enough for the last metrics line


class CacheStatus(NamedTuple):
    """Shards of a teacher cache, by name (split/index)."""

    path: Path
    num_shards: int
    complete: list[str]
    missing: list[str]  # not complete: not started, being written, or interrupted
    bad: list[str]  # "name (reason)" of complete shards that are damaged
    checksums: bool  # whether `bad` read every file's checksum, or only sizes

    def problem(self) -> str | None:
        """Why the cache is not ready for training, or None."""
        issues = []
        if self.missing:
            issues.append(f"{len(self.missing)} missing ({_names(self.missing)})")
        if self.bad:
            issues.append(f"{len(self.bad)} bad ({_names(self.bad)})")
        if not issues:
            return None
        return (
            f"cache {self.path} is not complete: {' and '.join(issues)} of {self.num_shards} shards; "
            "re-run cache-teacher (or re-submit the array) to finish it, with --repair for bad shards"
        )

    def text(self) -> str:
        bad = str(len(self.bad)) if self.checksums else f"{len(self.bad)} (file sizes checked; checksums with --verify)"
        lines = [f"cache {self.path}: {self.num_shards} shards: {len(self.complete)} complete, {len(self.missing)} missing, bad: {bad}"]
        if self.missing:
            lines.append(f"  missing: {_names(self.missing, limit=20)}")
        if self.bad:
            lines.append(f"  bad: {_names(self.bad, limit=20)}")
        return "\n".join(lines)


class RunStatus(NamedTuple):
    """Progress of a training run directory."""

    path: Path
    checkpoint: Path | None  # the newest complete checkpoint that is not damaged
    steps_done: int  # held by `checkpoint` (0 without one)
    planned_steps: int
    last_metrics: dict[str, Any] | None
    damaged: list[str] = []  # "step-* (reason)" of complete checkpoints newer than `checkpoint`

    def problem(self) -> str | None:
        """Why the run is not finished, or None."""
        if self.damaged:
            previous = f"from {self.checkpoint.name}" if self.checkpoint is not None else "from step 0"
            return (
                f"run {self.path} has a damaged checkpoint: {_names(self.damaged)}; delete it to resume {previous} "
                "with --resume (export reads the newest checkpoint too)"
            )
        if self.steps_done < self.planned_steps:
            return f"run {self.path} is not finished: {self.steps_done} of {self.planned_steps} steps checkpointed; resume it with --resume"
        return None

    def text(self) -> str:
        lines = [f"run {self.path}"]
        if self.checkpoint is None:
            lines.append("  last checkpoint: none yet")
        else:
            lines.append(f"  last checkpoint: step {self.steps_done} ({self.checkpoint.relative_to(self.path)})")
        if self.damaged:
            lines.append(f"  damaged checkpoints: {_names(self.damaged)}")
        percent = 100.0 * self.steps_done / self.planned_steps
        lines.append(f"  progress: {self.steps_done} of {self.planned_steps} steps checkpointed ({percent:.1f}%)")
        metrics = "none yet" if self.last_metrics is None else json.dumps(self.last_metrics, sort_keys=True)
        lines.append(f"  last metrics: {metrics}")
        return "\n".join(lines)


def _names(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def status(path: Path, *, verify: bool = False) -> CacheStatus | RunStatus:
    """The status of a teacher cache or a training run directory."""
    path = Path(path)
    if not path.is_dir():
        what = "is a file, not a directory" if path.exists() else "does not exist"
        raise KdpipeError(f"{path} {what}; give a teacher cache or a training run directory")
    if (path / MANIFEST_FILE).is_file():
        return cache_status(path, verify=verify)
    if (path / RUN_MANIFEST).is_file():
        return run_status(path)
    raise KdpipeError(f"{path} is neither a teacher cache (no {MANIFEST_FILE}) nor a train-student run (no {RUN_MANIFEST})")


def cache_status(path: Path, *, verify: bool = False) -> CacheStatus:
    """Complete, missing and damaged shards.

    Always cheap checks from the completion records (every listed file present, with its
    recorded size); with `verify` every file's checksum too (reads every byte).
    """
    report = verify_cache(path) if verify else scan_cache(path)
    return CacheStatus(
        path=Path(path),
        num_shards=len(report.shards),
        complete=[v.name for v in report.shards if v.status == "ok"],
        missing=[v.name for v in report.shards if v.status in ("missing", "partial")],
        bad=[f"{v.name} ({v.reason})" for v in report.bad],
        checksums=verify,
    )


def run_status(path: Path) -> RunStatus:
    """Last checkpoint, steps checkpointed vs planned, and the last metrics line of a run directory."""
    path = Path(path)
    planned_steps = read_run_manifest(path).get("total_steps")
    if not isinstance(planned_steps, int) or planned_steps < 1:
        raise KdpipeError(f"{path / RUN_MANIFEST} has no valid total_steps ({planned_steps!r}); the run directory is damaged")
    checkpoint, damaged = None, []
    for candidate in reversed(complete_checkpoints(path)):
        reason = checkpoint_damage(candidate)
        if reason is None:
            checkpoint = candidate
            break
        damaged.append(f"{candidate.name} ({reason})")
    steps_done = checkpoint_step(checkpoint) if checkpoint is not None else 0
    return RunStatus(path, checkpoint, steps_done, planned_steps, _last_metrics(path / METRICS_FILE), damaged)


def _last_metrics(metrics_path: Path) -> dict[str, Any] | None:
    """The last complete JSON line (a crash can leave a torn last line, which is skipped)."""
    if not metrics_path.is_file():
        return None
    with open(metrics_path, "rb") as handle:
        handle.seek(0, 2)
        size = handle.tell()
        handle.seek(max(0, size - _TAIL_BYTES))
        tail = handle.read().decode("utf-8", errors="replace")
    for line in reversed(tail.splitlines()):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            return record
    return None
