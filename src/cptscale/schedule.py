"""Learning-rate schedules as pure functions of the step.

Shared by the training engine (which applies them), the mixer (which resolves a phase switch
"when the LR has decayed to max/5" to an exact step) and the report (which draws them), so the
three can never disagree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

ScheduleKind = Literal["cosine", "wsd", "constant"]
DecayShape = Literal["linear", "cosine", "1-sqrt"]


@dataclass(frozen=True)
class Schedule:
    """One run's LR schedule.

    ``warmup_steps`` ramp linearly from ``start_lr`` to ``max_lr``: warmup step k (0-based) trains
    at ``start_lr + (max_lr - start_lr) * (k + 1) / warmup_steps``, so step 0 is already one
    increment above ``start_lr`` (``max_lr / warmup_steps`` when ``start_lr`` is 0: no step is
    wasted at LR 0) and the last warmup step reaches ``max_lr``. After warmup: ``cosine`` decays to
    ``min_lr`` at ``total_steps``; ``wsd`` holds ``max_lr`` and decays over the last ``decay_steps``;
    ``constant`` holds ``max_lr``.

    ``branches`` (WSD only): total step counts < ``total_steps`` of extra decay branches taken from
    this run's stable phase (:meth:`branch`), so one run yields several token budgets; the trainer
    runs each branch's decay from a snapshot of the main run and then continues the main run.
    """

    kind: ScheduleKind
    max_lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int
    start_lr: float = 0.0
    decay_steps: int = 0
    decay_shape: DecayShape = "linear"
    branches: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"warmup_steps must be in [0, total_steps], got {self.warmup_steps}")
        if self.max_lr <= 0 or self.min_lr < 0 or self.min_lr > self.max_lr:
            raise ValueError(f"need 0 <= min_lr <= max_lr and max_lr > 0, got {self.min_lr}, {self.max_lr}")
        if self.kind == "wsd" and not 0 < self.decay_steps <= self.total_steps - self.warmup_steps:
            raise ValueError("wsd needs 0 < decay_steps <= total_steps - warmup_steps")
        if self.branches:
            self._check_branches()

    def _check_branches(self) -> None:
        b = list(self.branches)
        if self.kind != "wsd":
            raise ValueError(f"decay branches {b} need a wsd schedule, not {self.kind!r}")
        if b != sorted(set(b)):
            raise ValueError(f"decay branches must be distinct and increasing, got {b}")
        for total in b:
            if not self.warmup_steps < total < self.total_steps:
                raise ValueError(f"decay branch of {total} steps must end after warmup ({self.warmup_steps} steps) "
                                 f"and before the run's end ({self.total_steps} steps)")
            if self.branch(total).decay_start > self.decay_start:  # cannot happen with a shared decay share
                raise ValueError(f"decay branch of {total} steps would start decaying after the main run does")

    @property
    def decay_start(self) -> int:
        """First step of the decay (WSD: end of the stable phase; cosine: end of warmup)."""
        if self.kind == "wsd":
            return self.total_steps - self.decay_steps
        return self.warmup_steps

    def lr_at(self, step: int) -> float:
        return lr_at(self, step)

    def branch(self, total_steps: int) -> Schedule:
        """A WSD decay branch ending at ``total_steps`` that shares this run's warmup and stable phase."""
        if self.kind != "wsd":
            raise ValueError("only WSD schedules have decay branches")
        frac = self.decay_steps / (self.total_steps - self.warmup_steps)
        decay = max(1, round(frac * (total_steps - self.warmup_steps)))
        return Schedule("wsd", self.max_lr, self.min_lr, self.warmup_steps, total_steps, self.start_lr, decay,
                        self.decay_shape)

    def branch_schedules(self) -> list[Schedule]:
        """The decay branches (``branches``) as schedules of their own, shortest first."""
        return [self.branch(total) for total in self.branches]


def lr_at(s: Schedule, step: int) -> float:
    """LR used for optimizer step ``step`` (0-based)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < s.warmup_steps:
        lo = s.start_lr if s.start_lr > 0 else 0.0
        frac = (step + 1) / s.warmup_steps
        return lo + (s.max_lr - lo) * frac
    if s.kind == "constant":
        return s.max_lr
    step = min(step, s.total_steps)
    if s.kind == "cosine":
        span = max(1, s.total_steps - s.warmup_steps)
        progress = (step - s.warmup_steps) / span
        return s.min_lr + 0.5 * (s.max_lr - s.min_lr) * (1 + math.cos(math.pi * progress))
    # wsd
    if step < s.decay_start:
        return s.max_lr
    progress = (step - s.decay_start) / s.decay_steps
    if s.decay_shape == "linear":
        factor = 1 - progress
    elif s.decay_shape == "cosine":
        factor = 0.5 * (1 + math.cos(math.pi * progress))
    else:  # 1-sqrt (Hägele et al. 2024)
        factor = 1 - math.sqrt(progress)
    return s.min_lr + (s.max_lr - s.min_lr) * factor


def first_step_at_or_below(s: Schedule, lr: float) -> int:
    """First post-warmup step whose LR is <= ``lr`` (the "switch blend at max/5" rule).

    Raises if the schedule never gets that low, so a phase switch that can never happen is an error
    at planning time rather than a silent single-phase run.
    """
    lo, hi = s.warmup_steps, s.total_steps - 1
    if hi < lo or lr_at(s, hi) > lr:
        raise ValueError(
            f"the LR never falls to {lr:g} (schedule {s.kind}, min_lr {s.min_lr:g}, final LR "
            f"{lr_at(s, max(hi, 0)):g}); choose a higher threshold"
        )
    if s.kind == "constant":
        return lo
    while lo < hi:  # post-warmup LR is non-increasing, so bisect
        mid = (lo + hi) // 2
        if lr_at(s, mid) <= lr:
            hi = mid
        else:
            lo = mid + 1
    return lo
