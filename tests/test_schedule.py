"""LR schedules are pure functions of the step; phase switches resolve to exact steps."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest

from cptscale.schedule import Schedule, first_step_at_or_below, lr_at


def test_cosine_warmup_peak_and_floor() -> None:
    s = Schedule("cosine", max_lr=1e-3, min_lr=1e-4, warmup_steps=10, total_steps=110)
    assert lr_at(s, 0) == pytest.approx(1e-4)  # first warmup step is not wasted at LR 0
    assert lr_at(s, 9) == pytest.approx(1e-3)
    assert lr_at(s, 10) == pytest.approx(1e-3)
    assert lr_at(s, 60) == pytest.approx(5.5e-4)  # half-way through the cosine
    assert lr_at(s, 110) == pytest.approx(1e-4)
    lrs = [lr_at(s, i) for i in range(10, 111)]
    assert all(a >= b for a, b in pairwise(lrs))


def test_wsd_stable_then_decay_and_branches_share_prefix() -> None:
    s = Schedule("wsd", 1e-3, 0.0, 10, 100, decay_steps=20)
    assert s.decay_start == 80
    assert all(lr_at(s, i) == 1e-3 for i in range(10, 80))
    assert lr_at(s, 90) == pytest.approx(0.5e-3)
    b = s.branch(200)
    assert b.decay_steps == 42  # same decay share of the post-warmup run
    assert [lr_at(b, i) for i in range(80)] == [lr_at(s, i) for i in range(80)]


def test_wsd_decay_shapes() -> None:
    for shape, mid in (("linear", 0.5), ("cosine", 0.5), ("1-sqrt", 1 - math.sqrt(0.5))):
        s = Schedule("wsd", 1.0, 0.0, 0, 100, decay_steps=50, decay_shape=shape)
        assert lr_at(s, 75) == pytest.approx(mid)


def test_constant() -> None:
    s = Schedule("constant", 2e-4, 2e-4, 5, 50)
    assert lr_at(s, 49) == 2e-4


def test_first_step_at_or_below_on_cosine() -> None:
    s = Schedule("cosine", 1.0, 0.0, 10, 210)
    step = first_step_at_or_below(s, 0.2)  # Reuse recipe: switch at max/5
    assert lr_at(s, step) <= 0.2 < lr_at(s, step - 1)
    with pytest.raises(ValueError, match="never falls"):
        first_step_at_or_below(Schedule("cosine", 1.0, 0.5, 0, 100), 0.2)


@pytest.mark.parametrize(
    "kwargs",
    [dict(total_steps=0), dict(warmup_steps=200), dict(min_lr=2.0), dict(kind="wsd", decay_steps=0)],
)
def test_bad_schedules_rejected(kwargs: dict) -> None:
    base = dict(kind="cosine", max_lr=1.0, min_lr=0.1, warmup_steps=10, total_steps=100)
    with pytest.raises(ValueError):
        Schedule(**{**base, **kwargs})
