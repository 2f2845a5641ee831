"""Loss curves shaped by the LR schedule (Tissue et al. 2024, "Scaling Law with LR Annealing").

Their law is ``L(s) = L0 + A S1^-alpha - C S2``: ``S1`` is the forward area (the sum of the LRs
used so far) and ``S2`` the annealing area, ``S2 = sum_i m_i`` with momentum
``m_i = lambda m_{i-1} + (eta_{i-1} - eta_i)``: an LR drop lowers the loss, with a lag. Here the
data term of a Chinchilla-type law takes ``D1 = tokens_per_step x S1 / eta_max`` (tokens weighted by
their relative LR) in place of D, and the annealing term is normalised to ``S2 (1 - lambda) /
eta_max`` (about 1 after a full anneal from the peak to zero). The two are calibrated so that the
loss at the *end* of each run's own schedule is exactly the law's value for its tokens: the truth a
fit should recover is "final loss of a fully annealed run of D tokens". Before the end the curve is
higher than the law (a cosine run's middle has not annealed) and WSD's stable phase sits above its
decay; a WSD decay branch ends on the law at its shorter budget (the run model adds what the shared
warmup would leave above it, in step with the branch's annealing: ``_Model._branch_gap``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cptscale.schedule import Schedule, lr_at


@dataclass(frozen=True)
class Areas:
    """Per completed step count k = 0..steps: cumulative LR-weighted areas (index k: after k steps)."""

    lr: np.ndarray  #: LR of optimizer step i (i = 0..steps-1)
    s1: np.ndarray  #: forward area, in steps at peak LR
    s2: np.ndarray  #: normalised annealing area (0 before any LR drop, ~1 after a full anneal)


@functools.lru_cache(maxsize=64)
def lr_series(schedule: Schedule) -> np.ndarray:
    """The LR of every optimizer step (read-only; cached: the CPT runs of one size share a schedule)."""
    out = np.array([lr_at(schedule, i) for i in range(schedule.total_steps)], dtype=float)
    out.flags.writeable = False
    return out


def areas(schedule: Schedule, lag_steps: float, lr: np.ndarray | None = None, weights: np.ndarray | None = None
          ) -> Areas:
    """S1 and S2 of a schedule. ``lag_steps``: memory of the annealing momentum (Tissue's lambda =
    exp(-1/lag_steps)). ``weights`` (per step, e.g. the target language's share of a blend) weight S1."""
    lr = lr_series(schedule) if lr is None else lr
    peak = max(schedule.max_lr, float(lr.max(initial=0.0)))
    w = np.ones_like(lr) if weights is None else weights
    s1 = np.concatenate([[0.0], np.cumsum(w * lr / peak)])
    drops = np.maximum(0.0, -np.diff(lr, prepend=lr[:1]))  # warmup (rising LR) anneals nothing
    lam = math.exp(-1.0 / max(lag_steps, 1e-9))
    m = ewm(drops, lam)  # momentum of the LR drops: m_i = lam m_{i-1} + drop_i
    s2 = np.concatenate([[0.0], np.cumsum(m)]) * (1 - lam) / peak
    return Areas(lr=lr, s1=s1, s2=s2)


def ewm(x: np.ndarray, lam: float) -> np.ndarray:
    """``m_i = lam m_{i-1} + x_i`` (m_{-1} = 0) in numpy: within blocks short enough that lam^-k stays below
    e^50, ``m_j = lam^j (lam carry + sum_{i<=j} x_i lam^-i)`` (scipy.signal.lfilter costs 3 s to import)."""
    x = np.asarray(x, float)
    out = np.empty_like(x)
    if lam <= 0:
        return x.copy()
    block = max(1, int(50.0 / -math.log(lam))) if lam < 1 else len(x) or 1
    carry = 0.0
    for s in range(0, len(x), block):
        blk = x[s : s + block]
        p = lam ** np.arange(len(blk), dtype=float)
        out[s : s + block] = p * (lam * carry + np.cumsum(blk / p))
        carry = float(out[s + len(blk) - 1])
    return out


def smooth_min(a: np.ndarray, b: float, width: float = 0.05) -> np.ndarray:
    """min(a, b) with a soft corner: a law that diverges at D -> 0 starts at the initial loss ``b``."""
    a = np.asarray(a, float)
    with np.errstate(over="ignore", invalid="ignore"):
        lo = np.minimum(a, b)
        out = lo - width * np.log1p(np.exp(-np.abs(a - b) / width))
    return np.where(np.isfinite(a), out, b)


def data_term_curve(coef: float, exponent: float, tokens_per_step: float, s1: np.ndarray, s1_end: float,
                    d_end: float, unique: float = math.inf, r_d: float = 15.39) -> np.ndarray:
    """``coef / D_eff^exponent`` along a run, with D_eff = D1 scaled so that D_eff(end) = d_end, and beyond
    ``unique`` tokens Muennighoff et al.'s effective data of D_eff (``r_d``: their R*_D): a run that repeats
    its data ends on the law at its effective data."""
    from cptscale.fit.laws import effective_data

    kappa = s1_end / d_end * tokens_per_step if d_end > 0 else 1.0
    with np.errstate(divide="ignore"):
        d_eff = tokens_per_step * np.asarray(s1, float) / kappa
        if math.isfinite(unique):
            d_eff = effective_data(d_eff, unique, r_d)
        return np.where(d_eff > 0, coef / np.where(d_eff > 0, d_eff, 1.0) ** exponent, np.inf)


def eval_indices(steps: Sequence[int], total: int) -> np.ndarray:
    return np.clip(np.asarray(list(steps), dtype=int), 0, total)
