"""`train-student` and `export-student`: compose the parts of a run, in a fixed order.

model (`build_student`) → train module (`StudentLoss`, wrapped by `parallelize`, and its
optimizer) → data loader (`StudentLoader`) → `Trainer`. Every rank runs the same code;
rank 0 alone writes the run directory:

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
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import AutoConfig

from kdpipe.schemas.cache_format import CacheManifest
from kdpipe.schemas.config import from_dict, to_dict, write_resolved
from kdpipe.schemas.errors import KdpipeError
from kdpipe.schemas.train_config import RESUMABLE_CHANGES, TrainStudentConfig
from kdpipe.student_train.builders import PlainStudent, Student, build_plain, build_student
from kdpipe.student_train.checkpoint import latest_checkpoint, load_checkpoint
from kdpipe.student_train.export import TOKENIZER_FILES, VOCAB_FILES, export_student
from kdpipe.student_train.loader import StudentLoader
from kdpipe.student_train.parallelize import DistContext, init_distributed, parallelize, shutdown_distributed
from kdpipe.student_train.schedules import Schedule
from kdpipe.student_train.trainer import (
    BatchSource,
    Callback,
    Evaluator,
    ProgressBar,
    Schedules,
    StudentLoss,
    Trainer,
    TrainerOptions,
    TrainSummary,
)
from kdpipe.student_train.validate import check_student
from kdpipe.teacher_cache import TeacherCache, open_cache

CONFIG_FILE = "config.yaml"
RUN_MANIFEST = "run.json"
RUN_FORMAT = "kdpipe.student_run"


def train_student(config: TrainStudentConfig, *, callbacks: Sequence[Callback] = ()) -> TrainSummary:
    """Train (or continue) the run of `config`; under torchrun, one call per rank."""
    joined = torch.distributed.is_initialized()  # a group the caller made is the caller's to end
    ctx = init_distributed(config.device)
    loader = None
    try:
        trainer = build_trainer(config, ctx, callbacks=callbacks)
        loader = trainer.loader
        return trainer.fit()
    finally:
        if isinstance(loader, StudentLoader):
            loader.close()
        if not joined:
            shutdown_distributed()


def build_trainer(
    config: TrainStudentConfig, ctx: DistContext, *, callbacks: Sequence[Callback] = (), loader: BatchSource | None = None
) -> Trainer:
    """Everything a run needs, built in order; `loader` replaces the cache's train loader if given."""
    cache = open_cache(config.cache)
    cache.require_complete()
    check_student(config, cache.manifest)  # config files only: before the teacher loads and the run dir is written
    resuming = _check_run_dir(config, cache, ctx)
    ctx.barrier()  # every rank has looked at the run directory before rank 0 writes to it

    student = build_student(config, cache.manifest, device=ctx.device, cache=cache)
    use_lm, use_kd, use_clone = config.lm_weight > 0, config.kd_weight > 0, config.clone_weight > 0
    module = StudentLoss(
        student, mode=cache.mode, kd_temperature=config.kd_temperature, chunk_size=config.loss_chunk_size,
        use_lm=use_lm, use_kd=use_kd, use_clone=use_clone, clone_scale=config.clone_scale,
    )  # fmt: skip
    blocks = student.blocks() if isinstance(student, PlainStudent) else []
    module = parallelize(module, ctx=ctx, mode=config.parallelism, blocks=blocks, find_unused_parameters=not (use_lm or use_kd))
    optimizer = _adamw(module, config)

    if loader is None:
        loader = StudentLoader(
            cache, split="train", batch_size=config.batch_size, seed=config.seed, rank=ctx.rank,
            world_size=ctx.world_size, num_workers=config.num_workers, pin_memory=ctx.device.type == "cuda",
        )  # fmt: skip
    total_steps = _total_steps(config, cache, ctx.world_size)
    schedules = _schedules(config, total_steps)
    all_callbacks: list[Callback] = [ProgressBar()]
    if config.eval_every:
        all_callbacks.append(_evaluator(config, cache, ctx))
    all_callbacks.extend(callbacks)

    if ctx.is_main and not resuming:
        _write_run_dir(config, cache, student, ctx.world_size, total_steps)
    ctx.barrier()
    options = TrainerOptions(
        total_steps=total_steps, grad_accum=config.grad_accum, grad_clip=config.grad_clip,
        checkpoint_every=config.checkpoint_every, keep_checkpoints=config.keep_checkpoints, log_every=config.log_every,
    )  # fmt: skip
    return Trainer(
        module=module, optimizer=optimizer, schedules=schedules, loader=loader, options=options,
        run_dir=config.out, ctx=ctx, callbacks=all_callbacks,
    )  # fmt: skip


def _adamw(module: torch.nn.Module, config: TrainStudentConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm scales and biases are not shrunk)."""
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=config.lr, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps
    )


def _total_steps(config: TrainStudentConfig, cache: TeacherCache, world_size: int) -> int:
    if config.steps is not None:
        return config.steps
    assert config.tokens is not None
    tokens_per_step = config.batch_size * config.grad_accum * world_size * cache.seq_len
    return math.ceil(config.tokens / tokens_per_step)


def _schedules(config: TrainStudentConfig, total_steps: int) -> Schedules:
    def weight(kind: str, peak: float) -> Schedule:
        return Schedule(
            kind=kind, peak=peak, total_steps=total_steps,  # type: ignore[arg-type]
            warmup_steps=config.weight_warmup_steps, decay_fraction=config.decay_fraction,
        )  # fmt: skip

    lr = Schedule(
        kind=config.lr_schedule, peak=config.lr, total_steps=total_steps, warmup_steps=config.warmup_steps,
        decay_fraction=config.decay_fraction, final_fraction=config.min_lr_fraction,
    )  # fmt: skip
    return Schedules(
        lr=lr,
        lm=weight(config.lm_schedule, config.lm_weight),
        kd=weight(config.kd_schedule, config.kd_weight),
        clone=weight(config.clone_schedule, config.clone_weight),
    )


def _evaluator(config: TrainStudentConfig, cache: TeacherCache, ctx: DistContext) -> Evaluator:
    if cache.splits.get("val", 0) == 0:
        raise KdpipeError(
            f"cache {config.cache} has no val sequences for --eval-every; prepare-data with --val-fraction > 0 "
            "and cache it, or set --eval-every 0"
        )
    loader = StudentLoader(
        cache, split="val", batch_size=config.batch_size, seed=config.seed, rank=ctx.rank, world_size=ctx.world_size
    )
    # At most one epoch: the same held-out batches every eval, none of them twice.
    batches = min(config.eval_batches, loader.batches_per_epoch)
    return Evaluator(loader, every=config.eval_every, batches=batches, mode=cache.mode, chunk_size=config.loss_chunk_size)


def _check_run_dir(config: TrainStudentConfig, cache: TeacherCache, ctx: DistContext) -> bool:
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


def _write_run_dir(config: TrainStudentConfig, cache: TeacherCache, student: Student, world_size: int, total_steps: int) -> None:
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


def export_run(run_dir: Path, out: Path, *, dtype: str = "float32") -> Path:
    """Write the run's latest complete checkpoint as a Hugging Face model directory with the teacher's tokenizer."""
    run_dir = Path(run_dir)
    run = read_run_manifest(run_dir)
    config = read_run_config(run_dir)
    if Path(out).exists():
        raise KdpipeError(f"export directory {out} already exists; remove it or choose another --out")
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise KdpipeError(f"run {run_dir} has no complete checkpoint yet; train it until it writes one, then export")
    manifest = CacheManifest.from_json(json.dumps(run["cache"]["manifest"]), where=f"{run_dir / RUN_MANIFEST}")
    teacher_dir = Path(manifest.teacher.path)
    torch_dtype = getattr(torch, dtype)
    cpu = torch.device("cpu")
    if config.student == "lrc":
        student: Student = build_student(config, manifest, device=cpu)
    else:
        stored = dict(run["student"]["config"])
        student = build_plain(AutoConfig.for_model(stored.pop("model_type"), **stored), manifest)
    student.load_state_dict(load_checkpoint(checkpoint).model_state, strict=True)
    student.eval()
    if isinstance(student, PlainStudent):
        return _export_plain(student, Path(out), tokenizer_dir=teacher_dir, dtype=torch_dtype)
    return export_student(student, Path(out), tokenizer_dir=teacher_dir, dtype=torch_dtype)


def _export_plain(student: PlainStudent, out: Path, *, tokenizer_dir: Path, dtype: torch.dtype) -> Path:
    """save_pretrained plus the teacher's tokenizer files, renamed into place when complete."""
    files = [tokenizer_dir / name for name in TOKENIZER_FILES if (tokenizer_dir / name).is_file()]
    if not any(path.name in VOCAB_FILES for path in files):
        raise KdpipeError(f"teacher directory {tokenizer_dir} holds no tokenizer ({', '.join(VOCAB_FILES)}); put it back")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        student.model.to(dtype).save_pretrained(tmp)
        for path in files:
            shutil.copy2(path, tmp / path.name)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
