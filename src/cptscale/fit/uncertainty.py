"""Uncertainty of fits: bootstrap over runs (intervals of parameters, exponents and allocations) and held-out validation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from cptscale.fit.estimate import _nll_minimize, exponents, fit_law, optimal_n
from cptscale.fit.laws import _LOG, LAWS, FitResult, _min_sizes, _to_internal, _to_params
from cptscale.fit.optimizer import _Prep, _run_batch
from cptscale.fit.points import Points, _points

_LEVEL = 0.95


#: How :func:`bootstrap_law` may resample (fit.bootstrap_scheme).
BOOTSTRAP_SCHEMES = ("pairs", "bayes", "wild", "wild3", "wildjk")


def _run_codes(run: np.ndarray) -> tuple[int, np.ndarray]:
    """The number of runs and each point's run index: every resampling scheme draws one value per run."""
    labels, codes = np.unique(np.asarray(run).astype(str), return_inverse=True)
    return len(labels), codes


def bootstrap_counts(run: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Resample runs (not checkpoints) with replacement: (n, n_runs) run counts and (n, n_points) weights."""
    R, codes = _run_codes(run)
    counts = rng.multinomial(R, np.full(R, 1.0 / R), size=n)
    return counts, counts[:, codes].astype(float)


def bayes_weights(run: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Bayesian bootstrap (Rubin 1981): one Exp(1) weight per run and resample (Dirichlet(1, ..., 1) x runs),
    spread to the run's points: (n, n_points). Same variance per run as the pairs counts, but no run ever
    drops out, so no resample loses the smallest or largest size and extrapolates from a narrower ladder."""
    R, codes = _run_codes(run)
    return rng.exponential(1.0, size=(n, R))[:, codes]


def wild_multipliers(run: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Rademacher signs, one per run and resample, spread to the run's points: (n, n_points)."""
    R, codes = _run_codes(run)
    return rng.choice(np.array([-1.0, 1.0]), size=(n, R))[:, codes]


#: How each scheme resamples, as the bootstrap records say it.
SCHEME_TEXT = {"wild": "wild: one Rademacher sign per run on its log-loss residuals, design fixed",
               "wild3": "wild3: one Rademacher sign per run on its jackknife (CV3) log-loss residuals, design fixed",
               "wildjk": "wildjk: one Rademacher sign per run on its leave-one-run-out log-loss residuals (exact "
                         "cluster jackknife of the Huber fit), design fixed",
               "pairs": "pairs: runs resampled with replacement",
               "bayes": "bayes: one Exp(1) weight per run (Bayesian bootstrap), every run kept"}


def resample_draws(pts: Points, n: int, seed: int, scheme: str,
                   pair_with: dict[str, Any] | None) -> tuple[np.ndarray, dict[str, Any], dict[str, str]]:
    """Every bootstrap's per-run draws: (point codes, ``run_draws`` (slots and the (n, runs) draws, paired
    by size with ``pair_with``), and the record's pairing entry (empty without a source))."""
    R, codes = _run_codes(pts.run)
    slots = run_slots(pts)
    draws, n_paired = paired_draws(per_run_draws(pts.run, n, seed, scheme), slots, pair_with)
    info = ({"paired_by_size": f"{n_paired} of {R} runs draw as the same-size run of the source"}
            if pair_with is not None else {})
    return codes, {"slots": slots, "draws": draws}, info


def per_run_draws(run: np.ndarray, n: int, seed: int, scheme: str) -> np.ndarray:
    """One draw per run and resample, (n, runs) in :func:`_run_codes` order: the pairs counts, the Bayesian
    bootstrap's Exp(1) weights, or the wild schemes' signs (the per-point helpers at one point per run)."""
    R, codes = _run_codes(run)
    first = np.array([np.flatnonzero(codes == i)[0] for i in range(R)])
    rng = np.random.default_rng(seed)
    if scheme == "pairs":
        return bootstrap_counts(np.asarray(run)[first], n, rng)[0].astype(float)
    if scheme == "bayes":
        return bayes_weights(np.asarray(run)[first], n, rng)
    return wild_multipliers(np.asarray(run)[first], n, rng)


def run_slots(pts: Points) -> list[tuple[float, int]]:
    """Each run's slot, in :func:`_run_codes` order: its size N and its rank among the runs of that size (by
    run id). Slots, not run ids or positions, pair two fits' resamples: a scratch run and the CPT run of
    the same size share a slot, whatever their names and whichever other runs each fit has."""
    labels, codes = np.unique(np.asarray(pts.run).astype(str), return_inverse=True)
    n_of = [float(pts.N[np.flatnonzero(codes == i)[0]]) for i in range(len(labels))]
    seen: dict[float, int] = {}
    out = []
    for n_run in n_of:  # labels are sorted, so each size's runs come in run-id order
        out.append((n_run, seen.get(n_run, 0)))
        seen[n_run] = seen.get(n_run, 0) + 1
    return out


def paired_draws(own: np.ndarray, slots: Sequence[tuple[float, int]],
                 source: dict[str, Any] | None) -> tuple[np.ndarray, int]:
    """Per-run draws (resamples x runs: counts, weights or signs) with each run that has a slot in
    ``source`` (another bootstrap's ``run_draws``) given that run's column, so resample b weights a size
    alike in both fits; runs without a counterpart keep their own draws. Returns the draws and how many
    runs were paired."""
    if source is None:
        return own, 0
    col = {tuple(k): j for j, k in enumerate(source["slots"])}
    src = np.asarray(source["draws"])
    out = own.copy()
    n = min(len(own), len(src))
    paired = 0
    for r, slot in enumerate(slots):
        j = col.get(tuple(slot))
        if j is not None:
            out[:n, r] = src[:n, j]
            paired += 1
    return out, paired


def cluster_jackknife_residuals(pts: Points, fit: FitResult, free: Sequence[int], base_th: np.ndarray) -> np.ndarray:
    """Log-loss residuals with each run's block multiplied by ``(I - H_gg)^-1``, H the hat matrix of the
    linearised law at the fit (Jacobian of the log prediction in the free internal parameters): the
    CV3 residuals of MacKinnon, Nielsen & Webb (2023). A run with high leverage (the smallest and largest
    sizes pull alpha) leaves a shrunken residual behind; a wild bootstrap on raw residuals then draws
    data quieter than the real at exactly those runs, and under-covers what they determine."""
    names = LAWS[fit.law]

    def lpred(th_free: np.ndarray) -> np.ndarray:
        th = base_th.copy()
        th[list(free)] = th_free
        return np.log(FitResult(fit.law, _to_params(th, names)).predict(pts.N, pts.D))

    th0 = base_th[list(free)]
    f0 = lpred(th0)
    J = np.empty((len(f0), len(th0)))
    for j in range(len(th0)):
        h = 1e-6 * max(1.0, abs(th0[j]))
        up, dn = th0.copy(), th0.copy()
        up[j] += h
        dn[j] -= h
        J[:, j] = (lpred(up) - lpred(dn)) / (2 * h)
    bread = np.linalg.pinv(J.T @ J)
    r = np.log(pts.L) - f0
    out = r.copy()
    runs = np.asarray(pts.run).astype(str)
    for g in np.unique(runs):
        idx = np.flatnonzero(runs == g)
        lam, vec = np.linalg.eigh(np.eye(len(idx)) - J[idx] @ bread @ J[idx].T)
        # eigenvalues in [0, 1]; a direction only this run determines (~0) has ~0 residual: floored, not inverted
        out[idx] = vec @ ((vec.T @ r[idx]) / np.maximum(lam, 1e-2))
    return out


def leave_one_run_out_weights(run: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """The runs, each point's run index and one row of point weights per run that leaves that run out."""
    R, codes = _run_codes(run)
    return R, codes, (np.arange(R)[:, None] != codes[None, :]).astype(float)


def leave_one_run_out_residuals(pts: Points, fit: FitResult, free: Sequence[int], base_th: np.ndarray,
                                starts: np.ndarray, delta: float, reduction: str, asym: float) -> np.ndarray:
    """Each run's log-loss residuals from the law refitted without that run (the exact cluster jackknife,
    of the Huber fit itself, all runs in one batched refit from the fit's warm starts). The linearised
    CV3 correction (:func:`cluster_jackknife_residuals`) uses the least-squares hat matrix; the Huber fit
    with a delta far below the noise behaves like least absolute deviations, whose leverage differs, so
    the refit is the direct measurement."""
    R, codes, W = leave_one_run_out_weights(pts.run)
    fitted, _ = _refit_batch(pts, np.tile(base_th, (R, 1)), np.arange(R), list(free), starts, W, delta,
                             reduction, asym)
    names = LAWS[fit.law]
    out = np.empty(len(pts.N))
    for g, th in fitted:
        idx = codes == g
        out[idx] = np.log(pts.L[idx]) - np.log(FitResult(fit.law, _to_params(th, names)).predict(pts.N[idx], pts.D[idx]))
    return out


def _interval(x: Any, level: float = _LEVEL) -> dict[str, Any]:
    x = np.asarray(x, float)
    x = x[np.isfinite(x)]
    if len(x) < 2:
        return {"lo": None, "hi": None, "median": None, "se": None, "n": len(x)}
    q = (1 - level) / 2
    lo, med, hi = np.quantile(x, [q, 0.5, 1 - q])
    return {"lo": float(lo), "hi": float(hi), "median": float(med), "se": float(np.std(x, ddof=1)), "n": len(x)}


def _spread_interval(x: np.ndarray, level: float) -> dict[str, Any]:
    """:func:`_interval`, except that resamples which all give the same value (a law fitted exactly through
    too few runs: every usable resample reproduces the fit) give no interval and say why, rather than a
    zero-width one that reads as certainty."""
    iv = _interval(x, level)
    if iv["se"] is not None and iv["se"] <= 1e-9 * max(1.0, abs(iv["median"])):
        iv = {**iv, "lo": None, "hi": None,
              "reason": f"all {iv['n']} usable resamples give the same value: too few runs to measure its spread"}
    return iv


def _usable_resamples(pts: Points, fit: FitResult, W: np.ndarray, base_th: np.ndarray,
                      fixed_samples: dict[str, np.ndarray] | None) -> tuple[np.ndarray, np.ndarray]:
    """Which resamples can identify the law (enough sizes and points, finite frozen draws) and each resample's
    internal parameter vector with its frozen draws filled in."""
    names = LAWS[fit.law]
    n = len(W)
    nfree = sum(k not in fit.fixed for k in names)
    need = _min_sizes(fit.law, fit.fixed)
    ok = np.ones(n, bool)
    for b in range(n):
        m = W[b] > 0
        if len(set(pts.N[m])) < need or m.sum() < nfree:
            ok[b] = False
    fixed_b = np.tile(base_th, (n, 1))
    for k, v in (fixed_samples or {}).items():
        v = np.asarray(v, float)[:n]
        ok &= np.isfinite(v) & (v > 0 if k in _LOG else True)
        fixed_b[:, names.index(k)] = np.log(np.where(v > 0, v, 1.0)) if k in _LOG else v
    return ok, fixed_b


def _refit_nll(pts: Points, fixed_b: np.ndarray, bidx: np.ndarray, free: list[int], start: np.ndarray,
               W: np.ndarray, delta: float) -> tuple[list[tuple[int, np.ndarray]], int]:
    """The huber-nll recipe per resample: one BFGS from the full-data optimum (law parameters and sigma);
    (resample, internal parameters) of each and the number that did not converge."""
    prep = _Prep(np.log(pts.N), np.log(pts.D), np.log(pts.L))
    fitted, n_unconv = [], 0
    for b in bidx:
        th0 = fixed_b[b].copy()
        th0[free] = start[:-1]
        r = _nll_minimize(th0, free, float(start[-1]), prep, delta, W[b])
        th0[free] = r.x[:-1]
        n_unconv += int(not r.success and "precision loss" not in str(r.message))
        fitted.append((int(b), th0))
    return fitted, n_unconv


def _refit_batch(pts: Points, fixed_b: np.ndarray, bidx: np.ndarray, free: list[int], starts: np.ndarray,
                 W: np.ndarray, delta: float, reduction: str,
                 asym: float, LL: np.ndarray | None = None) -> tuple[list[tuple[int, np.ndarray]], int]:
    """The Huber recipe: every resample from every warm start in one vectorised L-BFGS batch, the best start
    kept per resample; (resample, internal parameters) of each and the number that did not converge."""
    S = len(starts)
    theta0 = np.repeat(fixed_b[bidx], S, axis=0)
    theta0[:, free] = np.tile(starts, (len(bidx), 1))
    res = _run_batch(theta0, free, np.log(pts.N), np.log(pts.D), np.log(pts.L), delta, reduction, W=W,
                     wrow=np.repeat(bidx, S), asym=asym, LL=LL, maxiter=3000, ftol=1e-13)
    f = res["f"].reshape(len(bidx), S)
    sel = np.arange(len(bidx)) * S + np.argmin(f, 1)
    fitted = []
    for row, b in zip(sel, bidx, strict=True):
        th = theta0[row].copy()
        th[free] = res["x"][row]
        fitted.append((int(b), th))
    return fitted, int(np.sum(~np.isin(res["status"][sel], (1, 2))))


def _resample_draws(law: str, fitted: list[tuple[int, np.ndarray]], pts: Points, n: int,
                    budgets: Sequence[float]) -> tuple[dict[str, np.ndarray], np.ndarray, dict[float, Any]]:
    """Per resample (NaN where there is none): every parameter and a, b, G; the predicted loss at every point;
    N_opt, D_opt and the predicted loss at each budget."""
    names = LAWS[law]
    samples = {k: np.full(n, np.nan) for k in [*names, "a", "b", "G"]}
    pred = np.full((n, len(pts.N)), np.nan)
    alloc = {float(C): {k: np.full(n, np.nan) for k in ("N_opt", "D_opt", "predicted_loss")} for C in budgets}
    for b, th in fitted:
        fr = FitResult(law, _to_params(th, names))
        for k in names:
            samples[k][b] = fr.params[k]
        pred[b] = fr.predict(pts.N, pts.D)
        ex = exponents(fr)
        if ex["valid"]:
            samples["a"][b], samples["b"][b], samples["G"][b] = ex["a"], ex["b"], ex["G"]
            for C, dct in alloc.items():
                nn = optimal_n(ex, C)
                if nn is None:  # out of the float range: this resample has no allocation (NaN)
                    continue
                dct["N_opt"][b], dct["D_opt"][b] = nn, C / (6 * nn)
                dct["predicted_loss"][b] = float(fr.predict(nn, C / (6 * nn)))
    return samples, pred, alloc


def bootstrap_law(data: Any, fit: FitResult, n: int = 200, seed: int = 0, budgets: Sequence[float] = (),
                  delta: float | None = None, reduction: str | None = None,
                  fixed_samples: dict[str, np.ndarray] | None = None, level: float = _LEVEL,
                  scheme: str = "pairs", frozen_from: str | None = None,
                  pair_with: dict[str, Any] | None = None) -> dict[str, Any]:
    """Bootstrap over runs for a loss law, all resamples optimised in one batch.

    ``scheme="pairs"`` (default): runs resampled with replacement. ``"bayes"``: the Bayesian bootstrap, one
    Exp(1) weight per run (the pairs counts' mean and variance, but no run drops out: on a 4-size ladder a
    pairs resample keeps every size with probability 4!/4^4 = 9 %; over 100 simulated paper studies its
    coverage equals pairs'). ``"wild"`` (the Huber recipe only; a ``huber-nll`` fit uses pairs): the design stays fixed and each run's log-loss residuals from the fit are
    multiplied by one random sign per run and resample (wild cluster bootstrap: a run's points keep their
    shared noise). On simulated paper-ladder studies (bench/sim_coverage.py, one run per size) pairs
    over-covers beta (100/100 studies; its spread 1.3x the true one) and wild covers beta at nominal but
    under-covers alpha, a and N_opt (~82 % of 62 studies; spread 0.8x: the Huber fit's residuals crowd
    into |r| < delta, so the resampled data are quieter than the real). ``"wild3"``: the same on residuals
    corrected by the least-squares hat matrix (CV3): still narrow (87.5-92 %). ``"wildjk"`` (the config's
    default): the same on each run's residuals from the law refitted without it
    (:func:`leave_one_run_out_residuals`), the leverage of the Huber fit itself: over 200 simulated paper
    studies every interval covers in the 90-98 % band (bench/sim_coverage.py, README).

    Resample b reweights each point by the count of its run; the fit restarts from the full-data fit's
    best distinct optima (warm starts, not the grid: cost n·k rather than n·4,500 starts). A
    ``huber-nll`` fit is refitted with its own recipe (BFGS on the weighted Huber likelihood, one
    start per resample at the full-data optimum). Frozen parameters may vary per resample
    (``fixed_samples``: the scratch fit's draws of E, A, alpha, or a separate fit's draws of E;
    ``frozen_from`` names the source in the record) so their uncertainty propagates; ``pair_with`` (that
    source's ``run_draws``) then gives each run the draw of the source's run of the same size (its slot,
    :func:`run_slots`), so resample b's frozen draw and its weights come from the same luck of each size,
    whichever runs either fit has (a missing run, several replay ratios). Resamples with too few
    sizes to identify the law are counted as degenerate and left out. Returns samples of every parameter, of a, b, G, of the
    allocation at each budget and of the predicted loss at every point, with intervals.
    """
    pts = _points(data)
    names = LAWS[fit.law]
    delta = fit.meta.get("delta", 1e-3) if delta is None else delta
    reduction = fit.meta.get("reduction", "sum") if reduction is None else reduction
    free = [i for i, k in enumerate(names) if k not in fit.fixed]
    nll = fit.meta.get("loss") == "huber-nll"
    if scheme not in BOOTSTRAP_SCHEMES:
        raise ValueError(f"bootstrap scheme must be one of {list(BOOTSTRAP_SCHEMES)}, not {scheme!r}")
    scheme = "pairs" if nll and scheme.startswith("wild") else scheme
    base_th = np.array([_to_internal(k, fit.params[k]) for k in names])
    starts = fit.starts if fit.starts is not None else base_th[free][None]
    asym = float(fit.meta.get("overestimate_penalty", 1.0))
    LL = None
    codes, run_draws, pairing = resample_draws(pts, n, seed, scheme, pair_with)
    draws = run_draws["draws"]
    if scheme in ("pairs", "bayes"):
        W = draws[:, codes]
    else:  # the design stays: every point once, the observations redrawn around the fit
        lpred = np.log(fit.predict(pts.N, pts.D))
        if scheme == "wildjk":
            resid = leave_one_run_out_residuals(pts, fit, free, base_th, starts, delta, reduction, asym)
        elif scheme == "wild3":
            resid = cluster_jackknife_residuals(pts, fit, free, base_th)
        else:
            resid = np.log(pts.L) - lpred
        LL = lpred + draws[:, codes] * resid
        W = np.ones((n, len(pts.N)))
    ok, fixed_b = _usable_resamples(pts, fit, W, base_th, fixed_samples)
    bidx = np.flatnonzero(ok)
    if nll and (fit.starts is None or starts.shape[1] != len(free) + 1):
        starts = np.r_[base_th[free], float(fit.meta.get("sigma", 0.0))][None]
    fitted: list[tuple[int, np.ndarray]] = []  # (resample, internal parameters)
    n_unconv = 0
    if len(bidx) and nll:
        fitted, n_unconv = _refit_nll(pts, fixed_b, bidx, free, starts[0], W, delta)
    elif len(bidx):
        fitted, n_unconv = _refit_batch(pts, fixed_b, bidx, free, starts, W, delta, reduction, asym, LL)
    samples, pred, alloc = _resample_draws(fit.law, fitted, pts, n, budgets)
    need = _min_sizes(fit.law, fit.fixed)
    return {
        "samples": samples, "pred": pred, "alloc": alloc, "ok": ok,
        "run_draws": run_draws,  # for a fit that freezes parameters from this one
        "intervals": {k: _interval(v, level) for k, v in samples.items()},
        "info": {"n_requested": n, "n_ok": int(ok.sum()), "n_degenerate": int((~ok).sum()),
                 "n_not_converged": n_unconv, "unit": "run", "n_runs": draws.shape[1], "seed": seed,
                 "level": level, "method": "percentile",
                 "scheme": SCHEME_TEXT[scheme],
                 "starts": "warm: one BFGS per resample from the full-data optimum (huber-nll)" if nll else
                           f"warm: the full-data optimum and the grid stage's {len(starts) - 1} best distinct optima",
                 "loss": "huber-nll" if nll else "huber",
                 "frozen": (f"{', '.join(fixed_samples)} resampled with {frozen_from or 'their source'}"
                            if fixed_samples
                            else "held at the fit's values"),
                 "resampled": list(fixed_samples or ()),  # frozen parameters that vary over the resamples
                 **pairing,
                 "degenerate_rule": f"resamples with < {need} distinct sizes or fewer points than free parameters"},
    }


def _bootstrap_generic(pts: Points, n: int, seed: int, refit: Callable[[np.ndarray, dict[str, int]], dict[str, float]],
                       keys: Sequence[str], level: float = _LEVEL) -> dict[str, Any]:
    """Bootstrap over runs for the cheap laws: ``refit(weights, run_counts)`` returns the quantities."""
    counts, W = bootstrap_counts(pts.run, n, np.random.default_rng(seed))
    labels = np.unique(pts.run.astype(str))
    samples = {k: np.full(n, np.nan) for k in keys}
    bad = 0
    for b in range(n):
        try:
            out = refit(W[b], dict(zip(labels, counts[b].tolist(), strict=True)))
        except Exception:
            bad += 1
            continue
        for k in keys:
            samples[k][b] = out.get(k, np.nan)
    return {"samples": samples, "intervals": {k: _spread_interval(v, level) for k, v in samples.items()},
            "info": {"n_requested": n, "n_ok": n - bad, "n_degenerate": bad, "unit": "run",
                     "n_runs": len(labels), "seed": seed, "level": level, "method": "percentile"}}


def _err_stats(pred: np.ndarray, obs: np.ndarray) -> dict[str, float]:
    err = pred - obs
    return {"mae": float(np.abs(err).mean()), "rmse": float(np.sqrt((err**2).mean())),
            "max_abs_err": float(np.abs(err).max()), "mean_rel_err": float(np.abs(err / obs).mean()),
            "bias": float(err.mean())}


def heldout_validation(data: Any, law: str = "chinchilla", fixed: dict[str, float] | None = None,
                       **kw: Any) -> dict[str, Any]:
    """Fit without the largest model size and predict its losses: the honesty number of a fit."""
    pts = _points(data)
    nmax = float(pts.N.max())
    tr, te = pts.subset(nmax > pts.N), pts.subset(nmax == pts.N)
    r = fit_law(tr, law, fixed, **kw)
    pred = r.predict(te.N, te.D)
    return {"status": "ok", "heldout_N": nmax, "n_train": len(tr.N), "n_test": len(te.N),
            **_err_stats(pred, te.L), "params": r.params, "fixed": dict(fixed or {}),
            "points": [{"run_id": str(ru), "N": float(a), "D": float(b), "observed_loss": float(o),
                        "predicted_loss": float(p)} for ru, a, b, o, p in zip(te.run, te.N, te.D, te.L, pred, strict=True)]}
