"""The run directory of `kdpipe train-student`: its files, their names and formats, and cheap checks.

Written by `kdpipe.student_train` (rank 0 of the job), read by export, resume, `kdpipe
status` and `kdpipe report`, which need none of the trainer. A run directory holds:

- `config.yaml` — the resolved `TrainStudentConfig` (re-loadable with --config).
- `run.json` — the run manifest: `format` (`RUN_FORMAT`), `schema_version`, `cache` (path,
  fingerprint, manifest), `student` (kind, Hugging Face config), `world_size`,
  `global_batch_size`, `seq_len`, `total_steps`. Sorted keys, written atomically.
- `metrics.jsonl` — one JSON object per line, appended by rank 0: a train record
  (`type` "train", `step`, `epoch`, `tokens`, `loss` and its terms `loss/lm`, `loss/kd`,
  `loss/clone`, `loss/clone/{term}`, `grad_norm`, `lr`, `w_lm`, `w_kd`, `w_clone`,
  `tokens_per_s`) every --log-every steps, at the last step and at a diverged step; an eval
  record (`type` "eval", `step`, `eval/{metric}`) every --eval-every steps. Every line is
  strict JSON: a value that is not a finite number (a diverged step's loss, an infinite
  gradient norm) is written as null. A resumed run truncates the file to the length its
  checkpoint recorded, so lines logged after that checkpoint are dropped and redone.
- `checkpoints/step-{step:08d}/` — complete checkpoints, each holding `model.safetensors`,
  `optimizer.pt` and `rng.pt` (weights-only torch pickles, zip archives) and
  `trainer_state.json` (`step`, loader state, metrics length, last records). A directory is
  renamed to this name only once complete; `.tmp-*` directories are saves or deletes in
  progress that readers ignore, and `diverged-step-*` ones are checkpoints set aside
  because the step after them diverged.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import zipfile
from pathlib import Path
from typing import Any

import yaml

from kdpipe.schemas.config import from_dict
from kdpipe.schemas.errors import KdpipeError, parse_json
from kdpipe.schemas.train_config import TrainStudentConfig

CONFIG_FILE = "config.yaml"
RUN_MANIFEST = "run.json"
RUN_FORMAT = "kdpipe.student_run"
RUN_SCHEMA_VERSION = 1
METRICS_FILE = "metrics.jsonl"

CHECKPOINTS_DIR = "checkpoints"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"
TRAINER_STATE_FILE = "trainer_state.json"
CHECKPOINT_FILES = (MODEL_FILE, OPTIMIZER_FILE, RNG_FILE, TRAINER_STATE_FILE)
TMP_PREFIX = ".tmp-"
DIVERGED_PREFIX = "diverged-"

_COMPLETE_NAME = re.compile(r"^step-(\d{8})$")


# ---------------------------------------------------------------- run.json and config.yaml


def read_run_manifest(run_dir: Path) -> dict[str, Any]:
    """The run manifest of a run directory."""
    path = Path(run_dir) / RUN_MANIFEST
    if not path.is_file():
        raise KdpipeError(f"{run_dir} is not a train-student run (no {RUN_MANIFEST}); pass the --out of `kdpipe train-student`")
    run = parse_json(path.read_text(encoding="utf-8"), path, "the run directory is damaged")
    if run.get("format") != RUN_FORMAT:
        raise KdpipeError(f"{path} is not a kdpipe run manifest; pass the --out of `kdpipe train-student`")
    return run


def write_run_manifest(run_dir: Path, run: dict[str, Any]) -> None:
    """Write run.json atomically (temporary file, then rename); `format` and `schema_version` are set here."""
    out = Path(run_dir)
    tmp = out / f".{RUN_MANIFEST}.tmp-{os.getpid()}"
    record = {**run, "format": RUN_FORMAT, "schema_version": RUN_SCHEMA_VERSION}
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, out / RUN_MANIFEST)


def read_run_config(run_dir: Path) -> TrainStudentConfig:
    """The resolved config a run was started with."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise KdpipeError(f"{run_dir} has no {CONFIG_FILE}; the run directory is damaged")
    return from_dict(TrainStudentConfig, yaml.safe_load(path.read_text(encoding="utf-8")) or {}, where=f"config {path}")


# ---------------------------------------------------------------- metrics.jsonl


def finite_or_null(value: Any) -> Any:
    """`value` with every NaN or infinite float (in dicts and lists too) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_null(v) for key, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_null(v) for v in value]
    return value


def metrics_line(record: dict[str, Any]) -> bytes:
    """One metrics.jsonl line: strict JSON, non-finite numbers as null."""
    return (json.dumps(finite_or_null(record), allow_nan=False) + "\n").encode()


# ---------------------------------------------------------------- checkpoints


def checkpoint_name(step: int) -> str:
    """Directory name of the complete checkpoint at `step` (zero-padded so names sort by step)."""
    return f"step-{step:08d}"


def checkpoint_step(path: Path) -> int:
    """The step a complete checkpoint directory holds, from its name."""
    match = _COMPLETE_NAME.match(Path(path).name)
    assert match is not None, f"{path} is not a complete checkpoint's name"
    return int(match.group(1))


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    checkpoints = Path(run_dir) / CHECKPOINTS_DIR
    if not checkpoints.is_dir():
        return []
    found = [p for p in checkpoints.iterdir() if p.is_dir() and _COMPLETE_NAME.match(p.name)]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None; temporary and partial directories are ignored."""
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def checkpoint_damage(path: Path) -> str | None:
    """Why a complete checkpoint cannot be loaded, found without reading its tensors; None if it looks whole.

    Each file is checked against its own index: the safetensors header gives the file's
    length, a torch pickle is a zip archive whose directory sits at its end, and the
    trainer state is small JSON naming the checkpoint's step. A truncated or deleted file is
    found; a flipped bit inside the tensor data is not (nothing records a checksum).
    """
    path = Path(path)
    for name in CHECKPOINT_FILES:
        if not (path / name).is_file():
            return f"{name} is missing"
    size = (path / MODEL_FILE).stat().st_size
    with open(path / MODEL_FILE, "rb") as handle:
        head = handle.read(8)
        header_len = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        header = handle.read(header_len) if 0 < header_len <= size - 8 else b""
    try:
        tensors = json.loads(header)
        end = max((t["data_offsets"][1] for k, t in tensors.items() if k != "__metadata__"), default=0)
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError, IndexError):
        return f"{MODEL_FILE} has no readable safetensors header"
    if size != 8 + header_len + end:
        return f"{MODEL_FILE} holds {size:,} bytes, its header describes {8 + header_len + end:,}"
    for name in (OPTIMIZER_FILE, RNG_FILE):
        try:
            with zipfile.ZipFile(path / name) as archive:
                last = max(archive.infolist(), key=lambda info: info.header_offset, default=None)
                if last is not None and last.header_offset + last.compress_size > (path / name).stat().st_size:
                    return f"{name} is truncated"
        except zipfile.BadZipFile:
            return f"{name} is truncated or not a torch file"
    try:
        state = json.loads((path / TRAINER_STATE_FILE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"{TRAINER_STATE_FILE} is not valid JSON"
    if not isinstance(state, dict) or state.get("step") != checkpoint_step(path):
        return f"{TRAINER_STATE_FILE} does not hold step {checkpoint_step(path)}"
    return None
