"""Training checkpoints: written atomically, read as data, never lost half-way.

The layout of a checkpoint (`RUN/checkpoints/step-00001000/`) and its names are in
`kdpipe.schemas.run_dir`:

    model.safetensors     the model state (tensors only)
    optimizer.pt          optimizer state: tensors and primitives, loads with `weights_only=True`
    rng.pt                RNG states (name -> uint8 tensor), loads with `weights_only=True`
    trainer_state.json    step, loader state, schedules, metrics cursor (JSON)

Atomicity: everything is written (and fsync'ed) into `checkpoints/.tmp-step-{step}-{pid}`,
which is then renamed to `step-{step}`. The rename is the completion marker: a directory
named `step-*` is complete by construction, and a crash at any point leaves either the
complete checkpoint or a `.tmp-*` directory that readers ignore and the next save removes.
Old checkpoints are removed only after the new one is in place, so the latest complete
checkpoint always survives. A checkpoint a diverged step started from is renamed
`diverged-step-*` (see `set_aside_checkpoint`) and is no longer a checkpoint of the run.
A crash after the last save's rename leaves what that save had
yet to remove (one checkpoint too many, a `.tmp-*` leftover): a resumed run removes it with
`prune_checkpoints` even when it has no step left to train and so never saves. One writer
per run directory (rank 0 of the job) is assumed: under FSDP the caller gathers full state
dicts before calling `save_checkpoint`.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from kdpipe.schemas.errors import KdpipeError
from kdpipe.schemas.out_dir import free_bytes, is_disk_full
from kdpipe.schemas.run_dir import (
    CHECKPOINTS_DIR,
    DIVERGED_PREFIX,
    MODEL_FILE,
    OPTIMIZER_FILE,
    RNG_FILE,
    TMP_PREFIX,
    TRAINER_STATE_FILE,
    checkpoint_name,
    complete_checkpoints,
)

class Checkpoint(NamedTuple):
    """The four parts of a checkpoint, as loaded (tensors on CPU)."""

    model_state: dict[str, Tensor]
    optimizer_state: dict[str, Any]
    trainer_state: dict[str, Any]
    rng_state: dict[str, Tensor]


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable (POSIX: fsync the directory)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _safetensors_ready(model_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """CPU, contiguous tensors with no shared storage (safetensors refuses aliases, e.g. tied embeddings).

    A tensor whose storage was already seen is cloned: loading the state dict back into a
    model with tied weights assigns the same values to both names, which re-ties nothing
    but changes nothing either.
    """
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model_state.items():
        t = tensor.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def _remove_tree(checkpoints: Path, victim: Path) -> None:
    """Rename then delete, so a crash mid-delete leaves a `.tmp-*` leftover, not a partial `step-*`."""
    doomed = checkpoints / f"{TMP_PREFIX}delete-{victim.name}-{os.getpid()}"
    os.rename(victim, doomed)
    shutil.rmtree(doomed)


def _remove_leftovers(checkpoints: Path) -> None:
    """Delete the `.tmp-*` leftovers of crashed saves and interrupted deletes."""
    for leftover in checkpoints.iterdir():
        if leftover.name.startswith(TMP_PREFIX):
            shutil.rmtree(leftover, ignore_errors=True)


def prune_checkpoints(run_dir: Path, *, keep: int) -> None:
    """Remove crash leftovers and all but the newest `keep` complete checkpoints of a run.

    Only the run's one writer may call this (a reader running beside it, e.g. an export,
    could delete a save in progress), and only once it has loaded the newest checkpoint:
    with a smaller `keep`, an unreadable newest one must still leave its predecessor.
    """
    if keep < 1:
        raise KdpipeError(f"checkpoint keep={keep}: keep at least 1 checkpoint")
    checkpoints = Path(run_dir) / CHECKPOINTS_DIR
    if not checkpoints.is_dir():
        return
    _remove_leftovers(checkpoints)
    for old in complete_checkpoints(run_dir)[:-keep]:
        _remove_tree(checkpoints, old)


def set_aside_checkpoint(run_dir: Path, step: int) -> Path | None:
    """Rename the complete checkpoint of `step`, if any, to `diverged-step-*`: kept to look at, never resumed from.

    Readers and `prune_checkpoints` see only `step-*` directories, so the run continues from
    the checkpoint before it. An earlier set-aside copy of the same step is replaced.
    """
    checkpoints = Path(run_dir) / CHECKPOINTS_DIR
    victim = checkpoints / checkpoint_name(step)
    if not victim.is_dir():
        return None
    target = checkpoints / f"{DIVERGED_PREFIX}{victim.name}"
    if target.exists():
        _remove_tree(checkpoints, target)
    os.rename(victim, target)
    _fsync_dir(checkpoints)
    return target


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    model_state: dict[str, Tensor],
    optimizer_state: dict[str, Any],
    trainer_state: dict[str, Any],
    rng_state: dict[str, Tensor],
    keep: int = 3,
) -> Path:
    """Write the checkpoint of `step` atomically and keep only the newest `keep` complete ones.

    If a complete checkpoint of the same step already exists (a preemption signal right
    after a periodic save, or a save straight after resuming), it is kept and the new copy
    discarded: training is deterministic, so both hold the same state, and a complete
    checkpoint is never replaced by one that might not finish.
    """
    if keep < 1:
        raise KdpipeError(f"checkpoint keep={keep}: keep at least 1 checkpoint")
    if step < 0:
        raise KdpipeError(f"checkpoint step {step} must be non-negative")
    checkpoints = Path(run_dir) / CHECKPOINTS_DIR
    checkpoints.mkdir(parents=True, exist_ok=True)
    tmp = checkpoints / f"{TMP_PREFIX}{checkpoint_name(step)}-{os.getpid()}"
    _remove_leftovers(checkpoints)  # of earlier processes: free their space before writing
    tmp.mkdir()
    try:
        save_file(_safetensors_ready(model_state), str(tmp / MODEL_FILE))
        torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
        torch.save({name: t.detach().cpu() for name, t in rng_state.items()}, tmp / RNG_FILE)
        (tmp / TRAINER_STATE_FILE).write_text(json.dumps(trainer_state, indent=2, sort_keys=True), encoding="utf-8")
        for name in (MODEL_FILE, OPTIMIZER_FILE, RNG_FILE, TRAINER_STATE_FILE):
            _fsync_file(tmp / name)
        _fsync_dir(tmp)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(err):
            raise KdpipeError(
                f"out of disk space (or quota) writing the step-{step} checkpoint in {checkpoints}: "
                f"{free_bytes(checkpoints):,} bytes free; earlier checkpoints are kept: free space and re-run with --resume"
            ) from None
        raise
    final = checkpoints / checkpoint_name(step)
    if final.exists():
        shutil.rmtree(tmp)
    else:
        os.rename(tmp, final)
        _fsync_dir(checkpoints)
    prune_checkpoints(run_dir, keep=keep)
    return final


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a complete checkpoint directory; every part is data (safetensors, JSON, weights-only pickles)."""
    path = Path(path)
    if not path.is_dir():
        raise KdpipeError(f"checkpoint {path} does not exist; pass a directory under RUN/{CHECKPOINTS_DIR}")
    try:
        model_state = load_file(str(path / MODEL_FILE), device="cpu")
        optimizer_state = torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
        rng_state = torch.load(path / RNG_FILE, map_location="cpu", weights_only=True)
        trainer_state = json.loads((path / TRAINER_STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, SafetensorError, pickle.UnpicklingError, RuntimeError, EOFError, json.JSONDecodeError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise KdpipeError(
            f"checkpoint {path} is unreadable ({reason}); delete it to resume from the previous checkpoint"
        ) from None
    return Checkpoint(model_state, optimizer_state, trainer_state, rng_state)
