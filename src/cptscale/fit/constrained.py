"""Data-constrained scaling (Muennighoff et al. 2023, "Scaling Data-Constrained Language Models", NeurIPS):
Chinchilla's law on the effective data D' = U + U·R*_D·(1 − exp(−R_D/R*_D)), R_D = D/U − 1 repetitions of the
U unique tokens (:func:`cptscale.fit.laws.effective_data`), fitted when runs repeat data.

Lovelace et al. 2026 ("Prescriptive Scaling Laws for Data Constrained Training", arXiv 2605.01640) model
the same excess loss with an additive one-coefficient overfitting penalty instead; its exact equation could
not be read from the stored text of the paper, so it is not implemented (see the study's report notes).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from cptscale.errors import CLIError
from cptscale.fit.estimate import _fit_meta, fit_law
from cptscale.fit.laws import R_STAR_D, FitResult, effective_data
from cptscale.fit.points import Points, _points


def fit_data_constrained(data: Any, U: float, r_grid: Sequence[float] = tuple(np.geomspace(1.0, 100.0, 7)),
                         fixed: dict[str, float] | None = None, **kw: Any) -> FitResult:
    """The effective-data law L = E + A/N^α + B/D'^β, D' = D'(D; U, R_D), fitted by profiling R_D: the
    Chinchilla fit on (N, D'(R_D)) for each R_D of a log grid, then a bounded Brent refinement of log R_D
    around the best; U (the unique tokens of the language) is held fixed. ``fixed`` may freeze R_D (e.g.
    the published 15.39) or Chinchilla parameters. Only repeated points (D > U) inform R_D: without them
    the law is Chinchilla's and R_D is reported as not identified."""
    from scipy.optimize import minimize_scalar

    pts = _points(data)
    fixed = dict(fixed or {})
    r_fixed = fixed.pop("R_D", None)
    U = float(U)
    if not U > 0:
        raise CLIError(f"unique tokens U must be > 0, not {U}")

    warm: list[np.ndarray] = []

    def fit_at(r: float) -> FitResult:
        d_eff = effective_data(pts.D, U, r)
        fr = fit_law(Points(pts.N, d_eff, pts.L, pts.run, pts.index), "chinchilla", fixed,
                     init=np.vstack(warm) if warm else None, **kw)
        warm[:] = [fr.starts] if fr.starts is not None else []  # the next R_D starts from these optima
        return fr

    repeated = int(np.sum(pts.D > U))
    profile: list[tuple[float, float]] = []
    if r_fixed is not None or not repeated:
        r_best = float(r_fixed if r_fixed is not None else R_STAR_D)
        best = fit_at(r_best)
    else:
        fits = {}
        for r in r_grid:
            fits[float(r)] = fit_at(float(r))
            profile.append((float(r), fits[float(r)].meta["objective"]))
        rs = sorted(fits)
        i = int(np.argmin([fits[r].meta["objective"] for r in rs]))
        lo, hi = math.log(rs[max(i - 1, 0)]), math.log(rs[min(i + 1, len(rs) - 1)])
        res = minimize_scalar(lambda u: fit_at(math.exp(u)).meta["objective"], bounds=(lo, hi), method="bounded",
                              options={"xatol": 1e-2, "maxiter": 15})
        r_best = math.exp(float(res.x)) if res.fun <= fits[rs[i]].meta["objective"] else rs[i]
        best = fit_at(r_best)
    params = {**best.params, "R_D": r_best, "U": U}
    meta = {**best.meta, "law_fitted_on": "chinchilla on (N, D'(D; U, R_D))", "unique_tokens": U,
            "n_repeated_points": repeated, "max_epochs": float(np.max(pts.D) / U),
            "R_D": "fixed" if r_fixed is not None else ("profiled" if repeated else
                   "not identified (no point repeats data): the published 15.39 is used"),
            "R_D_profile": profile, **_fit_meta("chinchilla", best.params, Points(
                pts.N, effective_data(pts.D, U, r_best), pts.L, pts.run, pts.index), kw.get("delta", 1e-3))}
    fx = {**best.fixed, "U": U, **({"R_D": r_best} if r_fixed is not None else {})}
    return FitResult("muennighoff", params, fx, meta)
