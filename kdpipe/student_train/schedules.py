"""Schedules of the learning rate and of each loss weight, as pure functions of the step.

PD (Peng et al. 2024) finds warm-up–stable–decay best for both the learning rate and
the KD weight α; constant, linear and cosine are the usual baselines. Every kind starts
with the same linear warm-up; the value after the last step stays at the end value, so
a run that goes a few steps past `total_steps` (a resumed run with a rounded step count)
gets no surprise.

Phases count steps so that each phase's last step lands exactly on its target: warm-up
step s (0-based) has peak·(s+1)/warmup_steps, reaching the peak at step warmup_steps−1
(no step trains with a zero learning rate), and a decay of L steps reaches the end value
at its L-th step, which is the last step of the run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from kdpipe.schemas.errors import KdpipeError


@dataclass(kw_only=True, frozen=True, slots=True)
class Schedule:
    """A value per training step: linear warm-up, then constant, linear, cosine or WSD."""

    kind: Literal["constant", "linear", "cosine", "wsd"] = "constant"
    """Shape after warm-up: constant holds the peak; linear and cosine decay from the peak
    to the end value over the remaining steps; wsd holds the peak, then decays linearly
    over the last `decay_fraction` of the run."""
    peak: float
    """The value reached at the end of warm-up (the learning rate, or a loss weight)."""
    total_steps: int
    """Optimizer steps in the run; the end value is reached at step total_steps − 1."""
    warmup_steps: int = 0
    """Steps of linear warm-up from peak/warmup_steps to the peak; 0 starts at the peak."""
    decay_fraction: float = 0.2
    """wsd only: the fraction of total_steps, at the end of the run, spent decaying."""
    final_fraction: float = 0.0
    """End value as a fraction of the peak, for linear, cosine and wsd (constant ignores it)."""

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise KdpipeError(f"schedule total_steps {self.total_steps} must be >= 1: set the run's step count")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise KdpipeError(
                f"schedule warmup_steps {self.warmup_steps} must be in [0, total_steps={self.total_steps}]"
            )
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise KdpipeError(f"schedule decay_fraction {self.decay_fraction} must be in [0, 1]")
        if self.final_fraction < 0.0:
            raise KdpipeError(f"schedule final_fraction {self.final_fraction} must be >= 0")
        if self.kind == "wsd" and self.warmup_steps + self.decay_steps > self.total_steps:
            raise KdpipeError(
                f"wsd schedule: warmup_steps {self.warmup_steps} plus decay steps {self.decay_steps} "
                f"(decay_fraction {self.decay_fraction} of {self.total_steps}) exceed total_steps; "
                "shorten the warm-up or the decay"
            )

    @property
    def decay_steps(self) -> int:
        """Steps from the first below-peak value to the end value, after warm-up."""
        if self.kind == "constant":
            return 0
        if self.kind == "wsd":
            return round(self.decay_fraction * self.total_steps)
        return self.total_steps - self.warmup_steps

    def value(self, step: int) -> float:
        """The scheduled value at 0-based optimizer step `step`."""
        assert step >= 0, f"schedule step {step} is negative"
        if step < self.warmup_steps:
            return self.peak * (step + 1) / self.warmup_steps
        decay_start = self.total_steps - self.decay_steps
        if self.decay_steps == 0 or step < decay_start:
            return self.peak
        progress = min((step - decay_start + 1) / self.decay_steps, 1.0)  # in (0, 1]
        final = self.peak * self.final_fraction
        if self.kind == "cosine":
            return final + (self.peak - final) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.peak + (final - self.peak) * progress
