"""The training loop: steps, schedules, checkpoints, cancellation, metrics and eval.

`StudentLoss` is the train module's forward: the student and every loss term in one
`nn.Module`, so that DDP and FSDP see the whole computation (the LM head and the clone
targets use student parameters outside the student's own forward). A step is
`w_lm·CE + w_kd·KD + α·clone` over `grad_accum` micro-batches, then gradient clipping
and AdamW, with the learning rate and each weight read from its `Schedule` at the step.

`Trainer` owns the loop, the checkpoint cadence and cancellation: SIGTERM or SIGUSR1
(Slurm preemption) only sets a flag; at the end of the current step every rank agrees to
stop (one all-reduce), a checkpoint is written, and `fit` returns a summary with
`preempted=True`; the CLI then exits with `PREEMPTED_EXIT_CODE`. A resumed run restores
the weights, the optimizer, the RNG states of every rank, the loader position and the
metrics file's length, so on CPU it reproduces the uninterrupted run's metrics exactly.
Logging, the progress bar and eval are callbacks.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import Tensor, nn

from kdpipe.schemas.errors import KdpipeError
from kdpipe.student_train.builders import Student, lm_head_bias
from kdpipe.student_train.checkpoint import latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
from kdpipe.student_train.clone_loss import CloneScale, clone_loss_terms
from kdpipe.student_train.loader import StudentBatch
from kdpipe.student_train.losses import SparseTargetBatch, kd_lm_loss, normalise_targets
from kdpipe.student_train.metrics import EvalAccumulator
from kdpipe.student_train.parallelize import DistContext, full_state, gradient_sync, grad_norm_value, load_full_state
from kdpipe.student_train.schedules import Schedule

PREEMPTED_EXIT_CODE = 75
"""Exit status after a checkpoint on SIGTERM/SIGUSR1: EX_TEMPFAIL of sysexits.h, "try
again later". Under torchrun the launcher reports it as a failed worker (its own status is
1), so Slurm scripts should requeue on the signal (a trap running `scontrol requeue`)
rather than on the status; the requeued command adds `--resume`."""

METRICS_FILE = "metrics.jsonl"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class LossWeights(NamedTuple):
    """The loss weights of one step."""

    lm: float
    kd: float
    clone: float


class StudentLoss(nn.Module):
    """Student forward plus losses; in eval, student forward plus eval metrics."""

    def __init__(
        self, student: Student, *, mode: str, kd_temperature: float, chunk_size: int, use_lm: bool, use_kd: bool, use_clone: bool,
        clone_scale: CloneScale = "absolute",
    ) -> None:
        super().__init__()
        self.student = student
        self.mode = mode
        self.kd_temperature = kd_temperature
        self.chunk_size = chunk_size
        self.use_lm, self.use_kd, self.use_clone = use_lm, use_kd, use_clone
        self.clone_scale = clone_scale

    def forward(
        self, batch: StudentBatch, weights: LossWeights | None = None, accumulator: EvalAccumulator | None = None
    ) -> dict[str, Tensor] | None:
        """Train: {"loss": weighted total, "loss/lm" | "loss/kd" | "loss/clone" | "loss/clone/{term}": detached}.
        Eval (`accumulator` given): adds to it and returns None."""
        capture = batch.snap_positions if self.use_clone and accumulator is None else None
        out = self.student(batch.input_ids, capture_positions_BK=capture)
        hidden_ND = out.hidden.reshape(-1, out.hidden.shape[-1])  # (B*T, D)
        head_VD, bias_V = self.student.lm_head_weight(), lm_head_bias(self.student)
        labels_N = batch.labels.reshape(-1)  # (B*T,)
        if accumulator is not None:
            accumulator.update(hidden_ND, head_VD, labels_N, batch.targets, bias_V)
            return None
        assert weights is not None
        total = hidden_ND.new_zeros((), dtype=torch.float32)
        logged: dict[str, Tensor] = {}
        if self.use_lm or self.use_kd:
            terms = kd_lm_loss(
                hidden_ND,
                head_VD,
                labels_N=labels_N if self.use_lm else None,
                targets=normalise_targets(batch.targets, mode=self.mode) if self.use_kd else None,
                kd_temperature=self.kd_temperature,
                chunk_size=self.chunk_size,
                lm_bias_V=bias_V,
            )
            total = total + weights.lm * terms.lm + weights.kd * terms.kd
            if self.use_lm:
                logged["loss/lm"] = terms.lm.detach()
            if self.use_kd:
                logged["loss/kd"] = terms.kd.detach()
        if self.use_clone:
            # Targets at the cached snapshot positions, the same positions the forward captured.
            targets = {layer: self.student.clone_targets(layer, batch.snapshots[layer]) for layer in out.activations}
            parts = clone_loss_terms(out.activations, targets, scale=self.clone_scale)
            clone = torch.stack(list(parts.values())).sum()
            total = total + weights.clone * clone
            logged["loss/clone"] = clone.detach()
            for term in sorted({term for _, term in parts}):
                logged[f"loss/clone/{term}"] = torch.stack([v for (_, t), v in parts.items() if t == term]).sum().detach()
        return {"loss": total, **logged}


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
        return (
            f"trained {self.step} steps ({self.tokens:,} tokens) into {self.run_dir} in {self.wall_s:.1f} s{loss}{evaluated}; "
            f"export with `kdpipe export-student {self.run_dir} --out DIR`"
        )


class Callback:
    """Hooks around the loop; every rank runs them (collectives inside are allowed)."""

    def on_train_start(self, trainer: Trainer) -> None: ...
    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None: ...
    def on_step_end(self, trainer: Trainer) -> None: ...
    def on_train_end(self, trainer: Trainer) -> None: ...  # also after a stop or an error


class MetricsLog:
    """metrics.jsonl, written by rank 0; its length is checkpointed so a resume drops later lines."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled
        self.offset = 0

    def open(self, offset: int) -> None:
        """Continue after the first `offset` bytes (the checkpoint's lines), dropping later ones."""
        self.offset = offset
        if not self.enabled:
            return
        with open(self.path, "ab") as handle:
            self.offset = min(offset, handle.tell())  # a file shortened by hand is not padded
            handle.truncate(self.offset)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = (json.dumps(record, allow_nan=False) + "\n").encode()
        with open(self.path, "ab") as handle:
            handle.write(line)
        self.offset += len(line)


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
        self.tokens = 0
        self.epoch = 0
        self.last_train: dict[str, Any] | None = None
        self.last_eval: dict[str, Any] | None = None
        self._stop_signal: str | None = None
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
        previous = self._install_signal_handlers()
        try:
            for callback in self.callbacks:
                callback.on_train_start(self)
            batches = iter(self.loader)
            while self.step < self.total_steps:
                local = self._train_step(self._next_batches(batches))
                self.step += 1
                if self.step % self.options.log_every == 0 or self.step == self.total_steps:
                    self.last_train = self._train_record(local)
                    self.log(self.last_train)
                for callback in self.callbacks:
                    callback.on_step_end(self)
                if self._stop_agreed() and self.step < self.total_steps:
                    self.save()
                    return self._summary(preempted=True)
                if self.step % self.options.checkpoint_every == 0 or self.step == self.total_steps:
                    self.save()
            return self._summary(preempted=False)
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
        if not math.isfinite(record["loss"]):
            raise KdpipeError(
                f"training diverged: loss {record['loss']} at step {self.step}; start a new run with a lower --lr, "
                "a longer --warmup-steps or a tighter --grad-clip"
            )
        return record

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


class Evaluator(Callback):
    """Eval on the held-out split every `every` steps and at the end: LM loss, KL to the cached targets, ECE."""

    def __init__(self, loader: BatchSource, *, every: int, batches: int, mode: str, chunk_size: int) -> None:
        self.loader = loader
        self.every = every
        self.batches = batches
        self.mode = mode
        self.chunk_size = chunk_size
        self._start = loader.state_dict()

    def on_step_end(self, trainer: Trainer) -> None:
        if trainer.step % self.every == 0 or trainer.step == trainer.total_steps:
            trainer.log(self.evaluate(trainer))

    @torch.no_grad()
    def evaluate(self, trainer: Trainer) -> dict[str, Any]:
        """The same `batches` val batches every time (the loader is rewound), summed over ranks."""
        accumulator = EvalAccumulator(mode=self.mode, chunk_size=self.chunk_size, device=trainer.ctx.device)
        self.loader.load_state_dict(self._start)
        trainer.module.eval()
        try:
            for batch in islice(self.loader, self.batches):
                with trainer.autocast():
                    trainer.module(to_device(batch, trainer.ctx.device), accumulator=accumulator)
        finally:
            trainer.module.train()
        trainer.ctx.all_reduce(accumulator.totals)
        result = accumulator.result()
        record: dict[str, Any] = {"type": "eval", "step": trainer.step}
        record.update({f"eval/{name}": value for name, value in result.items()})
        return record


class ProgressBar(Callback):
    """A rich progress bar on rank 0 (stderr) with the latest loss and eval results."""

    def __init__(self) -> None:
        self._progress: Progress | None = None
        self._task = 0

    def on_train_start(self, trainer: Trainer) -> None:
        if not trainer.ctx.is_main:
            return
        self._progress = Progress(
            TextColumn("train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        )
        self._progress.start()
        self._task = self._progress.add_task("train", total=trainer.total_steps, completed=trainer.step, status="")

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if self._progress is None:
            return
        if record["type"] == "train":
            status = f"loss {record['loss']:.4f}  {record['tokens_per_s']:,.0f} tok/s"
            self._progress.update(self._task, status=status)
        elif record.get("eval/lm_loss") is not None:
            kl = record["eval/kl"]
            self._progress.console.print(
                f"eval step {record['step']}: LM loss {record['eval/lm_loss']:.4f}"
                + (f", KL {kl:.4f}" if kl is not None else "")
                + f", ECE {record['eval/ece']:.4f}"
            )

    def on_step_end(self, trainer: Trainer) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=trainer.step)

    def on_train_end(self, trainer: Trainer) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
