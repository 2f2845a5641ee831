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


def test_warmup_step0_is_one_increment_above_start_lr() -> None:
    """Warmup step k trains at start_lr + (max_lr - start_lr) (k + 1) / warmup_steps (the docstring)."""
    s = Schedule("cosine", max_lr=1e-3, min_lr=1e-4, warmup_steps=10, total_steps=100, start_lr=1e-4)
    assert lr_at(s, 0) == pytest.approx(1e-4 + 9e-4 / 10)
    assert lr_at(s, 4) == pytest.approx(1e-4 + 9e-4 * 5 / 10)
    assert lr_at(s, 9) == pytest.approx(1e-3)


def test_wsd_branches_are_validated() -> None:
    s = Schedule("wsd", 1e-3, 0.0, 10, 100, decay_steps=20, branches=(40, 70))
    assert [(b.total_steps, b.decay_start, b.branches) for b in s.branch_schedules()] == [(40, 33, ()), (70, 57, ())]
    for b in s.branch_schedules():  # a branch shares the main run's LRs until its own decay starts
        assert [lr_at(b, i) for i in range(b.decay_start)] == [lr_at(s, i) for i in range(b.decay_start)]
    for branches, needle in (((100,), "before the run's end"), ((10,), "end after warmup"), ((70, 40), "increasing")):
        with pytest.raises(ValueError, match=needle):
            Schedule("wsd", 1e-3, 0.0, 10, 100, decay_steps=20, branches=branches)
    with pytest.raises(ValueError, match="need a wsd schedule"):
        Schedule("cosine", 1e-3, 0.0, 10, 100, branches=(50,))


def _demo_cfg(**train: object):
    from pathlib import Path

    import yaml

    from cptscale.validation import parse_config

    root = Path(__file__).resolve().parents[1]
    raw = yaml.safe_load((root / "config.yaml").read_text())
    for key, value in train.items():  # None removes a key the demo config sets
        if value is None:
            raw["train"].pop(key, None)
        else:
            raw["train"][key] = value
    return parse_config(raw, base_dir=root)


def test_batch_warning_when_target_batch_cannot_be_met() -> None:
    """micro_batch_size 16 x dp 1 x seq 128 = 2,048 tokens per micro-step: a 5,000-token target rounds
    to 2 accumulation steps (4,096 tokens), with a warning naming the size and both figures."""
    import warnings

    from cptscale.runs import batch_layout

    cfg = _demo_cfg(batch_tokens=5000)
    with pytest.warns(UserWarning, match=r"size d32l2: batch of 5000 tokens is not a multiple of micro_batch_size "
                                         r"x dp x seq_length; using 32 sequences \(4096 tokens\) per step"):
        assert batch_layout(cfg, "d32l2") == (32, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an exact batch: no warning
        assert batch_layout(_demo_cfg(batch_tokens=4096), "d32l2") == (32, 2)


def test_schedule_for_wsd_branches() -> None:
    from cptscale.plan import plan_study, schedule_for

    cfg = _demo_cfg(schedule="wsd", wsd_branches=[0.5, 0.25])
    run = next(r for r in plan_study(cfg) if r.init == "scratch")
    s = schedule_for(cfg, run)
    assert s.branches == (round(0.25 * run.steps), round(0.5 * run.steps))
    unset = _demo_cfg(schedule="cosine", wsd_branches=None)
    assert "wsd_branches" not in unset.train.model_dump(mode="json")  # unset: training hashes unchanged
    # config validation (which plans every run's schedule) reports the field and the fix
    from cptscale.config.problems import ConfigError

    with pytest.raises(ConfigError, match=r"train.wsd_branches: .*\[0.5\] needs train.schedule: wsd"):
        _demo_cfg(schedule="cosine", wsd_branches=[0.5])
    with pytest.raises(ConfigError, match=r"train.wsd_branches: .*branches of \[\d+, \d+\] steps .*must end after "
                                          "warmup"):
        _demo_cfg(schedule="wsd", wsd_branches=[0.001, 0.5])
