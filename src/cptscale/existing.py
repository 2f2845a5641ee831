"""CPT of an existing model: how many target tokens and how much replay for *this* model.

With the model fixed (N constant) the questions are one-dimensional in data and replay:

* the data-scaling law in D at fixed N, per replay ratio r: ``L_target(D) = E_r + B_r / D^beta_r``
  (the extended CPT law of Zheng et al. 2024 with N frozen: ``E_r`` absorbs the model terms), fitted
  by variable projection (for each beta, E and B are a non-negative linear least-squares problem; beta
  by a bounded scalar search on the log-loss residuals);
* the forgetting-vs-replay frontier: per replay ratio the target loss reached and the source-language
  loss rise (``L_source - L_source(model as given)``); the Pareto-optimal ratios trade one for the
  other;
* the answer: the smallest replay ratio whose forgetting stays within ``max_forgetting`` nats, and the
  target tokens its data law needs to reach a target loss.

Pure (numpy/scipy): the study kind's fit step calls it on the store's final evaluations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

BETA_BOUNDS = (1e-3, 3.0)


@dataclass(frozen=True)
class DataLaw:
    """``L(D) = E + B / D^beta`` at fixed N."""

    E: float
    B: float
    beta: float
    n_points: int
    rmse_log: float  #: root-mean-square log-loss residual of the fit
    on_bound: tuple[str, ...] = ()  #: parameters sitting on a bound (E = 0, beta at an end)

    def loss(self, D: Any) -> Any:
        return self.E + self.B / np.asarray(D, float) ** self.beta

    def tokens_for(self, loss: float) -> float:
        """Target tokens at which the law reaches ``loss`` (inf if it never does: loss <= E)."""
        if loss <= self.E or self.B <= 0:
            return math.inf
        return float((self.B / (loss - self.E)) ** (1.0 / self.beta))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _nnls_2(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least squares ``y ~ E + B x`` with E, B >= 0 (the four active sets of a 2-variable NNLS)."""
    best = (math.inf, 0.0, 0.0)
    A = np.stack([np.ones_like(x), x], axis=1)
    cands = []
    sol, *_ = np.linalg.lstsq(A, y, rcond=None)
    cands.append((float(sol[0]), float(sol[1])))
    cands.append((float(np.mean(y)), 0.0))
    xx = float(x @ x)
    cands.append((0.0, float(x @ y) / xx if xx > 0 else 0.0))
    for E, B in cands:
        E, B = max(E, 0.0), max(B, 0.0)
        r = float(np.sum((E + B * x - y) ** 2))
        if r < best[0]:
            best = (r, E, B)
    return best[1], best[2]


def fit_data_law(D: Sequence[float], L: Sequence[float]) -> DataLaw:
    """Fit ``L = E + B / D^beta`` to (tokens, loss) points of one model and one replay ratio."""
    from scipy.optimize import minimize_scalar

    D_arr, L_arr = np.asarray(D, float), np.asarray(L, float)
    if len(D_arr) < 3 or len(np.unique(D_arr)) < 3:
        raise ValueError(f"the data law needs losses at >= 3 distinct token budgets, got {sorted(set(D_arr.tolist()))}")
    if np.any(D_arr <= 0) or np.any(~np.isfinite(L_arr)) or np.any(L_arr <= 0):
        raise ValueError("token budgets must be > 0 and losses finite and > 0")
    scale = float(np.median(D_arr))  # fit in units of the median budget: B stays O(loss)

    def inner(beta: float) -> tuple[float, float, float]:
        x = (D_arr / scale) ** -beta
        E, B = _nnls_2(x, L_arr)
        pred = np.maximum(E + B * x, 1e-12)
        return float(np.sum((np.log(pred) - np.log(L_arr)) ** 2)), E, B

    grid = np.geomspace(*BETA_BOUNDS, 61)
    k = int(np.argmin([inner(b)[0] for b in grid]))
    lo, hi = grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)]
    res = minimize_scalar(lambda b: inner(b)[0], bounds=(lo, hi), method="bounded", options={"xatol": 1e-6})
    beta = float(res.x) if inner(float(res.x))[0] <= inner(grid[k])[0] else float(grid[k])
    sse, E, B = inner(beta)
    # E at (or within 1e-4 of the smallest loss from) its bound 0: the floor is not identified by these points
    e_tol = 1e-4 * float(L_arr.min())
    on_bound = tuple(n for n, hit in (("E", e_tol >= E), ("beta", not BETA_BOUNDS[0] * 1.01 < beta < BETA_BOUNDS[1] * 0.99))
                     if hit)
    return DataLaw(E=E, B=B * scale**beta, beta=beta, n_points=len(D_arr), rmse_log=math.sqrt(sse / len(D_arr)),
                   on_bound=on_bound)


@dataclass(frozen=True)
class RunPoint:
    """The last evaluation of one CPT run of the model."""

    replay: float
    tokens: float  #: target-language tokens seen
    target_loss: float
    source_loss: float


def frontier(points: Sequence[RunPoint], source_loss_before: float) -> list[dict[str, Any]]:
    """Per replay ratio at the largest token budget it ran: target loss, forgetting (source-loss rise
    over the model as given) and whether the ratio is Pareto-optimal (no other ratio is at least as
    good on both and better on one)."""
    by_r: dict[float, RunPoint] = {}
    for p in points:
        if p.replay not in by_r or p.tokens > by_r[p.replay].tokens:
            by_r[p.replay] = p
    rows = [{"replay": float(r), "tokens": float(p.tokens), "target_loss": float(p.target_loss),
             "forgetting": float(p.source_loss - source_loss_before)} for r, p in sorted(by_r.items())]
    for a in rows:
        a["pareto"] = not any(b is not a and b["target_loss"] <= a["target_loss"] and b["forgetting"] <= a["forgetting"]
                              and (b["target_loss"], b["forgetting"]) != (a["target_loss"], a["forgetting"])
                              for b in rows)
    return rows


def recommend(points: Sequence[RunPoint], source_loss_before: float, *, max_forgetting: float,
              target_loss: float | None = None) -> dict[str, Any]:
    """How many target tokens and how much replay for this model: the smallest replay ratio whose
    forgetting at its largest budget is within ``max_forgetting`` nats (else the ratio that forgets
    least), its data law, and the tokens that law needs for ``target_loss`` (default: the best target
    loss any run of that ratio reached)."""
    rows = frontier(points, source_loss_before)
    if not rows:
        raise ValueError("no CPT runs of the model to recommend from")
    ok = [r for r in rows if r["forgetting"] <= max_forgetting]
    pick = min(ok, key=lambda r: r["replay"]) if ok else min(rows, key=lambda r: r["forgetting"])
    pts = [p for p in points if p.replay == pick["replay"]]
    law = fit_data_law([p.tokens for p in pts], [p.target_loss for p in pts])
    goal = target_loss if target_loss is not None else min(p.target_loss for p in pts)
    return {"replay": pick["replay"], "within_forgetting": bool(ok), "max_forgetting": max_forgetting,
            "forgetting": pick["forgetting"], "target_loss": goal, "tokens": law.tokens_for(goal),
            "law": law.as_dict(), "frontier": rows}


def answer_text(rec: dict[str, Any], lang: str, source: str) -> str:
    """One sentence for the report and the summary."""
    tok = rec["tokens"]
    tok_s = "never (the fitted floor E is above it)" if math.isinf(tok) else f"{tok:.3g} {lang} tokens"
    cond = (f"keeps {source} forgetting within {rec['max_forgetting']:g} nats" if rec["within_forgetting"]
            else f"forgets least ({rec['forgetting']:.3g} nats; no ratio stays within {rec['max_forgetting']:g})")
    bound = rec["law"].get("on_bound") or ()
    caveat = f" ({', '.join(bound)} on a bound of the fit: not identified, treat the tokens as rough)" if bound else ""
    return (f"replay {rec['replay']:g} {cond}; its data law L(D) = {rec['law']['E']:.3f} + "
            f"{rec['law']['B']:.3g}/D^{rec['law']['beta']:.3f} reaches {lang} loss {rec['target_loss']:.3f} at {tok_s}"
            + caveat)
