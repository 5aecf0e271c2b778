"""The run directory of `train-student`: refuse what cannot be continued, write what a run starts with.

    RUN/config.yaml     the resolved config (re-loadable with --config)
    RUN/run.json        run manifest: the cache's path, fingerprint and manifest, the
                        student's Hugging Face config, world size and step count
    RUN/metrics.jsonl   one JSON record per logged step and per eval
    RUN/checkpoints/    complete checkpoints (see `checkpoint.py`)

A run directory is never started twice: without --resume an existing run is refused; with
--resume the run continues on the same cache (by fingerprint) with the same options
(those in `RESUMABLE_CHANGES` excepted) and the same number of ranks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from kdpipe.schemas.config import from_dict, to_dict, write_resolved
from kdpipe.schemas.errors import KdpipeError
from kdpipe.schemas.train_config import RESUMABLE_CHANGES, TrainStudentConfig
from kdpipe.student_train.builders import Student
from kdpipe.student_train.parallelize import DistContext
from kdpipe.teacher_cache import TeacherCache

CONFIG_FILE = "config.yaml"
RUN_MANIFEST = "run.json"
RUN_FORMAT = "kdpipe.student_run"


def check_run_dir(config: TrainStudentConfig, cache: TeacherCache, ctx: DistContext) -> bool:
    """Whether this continues an existing run; refuses what cannot be continued or must not be overwritten."""
    out = Path(config.out)
    if not (out / RUN_MANIFEST).is_file():
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise KdpipeError(f"--out {out} exists and is not a training run; choose a new --out")
        return False
    if not config.resume:
        raise KdpipeError(f"{out} already holds a training run; pass --resume to continue it or choose a new --out")
    run = read_run_manifest(out)
    recorded = run["cache"]["fingerprint"]
    if recorded != cache.manifest.fingerprint:
        raise KdpipeError(
            f"run {out} was trained on cache {run['cache']['path']} (fingerprint {recorded[:16]}), but {cache.path} "
            f"has fingerprint {cache.manifest.fingerprint[:16]}; resume with the original cache or start a new --out"
        )
    started = to_dict(read_run_config(out))
    for name, value in to_dict(config).items():
        if name not in RESUMABLE_CHANGES and started[name] != value:
            raise KdpipeError(
                f"run {out} was started with {name}={started[name]!r}, this command gives {value!r}; "
                "resume with the run's options or start a new --out"
            )
    if run["world_size"] != ctx.world_size:
        raise KdpipeError(
            f"run {out} was started on {run['world_size']} rank(s), this job has {ctx.world_size}; the data order "
            "depends on it: resume with the same number of ranks"
        )
    return True


def write_run_dir(config: TrainStudentConfig, cache: TeacherCache, student: Student, world_size: int, total_steps: int) -> None:
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    write_resolved(config, out / CONFIG_FILE)
    run = {
        "format": RUN_FORMAT,
        "schema_version": 1,
        "cache": {
            "path": str(Path(cache.path).resolve()),
            "fingerprint": cache.manifest.fingerprint,
            "manifest": json.loads(cache.manifest.to_json()),
        },
        "student": {"kind": config.student, "config": student.config.to_dict()},
        "world_size": world_size,
        "global_batch_size": config.batch_size * config.grad_accum * world_size,
        "seq_len": cache.seq_len,
        "total_steps": total_steps,
    }
    tmp = out / f".{RUN_MANIFEST}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(run, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, out / RUN_MANIFEST)


def read_run_manifest(run_dir: Path) -> dict[str, Any]:
    """The run manifest of a run directory."""
    path = Path(run_dir) / RUN_MANIFEST
    if not path.is_file():
        raise KdpipeError(f"{run_dir} is not a train-student run (no {RUN_MANIFEST}); pass the --out of `kdpipe train-student`")
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise KdpipeError(f"{path} is not valid JSON ({err.msg}); the run directory is damaged") from None
    if run.get("format") != RUN_FORMAT:
        raise KdpipeError(f"{path} is not a kdpipe run manifest; pass the --out of `kdpipe train-student`")
    return run


def read_run_config(run_dir: Path) -> TrainStudentConfig:
    """The resolved config a run was started with."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise KdpipeError(f"{run_dir} has no {CONFIG_FILE}; the run directory is damaged")
    return from_dict(TrainStudentConfig, yaml.safe_load(path.read_text(encoding="utf-8")) or {}, where=f"config {path}")
