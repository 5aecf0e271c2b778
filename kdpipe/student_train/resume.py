"""Starting or continuing a run directory (its format: `kdpipe.schemas.run_dir`).

A run directory is never started twice: without --resume an existing run is refused; with
--resume the run continues on the same cache (by fingerprint) with the same options
(those in `RESUMABLE_CHANGES` excepted) and the same number of ranks.
"""

from __future__ import annotations

import json
from pathlib import Path

from kdpipe.schemas.config import to_dict, write_resolved
from kdpipe.schemas.errors import KdpipeError
from kdpipe.schemas.run_dir import CONFIG_FILE, RUN_MANIFEST, read_run_config, read_run_manifest, write_run_manifest
from kdpipe.schemas.train_config import RESUMABLE_CHANGES, TrainStudentConfig
from kdpipe.student_train.builders import Student
from kdpipe.student_train.parallelize import DistContext
from kdpipe.teacher_cache import TeacherCache


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
    write_run_manifest(out, run)
