"""Data-constrained scaling (Muennighoff et al. 2023, "Scaling Data-Constrained Language Models", NeurIPS):
Chinchilla's law on the effective data D' = U + U·R*_D·(1 − exp(−R_D/R*_D)), R_D = D/U − 1 repetitions of the
U unique tokens (:func:`cptscale.fit.laws.effective_data`), fitted when runs repeat data.

Lovelace et al. 2026 ("Prescriptive Scaling Laws for Data Constrained Training", arXiv 2605.01640) model
the excess loss of repetition with an additive overfitting penalty instead: Chinchilla's law on the total
tokens D = U_D (1 + R_D) plus P · R_D^delta · (N / U)^kappa, which grows with the repetitions and with the
model's size relative to its unique data (:func:`fit_overfit_penalty`; the form as Weng, "Scaling Laws,
Carefully", 2026, and Su, kexue.fm, restate it: the paper's own text was not reachable here). Both are fitted
when runs repeat data, and the study reports which one predicts the held-out size better.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from cptscale.errors import CLIError
from cptscale.fit.estimate import _fit_meta, fit_law
from cptscale.fit.laws import LAWS, R_STAR_D, FitResult, effective_data, repetitions
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

    def fit_at(r: float, grid: bool = False) -> FitResult:
        """The Chinchilla fit at one R_D: from the whole grid, or warm from the last fit's optima."""
        d_eff = effective_data(pts.D, U, r)
        fr = fit_law(Points(pts.N, d_eff, pts.L, pts.run, pts.index), "chinchilla", fixed,
                     init=np.vstack(warm) if warm and not grid else None, **kw)
        warm[:] = [fr.starts] if fr.starts is not None else []  # the next R_D starts from these optima
        return fr

    repeated = int(np.sum(pts.D > U))
    profile: list[tuple[float, float]] = []
    if r_fixed is not None or not repeated:
        r_best = float(r_fixed if r_fixed is not None else R_STAR_D)
        best = fit_at(r_best)
    else:
        fits = {}
        for r in r_grid:  # every profile point from the whole grid: warm starts carried along the profile
            # can stay in one R_D's basin and miss the global optimum at the next (measured: the published
            # law's points fitted to objective 1.9e-6, R_D 21.6 instead of 4.9e-12, R_D 15.4, when only the
            # rounding of the objective's sums changed)
            fits[float(r)] = fit_at(float(r), grid=True)
            profile.append((float(r), fits[float(r)].meta["objective"]))
        rs = sorted(fits)
        i = int(np.argmin([fits[r].meta["objective"] for r in rs]))
        warm[:] = [fits[rs[i]].starts] if fits[rs[i]].starts is not None else []  # Brent: local in R_D, warm
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


#: Internal coordinates of the overfitting-penalty law: log E, log A, log B, alpha, beta as Chinchilla's,
#: log P, delta, kappa; box bounds as :data:`cptscale.fit.optimizer.BOUNDS` plus the penalty's.
PENALTY_BOUNDS: dict[str, tuple[float, float]] = {"P": (-30.0, 10.0), "delta": (0.0, 5.0), "kappa": (-2.0, 5.0)}
_PENALTY_STARTS = {"P": (-4.0, -2.0, 0.0), "delta": (0.5, 1.0, 2.0), "kappa": (0.0, 0.5, 1.0)}


def fit_overfit_penalty(data: Any, U: float, fixed: dict[str, float] | None = None, starts_from: int = 3,
                        **kw: Any) -> FitResult:
    """Lovelace et al.'s law L = E + A/N^alpha + B/D^beta + P · R_D^delta · (N/U)^kappa, R_D = max(D/U − 1, 0):
    the Chinchilla fit of the same points gives the first five parameters' starts (its ``starts_from`` best
    distinct optima), each crossed with a 3·3·3 grid of (log P, delta, kappa); scipy L-BFGS-B with the exact
    gradient runs every start loosely and polishes the best three, on the same Huber objective as the other
    laws (log-loss residuals, ``delta``, ``reduction``). ``fixed`` may
    freeze E (the remedy of the scratch fit). Only repeated points inform P, delta and kappa: with fewer than
    four of them (more than its three parameters), or one repetition level, the penalty is not identified and
    the fit is refused."""
    from scipy.optimize import minimize

    from cptscale.fit.optimizer import BOUNDS, one_blas_thread

    pts = _points(data)
    fixed = {k: float(v) for k, v in (fixed or {}).items()}
    U = float(U)
    if not U > 0:
        raise CLIError(f"unique tokens U must be > 0, not {U}")
    R = repetitions(pts.D, U)
    rep = R > 0
    levels = len(set(np.round(R[rep], 6)))
    if rep.sum() < 4 or levels < 2:
        raise CLIError(f"{int(rep.sum())} points repeat data ({levels} repetition levels) "
                       f"of the {U:.4g} unique tokens: the penalty's P, delta, kappa need >= 4 repeated points (more "
                       "than its 3 parameters) at >= 2 repetition levels")
    delta_h = float(kw.get("delta", 1e-3))
    mean = kw.get("reduction", "sum") == "mean"
    names = ["E", "A", "B", "alpha", "beta", "P", "delta", "kappa"]
    logs = {"E", "A", "B", "P"}
    free = [k for k in names if k not in fixed]
    bounds = [(BOUNDS | PENALTY_BOUNDS)[k] for k in free]
    lN, lL, lR, lNU = np.log(pts.N), np.log(pts.L), np.log(np.where(rep, R, 1.0)), np.log(pts.N / U)
    chin = fit_law(pts, "chinchilla", {k: v for k, v in fixed.items() if k == "E"},
                   **{k: v for k, v in kw.items() if k in ("delta", "reduction", "grid")})

    def unpack(x: np.ndarray) -> dict[str, float]:
        th = dict(zip(free, x, strict=True))
        return {k: (math.exp(th[k]) if k in logs else th[k]) if k in th else fixed[k] for k in names}

    lD = np.log(pts.D)
    scale = 1e4 / (len(lL) if mean else 1)  # the objective rescaled to O(1) for L-BFGS-B's tolerances

    def objective(x: np.ndarray) -> tuple[float, np.ndarray]:
        """The Huber objective and its exact gradient in the free internal coordinates."""
        p = unpack(x)
        terms = {"E": np.full_like(lL, p["E"]), "A": p["A"] * np.exp(-p["alpha"] * lN),
                 "B": p["B"] * np.exp(-p["beta"] * lD),
                 "P": np.where(rep, p["P"] * np.exp(p["delta"] * lR + p["kappa"] * lNU), 0.0)}
        pred = terms["E"] + terms["A"] + terms["B"] + terms["P"]
        r = np.log(pred) - lL
        c = np.clip(r, -delta_h, delta_h)
        f = float(np.sum(c * (r - 0.5 * c)))
        w = c / pred  # dHuber/dpred
        dpred = {"E": terms["E"], "A": terms["A"], "B": terms["B"], "alpha": -terms["A"] * lN,
                 "beta": -terms["B"] * lD, "P": terms["P"], "delta": terms["P"] * lR, "kappa": terms["P"] * lNU}
        return f * scale, np.array([float(w @ dpred[k]) for k in free]) * scale

    chin_starts = (chin.starts if chin.starts is not None else np.empty((0, 0)))[:starts_from]
    starts = []
    for row in chin_starts:
        base = dict(zip([k for k in LAWS["chinchilla"] if k not in chin.fixed], row, strict=True))
        for lp in _PENALTY_STARTS["P"]:
            for dl in _PENALTY_STARTS["delta"]:
                for kp in _PENALTY_STARTS["kappa"]:
                    th = {**base, "P": lp, "delta": dl, "kappa": kp}
                    starts.append([th[k] for k in free])
    lo_b, hi_b = [b[0] for b in bounds], [b[1] for b in bounds]

    def run(x0: Any, ftol: float, maxiter: int) -> Any:
        return minimize(objective, np.clip(x0, lo_b, hi_b), jac=True, method="L-BFGS-B", bounds=bounds,
                        options={"ftol": ftol, "gtol": 1e-10, "maxiter": maxiter})

    with one_blas_thread():  # every start loosely, then the three best ends polished tightly
        rough = sorted((run(x0, 1e-10, 300) for x0 in starts), key=lambda r: r.fun)
        best = min((run(r.x, 1e-15, 3000) for r in rough[:3]), key=lambda r: r.fun, default=None)
    assert best is not None
    params = {k: float(v) for k, v in unpack(best.x).items()} | {"U": U}
    # within 1 % of the box, as identifiability (cptscale.fit.identify.BOUND_TOL) judges the other laws
    on_bound = [k for k, x, (lo, hi) in zip(free, best.x, bounds, strict=True) if min(x - lo, hi - x) <= 0.01 * (hi - lo)]
    fr = FitResult("lovelace", params, {**fixed, "U": U})
    meta = {"law_fitted_on": "Huber on log-loss residuals, all 8 parameters jointly", "unique_tokens": U,
            "n_repeated_points": int(rep.sum()), "max_epochs": float(np.max(pts.D) / U),
            "repetition_levels": levels, "delta": delta_h,
            "reduction": "mean" if mean else "sum", "objective": float(best.fun) / scale,
            "converged": bool(best.success), "message": str(best.message), "on_bound": on_bound,
            "n_starts": len(starts),
            "starts": f"the Chinchilla fit's {len(chin_starts)} best optima x a 3x3x3 grid of (log P, delta, kappa)",
            "bounds": {k: list(b) for k, b in zip(free, bounds, strict=True)},
            "bound_coords": "internal: log E, log A, log B, alpha, beta, log P, delta, kappa",
            **_fit_meta("lovelace", params, pts, delta_h)}
    fr.meta = meta
    return fr
