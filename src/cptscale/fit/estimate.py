"""Fitting each law: Chinchilla and extended CPT laws (Huber grid recipe or Huber NLL), loss-compute envelope,
Hernandez transfer law, IsoFLOP cross-check, exponents and compute-optimal allocation.

Loss laws (Hoffmann et al. 2022 App. D.2, Besiroglu et al. 2024, Zheng et al. 2024 §3.3): log-sum-exp
parameterisation ``log L̂ = LSE(a − α·log N, b − β·log D [− γ·log N], e)``, Huber loss (δ = 1e-3) on
log-loss residuals, **summed** over points, L-BFGS with analytic gradients from every start of a grid
(Chinchilla: 4,500 starts), best result kept. Any parameter can be frozen. The best few distinct optima
are then polished with scipy's L-BFGS-B (objective rescaled to O(1), so its absolute tolerances act as
relative ones: averaged Huber losses with scipy's defaults stop early, as Besiroglu et al. found).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from cptscale.errors import CLIError
from cptscale.fit.laws import (
    DATA_CONSTRAINED,
    GRIDS,
    HOFFMANN_START,
    LAWS,
    LINEAR_LAWS,
    LOSSES,
    R_STAR_D,
    FitResult,
    _check_law,
    _grid,
    _min_sizes,
    _to_internal,
    _to_params,
    effective_data,
)
from cptscale.fit.optimizer import BOUNDS, _distinct, _obj, _Prep, _run_batch, one_blas_thread
from cptscale.fit.points import Points, _points


def _grid_spec(law: str, grid: str, fixed: dict[str, float], starts: np.ndarray) -> dict[str, Any]:
    """What a fit record stores about its starts: the grid's values per parameter (internal coordinates;
    frozen parameters collapse to their value) and a hash of the start matrix, not just the grid's name."""
    from cptscale.util import stable_hash

    names = LAWS[law]
    return {"name": grid, "coords": "internal: log E, log A, log B, alpha, beta, gamma",
            "values": {k: [_finite_or_none(_to_internal(k, fixed[k]))] if k in fixed
                       else [float(v) for v in GRIDS[grid][k]] for k in names},
            "frozen": sorted(fixed), "n_starts": len(starts),
            "hash": stable_hash(np.nan_to_num(np.round(starts, 12), neginf=-1e300).tolist())}


def _finite_or_none(x: float) -> float | None:
    """JSON has no infinities: the reduced law's log E = -inf is recorded as null."""
    return float(x) if math.isfinite(x) else None


def _fit_meta(law: str, params: dict[str, float], pts: Points, delta: float) -> dict[str, Any]:
    """The part of a loss-law fit's metadata that does not depend on the loss function: goodness of fit
    (Huber sum and mean at ``delta``, RMSE of log loss), the data and what was excluded."""
    from cptscale.util import stable_hash

    resid = np.log(pts.L) - np.log(FitResult(law, params).predict(pts.N, pts.D))
    hub = np.where(np.abs(resid) <= delta, 0.5 * resid**2, delta * (np.abs(resid) - 0.5 * delta))
    return {
        "huber_sum": float(hub.sum()), "huber_mean": float(hub.mean()),
        "rmse_log": float(np.sqrt(np.mean(resid**2))), "mae_log": float(np.mean(np.abs(resid))),
        "n_points": len(pts.N), "n_runs": len(set(pts.run)), "sizes": pts.sizes,
        "data_range": {"N": [float(pts.N.min()), float(pts.N.max())], "D": [float(pts.D.min()), float(pts.D.max())],
                       "C": [float((6 * pts.N * pts.D).min()), float((6 * pts.N * pts.D).max())]},
        "excluded": pts.excluded, "excluded_points": pts.excluded_points,
        "input_hash": stable_hash([pts.N.tolist(), pts.D.tolist(), pts.L.tolist()]),
    }


def _check_fit_options(law: str, loss: str, reduction: str, delta: float, overestimate_penalty: float) -> None:
    """Refuse an unknown law, loss or reduction and a non-positive delta or penalty, naming the option."""
    if law not in LAWS:
        raise CLIError(f"unknown law {law!r}; choose one of {list(LAWS)}")
    if loss not in LOSSES:
        raise CLIError(f"unknown loss {loss!r}; choose one of {list(LOSSES)}")
    if reduction not in ("sum", "mean"):
        raise CLIError(f"reduction must be 'sum' or 'mean', not {reduction!r}")
    if not delta > 0:
        raise CLIError(f"Huber delta must be > 0, not {delta}")
    if not overestimate_penalty > 0:
        raise CLIError(f"overestimate_penalty must be > 0, not {overestimate_penalty}")


def _check_design(pts: Points, law: str, fixed: dict[str, float], free: list[int]) -> None:
    """Refuse data that cannot identify the law's free parameters (too few points or sizes), saying what helps."""
    names = LAWS[law]
    if not free:
        raise CLIError(f"every parameter of {law!r} is frozen; nothing to fit")
    if len(pts.N) < len(free):
        raise CLIError(f"{len(pts.N)} points but {len(free)} free parameters; need at least as many points")
    need = _min_sizes(law, fixed)
    if len(pts.sizes) < need:
        raise CLIError(f"{len(pts.sizes)} distinct model size(s) (N = {', '.join(f'{n:.4g}' for n in pts.sizes)}): "
                   f"the {law} law with {', '.join(k for k in names if k not in fixed)} free needs >= {need} sizes "
                   "to separate the N term from E; add runs of other sizes or freeze E, A and alpha (--fixed)")


def _polish(starts: np.ndarray, res: dict[str, np.ndarray], top: Sequence[int], free: list[int],
            bounds: tuple[np.ndarray, np.ndarray], logs: tuple[np.ndarray, np.ndarray, np.ndarray], delta: float,
            reduction: str, asym: float) -> tuple[float, np.ndarray, int, bool, str]:
    """scipy L-BFGS-B from each of the ``top`` vectorised optima (objective rescaled to O(1)); the best result
    as (objective, free coordinates, start index, converged, message), keeping a vectorised optimum that
    polishing made worse."""
    from scipy.optimize import minimize

    lN, lD, lL = logs
    lo, hi = bounds
    scale = 1.0 / max(float(np.min(res["f"])), 1e-300)
    prep = _Prep(lN, lD, lL)
    best: tuple[float, np.ndarray, int, bool, str] | None = None
    for i in top:
        th = starts[i].copy()

        def fun(x: np.ndarray, th: np.ndarray = th) -> tuple[float, np.ndarray]:
            th[free] = x
            f, g = _obj(th[None], lN, lD, lL, delta, reduction, prep=prep, asym=asym)
            return float(f[0]) * scale, g[0, free] * scale

        r = minimize(fun, res["x"][i], jac=True, method="L-BFGS-B", bounds=list(zip(lo, hi, strict=True)),
                     options={"maxiter": 10000, "maxfun": 20000, "ftol": 1e-15, "gtol": 1e-12, "maxls": 50})
        cand = (r.fun / scale, r.x, i, bool(r.success), str(r.message)) if r.fun / scale <= res["f"][i] else \
            (float(res["f"][i]), res["x"][i], i, bool(res["status"][i] in (1, 2)), "vectorised L-BFGS")
        if best is None or cand[0] < best[0]:
            best = cand
    assert best is not None
    return best


def _grid_edge(res: dict[str, np.ndarray], fobj: float, i0: int, starts: np.ndarray, th: np.ndarray,
               free: list[int], names: Sequence[str], grid: str,
               warm: bool) -> tuple[np.ndarray, list[str], list[str]]:
    """The basin (starts that reached the optimum, objective within 1e-6 relative), the parameters whose every
    basin start lies on the grid's edge (the grid may be too narrow there; Hoffmann et al. check "the optimal
    initialisation is not on the boundary") and those whose optimum lies outside the grid's span."""
    basin = res["f"] <= fobj * (1 + 1e-6) + 1e-300
    if not basin.any():
        basin[i0] = True
    edge, outside = [], []
    for j in free:
        ax = GRIDS[grid][names[j]]
        if not warm and len(ax) > 1 and np.all(np.isin(starts[basin, j], (min(ax), max(ax)))):
            edge.append(names[j])
        if not min(ax) <= th[j] <= max(ax):
            outside.append(names[j])
    return basin, edge, outside


def _optimum_checks(th: np.ndarray, free: list[int], names: Sequence[str], bounds: tuple[np.ndarray, np.ndarray],
                    logs: tuple[np.ndarray, np.ndarray, np.ndarray], delta: float, reduction: str, asym: float,
                    success: bool, message: str) -> dict[str, Any]:
    """The fit record's checks of the optimum ``th``: objective, convergence, gradient and projected-gradient
    norms (a bound that the gradient pushes against does not count) and the parameters on a bound."""
    lN, lD, lL = logs
    lo, hi = bounds
    x = th[free]
    f1, g1 = _obj(th[None], lN, lD, lL, delta, reduction, asym=asym)
    gfree = g1[0, free]
    at_lo, at_hi = np.abs(x - lo) < 1e-7, np.abs(x - hi) < 1e-7
    pg = np.where((at_lo & (gfree > 0)) | (at_hi & (gfree < 0)), 0.0, gfree)
    return {"objective": float(f1[0]), "converged": bool(success), "message": message,
            "grad_norm": float(np.linalg.norm(gfree)), "proj_grad_norm": float(np.linalg.norm(pg)),
            "on_bound": [names[j] for j, b in zip(free, at_lo | at_hi, strict=True) if b]}


def fit_law(data: Any, law: str = "chinchilla", fixed: dict[str, float] | None = None,
            exclude: Sequence[Any] | None = None, delta: float = 1e-3, reduction: str = "sum",
            grid: str = "chinchilla", polish: int = 3, loss: str = "huber",
            overestimate_penalty: float = 1.0, init: np.ndarray | None = None) -> FitResult:
    """Fit a loss law. ``loss="huber"`` (default): vectorised L-BFGS from every grid start, then scipy
    L-BFGS-B on the best distinct optima. ``loss="huber-nll"``: Besiroglu et al.'s published-table recipe
    (:func:`_fit_huber_nll`; ``grid`` and ``reduction`` do not apply and are recorded as such)."""
    t0 = time.perf_counter()
    _check_fit_options(law, loss, reduction, delta, overestimate_penalty)
    names = LAWS[law]
    fixed = {k: float(v) for k, v in (fixed or {}).items()}
    _check_law(law, fixed, names)
    pts = _points(data, exclude)
    free = [i for i, k in enumerate(names) if k not in fixed]
    _check_design(pts, law, fixed, free)
    if loss == "huber-nll":
        return _fit_huber_nll(pts, law, fixed, delta, t0)
    lN, lD, lL = np.log(pts.N), np.log(pts.D), np.log(pts.L)
    starts = _grid(law, grid, fixed)
    if init is not None:  # warm starts (free coordinates) instead of the grid, e.g. a neighbouring fit's optima
        starts = np.repeat(starts[:1], len(init), axis=0)
        starts[:, free] = np.asarray(init, float).reshape(len(init), len(free))
    asym = float(overestimate_penalty)
    res = _run_batch(starts, free, lN, lD, lL, delta, reduction, asym=asym, maxiter=2000, ftol=1e-9)
    top = _distinct(res["x"], res["f"], polish)
    lo = np.array([BOUNDS[names[i]][0] for i in free])
    hi = np.array([BOUNDS[names[i]][1] for i in free])
    with one_blas_thread():
        fobj, x, i0, success, message = _polish(starts, res, top, free, (lo, hi), (lN, lD, lL), delta, reduction,
                                                asym)
    th = starts[i0].copy()
    th[free] = x
    params = _to_params(th, names)
    basin, edge, outside = _grid_edge(res, fobj, i0, starts, th, free, names, grid, init is not None)
    meta = {
        "loss": "huber", "loss_description": "Huber(delta) on log-loss residuals log L_hat - log L",
        "delta": delta, "reduction": reduction, "overestimate_penalty": asym,
        "optimizer": "vectorised L-BFGS (numpy; m=10, projected Armijo backtracking; stop at |pg|<=1e-12 or "
                     "relative decrease <=1e-9) from every grid start, then scipy L-BFGS-B (objective "
                     f"rescaled to O(1), ftol=1e-15, gtol=1e-12) on the {len(top)} best distinct optima",
        "grid": grid if init is None else "warm",
        "grid_spec": _grid_spec(law, grid, fixed, starts) if init is None else
        {"name": "warm", "n_starts": len(starts), "note": "warm starts from a neighbouring fit's optima"},
        "n_starts": len(starts),
        "n_polished": len(top),
        **_optimum_checks(th, free, names, (lo, hi), (lN, lD, lL), delta, reduction, asym, success, message),
        "bounds": {k: list(BOUNDS[k]) for k in names if k not in fixed},
        "bound_coords": "internal: log E, log A, log B, alpha, beta, gamma",
        "grid_edge": {"best_start": _to_params(starts[i0], names), "params_on_grid_edge": edge,
                      "optimum_outside_grid_span": outside,
                      "rule": "params_on_grid_edge: every start reaching the optimum (objective within 1e-6 "
                              "relative) starts on that parameter's grid edge"},
        "basin_share": float(basin.mean()),
        "vectorised": {"converged_share": float(np.mean(np.isin(res["status"], (1, 2)))),
                       "max_iterations": int(res["nit"].max()), "line_search_failures": int(np.sum(res["status"] == 3))},
        **_fit_meta(law, params, pts, delta),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return FitResult(law, params, fixed, meta, starts=np.vstack([x[None], res["x"][top]]))


def _huber_log_norm(delta: float) -> float:
    """log of the normalising constant of the unit-scale Huber density exp(-Huber_delta(x)):
    sqrt(2 pi)·erf(delta/sqrt 2) (the quadratic core) + 2·exp(-delta²/2)/delta (the two exponential tails)."""
    from scipy.special import erf

    return math.log(math.sqrt(2 * math.pi) * erf(delta / math.sqrt(2)) + 2 * math.exp(-0.5 * delta**2) / delta)


def _huber_nll(z: np.ndarray, th: np.ndarray, free: list[int], prep: _Prep, delta: float,
               w: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """Negative log-likelihood of log L under a Huber density centred on the law's log prediction with
    scale exp(sigma), and its exact gradient. ``z`` = (free law parameters in internal coordinates...,
    sigma); ``th`` holds the frozen ones; ``w`` are point weights (bootstrap counts)."""
    th = th.copy()
    th[free] = z[:-1]
    sig = z[-1]
    w1 = math.exp(th[0])
    w2 = np.exp(th[1] - th[3] * prep.lN)
    w3 = np.exp(th[2] - th[4] * prep.lD - (th[5] * prep.lN if len(th) == 6 else 0.0))
    tot = w1 + w2 + w3
    x = (np.log(tot) - prep.lL) * math.exp(-sig)
    psi = np.clip(x, -delta, delta)  # Huber'(x)
    hub = psi * (x - 0.5 * psi)
    ww = np.ones_like(x) if w is None else w
    f = float(ww @ hub) + float(ww.sum()) * (_huber_log_norm(delta) + sig)
    c = ww * psi * math.exp(-sig) / tot  # d f / d log-sum-exp argument, per point
    g = np.zeros(len(th))
    g[0] = w1 * c.sum()
    g[1], g[3] = (w2 * c).sum(), -(w2 * c) @ prep.lN
    g[2], g[4] = (w3 * c).sum(), -(w3 * c) @ prep.lD
    if len(th) == 6:
        g[5] = -(w3 * c) @ prep.lN
    gs = float(ww.sum() - ww @ (psi * x))
    return f, np.r_[g[free], gs]


def _nll_minimize(th0: np.ndarray, free: list[int], sigma0: float, prep: _Prep, delta: float,
                  w: np.ndarray | None = None) -> Any:
    """scipy BFGS (default options, exact gradient) from one start, as Besiroglu et al. ran it."""
    from scipy.optimize import minimize

    return minimize(_huber_nll, np.r_[th0[free], sigma0], args=(th0, free, prep, delta, w), jac=True, method="BFGS")


def _fit_huber_nll(pts: Points, law: str, fixed: dict[str, float], delta: float, t0: float) -> FitResult:
    """Besiroglu et al.'s published-table recipe (the data README of the Chinchilla fixture): minimise the
    Huber negative log-likelihood over the law's parameters and a free log-scale sigma with BFGS from one
    start, Hoffmann et al.'s estimates (``HOFFMANN_START``) and sigma0 = 0. Sigma runs to ~e^-12, far
    below delta, so every residual sits in the Huber tails: in effect a least-absolute-deviation fit of
    log L (which is why it differs from the summed-Huber grid fit by ~1 % in A and ~3 % in B)."""
    names = LAWS[law]
    free = [i for i, k in enumerate(names) if k not in fixed]
    th0 = np.array([_to_internal(k, fixed[k]) if k in fixed else HOFFMANN_START[k] for k in names])
    prep = _Prep(np.log(pts.N), np.log(pts.D), np.log(pts.L))
    r = _nll_minimize(th0, free, 0.0, prep, delta)
    th = th0.copy()
    th[free] = r.x[:-1]
    params = _to_params(th, names)
    f, g = _huber_nll(r.x, th0, free, prep, delta)
    start = {k: float(th0[i]) for i, k in enumerate(names)}
    meta = {
        "loss": "huber-nll",
        "loss_description": "negative log-likelihood of log L under a Huber(delta) density with location "
                            "log L_hat and free scale exp(sigma) (Besiroglu et al. 2024, published table)",
        "delta": delta, "reduction": "sum", "sigma": float(r.x[-1]), "scale": math.exp(float(r.x[-1])),
        "optimizer": "scipy BFGS (default options: gtol=1e-5, norm=inf) with the exact gradient over the law's "
                     "free parameters (internal coordinates) and sigma, from one start",
        "grid": "hoffmann-start",
        "grid_spec": {"name": "hoffmann-start", "coords": "internal: log E, log A, log B, alpha, beta, gamma",
                      "values": {k: [v] for k, v in start.items()}, "sigma0": 0.0, "frozen": sorted(fixed),
                      "n_starts": 1,
                      "source": "Hoffmann et al. 2022 unrounded estimates (a, b, e, alpha, beta) = (6.0073404, "
                                "6.0179186, 0.5267228, 0.33917084, 0.2849083)"},
        "n_starts": 1, "n_polished": 0, "objective": f, "converged": bool(r.success), "message": str(r.message),
        "iterations": int(r.nit), "grad_norm": float(np.linalg.norm(g[:-1])), "grad_sigma": float(g[-1]),
        "proj_grad_norm": float(np.linalg.norm(g[:-1])), "on_bound": [], "bounds": None,
        "grid_edge": {"best_start": _to_params(th0, names), "params_on_grid_edge": [],
                      "optimum_outside_grid_span": [], "rule": "one start: no grid"},
        **_fit_meta(law, params, pts, delta),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return FitResult(law, params, fixed, meta, starts=np.r_[r.x][None])


_LOG_FLOAT_MAX = 700.0  # exp(709) is the largest float


def _no_closed_form(reason: str) -> dict[str, Any]:
    return {"a": None, "b": None, "G": None, "valid": False, "reason": reason}


def exponents(fit: FitResult) -> dict[str, Any]:
    """Closed-form allocation under C = 6ND: N_opt = G (C/6)^a, D_opt = (C/6)^b / G (study-design §3.1, §3.2)."""
    p = fit.params
    if fit.law in DATA_CONSTRAINED:
        return _no_closed_form("data-constrained law: no closed form; the allocation is the numeric optimum")
    A, B, al, be, ga = p["A"], p["B"], p["alpha"], p["beta"], p.get("gamma", 0.0)
    s = al + be - ga
    if not (be - ga > 0 and s > 0 and al > 0):
        return _no_closed_form(f"no interior optimum: needs alpha > 0, beta - gamma > 0, alpha + beta - gamma > 0 "
                               f"(alpha={al:.4g}, beta={be:.4g}, gamma={ga:.4g})")
    log_g = (math.log(al * A) - math.log((be - ga) * B)) / s  # in logs: a tiny s overflows the power
    if not abs(log_g) < _LOG_FLOAT_MAX:
        return _no_closed_form(f"G = exp({log_g:.4g}) is outside the float range: a degenerate law "
                               f"(alpha + beta - gamma = {s:.4g})")
    return {"a": be / s, "b": (al - ga) / s, "G": math.exp(log_g), "valid": True, "reason": None}


def optimal_n(ex: dict[str, Any], C: float) -> float | None:
    """N_opt = G (C/6)^a of valid :func:`exponents`, or None when it leaves the float range (an exponent a
    far from 1/2, as a bootstrap resample of a barely identified law can give)."""
    log_n = math.log(ex["G"]) + ex["a"] * math.log(C / 6)
    return math.exp(log_n) if abs(log_n) < _LOG_FLOAT_MAX else None


def _numeric_opt(fit: FitResult, C: float) -> dict[str, Any]:
    """Minimise L(N, C/6N) over log N (bounded Brent): the cross-check of the closed form."""
    from scipy.optimize import minimize_scalar

    hi = math.log(C / 6)
    r = minimize_scalar(lambda u: float(fit.predict(math.exp(u), C / (6 * math.exp(u)))), bounds=(0.0, hi),
                        method="bounded", options={"xatol": 1e-10, "maxiter": 500})
    n = math.exp(r.x)
    return {"N": n, "D": C / (6 * n), "loss": float(r.fun), "on_bound": bool(r.x < 1e-6 or r.x > hi - 1e-6)}


def allocate(fit: FitResult, budgets: Sequence[float], numeric: bool = True,
             unique_tokens: float | None = None) -> list[dict[str, Any]]:
    """Compute-optimal N, D and predicted loss per budget: closed form, cross-checked by numeric minimisation
    (the data-constrained law has only the numeric optimum, which already charges for repetition).

    With ``unique_tokens`` U, a row whose D_opt exceeds U says so (``epochs``, ``warning``: what the
    repetition costs, by Muennighoff et al.'s effective data, their R*_D unless the law fitted its own)
    and gives the optimum that stays within U (``*_capped``): never more tokens than exist without the
    warning."""
    ex = exponents(fit)
    out = []
    for C in budgets:
        C = float(C)
        row: dict[str, Any] = {"C": C, "a": ex["a"], "b": ex["b"], "G": ex["G"]}
        nm = _numeric_opt(fit, C) if numeric or not ex["valid"] else None
        n = optimal_n(ex, C) if ex["valid"] else None
        if n is not None:
            d = C / (6 * n)
            row.update(N_opt=n, D_opt=d, predicted_loss=float(fit.predict(n, d)), tokens_per_param=d / n)
        elif fit.law in DATA_CONSTRAINED and nm is not None:
            row.update(N_opt=nm["N"], D_opt=nm["D"], predicted_loss=nm["loss"], tokens_per_param=nm["D"] / nm["N"])
        else:
            row.update(N_opt=None, D_opt=None, predicted_loss=None, tokens_per_param=None,
                       reason=ex["reason"] or f"N_opt = G (C/6)^a is outside the float range (a = {ex['a']:.4g})")
        if nm is not None:
            row.update(N_opt_numeric=nm["N"], D_opt_numeric=nm["D"], predicted_loss_numeric=nm["loss"],
                       numeric_on_bound=nm["on_bound"],
                       numeric_rel_diff=abs(nm["N"] / row["N_opt"] - 1) if row.get("N_opt") else None)
        if unique_tokens and row.get("D_opt") is not None:
            row.update(_unique_cap(fit, C, row["N_opt"], row["D_opt"], float(unique_tokens)))
        out.append(row)
    return out


def _unique_cap(fit: FitResult, C: float, n: float, d: float, U: float) -> dict[str, Any]:
    """What a unique-token cap U means for an allocation (N, D) at budget C (see :func:`allocate`)."""
    out: dict[str, Any] = {"unique_tokens": U, "epochs": d / U, "within_unique_tokens": d <= U}
    if d <= U:
        return out
    r_star = fit.params.get("R_D", R_STAR_D)
    if fit.law in DATA_CONSTRAINED:
        unique_fit = FitResult("chinchilla", {k: fit.params[k] for k in LAWS["chinchilla"]})
        cost = float(fit.predict(n, d)) - float(unique_fit.predict(n, d))
    else:
        cost = float(fit.predict(n, effective_data(d, U, r_star))) - float(fit.predict(n, d))
    n_cap = C / (6 * U)
    out.update(
        warning=f"D_opt = {d:.4g} tokens needs {d / U:.2f} epochs of the {U:.4g} unique tokens; repeating them "
                f"costs {cost:.4f} nats at this allocation (" + (
                    "the fitted overfitting penalty of Lovelace et al. 2026)" if fit.law == "lovelace" else
                    f"effective data D' of Muennighoff et al. 2023, R*_D = {r_star:.4g})"), repetition_cost=cost,
        N_capped=n_cap, D_capped=U, predicted_loss_capped=float(fit.predict(n_cap, U)))
    return out



def _linfit(X: np.ndarray, y: np.ndarray, names: list[str], fixed: dict[str, float],
            w: np.ndarray | None = None) -> np.ndarray:
    """Weighted least squares y ≈ X θ with frozen coefficients moved to the left-hand side."""
    th = np.zeros(len(names))
    free = [i for i, k in enumerate(names) if k not in fixed]
    for i, k in enumerate(names):
        if k in fixed:
            th[i] = math.log(fixed[k]) if k == "k" else fixed[k]
    yy = y - X @ th
    sw = np.sqrt(w) if w is not None else np.ones(len(y))
    sol, *_ = np.linalg.lstsq(X[:, free] * sw[:, None], yy * sw, rcond=None)
    th[free] = sol
    return th


def _lin_params(th: np.ndarray, names: list[str]) -> dict[str, float]:
    return {k: float(math.exp(th[i]) if k == "k" else th[i]) for i, k in enumerate(names)}


def lower_frontier(C: np.ndarray, L: np.ndarray, rtol: float = 1e-9) -> np.ndarray:
    """Mask of the points on the lower loss–compute frontier: the vertices (and points on the edges) of
    the lower convex hull of (log C, log L), up to the lowest loss. The envelope of convex learning
    curves in log-log is this hull; a running minimum would also keep points that merely improve on the
    previous one while lying well above the envelope."""
    x, y = np.log(np.asarray(C, float)), np.log(np.asarray(L, float))
    order = np.lexsort((y, x))
    hull: list[int] = []
    for i in order:
        if hull and x[i] == x[hull[-1]]:
            continue  # same compute, higher loss (sorted by loss within equal compute)
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            cross = (x[b] - x[a]) * (y[i] - y[a]) - (y[b] - y[a]) * (x[i] - x[a])
            if cross < -rtol * (abs(x[i] - x[a]) + 1) * (abs(y[i] - y[a]) + 1):
                hull.pop()
            else:
                break
        hull.append(int(i))
    mask = np.zeros(len(x), bool)
    h = np.array(hull)
    mask[h[: int(np.argmin(y[h])) + 1]] = True  # the frontier stops at the lowest loss
    return mask


def fit_envelope(C: np.ndarray, L: np.ndarray, fixed: dict[str, float] | None = None,
                 w: np.ndarray | None = None) -> FitResult:
    """L = k·C^m fitted (least squares in log-log) to the lower frontier of all runs (paper Fig. 1, Eq. 3)."""
    fixed = dict(fixed or {})
    _check_law("envelope", fixed, LINEAR_LAWS["envelope"])
    C, L = np.asarray(C, float), np.asarray(L, float)
    if np.any(~np.isfinite(C) | ~np.isfinite(L)) or np.any((C <= 0) | (L <= 0)):
        raise CLIError("envelope: compute and loss must be finite and > 0")
    on = lower_frontier(C, L) if w is None else lower_frontier(C[w > 0], L[w > 0])
    Cf, Lf = (C, L) if w is None else (C[w > 0], L[w > 0])
    wf = None if w is None else w[w > 0][on]
    Cf, Lf = Cf[on], Lf[on]
    nfree = 2 - len(fixed)
    if len(Cf) < max(nfree, 1) + 1:
        raise CLIError(f"envelope: {len(Cf)} frontier points; need at least {max(nfree, 1) + 1}")
    X = np.stack([np.ones(len(Cf)), np.log(Cf)], 1)
    th = _linfit(X, np.log(Lf), LINEAR_LAWS["envelope"], fixed, wf)
    resid = np.log(Lf) - X @ th
    meta = {"method": "least squares on log L vs log C over the lower frontier (lower convex hull of log L "
                      "vs log C up to the lowest loss)", "n_points": len(C), "n_frontier": len(Cf),
            "rmse_log": float(np.sqrt(np.mean(resid**2)))}
    return FitResult("envelope", _lin_params(th, LINEAR_LAWS["envelope"]), fixed, meta)


def fit_hernandez(N: np.ndarray, DF: np.ndarray, DT: np.ndarray, fixed: dict[str, float] | None = None,
                  w: np.ndarray | None = None) -> FitResult:
    """D_T = k·D_F^alpha·N^beta (Hernandez et al. 2021, Eq. 1.1) by least squares on log D_T."""
    fixed = dict(fixed or {})
    names = LINEAR_LAWS["hernandez"]
    _check_law("hernandez", fixed, names)
    N, DF, DT = (np.asarray(x, float) for x in (N, DF, DT))
    for nm, v in (("N", N), ("D_F", DF), ("D_T", DT)):
        if np.any(~np.isfinite(v)) or np.any(v <= 0):
            raise CLIError(f"hernandez: {nm} must be finite and > 0")
    nfree = 3 - len(fixed)
    if len(N) < nfree + 1:
        raise CLIError(f"hernandez: {len(N)} points for {nfree} free parameters; need at least {nfree + 1}")
    X = np.stack([np.ones(len(N)), np.log(DF), np.log(N)], 1)
    th = _linfit(X, np.log(DT), names, fixed, w)
    resid = np.log(DT) - X @ th
    return FitResult("hernandez", _lin_params(th, names), fixed,
                     {"method": "least squares on log D_T", "n_points": len(N),
                      "rmse_log": float(np.sqrt(np.mean(resid**2)))})


_Curve = tuple[float, np.ndarray, np.ndarray, int]  # N, log D (ascending), log L, bootstrap count


def _isoflop_curves(N: np.ndarray, D: np.ndarray, L: np.ndarray, run: np.ndarray,
                    w: dict[str, int] | None) -> list[_Curve]:
    """Each run's loss curve with >= 2 points (runs with bootstrap count 0 left out)."""
    curves = []
    for r in dict.fromkeys(run):
        if w is not None and not w.get(r):
            continue
        m = run == r
        o = np.argsort(D[m])
        if m.sum() >= 2:
            curves.append((float(N[m][0]), np.log(D[m][o]), np.log(L[m][o]), (w or {}).get(r, 1)))
    return curves


def _isoflop_budgets(curves: list[_Curve], n_budgets: int, min_sizes: int) -> np.ndarray:
    """Up to ``n_budgets`` log-spaced log budgets that the curves of >= ``min_sizes`` sizes cover."""
    if len({c[0] for c in curves}) < min_sizes:
        raise CLIError(f"isoflop: curves of {len({c[0] for c in curves})} sizes; need at least {min_sizes}")
    lc_lo = [math.log(6 * n) + ld[0] for n, ld, _, _ in curves]
    lc_hi = [math.log(6 * n) + ld[-1] for n, ld, _, _ in curves]
    cand = np.linspace(min(lc_lo), max(lc_hi), 64)
    cover = [len({c[0] for c, a, b in zip(curves, lc_lo, lc_hi, strict=True) if a <= x <= b}) for x in cand]
    ok = cand[np.array(cover) >= min_sizes]
    if len(ok) < 2:
        raise CLIError(f"isoflop: fewer than 2 budgets are covered by {min_sizes} sizes' curves")
    return ok[np.unique(np.round(np.linspace(0, len(ok) - 1, min(n_budgets, len(ok)))).astype(int))]


def _isoflop_profile(lc: float, curves: list[_Curve], window: int) -> dict[str, Any]:
    """The IsoFLOP profile at log budget ``lc``: loss vs log N at D = C/6N, and its parabola's minimum."""
    xs, ys, ws = [], [], []
    for n, ld, ll, cnt in curves:
        x = lc - math.log(6 * n)
        if ld[0] <= x <= ld[-1]:
            xs.append(math.log(n))
            ys.append(math.exp(np.interp(x, ld, ll)))
            ws.append(cnt)
    # the parabola is a local model: fit it to the (up to) `window` sizes nearest the empirical minimum
    o = np.argsort(xs)
    xs, ys, ws = [xs[i] for i in o], [ys[i] for i in o], [ws[i] for i in o]
    k = int(np.argmin(ys))
    lo_i = max(0, min(k - window // 2, len(xs) - window))
    xs, ys, ws = xs[lo_i : lo_i + window], ys[lo_i : lo_i + window], ws[lo_i : lo_i + window]
    c2, c1, c0 = np.polyfit(xs, ys, 2, w=np.sqrt(ws))
    interior = c2 > 0 and min(xs) <= -c1 / (2 * c2) <= max(xs)
    nopt = math.exp(-c1 / (2 * c2)) if c2 > 0 else None
    return {"C": math.exp(lc), "n_sizes": len(set(xs)), "N_opt": nopt,
            "D_opt": math.exp(lc) / (6 * nopt) if nopt else None,
            "predicted_loss": float(c0 - c1**2 / (4 * c2)) if c2 > 0 else None, "interior": bool(interior),
            "profile": {"logN": xs, "loss": ys}}


def isoflop(N: np.ndarray, D: np.ndarray, L: np.ndarray, run: np.ndarray, n_budgets: int = 8,
            min_sizes: int = 3, w: dict[str, int] | None = None, window: int = 5) -> FitResult:
    """Chinchilla approach 2 on loss curves: per budget C, loss vs log N at D = C/6N (log-log interpolation
    along each run's curve, no extrapolation), a parabola's minimum gives N_opt(C); N_opt ∝ C^a.

    Budgets: up to ``n_budgets`` log-spaced budgets covered by ≥ ``min_sizes`` sizes; the parabola is fitted
    to the ``window`` sizes nearest the empirical minimum (a parabola in log N is only a local model).
    Minima outside those sizes, or parabolas opening downwards, are recorded but not used for the exponent.
    ``w`` (run → count) weights runs for the bootstrap.
    """
    N, D, L = (np.asarray(x, float) for x in (N, D, L))
    curves = _isoflop_curves(N, D, L, np.asarray(run).astype(str), w)
    budgets = _isoflop_budgets(curves, n_budgets, min_sizes)
    profiles = [_isoflop_profile(lc, curves, window) for lc in budgets]
    used = [(lc, math.log(row["N_opt"])) for lc, row in zip(budgets, profiles, strict=True) if row["interior"]]
    if len(used) < 2:
        raise CLIError(f"isoflop: {len(used)} budget(s) with an interior minimum; need at least 2")
    a, c = np.polyfit([u[0] for u in used], [u[1] for u in used], 1)
    params = {"a": float(a), "b": float(1 - a), "kN": float(math.exp(c)), "kD": float(math.exp(-c) / 6)}
    meta = {"method": "quadratic in log N of the loss interpolated (log-log) along each run's curve at D = C/6N; "
                      "least squares of log N_opt on log C over budgets with an interior minimum",
            "n_budgets": len(budgets), "n_used": len(used), "min_sizes": min_sizes, "window": window,
            "caveat": "intermediate checkpoints of a run decayed over its full schedule overstate the loss of a "
                      "run whose schedule ends at that D (Chinchilla approach 2 trains one run per budget)"}
    fr = FitResult("isoflop", params, {}, meta)
    fr.meta["profiles"] = profiles
    return fr
