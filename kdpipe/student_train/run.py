"""`train-student`: compose the parts of a run, in a fixed order.

model (`build_student`) → train module (`StudentLoss`, wrapped by `parallelize`, and its
optimizer) → data loader (`StudentLoader`) → `Trainer`. Every rank runs the same code;
rank 0 alone writes the run directory (`resume.py`; its format: `kdpipe.schemas.run_dir`). Export is `export.py`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from kdpipe.schemas.errors import KdpipeError
from kdpipe.schemas.out_dir import check_writable_dir
from kdpipe.schemas.train_config import TrainStudentConfig
from kdpipe.student_train.builders import PlainStudent, build_student
from kdpipe.student_train.callbacks import Callback, ProgressBar
from kdpipe.student_train.evaluator import Evaluator
from kdpipe.student_train.loader import StudentLoader
from kdpipe.student_train.optim import adamw
from kdpipe.student_train.parallelize import DistContext, init_distributed, parallelize, shutdown_distributed
from kdpipe.student_train.resume import check_run_dir, write_run_dir
from kdpipe.student_train.schedules import Schedule
from kdpipe.student_train.student_loss import StudentLoss
from kdpipe.student_train.trainer import BatchSource, Schedules, Trainer, TrainerOptions, TrainSummary
from kdpipe.student_train.validate import check_student
from kdpipe.teacher_cache import TeacherCache, open_cache


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
    check_writable_dir(Path(config.out), "--out")
    check_student(config, cache.manifest)  # config files only: before the teacher loads and the run dir is written
    resuming = check_run_dir(config, cache, ctx)
    ctx.barrier()  # every rank has looked at the run directory before rank 0 writes to it

    student = build_student(config, cache.manifest, device=ctx.device, cache=cache)
    use_lm, use_kd, use_clone = config.lm_weight > 0, config.kd_weight > 0, config.clone_weight > 0
    module = StudentLoss(
        student, mode=cache.mode, kd_temperature=config.kd_temperature, chunk_size=config.loss_chunk_size,
        use_lm=use_lm, use_kd=use_kd, use_clone=use_clone, clone_scale=config.clone_scale,
    )  # fmt: skip
    blocks = student.blocks() if isinstance(student, PlainStudent) else []
    module = parallelize(module, ctx=ctx, mode=config.parallelism, blocks=blocks, find_unused_parameters=not (use_lm or use_kd))
    betas = (config.adam_beta1, config.adam_beta2)
    optimizer = adamw(module, lr=config.lr, weight_decay=config.weight_decay, betas=betas, eps=config.adam_eps)

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
        write_run_dir(config, cache, student, ctx.world_size, total_steps)
    ctx.barrier()
    options = TrainerOptions(
        total_steps=total_steps, grad_accum=config.grad_accum, grad_clip=config.grad_clip,
        checkpoint_every=config.checkpoint_every, keep_checkpoints=config.keep_checkpoints, log_every=config.log_every,
    )  # fmt: skip
    return Trainer(
        module=module, optimizer=optimizer, schedules=schedules, loader=loader, options=options,
        run_dir=config.out, ctx=ctx, callbacks=all_callbacks,
    )  # fmt: skip


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
