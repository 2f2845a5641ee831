"""CPT compute saving by the scratch law: what a same-size scratch run would need for each CPT run's final loss.

The store's transfer metric interpolates the same-size scratch run's own curve, so it is undefined where
a CPT run ends below the scratch run's best loss: exactly the runs where CPT helped most. The summary's
curve-based headline then reads those runs at an earlier evaluation. Here the scratch Chinchilla law
(fitted on the study's own scratch runs) supplies the missing extrapolation, as the paper does with its
fitted laws: at each CPT run's final (annealed) evaluation, the tokens a scratch run of the same size
needs for the same target loss, D_eq = (B / (L - E - A N^-alpha))^(1/beta), and the saving 1 - D / D_eq
(same shape, so the FLOPs ratio is the token ratio; D counts every CPT token, replay included, and no
source pre-training). A loss at or below the law's floor at that size (E + A N^-alpha) is one no scratch
run of that size reaches: its saving is recorded as 1 and flagged. The interval is a two-level bootstrap:
runs resampled with replacement, each resample read through one of the law's bootstrap draws.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cptscale.fit.uncertainty import _LEVEL, _interval

_RESAMPLES = 2000

#: The saving below which the summary and the report print only this bound (-1000 %: CPT spent over 11x
#: what the same-size scratch run needs). Its digits past that say nothing a reader can use: a bootstrap
#: draw whose law is nearly flat in D gives ends such as -9.8e6 %, which also flattened the report's chart
FRAC_FLOOR = -10.0


def equal_loss_saving(params: Mapping[str, float], N: float, D: float, loss: float) -> tuple[float, float | None]:
    """(saving, D_eq) of one run of N parameters and D tokens at ``loss`` under the Chinchilla law ``params``;
    D_eq None (saving 1) where the law's scratch runs of size N never reach ``loss``."""
    room = loss - params["E"] - params["A"] * N ** (-params["alpha"])
    if room <= 0:
        return 1.0, None
    # in logs: a bootstrap draw with beta near 0 puts D_eq beyond the float range (0 or inf), which raised
    ratio = math.log(params["B"]) - math.log(room)
    beta = params["beta"]
    log_deq = ratio / beta if beta > 0 else (math.inf if ratio > 0 else -math.inf if ratio < 0 else 0.0)
    if log_deq >= 700:  # no float D reaches it: as below the floor
        return 1.0, None
    return 1.0 - math.exp(min(math.log(D) - log_deq, 700.0)), math.exp(log_deq)


def _draws(rec: Mapping[str, Any]) -> list[dict[str, float]]:
    """The law's bootstrap parameter draws (the fit's own values where a parameter was not resampled)."""
    boot = rec.get("bootstrap") or {}
    n = min((len(v) for k, v in boot.items() if k in rec["params"]), default=0)
    out = []
    for i in range(n):
        d = {k: float(boot[k][i]) if k in boot and boot[k][i] is not None else float(v)
             for k, v in rec["params"].items()}
        if all(math.isfinite(x) for x in d.values()):
            out.append(d)
    return out


def _median_interval(S: np.ndarray, rng: np.random.Generator) -> tuple[float | None, float | None]:
    """Percentile interval of the median over runs: each resample draws runs with replacement and one law
    draw (a column of ``S``: runs x draws)."""
    n_runs, n_draws = S.shape
    if n_runs < 2 or n_draws < 1:
        return None, None
    rows = rng.integers(0, n_runs, size=(_RESAMPLES, n_runs))
    cols = rng.integers(0, n_draws, size=_RESAMPLES)
    meds = np.median(S[rows, cols[:, None]], axis=1)
    q = (1 - _LEVEL) / 2
    lo, hi = np.quantile(meds, [q, 1 - q])
    return float(lo), float(hi)


def law_saving(df: Any, lang: str, scratch: Mapping[str, Any] | None, seed: int = 0) -> dict[str, Any]:
    """Per CPT run of ``lang`` (its last main-trajectory point in ``df``, the fit-study points frame with N in
    the fit's convention): the saving by the scratch law ``scratch`` (a fit record) with its bootstrap
    interval, and per replay ratio (and over all runs) the median with a two-level bootstrap interval."""
    base = {"lang": lang, "method": __doc__.strip().splitlines()[0], "level": _LEVEL}
    if not scratch or scratch.get("status") != "ok":
        return {**base, "status": "skipped", "reason": "no scratch Chinchilla fit of this language"}
    cpt = df[(df["init"] == "cpt") & (df["lang"] == lang)]
    if "branch" in cpt.columns:
        cpt = cpt[cpt["branch"].isna()]
    if cpt.empty:
        return {**base, "status": "skipped", "reason": "no CPT run of this language"}
    last = cpt.loc[cpt.groupby("run")["step"].idxmax()] if "step" in cpt.columns else cpt.groupby("run").tail(1)
    scr = df[(df["init"] == "scratch") & (df["lang"] == lang)]
    d_max = scr.groupby("N")["D"].max().to_dict()  # the largest scratch D fitted at each size
    draws = _draws(scratch)
    runs, S = [], []
    for _, r in last.sort_values(["replay", "N", "run"]).iterrows():
        N, D, L = float(r["N"]), float(r["D"]), float(r["loss"])
        s, d_eq = equal_loss_saving(scratch["params"], N, D, L)
        sd = [equal_loss_saving(p, N, D, L)[0] for p in draws] or [s]
        iv = _interval(sd)
        runs.append({"run_id": str(r["run"]), "size": r.get("size"), "replay": float(r["replay"]), "N": N, "D": D,
                     "loss": L, "scratch_tokens_equiv": d_eq, "frac_saved": s,
                     "frac_saved_lo": iv["lo"], "frac_saved_hi": iv["hi"],
                     "below_law_floor": d_eq is None,
                     "extrapolated": d_eq is None or d_eq > d_max.get(N, 0.0)})
        S.append(sd)
    rng = np.random.default_rng(seed)
    groups: list[tuple[str, Sequence[int]]] = [
        (f"{rep:g}", [i for i, x in enumerate(runs) if x["replay"] == rep])
        for rep in sorted({x["replay"] for x in runs})]
    if len(groups) > 1:
        groups.append(("all", list(range(len(runs)))))
    M = np.array(S)  # runs x draws: every run has one saving per law draw (or its one estimate without draws)
    by = []
    for name, idx in groups:
        lo, hi = _median_interval(M[list(idx)], rng)
        by.append({"replay": name, "n_runs": len(idx),
                   "median_frac_saved": float(np.median([runs[i]["frac_saved"] for i in idx])),
                   "median_frac_saved_lo": lo, "median_frac_saved_hi": hi,
                   "n_extrapolated": sum(runs[i]["extrapolated"] for i in idx)})
    return {**base, "status": "ok", "law_fit": scratch.get("fit_id"), "n_law_draws": len(draws),
            "reliable": bool((scratch.get("identifiability") or {}).get("allocation_reliable", True)),
            "interval": f"{_LEVEL:.0%} percentile bootstrap of the median: runs resampled with replacement, "
                        f"each resample through one of the law's {len(draws)} bootstrap draws ({_RESAMPLES} resamples)",
            "by_replay": by, "per_run": runs}
