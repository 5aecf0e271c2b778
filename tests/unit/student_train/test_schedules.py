"""Schedules: values at the phase boundaries and the shape between them."""

from __future__ import annotations

import math

import pytest

from kdpipe.schemas.errors import KdpipeError
from kdpipe.student_train.schedules import Schedule


def values(schedule: Schedule) -> list[float]:
    return [schedule.value(step) for step in range(schedule.total_steps)]


def non_increasing(xs: list[float]) -> bool:
    return all(b <= a + 1e-12 for a, b in zip(xs, xs[1:]))


def test_constant_with_warmup() -> None:
    schedule = Schedule(kind="constant", peak=2.0, warmup_steps=4, total_steps=10, final_fraction=0.5)
    assert values(schedule) == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]
    assert Schedule(peak=0.7, total_steps=3).value(0) == 0.7  # no warm-up starts at the peak


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_decay_from_peak_to_final(kind: str) -> None:
    schedule = Schedule(kind=kind, peak=1.0, warmup_steps=10, total_steps=110, final_fraction=0.1)
    xs = values(schedule)
    assert xs[0] == pytest.approx(0.1)  # step 0 of a 10-step warm-up
    assert xs[9] == 1.0  # end of warm-up
    assert all(a < b for a, b in zip(xs[:10], xs[1:10]))  # warm-up rises strictly
    assert xs[10] < 1.0  # decay starts right after warm-up
    assert non_increasing(xs[9:]) and xs[109] == pytest.approx(0.1)  # last step lands on the end value
    assert schedule.value(500) == pytest.approx(0.1)  # past the end it stays there


def test_linear_and_cosine_midpoints() -> None:
    linear = Schedule(kind="linear", peak=1.0, total_steps=100)
    cosine = Schedule(kind="cosine", peak=1.0, total_steps=100)
    # Step 49 is the 50th of 100 decay steps: halfway.
    assert linear.value(49) == pytest.approx(0.5)
    assert cosine.value(49) == pytest.approx(0.5)
    assert cosine.value(9) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.1)))
    assert cosine.value(9) > linear.value(9)  # cosine stays near the peak longer


def test_wsd_phases() -> None:
    schedule = Schedule(kind="wsd", peak=3e-4, warmup_steps=5, total_steps=100, decay_fraction=0.2)
    xs = values(schedule)
    assert schedule.decay_steps == 20
    assert xs[0] == pytest.approx(3e-4 / 5) and xs[4] == 3e-4  # warm-up
    assert all(x == 3e-4 for x in xs[4:80])  # stable through the step before the decay
    assert xs[80] == pytest.approx(3e-4 * 19 / 20)  # first decay step
    assert non_increasing(xs[80:]) and xs[99] == 0.0  # decays to final_fraction = 0


def test_wsd_final_fraction_and_no_decay() -> None:
    schedule = Schedule(kind="wsd", peak=1.0, total_steps=10, decay_fraction=0.5, final_fraction=0.5)
    assert values(schedule) == pytest.approx([1.0] * 5 + [0.9, 0.8, 0.7, 0.6, 0.5])
    assert values(Schedule(kind="wsd", peak=1.0, total_steps=4, decay_fraction=0.0)) == [1.0] * 4


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"total_steps": 0}, "total_steps 0"),
        ({"total_steps": 10, "warmup_steps": 11}, "warmup_steps 11"),
        ({"total_steps": 10, "decay_fraction": 1.5}, "decay_fraction 1.5"),
        ({"total_steps": 10, "final_fraction": -0.1}, "final_fraction -0.1"),
        ({"total_steps": 10, "kind": "wsd", "warmup_steps": 9, "decay_fraction": 0.2}, "exceed total_steps"),
    ],
)
def test_rejects_inconsistent_settings(kwargs: dict, match: str) -> None:
    with pytest.raises(KdpipeError, match=match):
        Schedule(peak=1.0, **kwargs)


def test_frozen_and_keyword_only() -> None:
    schedule = Schedule(peak=1.0, total_steps=2)
    with pytest.raises(AttributeError):
        schedule.peak = 2.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        Schedule("constant", 1.0, 2)  # type: ignore[misc]
