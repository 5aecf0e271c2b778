"""Hooks around the training loop, and the two rank-0 outputs every run has.

`Callback` is what the loop calls; `MetricsLog` writes metrics.jsonl (its length is
checkpointed, so a resumed run drops the lines logged after its checkpoint); `ProgressBar`
shows the step, the latest loss and eval results on stderr.
The record format is in `kdpipe.schemas.run_dir`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from kdpipe.schemas.run_dir import metrics_line

if TYPE_CHECKING:
    from kdpipe.student_train.trainer import Trainer

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
        line = metrics_line(record)
        with open(self.path, "ab") as handle:
            handle.write(line)
        self.offset += len(line)



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
            self._progress.live.transient = trainer.failed  # the error's one line is all that stays on stderr
            self._progress.stop()
            self._progress = None
