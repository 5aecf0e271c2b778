"""The training loop: steps, schedules, checkpoints and cancellation.

A step runs the train module (`StudentLoss`, see `student_loss.py`) over `grad_accum`
micro-batches, then gradient clipping and AdamW, with the learning rate and each loss
weight read from its `Schedule` at the step.

`Trainer` owns the loop, the checkpoint cadence and cancellation: SIGTERM or SIGUSR1
(Slurm preemption) only sets a flag; at the end of the current step every rank agrees to
stop (one all-reduce), a checkpoint is written, and `fit` returns a summary with
`preempted=True`; the CLI then exits with `PREEMPTED_EXIT_CODE`. A resumed run restores
the weights, the optimizer, the RNG states of every rank, the loader position and the
metrics file's length, so on CPU it reproduces the uninterrupted run's metrics exactly.
Logging (`callbacks.py`), the progress bar and eval (`evaluator.py`) are callbacks.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from kdpipe.schemas.errors import KdpipeError
from kdpipe.schemas.run_dir import METRICS_FILE, latest_checkpoint
from kdpipe.student_train.callbacks import Callback, MetricsLog
from kdpipe.student_train.checkpoint import load_checkpoint, prune_checkpoints, save_checkpoint, set_aside_checkpoint
from kdpipe.student_train.loader import StudentBatch
from kdpipe.student_train.losses import SparseTargetBatch
from kdpipe.student_train.parallelize import DistContext, full_state, gradient_sync, grad_norm_value, load_full_state
from kdpipe.student_train.schedules import Schedule
from kdpipe.student_train.student_loss import LossWeights

PREEMPTED_EXIT_CODE = 75
"""Exit status after a checkpoint on SIGTERM/SIGUSR1: EX_TEMPFAIL of sysexits.h, "try
again later". Under torchrun the launcher reports it as a failed worker (its own status is
1), so Slurm scripts should requeue on the signal (a trap running `scontrol requeue`)
rather than on the status; the requeued command adds `--resume`."""

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class BatchSource(Protocol):
    """What the trainer needs of a loader (`StudentLoader` is one): batches in run order, and
    a JSON-able position to checkpoint and restore."""

    def __iter__(self) -> Iterator[StudentBatch]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(kw_only=True, slots=True)
class TrainerOptions:
    """The loop's knobs (from `TrainStudentConfig`)."""

    total_steps: int
    grad_accum: int
    grad_clip: float
    checkpoint_every: int
    keep_checkpoints: int
    log_every: int


@dataclass(kw_only=True, slots=True)
class Schedules:
    """The learning rate and the three loss weights as functions of the step."""

    lr: Schedule
    lm: Schedule
    kd: Schedule
    clone: Schedule

    def weights(self, step: int) -> LossWeights:
        return LossWeights(self.lm.value(step), self.kd.value(step), self.clone.value(step))


@dataclass(kw_only=True, slots=True)
class TrainSummary:
    """What `fit` did."""

    run_dir: Path
    start_step: int  # where this call began: the resumed checkpoint's step, else 0
    step: int
    total_steps: int
    tokens: int
    preempted: bool
    stop_signal: str | None
    last_train: dict[str, Any] | None
    last_eval: dict[str, Any] | None
    wall_s: float

    def describe(self) -> str:
        loss = f", loss {self.last_train['loss']:.4f}" if self.last_train else ""
        evaluated = ""
        if self.last_eval and self.last_eval.get("eval/lm_loss") is not None:
            evaluated = f", eval LM loss {self.last_eval['eval/lm_loss']:.4f}"
            if self.last_eval.get("eval/kl") is not None:
                evaluated += f", KL {self.last_eval['eval/kl']:.4f}"
        if self.preempted:
            return (
                f"stopped by {self.stop_signal} at step {self.step}/{self.total_steps}{loss}; checkpoint written, "
                f"continue with --resume (exit status {PREEMPTED_EXIT_CODE})"
            )
        if self.start_step == self.step:
            return (
                f"run {self.run_dir} already finished all {self.total_steps} steps, nothing to train; "
                f"export it with `kdpipe export-student {self.run_dir} --out DIR`"
            )
        resumed = f" (resumed at step {self.start_step})" if self.start_step else ""
        return (
            f"trained {self.step} steps{resumed} ({self.tokens:,} tokens) into {self.run_dir} in {self.wall_s:.1f} s{loss}{evaluated}; "
            f"export with `kdpipe export-student {self.run_dir} --out DIR`"
        )


@dataclass(slots=True)
class _Clock:
    start: float = field(default_factory=time.perf_counter)
    last_log: float = field(default_factory=time.perf_counter)
    tokens_at_last_log: int = 0


class Trainer:
    """Runs `options.total_steps` optimizer steps of `module` over `loader`, resumably."""

    def __init__(
        self,
        *,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        schedules: Schedules,
        loader: BatchSource,
        options: TrainerOptions,
        run_dir: Path,
        ctx: DistContext,
        callbacks: Sequence[Callback] = (),
    ) -> None:
        self.module = module
        self.optimizer = optimizer
        self.schedules = schedules
        self.loader = loader
        self.options = options
        self.run_dir = Path(run_dir)
        self.ctx = ctx
        self.callbacks = list(callbacks)
        self.metrics = MetricsLog(self.run_dir / METRICS_FILE, enabled=ctx.is_main)
        self.step = 0
        self._start_step = 0
        self.tokens = 0
        self.epoch = 0
        self.last_train: dict[str, Any] | None = None
        self.last_eval: dict[str, Any] | None = None
        self._stop_signal: str | None = None
        self.failed = False  # set when `fit` ends by an exception (the callbacks' `on_train_end` can tell)
        self._clock = _Clock()
        self._params = [p for p in module.parameters() if p.requires_grad]

    @property
    def total_steps(self) -> int:
        return self.options.total_steps

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast on GPU; fp32 on CPU (exact, reproducible)."""
        if self.ctx.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def request_stop(self, reason: str) -> None:
        """Stop after the current step with a checkpoint (what SIGTERM/SIGUSR1 do)."""
        self._stop_signal = reason

    def log(self, record: dict[str, Any]) -> None:
        """Append a metrics record (rank 0 writes) and pass it to the callbacks."""
        self.metrics.write(record)
        for callback in self.callbacks:
            callback.on_log(self, record)
        if record.get("type") == "eval":
            self.last_eval = record

    def fit(self) -> TrainSummary:
        self._restore()
        self._start_step = self.step
        previous = self._install_signal_handlers()
        try:
            for callback in self.callbacks:
                callback.on_train_start(self)
            batches = iter(self.loader)
            while self.step < self.total_steps:
                local = self._train_step(self._next_batches(batches))
                self.step += 1
                diverged = self._diverged(local)
                if diverged or self.step % self.options.log_every == 0 or self.step == self.total_steps:
                    self.last_train = self._train_record(local)
                    self.log(self.last_train)
                if diverged:
                    raise self._divergence_error()
                for callback in self.callbacks:
                    callback.on_step_end(self)
                if self._stop_agreed() and self.step < self.total_steps:
                    self.save()
                    return self._summary(preempted=True)
                if self.step % self.options.checkpoint_every == 0 or self.step == self.total_steps:
                    self.save()
            return self._summary(preempted=False)
        except BaseException:
            self.failed = True
            raise
        finally:
            for callback in self.callbacks:
                callback.on_train_end(self)
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _next_batches(self, batches: Iterator[StudentBatch]) -> list[StudentBatch]:
        """The step's micro-batches, fetched with SIGTERM/SIGUSR1 blocked.

        The loader forks its worker processes inside the first fetch, and they inherit the
        blocked mask: a signal sent to the whole job (Slurm signals every process of the
        step) then stops only the trainer, at the end of its step. A worker killed by it
        would make the DataLoader raise in the middle of a step, before the checkpoint.
        A signal arriving during the fetch is delivered, to the trainer's handler, right after.
        """
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            return [next(batches) for _ in range(self.options.grad_accum)]
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    def _train_step(self, micro_batches: list[StudentBatch]) -> dict[str, Tensor]:
        """One optimizer step; returns this rank's loss terms averaged over the micro-batches, and the grad norm."""
        step = self.step
        lr = self.schedules.lr.value(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        weights = self.schedules.weights(step)
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, Tensor] = {}
        count = len(micro_batches)
        for index, batch in enumerate(micro_batches):
            batch = to_device(batch, self.ctx.device)
            with gradient_sync(self.module, enabled=index == count - 1):
                with self.autocast():
                    out = self.module(batch, weights)
                (out["loss"] / count).backward()
            for name, value in out.items():
                sums[name] = sums.get(name, 0) + value.detach().float()
            self.tokens += batch.input_ids.numel() * self.ctx.world_size
            self.epoch = batch.epoch
        max_norm = self.options.grad_clip if self.options.grad_clip > 0 else math.inf
        grad_norm = grad_norm_value(torch.nn.utils.clip_grad_norm_(self._params, max_norm))
        self.optimizer.step()
        local = {name: value / count for name, value in sums.items()}
        local["grad_norm"] = grad_norm.detach().float()
        return local

    def _train_record(self, local: dict[str, Tensor]) -> dict[str, Any]:
        """The step's metrics averaged over ranks (one all-reduce), as a JSON record."""
        names = [n for n in local if n != "grad_norm"]
        values = torch.stack([local[n].to(self.ctx.device) for n in names])
        values = (self.ctx.all_reduce(values) / self.ctx.world_size).tolist()
        now = time.perf_counter()
        tokens_per_s = (self.tokens - self._clock.tokens_at_last_log) / max(now - self._clock.last_log, 1e-9)
        self._clock.last_log, self._clock.tokens_at_last_log = now, self.tokens
        record: dict[str, Any] = {"type": "train", "step": self.step, "epoch": self.epoch, "tokens": self.tokens}
        record.update(zip(names, values))
        record["grad_norm"] = float(local["grad_norm"])
        step = self.step - 1  # the step just taken, 0-based, as the schedules count
        record["lr"] = self.schedules.lr.value(step)
        record.update({f"w_{name}": value for name, value in self.schedules.weights(step)._asdict().items()})
        record["tokens_per_s"] = tokens_per_s
        return record

    def _diverged(self, local: dict[str, Tensor]) -> bool:
        """Whether a loss term or the gradient norm of the step just taken is not finite on any rank."""
        values = torch.stack([value.to(self.ctx.device).reshape(()) for value in local.values()])
        flag = (~torch.isfinite(values)).any().float().reshape(1)
        return bool(self.ctx.all_reduce(flag, op=torch.distributed.ReduceOp.MAX).item())

    def _divergence_error(self) -> KdpipeError:
        """The error that ends a diverged run, after setting aside the checkpoint the diverged step started from.

        Its weights gave the non-finite loss or gradient, on the same batch whatever the
        learning rate, so a resume from it would diverge again; earlier checkpoints are kept.
        Nothing is saved of the diverged state.
        """
        if self.ctx.is_main:
            set_aside_checkpoint(self.run_dir, self.step - 1)
        self.ctx.barrier()
        kept = latest_checkpoint(self.run_dir)
        where = (
            f"the last good checkpoint is {kept.name}: continue from it" if kept is not None
            else "no checkpoint precedes it: start again from step 0"
        )
        record = self.last_train or {}
        values = ", ".join(f"{name.replace('_', ' ')} {record[name]}" for name in ("loss", "grad_norm") if name in record)
        return KdpipeError(
            f"training diverged at step {self.step} ({values}); "
            f"{where} with --resume and a lower --lr, a longer --warmup-steps or a tighter --grad-clip"
        )

    def _stop_agreed(self) -> bool:
        """Whether any rank was signalled (every rank must stop at the same step)."""
        flag = torch.tensor([1.0 if self._stop_signal else 0.0], device=self.ctx.device)
        stop = bool(self.ctx.all_reduce(flag, op=torch.distributed.ReduceOp.MAX).item())
        if stop and self._stop_signal is None:
            self._stop_signal = "a signal on another rank"
        return stop

    def save(self) -> Path | None:
        """Checkpoint the current step (collective; rank 0 writes); returns the directory on rank 0."""
        model_state, optimizer_state = full_state(self.module, self.optimizer)
        rng = self.ctx.gather_objects(_rng_state())
        path = None
        if self.ctx.is_main:
            path = save_checkpoint(
                self.run_dir,
                self.step,
                model_state={name.removeprefix("student."): t for name, t in model_state.items()},
                optimizer_state=optimizer_state,
                trainer_state={
                    "step": self.step,
                    "tokens": self.tokens,
                    "epoch": self.epoch,
                    "loader": self.loader.state_dict(),
                    "metrics_offset": self.metrics.offset,
                    "last_train": self.last_train,
                    "last_eval": self.last_eval,
                },
                rng_state={f"{name}_rank{rank}": t for rank, state in enumerate(rng) for name, t in state.items()},
                keep=self.options.keep_checkpoints,
            )
        self.ctx.barrier()  # no rank exits (preemption) before the checkpoint is complete
        return path

    def _restore(self) -> None:
        """Continue from the latest complete checkpoint of the run, if any."""
        path = latest_checkpoint(self.run_dir)
        if path is None:
            self.metrics.open(0)
            return
        checkpoint = load_checkpoint(path)
        if self.ctx.is_main:  # what a crash in the last save left undone; a run with no step left never saves again
            prune_checkpoints(self.run_dir, keep=self.options.keep_checkpoints)
        model_state = {f"student.{name}": t for name, t in checkpoint.model_state.items()}
        load_full_state(self.module, self.optimizer, model_state, checkpoint.optimizer_state)
        state = checkpoint.trainer_state
        self.loader.load_state_dict(state["loader"])
        self.step, self.tokens, self.epoch = state["step"], state["tokens"], state["epoch"]
        self.last_train, self.last_eval = state["last_train"], state["last_eval"]
        self.metrics.open(state["metrics_offset"])
        self._clock.tokens_at_last_log = self.tokens
        _set_rng_state(checkpoint.rng_state, self.ctx.rank)

    def _install_signal_handlers(self) -> dict[int, Any]:
        """Turn SIGTERM/SIGUSR1 into `request_stop` (main thread only: Python's rule)."""
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}
        for signum in STOP_SIGNALS:
            previous[signum] = signal.signal(signum, lambda num, frame: self.request_stop(signal.Signals(num).name))
        return previous

    def _summary(self, *, preempted: bool) -> TrainSummary:
        return TrainSummary(
            run_dir=self.run_dir,
            start_step=self._start_step,
            step=self.step,
            total_steps=self.total_steps,
            tokens=self.tokens,
            preempted=preempted,
            stop_signal=self._stop_signal,
            last_train=self.last_train,
            last_eval=self.last_eval,
            wall_s=time.perf_counter() - self._clock.start,
        )


def _rng_state() -> dict[str, Tensor]:
    state = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Tensor], rank: int) -> None:
    torch.set_rng_state(state[f"torch_cpu_rank{rank}"])
    if f"torch_cuda_rank{rank}" in state:
        torch.cuda.set_rng_state(state[f"torch_cuda_rank{rank}"])


def to_device(batch: StudentBatch, device: torch.device) -> StudentBatch:
    """The batch's tensors on `device` (non-blocking from pinned memory on GPU)."""
    if device.type == "cpu":
        return batch
    move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
    t = batch.targets
    return batch._replace(
        input_ids=move(batch.input_ids),
        labels=move(batch.labels),
        targets=SparseTargetBatch(ids=move(t.ids), weights=move(t.weights), offsets=move(t.offsets), ghost=move(t.ghost)),
        snap_positions=move(batch.snap_positions),
        snapshots={layer: {term: move(v) for term, v in terms.items()} for layer, terms in batch.snapshots.items()},
    )
