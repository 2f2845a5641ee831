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
from cptscale.fit.estimate import _fit_meta, _numeric_opt, fit_law
from cptscale.fit.laws import LAWS, R_STAR_D, FitResult, _to_internal, _to_params, effective_data, repetitions
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
    return FitResult("muennighoff", params, fx, meta, starts=best.starts)  # starts: the bootstrap's warm starts


#: Internal coordinates of the overfitting-penalty law: log E, log A, log B, alpha, beta as Chinchilla's,
#: log P, delta, kappa; box bounds as :data:`cptscale.fit.optimizer.BOUNDS` plus the penalty's.
PENALTY_BOUNDS: dict[str, tuple[float, float]] = {"P": (-30.0, 10.0), "delta": (0.0, 5.0), "kappa": (-2.0, 5.0)}
_PENALTY_STARTS = {"P": (-4.0, -2.0, 0.0), "delta": (0.5, 1.0, 2.0), "kappa": (0.0, 0.5, 1.0)}


_PENALTY_NAMES = ["E", "A", "B", "alpha", "beta", "P", "delta", "kappa"]
_PENALTY_LOGS = {"E", "A", "B", "P"}


def _penalty_problem(pts: Points, U: float, fixed: dict[str, float], delta_h: float, mean: bool,
                     w: np.ndarray | None = None) -> tuple[list[str], list[tuple[float, float]], Any, Any, float]:
    """The penalty law's free parameters, their box, ``unpack`` (internal coordinates to parameters), the
    Huber objective with its exact gradient, rescaled to O(1) for L-BFGS-B's tolerances, and that scale;
    ``w``: a weight per point (a bootstrap resample)."""
    from cptscale.fit.optimizer import BOUNDS

    R = repetitions(pts.D, U)
    rep = R > 0
    free = [k for k in _PENALTY_NAMES if k not in fixed]
    bounds = [(BOUNDS | PENALTY_BOUNDS)[k] for k in free]
    lN, lD, lL = np.log(pts.N), np.log(pts.D), np.log(pts.L)
    lR, lNU = np.log(np.where(rep, R, 1.0)), np.log(pts.N / U)
    wt = np.ones_like(lL) if w is None else np.asarray(w, float)
    scale = 1e4 / (len(lL) if mean else 1)

    def unpack(x: np.ndarray) -> dict[str, float]:
        th = dict(zip(free, x, strict=True))
        return {k: (math.exp(th[k]) if k in _PENALTY_LOGS else th[k]) if k in th else fixed[k]
                for k in _PENALTY_NAMES}

    def objective(x: np.ndarray) -> tuple[float, np.ndarray]:
        p = unpack(x)
        terms = {"E": np.full_like(lL, p["E"]), "A": p["A"] * np.exp(-p["alpha"] * lN),
                 "B": p["B"] * np.exp(-p["beta"] * lD),
                 "P": np.where(rep, p["P"] * np.exp(p["delta"] * lR + p["kappa"] * lNU), 0.0)}
        pred = terms["E"] + terms["A"] + terms["B"] + terms["P"]
        r = np.log(pred) - lL
        c = np.clip(r, -delta_h, delta_h)
        f = float(np.sum(wt * c * (r - 0.5 * c)))
        g = wt * c / pred  # dHuber/dpred
        dpred = {"E": terms["E"], "A": terms["A"], "B": terms["B"], "alpha": -terms["A"] * lN,
                 "beta": -terms["B"] * lD, "P": terms["P"], "delta": terms["P"] * lR, "kappa": terms["P"] * lNU}
        return f * scale, np.array([float(g @ dpred[k]) for k in free]) * scale

    return free, bounds, unpack, objective, scale


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

    from cptscale.fit.optimizer import one_blas_thread

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
    free, bounds, unpack, objective, scale = _penalty_problem(pts, U, fixed, delta_h, mean)
    chin = fit_law(pts, "chinchilla", {k: v for k, v in fixed.items() if k == "E"},
                   **{k: v for k, v in kw.items() if k in ("delta", "reduction", "grid")})

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
    fr = FitResult("lovelace", params, {**fixed, "U": U}, starts=best.x[None])
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


#: The profile grid of R_D (:func:`fit_data_constrained`'s default ``r_grid``) as a box for identifiability:
#: an R_D at its top end means repetition costs nothing measurable, at its bottom end that it costs more
#: than the law's form can say. The penalty law's own parameters use their fitting box.
CONSTRAINED_BOUNDS: dict[str, dict[str, tuple[float, float, bool]]] = {
    "muennighoff": {"R_D": (0.0, math.log(100.0), True)},
    "lovelace": {"P": (*PENALTY_BOUNDS["P"], True), "delta": (*PENALTY_BOUNDS["delta"], False),
                 "kappa": (*PENALTY_BOUNDS["kappa"], False)},
}

#: R_D values each bootstrap resample of the effective-data law is profiled over (plus the fit's own R_D)
_BOOT_R_GRID = tuple(np.geomspace(1.0, 100.0, 13))


def _profile_vertex(u: np.ndarray, prof: np.ndarray, at_grid: np.ndarray) -> np.ndarray:
    """Per row of ``prof`` (objective at each grid coordinate ``u``, here log R_D): the vertex of the parabola
    through its best grid point and the two beside it, within them; the grid value itself at an end of the
    grid or where the three do not curve upwards. Without it a resample's R_D could only take grid values,
    and its interval had the grid's resolution (a factor 1.47), not the data's."""
    out = at_grid.copy()
    for b in np.flatnonzero(np.isfinite(prof).any(axis=1)):
        i = int(np.argmin(prof[b]))
        if not 0 < i < len(u) - 1 or not np.all(np.isfinite(prof[b, i - 1 : i + 2])):
            continue
        (x0, x1, x2), (y0, y1, y2) = u[i - 1 : i + 2], prof[b, i - 1 : i + 2]
        den = (x0 - x1) * (x0 - x2) * (x1 - x2)
        a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / den
        bb = (x2**2 * (y0 - y1) + x1**2 * (y2 - y0) + x0**2 * (y1 - y2)) / den
        if a > 0:
            out[b] = math.exp(min(max(-bb / (2 * a), x0), x2))
    return out


def _refit_resamples(pts: Points, fr: FitResult, W: np.ndarray, LL: np.ndarray | None, kw: dict[str, Any],
                     fixed_samples: dict[str, np.ndarray] | None) -> tuple[dict[str, np.ndarray], str]:
    """The law refitted on every row of ``W`` (point weights: a resample, or a leave-one-run-out mask), with
    ``LL`` per-row log losses (the wild schemes' redrawn observations) or the observed ones: each row's
    parameters (NaN where it has none) and how they were fitted."""
    from scipy.optimize import minimize

    from cptscale.fit.optimizer import _obj, one_blas_thread
    from cptscale.fit.uncertainty import _refit_batch, _usable_resamples

    n = len(W)
    delta = float(kw.get("delta", 1e-3))
    reduction = kw.get("reduction", "sum")
    names = LAWS["chinchilla"]
    keys = [*names, "R_D"] if fr.law == "muennighoff" else list(_PENALTY_NAMES)
    samples = {k: np.full(n, np.nan) for k in keys}
    fixed_draw = {k: np.asarray(v, float)[:n] for k, v in (fixed_samples or {}).items()}
    U = fr.params["U"]
    if fr.law == "muennighoff":
        chin_fixed = {k: v for k, v in fr.fixed.items() if k in names}
        rs = [fr.params["R_D"]] if "R_D" in fr.fixed or not fr.meta.get("n_repeated_points") else \
            sorted({*map(float, _BOOT_R_GRID), float(fr.params["R_D"])})
        free = [i for i, k in enumerate(names) if k not in chin_fixed]
        best_f = np.full(n, np.inf)
        prof = np.full((n, len(rs)), np.inf)  # each row's objective at every R_D of the grid
        for j, r in enumerate(rs):
            pr = Points(pts.N, effective_data(pts.D, U, r), pts.L, pts.run, pts.index)
            fr_r = fit_law(pr, "chinchilla", chin_fixed, init=fr.starts, **kw)  # this R_D's full-data optima
            base = np.array([_to_internal(k, fr_r.params[k]) for k in names])
            ok, fixed_b = _usable_resamples(pr, fr_r, W, base, fixed_samples)
            bidx = np.flatnonzero(ok)
            if not len(bidx):
                continue
            starts = fr_r.starts if fr_r.starts is not None else base[free][None]
            fitted, _ = _refit_batch(pr, fixed_b, bidx, free, starts, W, delta, reduction, 1.0, LL)
            th = np.array([t for _, t in fitted])
            f = _obj(th, np.log(pr.N), np.log(pr.D), np.log(pr.L), delta, reduction, W=W[bidx],
                     lLr=None if LL is None else LL[bidx])[0]
            for (b, t), fb in zip(fitted, f, strict=True):
                prof[b, j] = fb
                if fb < best_f[b]:
                    best_f[b] = fb
                    p = _to_params(t, names)
                    for k in names:
                        samples[k][b] = p[k]
                    samples["R_D"][b] = r
        samples["R_D"] = _profile_vertex(np.log(rs), prof, samples["R_D"])
        how = (f"each resample profiled over R_D ({len(rs)} values from {min(rs):.3g} to {max(rs):.3g}), a warm "
               "batched Chinchilla refit at each; its R_D the vertex of a parabola in log R_D through the best "
               "grid value and its neighbours, the other parameters those of the best grid value")
    else:
        x0 = fr.starts[0] if fr.starts is not None else None
        mean = reduction == "mean"
        frozen = {k: float(v) for k, v in fr.fixed.items() if k != "U"}
        with one_blas_thread():
            for b in range(n):
                fx = {**frozen, **{k: float(v[b]) for k, v in fixed_draw.items()}}
                if not all(math.isfinite(v) for v in fx.values()) or x0 is None:
                    continue
                pb = pts if LL is None else Points(pts.N, pts.D, np.exp(LL[b]), pts.run, pts.index)
                _, bounds, unpack, objective, _ = _penalty_problem(pb, U, fx, delta, mean, W[b])
                res = minimize(objective, np.clip(x0, [lo for lo, _ in bounds], [hi for _, hi in bounds]), jac=True,
                               method="L-BFGS-B", bounds=bounds, options={"ftol": 1e-15, "gtol": 1e-10,
                                                                           "maxiter": 3000})
                for k, v in unpack(res.x).items():
                    samples[k][b] = v
        how = "one L-BFGS-B per resample from the full-data optimum"
    return samples, how


def _loro_residuals(pts: Points, fr: FitResult, kw: dict[str, Any]) -> tuple[np.ndarray, int]:
    """Each run's log-loss residuals from the law refitted without that run (the exact cluster jackknife,
    as :func:`cptscale.fit.uncertainty.leave_one_run_out_residuals` does for the unique-data laws), and how
    many runs fell back to the full fit's residuals (their refit failed)."""
    from cptscale.fit.uncertainty import leave_one_run_out_weights

    R, codes, W = leave_one_run_out_weights(pts.run)
    loro, _ = _refit_resamples(pts, fr, W, None, kw, None)
    out = np.log(pts.L) - np.log(fr.predict(pts.N, pts.D))
    failed = 0
    for g in range(R):
        vals = {k: float(v[g]) for k, v in loro.items()}
        if not all(math.isfinite(v) for v in vals.values()):
            failed += 1
            continue
        idx = codes == g
        out[idx] = np.log(pts.L[idx]) - np.log(FitResult(fr.law, {**fr.params, **vals}).predict(pts.N[idx], pts.D[idx]))
    return out, failed


def bootstrap_constrained(pts: Points, fr: FitResult, n: int, seed: int, scheme: str, kw: dict[str, Any],
                          fixed_samples: dict[str, np.ndarray] | None = None,
                          pair_with: dict[str, Any] | None = None, budgets: Sequence[float] = ()) -> dict[str, Any]:
    """Bootstrap over runs for a data-constrained law (``fr``: :func:`fit_data_constrained` or
    :func:`fit_overfit_penalty`), so its exponents and repetition constants get intervals like the other
    laws'. ``scheme`` as the unique-data laws': runs reweighted (pairs counts, the Bayesian bootstrap's
    Exp(1) weights), or the design kept and each run's log-loss residuals multiplied by one random sign per
    run and resample (``wild``: the fit's residuals; ``wildjk``: each run's residuals from the law refitted
    without it; ``wild3``'s hat-matrix correction is the unique-data laws', so it runs as ``wildjk`` here).
    The effective-data law: each resample profiled over R_D on a 13-point log grid from 1 to 100 plus the
    fit's own R_D, a warm-started batched Chinchilla refit at each (resolution: a factor 1.47 in R_D). The
    penalty law: one L-BFGS-B per resample from the full-data optimum. ``fixed_samples``: per-resample
    values of a frozen E (its source's draws, paired by size through ``pair_with``). ``budgets``: each
    resample's numeric compute-optimal N, D and loss there (the laws' only allocation: it charges for
    repetition), for the allocation's intervals."""
    from cptscale.fit.uncertainty import _LEVEL, SCHEME_TEXT, _interval, resample_draws

    used = "wildjk" if scheme == "wild3" else scheme
    codes, run_draws, pairing = resample_draws(pts, n, seed, used, pair_with)
    draws = run_draws["draws"]
    LL, loro_failed = None, 0
    if used in ("pairs", "bayes"):
        W = draws[:, codes]
    else:  # the design stays: every point once, the observations redrawn around the fit
        lpred = np.log(fr.predict(pts.N, pts.D))
        if used == "wildjk":
            resid, loro_failed = _loro_residuals(pts, fr, kw)
        else:
            resid = np.log(pts.L) - lpred
        LL = lpred + draws[:, codes] * resid
        W = np.ones((n, len(pts.N)))
    samples, how = _refit_resamples(pts, fr, W, LL, kw, fixed_samples)
    keys = list(samples)  # the law's parameters (a is added below)
    ok = np.isfinite(samples["alpha"])
    alloc = {float(C): {k: np.full(n, np.nan) for k in ("N_opt", "D_opt", "predicted_loss")} for C in budgets}
    for b in np.flatnonzero(ok) if budgets else ():
        law_b = FitResult(fr.law, {**fr.params, **{k: float(samples[k][b]) for k in keys}})
        for C, dct in alloc.items():
            opt = _numeric_opt(law_b, C)
            dct["N_opt"][b], dct["D_opt"][b], dct["predicted_loss"][b] = opt["N"], opt["D"], opt["loss"]
    s_ab = samples["alpha"] + samples["beta"]
    samples["a"] = np.where(ok & (s_ab > 0), samples["beta"] / np.where(s_ab > 0, s_ab, 1.0), np.nan)
    note = "" if used == scheme else f" ({scheme} asked: its hat-matrix correction is the unique-data laws')"
    if loro_failed:
        note += f"; {loro_failed} run(s) kept the full fit's residuals (their leave-one-out refit failed)"
    return {"samples": samples, "intervals": {k: _interval(v, _LEVEL) for k, v in samples.items()},
            "alloc": alloc, "run_draws": run_draws,
            "info": {"n_requested": n, "n_ok": int(ok.sum()), "n_degenerate": int((~ok).sum()), "unit": "run",
                     "n_runs": draws.shape[1], "seed": seed, "level": _LEVEL,
                     "method": "percentile", "scheme": SCHEME_TEXT[used] + note,
                     "refit": how, "loss": "huber",
                     "frozen": (f"{', '.join(fixed_samples)} resampled with their source" if fixed_samples
                                else "held at the fit's values"),
                     "resampled": list(fixed_samples or ()), **pairing}}
