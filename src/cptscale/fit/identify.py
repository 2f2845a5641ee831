"""Which points a loss law is fitted on, whether the fit is identified, what to do when it is not, and
how well it extrapolates size by size.

* :func:`select_points`: ``annealed`` (default: each run's end and each WSD decay branch's end, losses of
  finished runs only) or ``all`` (every evaluation, biased: un-annealed checkpoints sit above the annealed
  curve; Hägele et al. 2024), recorded in every fit;
* :func:`identifiability`: a free parameter on a bound of the box, or a bootstrap interval reaching one,
  flags the fit, and its allocation is marked unreliable;
* :func:`fit_remedied`: the standard remedies for an unidentified fit (a fixed E, given or from a separate
  fit; the reduced law without E; more points, which ``cptscale plan`` names), the one used recorded;
* :func:`rollout`: OLMo-core's ladder rollout (``ScalingLawRollout``): fit on the smallest k sizes and
  predict size k+1, for every k.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from cptscale.errors import CLIError
from cptscale.fit.estimate import fit_law
from cptscale.fit.laws import _LOG, LAWS, FitResult, _grid, _to_internal
from cptscale.fit.optimizer import BOUNDS
from cptscale.fit.points import Points, _points
from cptscale.fit.uncertainty import _err_stats, bootstrap_law

#: Point selections of the loss-law fits (``fit.points``): what each one keeps and the bias it carries.
POINT_SELECTIONS: dict[str, dict[str, str]] = {
    "annealed": {
        "rule": "the final evaluation of each run's main trajectory (its schedule's end) and the final "
                "evaluation of each WSD decay branch: losses of annealed models only, at one D per budget",
        "bias": "unbiased with respect to the schedule: every point is a finished (annealed) run, as in "
                "Chinchilla's approach 3; needs several D per size (WSD branches) to separate alpha from beta",
    },
    "all": {
        "rule": "every evaluation after min_step_fraction of each run, annealed or not",
        "bias": "BIASED: intermediate evaluations of un-annealed checkpoints (WSD stable phase, mid-cosine) lie "
                "above the loss of a run annealed at that D (Hägele et al. 2024); mixing them with annealed "
                "points biases alpha and beta",
    },
}


def select_points(df: Any, mode: str = "annealed") -> tuple[Any, dict[str, Any]]:
    """The rows of a points table (``cptscale db points``: ``run, step, branch, ...``) a loss-law fit uses,
    and the record of that choice. ``annealed``: each run's last main-trajectory evaluation plus every
    decay branch's final evaluation; ``all``: every row."""
    if mode not in POINT_SELECTIONS:
        raise CLIError(f"fit.points must be one of {list(POINT_SELECTIONS)}, not {mode!r}")
    rec: dict[str, Any] = {"points": mode, **POINT_SELECTIONS[mode], "n_candidates": len(df)}
    if mode == "all" or not len(df):
        rec["n_selected"] = len(df)
        return df, rec
    if "step" not in df.columns:
        raise CLIError("point selection 'annealed' needs the points table's step column (cptscale db points writes it)")
    branch = df["branch"] if "branch" in df.columns else None
    main = branch.isna() if branch is not None else np.ones(len(df), bool)
    last = df["step"].where(main).groupby(df["run"]).transform("max")
    keep = (main & (df["step"] == last)) | (~main)
    out = df[keep]
    rec.update(n_selected=int(keep.sum()), n_branch_points=int((~main).sum()),
               n_run_ends=int((main & (df["step"] == last)).sum()))
    return out, rec


def design_counts(pts: Points) -> dict[str, Any]:
    """What a set of points can identify: distinct N, distinct D per N, points."""
    per_n = {float(n): len(set(np.round(pts.D[n == pts.N], 6).tolist())) for n in pts.sizes}
    return {"n_points": len(pts.N), "distinct_N": len(per_n), "distinct_D_per_N": per_n,
            "min_distinct_D_per_N": min(per_n.values()) if per_n else 0}


#: How close (share of the bound box, internal coordinates) a value must come to a bound to count as on it.
BOUND_TOL = 0.01


def _near_bound(name: str, value: float | None,
                extra: dict[str, tuple[float, float, bool]] | None = None) -> str | None:
    """Which bound of its box (``extra``: a law's own parameters, (lo, hi, in logs)) ``value`` sits at."""
    if value is None or not math.isfinite(value) or (name not in BOUNDS and name not in (extra or {})):
        return None
    if name in (extra or {}):
        lo, hi, in_logs = (extra or {})[name]
        x = (math.log(value) if value > 0 else -math.inf) if in_logs else value
    else:
        lo, hi = BOUNDS[name]
        try:
            x = _to_internal(name, value) if value > 0 or name not in _LOG else -math.inf
        except Exception:
            return "lower"
    tol = BOUND_TOL * (hi - lo)
    return "lower" if x <= lo + tol else "upper" if x >= hi - tol else None


def identifiability(fr: FitResult, intervals: dict[str, Any] | None, counts: dict[str, Any] | None = None,
                    on_bound: Sequence[str] | None = None,
                    extra_bounds: dict[str, tuple[float, float, bool]] | None = None) -> dict[str, Any]:
    """Whether a loss-law fit is identified: no free parameter at a bound of the box and no bootstrap
    interval reaching one (``BOUND_TOL`` of the box, internal coordinates), plus the design counts. An
    unidentified fit's allocation is unreliable. ``extra_bounds``: the boxes of a law's own parameters
    (the data-constrained laws' R_D profile, the penalty's P, delta, kappa), checked the same way."""
    free = [k for k in LAWS.get(fr.law, LAWS["chinchilla"]) if k not in fr.fixed and k in fr.params]
    free += [k for k in extra_bounds or {} if k not in fr.fixed and k in fr.params and k not in free]
    at_bound = {k: _near_bound(k, fr.params[k], extra_bounds) for k in free}
    at_bound = {k: v for k, v in at_bound.items() if v}
    for k in on_bound or []:
        at_bound.setdefault(k, "bound")
    iv_bound = {}
    for k in free:
        iv = (intervals or {}).get(k) or {}
        ends = [e for e in (_near_bound(k, iv.get("lo"), extra_bounds), _near_bound(k, iv.get("hi"), extra_bounds))
                if e]
        if ends:
            iv_bound[k] = ends[0]
    ok = not at_bound and not iv_bound
    bits = [f"{k} on its {v} bound" for k, v in at_bound.items()]
    bits += [f"the interval of {k} reaches its {v} bound" for k, v in iv_bound.items()]
    return {"identified": ok, "on_bound": sorted(at_bound), "interval_at_bound": sorted(iv_bound),
            "allocation_reliable": ok, "summary": "; ".join(bits) if bits else "every free parameter interior",
            "bound_tolerance": f"{BOUND_TOL:.0%} of the bound box (internal coordinates: log E, log A, log B)",
            "design": counts or {}}


def rollout(pts: Points, law: str, fixed_at: Callable[[int], dict[str, float] | None], need: int,
            **kw: Any) -> dict[str, Any]:
    """OLMo-core's ladder rollout: for every k, fit on the smallest k sizes and predict size k+1; the
    error of each step (``fixed_at(k)`` gives the frozen parameters of the step-k fit, or None to skip)."""
    sizes = pts.sizes
    steps = []
    prev = None  # the last step's fit: its optima warm-start the next step (one size more)
    for k in range(need, len(sizes)):
        train, test = pts.subset(sizes[k - 1] >= pts.N), pts.subset(sizes[k] == pts.N)
        fixed = fixed_at(k)
        if fixed is None:
            steps.append({"k": k, "status": "skipped", "reason": "no frozen parameters for this step"})
            continue
        # every step searches the whole grid and, after the first, also starts from the previous step's
        # optima (one size more moves the optimum a little): never worse than the grid alone (paper-scale
        # simulated study: one of 37 scratch steps found an optimum 0.14 % lower). The grid at every step
        # is what costs (115 of fit-study's 172 s at 42 sizes), but the previous optima plus the coarse
        # grid alone missed the optimum (objective up to 2.6 % higher) in 5 of 37 scratch steps.
        warm = None
        if prev is not None and prev.starts is not None and set(prev.fixed) == set(fixed):
            free = [i for i, name in enumerate(LAWS[law]) if name not in fixed]
            warm = np.vstack([prev.starts, _grid(law, kw.get("grid", "chinchilla"), fixed)[:, free]])
        try:
            fr = fit_law(train, law, fixed, **kw, init=warm)
        except Exception as exc:
            steps.append({"k": k, "status": "skipped", "reason": str(exc)})
            continue
        prev = fr
        steps.append({**rollout_step(k, sizes, train, test, fr), "objective": fr.meta.get("objective"),
                      "starts": fr.meta.get("n_starts")})
    return {**rollout_result(steps, f"{len(sizes)} sizes: no step with >= {need} sizes to fit and one to predict"),
            "overestimate_penalty": kw.get("overestimate_penalty", 1.0)}


def rollout_step(k: int, sizes: Sequence[float], train: Points, test: Points, fr: FitResult) -> dict[str, Any]:
    """One rollout step's record: the law ``fr`` fitted on the smallest k ``sizes`` (``train``), its error on
    size k+1 (``test``)."""
    return {"k": k, "status": "ok", "train_sizes": list(sizes[:k]), "predicted_N": sizes[k],
            "n_train": len(train.N), "n_test": len(test.N), **_err_stats(fr.predict(test.N, test.D), test.L),
            "params": fr.params, "on_bound": fr.meta.get("on_bound", [])}


def rollout_result(steps: list[dict[str, Any]], reason: str) -> dict[str, Any]:
    """A rollout's record from its steps: the mean and worst error over the steps that ran, or ``reason``."""
    ok = [x for x in steps if x["status"] == "ok"]
    return {"status": "ok" if ok else "skipped", "steps": steps,
            "mean_rel_err": float(np.mean([x["mean_rel_err"] for x in ok])) if ok else None,
            "max_rel_err": float(max(x["mean_rel_err"] for x in ok)) if ok else None,
            "reason": None if ok else reason}


#: What fit-study does with a loss-law fit that is not identified (``fit.remedy``): ``auto`` tries a fixed E
#: (``fit.fixed_E`` if given, else E of a separate free fit on the same target data, the CPT runs), then the
#: reduced law without E, and keeps the first that is identified; ``flag`` only flags it.
REMEDY_POLICIES = ("auto", "flag")
_MORE_POINTS = ("more points: more sizes (a wider N range) and WSD decay branches (train.wsd_branches: several "
                "annealed D per size); `cptscale plan CONFIG` says whether a design identifies each law")


def fit_remedied(pts: Points, law: str, fixed: dict[str, float], nboot: int, seed: int, budgets: Sequence[float],
                  fs: dict[str, np.ndarray] | None, kw: dict[str, Any], policy: str, fixed_E: float | None,
                  other: Any, scheme: str = "pairs", pair_with: dict[str, Any] | None = None,
                  separate: tuple[FitResult, dict[str, Any] | None] | None = None,
                  ) -> tuple[FitResult, dict[str, Any] | None, dict[str, Any], dict[str, Any]]:
    """A loss-law fit, its bootstrap (``scheme``: :data:`BOOTSTRAP_SCHEMES`) and identifiability; when it is
    not identified and ``policy`` is ``auto``, the standard remedies in order (fixed E given, fixed E from a
    separate fit on ``other``'s points, the reduced law without E), the first identified one kept. Returns
    the fit used, its bootstrap, its identifiability and the remedy record (offered, tried, used).

    E from a separate fit is not a known constant: the separate fit is bootstrapped too, and resample b of
    the remedied law holds E at that fit's resample-b value, so its intervals, allocation and every figure
    drawn from its bootstrap carry E's uncertainty. Same seed and scheme, and each run draws as the
    separate fit's run of the same size (``pair_with`` likewise pairs ``fs`` with its source's draws): a
    size's shape luck is shared by its scratch and CPT runs, so resample b weights it alike in both fits.
    A remedy that cannot be fitted is recorded with its error (:func:`first_identified`); only the free fit
    failing fails the law. ``separate``: that free fit on ``other`` and its bootstrap when the caller has
    them already (fit-study's CPT Chinchilla comparison is the same fit, same seed and scheme)."""

    def one(fx: dict[str, float], fsx: dict[str, np.ndarray] | None = None,
            source: str | None = None, pair: dict[str, Any] | None = None,
            ) -> tuple[FitResult, dict[str, Any] | None, dict[str, Any]]:
        fr = fit_law(pts, law, fx, **kw)
        fsb = {**(fs or {}), **(fsx or {})} or None
        src = source or ("the scratch fit's bootstrap" if fs else None)  # fs: the frozen E, A, alpha draws
        bs = (bootstrap_law(pts, fr, nboot, seed, budgets, fixed_samples=fsb, scheme=scheme, frozen_from=src,
                            pair_with=pair or (pair_with if fs else None))
              if nboot else None)
        return fr, bs, identifiability(fr, bs["intervals"] if bs else None, design_counts(pts),
                                       fr.meta.get("on_bound"))

    fr, bs, ident = one(fixed)
    offered = ["fixed E (fit.fixed_E, or E of a separate free fit on the same target data)",
               "reduced law without E (E = 0) for the range studied", _MORE_POINTS]
    rem: dict[str, Any] = {"policy": policy, "offered": offered, "tried": [], "used": "none",
                           "free_fit": {"params": fr.params, "identifiability": ident}}
    if ident["identified"] or policy != "auto" or "E" in fixed:
        return fr, bs, ident, rem
    cands: list[tuple[str, dict[str, float], dict[str, np.ndarray] | None, dict[str, Any]]] = []
    sep_draws = None  # the separate fit's per-run draws, which the remedied law's resamples pair with
    if fixed_E is not None:
        cands.append((f"fixed E = {fixed_E:g} (given: fit.fixed_E)", {"E": float(fixed_E)}, None, {}))
    if other is not None and len(other):
        try:
            op = _points(other)
            if len(op.sizes) >= 3:
                sep = separate[0] if separate else fit_law(op, "chinchilla", {}, **kw)
                if "E" not in sep.meta.get("on_bound", []) and not _near_bound("E", sep.params["E"]):
                    sep_bs = ((separate[1] if separate else bootstrap_law(op, sep, nboot, seed, (), scheme=scheme))
                              if nboot else None)
                    e_draws = {"E": sep_bs["samples"]["E"]} if sep_bs else None
                    sep_draws = sep_bs["run_draws"] if sep_bs else None
                    extra = {"E_interval": sep_bs["intervals"]["E"]} if sep_bs else {}
                    cands.append((f"fixed E = {sep.params['E']:.4g} from a separate free Chinchilla fit on the CPT "
                                  "runs of the same target data" + (" (E resampled with that fit's bootstrap)"
                                                                    if sep_bs else ""),
                                  {"E": sep.params["E"]}, e_draws, extra))
        except Exception as exc:  # the separate fit is optional: say why it was not offered
            rem["tried"].append({"remedy": "fixed E from a separate fit", "error": str(exc)})
    cands.append(("reduced law without E (E = 0) for the range studied", {"E": 0.0}, None, {}))
    found = first_identified(
        [(label, lambda fx=fx, fsx=fsx: one({**fixed, **fx}, fsx, "the separate fit's bootstrap" if fsx else None,
                                            sep_draws if fsx else None), extra)
         for label, fx, fsx, extra in cands], rem)
    return (*found, rem) if found else (fr, bs, ident, rem)


def remedy_text(rem: dict[str, Any], free: str | None) -> str:
    """How the summary and the report name a remedy: '; remedy used: X (the free fit: its flag)', or ''
    when none was used. A remedied law is never shown without what its free fit said."""
    if not rem.get("used") or rem["used"] == "none":
        return ""
    return f"; remedy used: {rem['used']}" + (f" (the free fit: {free})" if free else "")


#: A remedy to try: its label, the fit (returning the fit, its bootstrap and its identifiability) and extra
#: fields for its record
Remedy = tuple[str, Callable[[], tuple[FitResult, Any, dict[str, Any]]], dict[str, Any]]


def first_identified(remedies: Sequence[Remedy], rem: dict[str, Any]
                     ) -> tuple[FitResult, Any, dict[str, Any]] | None:
    """Try the remedies in order, each recorded in ``rem["tried"]``, and return the first identified one's
    fit, bootstrap and identifiability (its label in ``rem["used"]``), or None. A remedy that cannot be
    fitted is recorded with its error and the next one tried: the free fit stays, flagged, rather than the
    whole law failing for want of a remedy."""
    for label, fit, extra in remedies:
        try:
            fr, bs, ident = fit()
        except Exception as exc:
            rem["tried"].append({"remedy": label, "error": str(exc)})
            continue
        rem["tried"].append({"remedy": label, "params": fr.params, "identified": ident["identified"],
                             "summary": ident["summary"], **extra})
        if ident["identified"]:
            rem["used"] = label
            return fr, bs, ident
    return None
