"""Held-out evaluation as a training callback: LM loss, KL to the cached targets, ECE.

Every eval reads the same val batches (the loader is rewound to its start), so the
numbers of successive evals compare the same tokens.
"""

from __future__ import annotations

from itertools import islice
from typing import Any

import torch

from kdpipe.student_train.callbacks import Callback
from kdpipe.student_train.metrics import EvalAccumulator
from kdpipe.student_train.trainer import BatchSource, Trainer, to_device


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

