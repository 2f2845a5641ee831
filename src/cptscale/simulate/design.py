"""``cptscale design``: how precisely a planned study will pin its laws down, before compute is spent.

For the study's design and a few alternatives (one more size, WSD decay branches, other replay ratios,
fewer tokens per parameter), each law the study fits (per target language: the scratch Chinchilla law;
the extended CPT law with E, A, alpha frozen from it) is examined on the simulator's points, selected as
``cptscale db points`` selects them:

* **bias**: the law fitted (warm-started at the truth, the pipeline's Huber objective) to the noiseless
  simulated points; a checkpoint in the middle of a cosine run is not a fully annealed run of that many
  tokens, so point selection alone moves the estimate;
* **spread**: the linearised covariance of that fit under the truth's noise (one draw per run, one per
  evaluation: the cluster covariance ``(J'J)^-1 J' S J (J'J)^-1``; times pi/2 when the Huber delta is
  below the noise, where Huber behaves like least absolute deviations), and, for the planned design,
  ``studies`` noisy studies fitted the same way (Monte Carlo; noise drawn on the noiseless points with
  the simulator's noise model);
* **expected interval width** of the allocation exponent a and of N_opt at each ``fit.budgets`` budget
  (95 %: +-1.96 sd), the **expected held-out error** of the largest size (fit without it, predict it) and
  whether the law is **identifiable** (every exponent's sd below a quarter of its value, bias below 2 sd).

Point selection (``fit.points``: all evaluations or only annealed ones) is compared as an alternative too.
The alternative that buys the most precision per FLOP is the one with the largest
``(mse_a(planned) / mse_a(alternative)) / (FLOPs(alternative) / FLOPs(planned))``, the mean squared error
of a counting both its spread and its bias (summed as precisions over the study's laws).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from cptscale.simulate.truth import Truth

Z95 = 1.959963984540054
#: Identifiable: every free exponent's sd below this share of its true value (and bias below 2 sd).
REL_SD_MAX = 0.25
NAMES = {"chinchilla": ["E", "A", "B", "alpha", "beta"], "cpt": ["E", "A", "B", "alpha", "beta", "gamma"]}
LOGP = ("E", "A", "B")


@dataclass
class LawData:
    law: str
    lang: str
    kind: str
    N: np.ndarray
    D: np.ndarray
    L: np.ndarray  #: noiseless losses
    run: np.ndarray
    truth: dict[str, float]
    fixed: dict[str, float]


def _internal(params: dict[str, float], names: list[str]) -> np.ndarray:
    return np.array([math.log(params[k]) if k in LOGP else float(params[k]) for k in names])


def _params(th: np.ndarray, names: list[str]) -> dict[str, float]:
    return {k: float(math.exp(th[i]) if k in LOGP else th[i]) for i, k in enumerate(names)}


def _log_pred(th: np.ndarray, lN: np.ndarray, lD: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """log L-hat and its Jacobian (n, p) in internal coordinates (log E, log A, log B, alpha, beta[, gamma])."""
    e, a, b, al, be = th[:5]
    ga = th[5] if len(th) > 5 else 0.0
    tE, tA, tB = np.exp(e) * np.ones_like(lN), np.exp(a - al * lN), np.exp(b - be * lD - ga * lN)
    L = tE + tA + tB
    cols = [tE / L, tA / L, tB / L, -lN * tA / L, -lD * tB / L]
    if len(th) > 5:
        cols.append(-lN * tB / L)
    return np.log(L), np.stack(cols, 1)


def _allocation(th: np.ndarray, names: list[str], budgets: list[float]) -> np.ndarray:
    """[a, log N_opt(C) for C in budgets] of internal parameters (nan where no optimum exists)."""
    p = _params(th, names)
    ga = p.get("gamma", 0.0)
    s = p["alpha"] + p["beta"] - ga
    if not (p["beta"] - ga > 0 and s > 0 and p["alpha"] > 0):
        return np.full(1 + len(budgets), np.nan)
    a = p["beta"] / s
    logG = (math.log(p["alpha"] * p["A"]) - math.log((p["beta"] - ga) * p["B"])) / s
    return np.array([a, *[logG + a * math.log(C / 6) for C in budgets]])


def _fit(d: LawData, L: np.ndarray, start: np.ndarray, delta: float, reduction: str,
         mask: np.ndarray | None = None) -> np.ndarray:
    """The pipeline's Huber fit (cptscale.fit's objective and batched L-BFGS), warm-started at ``start``."""
    from cptscale.fit.optimizer import _run_batch

    names = NAMES[d.law]
    free = [i for i, k in enumerate(names) if k not in d.fixed]
    m = np.ones(len(d.N), bool) if mask is None else mask
    res = _run_batch(start[None], free, np.log(d.N[m]), np.log(d.D[m]), np.log(L[m]), delta, reduction,
                     maxiter=3000, ftol=1e-13)
    th = start.copy()
    th[free] = res["x"][0]
    return th


def _cov(d: LawData, th: np.ndarray, noise: Any, delta: float, mask: np.ndarray | None = None) -> np.ndarray:
    """Cluster covariance of the free parameters (runs are the clusters), zero rows/cols for frozen ones."""
    names = NAMES[d.law]
    free = [i for i, k in enumerate(names) if k not in d.fixed]
    m = np.ones(len(d.N), bool) if mask is None else mask
    _, J = _log_pred(th, np.log(d.N[m]), np.log(d.D[m]))
    J = J[:, free]
    run = d.run[m]
    JtJ = J.T @ J
    meat = noise.eval**2 * JtJ
    for r in np.unique(run):
        g = J[run == r].sum(0)
        meat += noise.run**2 * np.outer(g, g)
    try:
        inv = np.linalg.inv(JtJ)
    except np.linalg.LinAlgError:
        inv = np.linalg.pinv(JtJ)
    cov_free = inv @ meat @ inv
    if delta < math.hypot(noise.run, noise.eval):  # Huber with a tiny delta is least absolute deviations
        cov_free *= math.pi / 2
    cov = np.zeros((len(names), len(names)))
    cov[np.ix_(free, free)] = cov_free
    return cov


def _exp(x: float) -> float:
    """exp that says inf instead of overflowing (an unidentified law has astronomically wide intervals)."""
    return math.exp(x) if x < 700 else math.inf


def _grad(f: Any, th: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    base = f(th)
    G = np.zeros((len(base), len(th)))
    for j in range(len(th)):
        t = th.copy()
        t[j] += eps
        G[:, j] = (f(t) - base) / eps
    return G


def law_data(cfg: Any, truth: Truth, sims: dict[str, Any], selection: str = "all") -> list[LawData]:
    """The points each law of the study is fitted on, noiseless: ``all`` (the pipeline's selection: every
    evaluation after ``fit.min_step_fraction``) or ``annealed`` (each run's final evaluation and its WSD
    branches' ends: only fully annealed points)."""
    from cptscale.simulate.study import points_frame

    df = points_frame(sims, cfg.fit.min_step_fraction)
    if not len(df):
        return []
    if selection == "annealed":
        last = df.groupby("run")["step"].transform("max")
        df = df[(df["step"] == last) | df["branch"].notna()]
    if cfg.budget.param_count == "nonembedding":
        df["N"] = df["params_nonemb"].astype(float)
    out = []
    for lang in sorted(df["lang"].unique()):
        base = truth.scratch_law(lang)
        tr = {"E": base.E, "A": base.A, "B": base.B, "alpha": base.alpha, "beta": base.beta}
        sc = df[(df["init"] == "scratch") & (df["lang"] == lang)]
        if len(sc):
            out.append(LawData("chinchilla", lang, "scratch", sc["N"].to_numpy(float), sc["D"].to_numpy(float),
                               sc["loss"].to_numpy(float), sc["run"].astype(str).to_numpy(), tr, {}))
        cp = df[(df["init"] == "cpt") & (df["lang"] == lang)]
        if len(cp) and lang in truth.cpt:
            cp = cp[cp["replay"] == cp["replay"].min()]  # the fit's default: the smallest replay ratio
            c = truth.cpt_law(lang)
            trc = {"E": base.E, "A": base.A, "B": c.B, "alpha": base.alpha, "beta": c.beta, "gamma": c.gamma}
            out.append(LawData("cpt", lang, "cpt", cp["N"].to_numpy(float), cp["D_target"].to_numpy(float),
                               cp["loss"].to_numpy(float), cp["run"].astype(str).to_numpy(), trc,
                               {k: trc[k] for k in ("E", "A", "alpha")}))
    return out


def examine(d: LawData, truth: Truth, budgets: list[float], delta: float, reduction: str, studies: int = 0,
            seed: int = 0) -> dict[str, Any]:
    """Bias, spread, expected widths, held-out error and identifiability of one law on one design."""
    names = NAMES[d.law]
    th0 = _internal(d.truth, names)
    th = _fit(d, d.L, th0, delta, reduction)  # what the fit converges to without noise: the selection bias
    cov = _cov(d, th, truth.noise, delta)
    exps = [k for k in ("alpha", "beta", "gamma") if k in names and k not in d.fixed]
    sd = {k: float(math.sqrt(max(cov[names.index(k), names.index(k)], 0.0))) for k in exps}
    alloc = lambda t: _allocation(t, names, budgets)  # noqa: E731
    G = _grad(alloc, th)
    acov = G @ cov @ G.T
    asd = np.sqrt(np.clip(np.diag(acov), 0, None))
    truth_alloc, fit_alloc = alloc(th0), alloc(th)
    res: dict[str, Any] = {
        "law": d.law, "lang": d.lang, "kind": d.kind, "points": len(d.N), "runs": len(set(d.run)),
        "sizes": len(set(d.N)),
        "truth": {k: d.truth[k] for k in names if k not in d.fixed},
        "noiseless_fit": {k: v for k, v in _params(th, names).items() if k not in d.fixed},
        "sd": sd,
        "bias": {k: float(th[names.index(k)] - th0[names.index(k)]) for k in exps},
        "a": {"truth": float(truth_alloc[0]), "bias": float(fit_alloc[0] - truth_alloc[0]), "sd": float(asd[0]),
              "width95": float(2 * Z95 * asd[0])},
        "N_opt": [{"C": C, "truth": _exp(truth_alloc[i + 1]),
                   "bias_factor": _exp(fit_alloc[i + 1] - truth_alloc[i + 1]),
                   "width95_factor": _exp(2 * Z95 * asd[i + 1])} for i, C in enumerate(budgets)],
    }
    rel = [sd[k] / abs(d.truth[k]) if d.truth[k] else math.inf for k in exps]
    biased = [abs(res["bias"][k]) > 2 * sd[k] for k in exps]
    # N_opt moved by point selection beyond twice its spread (e.g. a cosine run's unannealed checkpoints)
    n_biased = [(n["C"], n["bias_factor"]) for i, n in enumerate(res["N_opt"])
                if np.isfinite(asd[i + 1]) and abs(fit_alloc[i + 1] - truth_alloc[i + 1]) > 2 * asd[i + 1]]
    res["identifiable"] = bool(all(np.isfinite(rel)) and max(rel) < REL_SD_MAX and not any(biased) and not n_biased)
    res["identifiability"] = ("identifiable" if res["identifiable"] else
                              "not identifiable: " + "; ".join(
                                  [f"sd({k}) = {sd[k]:.3g}" + (f", {r:.0%} of {d.truth[k]:g}" if r < 10 else
                                                                 " (unbounded)") for k, r in zip(exps, rel, strict=True)
                                   if not r < REL_SD_MAX] +
                                  [f"bias of {k} {res['bias'][k]:+.3g} > 2 sd" for k, b in zip(exps, biased, strict=True) if b] +
                                  [f"N_opt biased x{f:.3g} at C = {C:.0e} (> 2 sd)" for C, f in n_biased[:1]]))
    res["heldout"] = _heldout(d, th, truth, delta, reduction)
    if d.law == "chinchilla" and "E" not in d.fixed:  # the pipeline's first remedy when the free law is not identified
        fx = examine(replace(d, fixed={"E": d.truth["E"]}), truth, budgets, delta, reduction)
        res["fixed_E"] = {"E": d.truth["E"], "identifiable": fx["identifiable"],
                          "identifiability": fx["identifiability"], "a": fx["a"], "heldout": fx["heldout"],
                          "note": "the fixed-E remedy at its best: E held at its true value (fit.fixed_E, or E from "
                                  "a separate fit, adds that estimate's own error)"}
    if studies:
        res["monte_carlo"] = _monte_carlo(d, th0, truth, budgets, delta, reduction, studies, seed)
    return res


def _heldout(d: LawData, th: np.ndarray, truth: Truth, delta: float, reduction: str) -> dict[str, Any]:
    """Expected error predicting the largest size from the others: bias of the noiseless fit without it,
    the linearised spread of that prediction and the noise of the observed losses (root mean square, nats)."""
    nmax = d.N.max()
    train = nmax > d.N
    if len(set(d.N[train])) < (3 if d.law == "chinchilla" else 2):
        return {"status": "skipped", "reason": "too few sizes without the largest"}
    names = NAMES[d.law]
    th_ho = _fit(d, d.L, th, delta, reduction, train)
    cov = _cov(d, th_ho, truth.noise, delta, train)
    test = ~train
    lp, J = _log_pred(th_ho, np.log(d.N[test]), np.log(d.D[test]))
    pred = np.exp(lp)
    free = [i for i, k in enumerate(names) if k not in d.fixed]
    var_log = np.einsum("ij,jk,ik->i", J[:, free], cov[np.ix_(free, free)], J[:, free])
    noise_var = truth.noise.run**2 + truth.noise.eval**2
    err2 = (pred - d.L[test]) ** 2 + (var_log + noise_var) * d.L[test] ** 2
    return {"status": "ok", "heldout_N": float(nmax), "points": int(test.sum()),
            "bias_rmse": float(np.sqrt(np.mean((pred - d.L[test]) ** 2))), "expected_rmse": float(np.sqrt(err2.mean()))}


def _monte_carlo(d: LawData, th0: np.ndarray, truth: Truth, budgets: list[float], delta: float, reduction: str,
                 studies: int, seed: int) -> dict[str, Any]:
    """``studies`` noisy copies of the design's points, each fitted (warm start at the truth): the
    sampling distribution of a and N_opt that a bootstrap interval should match."""
    names = NAMES[d.law]
    rng = np.random.default_rng(seed)
    runs, inv = np.unique(d.run, return_inverse=True)
    draws = []
    for _ in range(studies):
        eps = rng.normal(0, truth.noise.run, len(runs))[inv] + rng.normal(0, truth.noise.eval, len(d.N))
        th = _fit(d, d.L * np.exp(eps), th0, delta, reduction)
        draws.append(_allocation(th, names, budgets))
    A = np.array(draws)
    ok = np.isfinite(A).all(1)
    A = A[ok]
    out: dict[str, Any] = {"studies": studies, "valid": int(ok.sum())}
    if len(A) > 2:
        lo, hi = np.quantile(A, [0.025, 0.975], axis=0)
        out["a_width95"] = float(hi[0] - lo[0])
        out["N_opt_width95_factor"] = [_exp(hi[i + 1] - lo[i + 1]) for i in range(len(budgets))]
    return out


# -- designs ---------------------------------------------------------------------------------------
def alternatives(cfg: Any) -> list[tuple[str, Any | None, str]]:
    """(name, config or None, what changes / why not available) of the compared designs."""
    from cptscale.ladder import paper_ffn

    out: list[tuple[str, Any | None, str]] = [("planned", cfg, "the study as configured")]
    sizes = list(cfg.ladder.sizes)
    big = max(sizes, key=lambda s: cfg.shape(s).params(cfg.vocab_size))
    sh = cfg.shape(big)
    name = f"{big}-plus"
    try:
        custom = {**{k: v.model_dump() for k, v in cfg.ladder.custom.items()},
                  name: {"hidden": sh.hidden + 2 * sh.head_dim, "layers": sh.layers + 4, "heads": sh.heads + 2,
                         "ffn": paper_ffn(sh.hidden + 2 * sh.head_dim) if sh.ffn == paper_ffn(sh.hidden) else None}}
        out.append(("one more size", _variant(cfg, {"ladder": {"sizes": [*sizes, name], "custom": custom}}),
                    f"add {name} (hidden {sh.hidden + 2 * sh.head_dim}, {sh.layers + 4} layers) above {big}"))
    except Exception as exc:  # an alternative that cannot be built is reported, not fatal
        out.append(("one more size", None, f"not available: {exc}"))
    br = sorted({*cfg.train.wsd_branches, 0.25, 0.5})
    out.append(("WSD branches", _variant(cfg, {"train": {"schedule": "wsd", "wsd_branches": br}}),
                f"train.schedule wsd with decay branches at {br} of each run"))
    ratios = sorted({min(cfg.replay.ratios), 0.05, 0.25})
    out.append(("other replay ratios", _variant(cfg, {"replay": {"ratios": ratios}}),
                f"replay.ratios {ratios} instead of {list(cfg.replay.ratios)}"))
    other = "all" if cfg.fit.points == "annealed" else "annealed"
    out.append((f"{other} points", _variant(cfg, {"fit": {"points": other}}),
                f"fit.points {other} instead of {cfg.fit.points} (no extra compute)"))
    if cfg.fit.points == "all":
        out.append(("WSD branches + annealed points",
                    _variant(cfg, {"train": {"schedule": "wsd", "wsd_branches": br}, "fit": {"points": "annealed"}}),
                    f"WSD decay branches at {br} and fit.points annealed"))
    tpp = cfg.budget.tokens_per_param / 2
    out.append(("fewer tokens/param", _variant(cfg, {"budget": {"tokens_per_param": tpp}}),
                f"budget.tokens_per_param {tpp:g} instead of {cfg.budget.tokens_per_param:g}"))
    return out


def _variant(cfg: Any, update: dict[str, Any]) -> Any:
    from cptscale.validation import parse_config

    d = cfg.model_dump(mode="json", exclude_none=False)
    for section, vals in update.items():
        d[section] = {**(d.get(section) or {}), **vals}
    d = {k: v for k, v in d.items() if v is not None or k in ("iplt",)}
    if d.get("iplt") is None:
        d.pop("iplt", None)
    return parse_config(d)


def design_report(cfg: Any, truth: Truth, studies: int = 50, seed: int = 0,
                  compare: bool = True) -> dict[str, Any]:
    """Every design (planned first), its laws' expected precision, and the ranking by precision per FLOP."""
    from cptscale import plan as P
    from cptscale.simulate.study import simulate_study

    t0 = time.perf_counter()
    budgets = [float(b) for b in cfg.fit.budgets]
    delta, reduction = cfg.fit.huber_delta, cfg.fit.reduction
    noiseless = truth.with_noise(0.0)
    designs = []
    for name, dcfg, what in (alternatives(cfg) if compare else [("planned", cfg, "the study as configured")]):
        if dcfg is None:
            designs.append({"design": name, "change": what, "available": False})
            continue
        runs = [r for r in P.plan_study(dcfg) if r.arm is None]
        sims = simulate_study(dcfg, noiseless, seed, runs)
        laws = [examine(d, truth, budgets, delta, reduction, studies if name == "planned" else 0, seed)
                for d in law_data(dcfg, truth, sims, dcfg.fit.points)]
        designs.append({"design": name, "change": what, "available": True, "runs": len(runs),
                        "flops": float(sum(r.flops_6nd for r in runs)), "laws": laws})
    _rank(designs)
    return {"format": "cptscale-design/1", "study": cfg.study, "truth": truth.name, "budgets": budgets,
            "noise": {"run": truth.noise.run, "eval": truth.noise.eval}, "studies": studies,
            "designs": designs, "seconds": round(time.perf_counter() - t0, 2)}


def _rank(designs: list[dict[str, Any]]) -> None:
    """Precision of a design = the inverse mean squared error of a (spread and point-selection bias),
    summed over its laws; ``gain_per_flop`` relative to the planned design."""
    def precision(dd: dict[str, Any]) -> float:
        return sum(1 / max(law["a"]["sd"] ** 2 + law["a"]["bias"] ** 2, 1e-24) for law in dd.get("laws", [])
                   if np.isfinite(law["a"]["sd"]))

    base = designs[0]
    p0, f0 = precision(base), base.get("flops", 1.0)
    for dd in designs:
        if not dd.get("available"):
            continue
        dd["precision"] = precision(dd)
        dd["precision_ratio"] = dd["precision"] / p0 if p0 else math.inf
        dd["flops_ratio"] = dd["flops"] / f0
        dd["gain_per_flop"] = dd["precision_ratio"] / dd["flops_ratio"]
        dd["identifiable"] = all(law["identifiable"] for law in dd["laws"])
    alts = [dd for dd in designs[1:] if dd.get("available")]
    best = max(alts, key=lambda dd: dd["gain_per_flop"], default=None)
    for dd in designs:
        dd["best_per_flop"] = dd is best


def format_design(rep: dict[str, Any]) -> str:
    lines = [f"design of study {rep['study']} (truth {rep['truth']}; noise {rep['noise']['run']:.3g} per run, "
             f"{rep['noise']['eval']:.3g} per evaluation; {rep['seconds']:.1f} s)"]
    for dd in rep["designs"]:
        if not dd.get("available"):
            lines.append(f"  {dd['design']}: {dd['change']}")
            continue
        tag = "  <- most precision per FLOP" if dd.get("best_per_flop") else ""
        lines.append(f"  {dd['design']} ({dd['change']}): {dd['runs']} runs, FLOPs x{dd['flops_ratio']:.2f}, "
                     f"precision of a (1/mse) x{dd['precision_ratio']:.3g}, per FLOP x{dd['gain_per_flop']:.3g}{tag}")
        for law in dd["laws"]:
            a = law["a"]
            lines.append(f"      {law['kind']} {law['law']} ({law['lang']}, {law['sizes']} sizes, {law['points']} "
                         f"points): a = {a['truth']:.3f} +- {a['width95'] / 2:.3g} (95 %), bias {a['bias']:+.3g}; "
                         f"{law['identifiability']}")
            widths = ", ".join(f"{n['C']:.0e}: x{n['width95_factor']:.3g}" for n in law["N_opt"])
            lines.append(f"        N_opt 95 % interval width (hi/lo) per budget: {widths}")
            ho = law["heldout"]
            if ho.get("status") == "ok":
                lines.append(f"        held-out largest size ({ho['heldout_N']:.3g} params): expected rmse "
                             f"{ho['expected_rmse']:.4f} nats (bias {ho['bias_rmse']:.4f})")
            fx = law.get("fixed_E")
            if fx:
                ho2 = fx["heldout"]
                lines.append(f"        with E fixed at {fx['E']:.4g} (the fixed-E remedy at its best): a +- "
                             f"{fx['a']['width95'] / 2:.3g}, " + (f"held-out expected rmse {ho2['expected_rmse']:.4f} "
                             "nats, " if ho2.get("status") == "ok" else "") + fx["identifiability"])
            mc = law.get("monte_carlo")
            if mc and "a_width95" in mc:
                lines.append(f"        {mc['valid']} simulated studies: a 95 % width {mc['a_width95']:.3g}, N_opt "
                             "width " + ", ".join(f"x{w:.3g}" for w in mc["N_opt_width95_factor"]))
    return "\n".join(lines)


# -- the report's study-design section -------------------------------------------------------------
def design_rows(rep: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (design, law): what the report's table and figure show."""
    rows = []
    for dd in rep.get("designs", []):
        for law in dd.get("laws", []):
            ho = law.get("heldout") or {}
            rows.append({"design": dd["design"], "change": dd["change"], "law": f"{law['kind']} {law['law']} ({law['lang']})",
                         "flops_ratio": dd.get("flops_ratio"), "gain_per_flop": dd.get("gain_per_flop"),
                         "best": bool(dd.get("best_per_flop")), "a_width95": law["a"]["width95"],
                         "a_bias": law["a"]["bias"], "identifiable": law["identifiable"],
                         "identifiability": law["identifiability"], "heldout_rmse": ho.get("expected_rmse"),
                         **{f"N_opt x width @ {n['C']:.0e}": n["width95_factor"] for n in law["N_opt"]}})
    return rows


def design_table(rep: dict[str, Any]) -> str:
    import html

    head = ("<h2>Study design (simulated, before compute is spent)</h2><p>Expected 95 % interval width of the "
            f"allocation exponent a and of N_opt (hi/lo) per budget, from `cptscale design` (truth {html.escape(str(rep.get('truth')))}, "
            f"{rep.get('studies', 0)} simulated studies of the planned design). The alternative marked ★ buys the most "
            "precision of a per FLOP.</p>")
    rows = design_rows(rep)
    if not rows:
        return head + "<p>no law could be examined</p>"
    cols = [c for c in rows[0] if c not in ("change", "identifiability")]

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "inf" if math.isinf(v) else f"{v:.3g}"
        if isinstance(v, bool):
            return "★" if v else ""
        return html.escape(str(v))

    body = "".join("<tr>" + "".join(f"<td>{cell(r[c])}</td>" for c in cols) + "</tr>" for r in rows)
    return (head + '<table class="design"><tr>' + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr>"
            + body + "</table>")


def design_chart(rep: dict[str, Any]) -> Any:
    """Expected 95 % width of a per design and law (log scale; unidentified laws are drawn at the top)."""
    import altair as alt
    import pandas as pd

    df = pd.DataFrame(design_rows(rep))
    if df.empty:
        df = pd.DataFrame({"design": [], "law": [], "a_width95": []})
    df["a_width95"] = df["a_width95"].clip(upper=10.0)
    return alt.Chart(df).mark_bar().encode(
        x=alt.X("a_width95:Q", scale=alt.Scale(type="log"), title="expected 95 % width of a (capped at 10)"),
        y=alt.Y("design:N", sort=None, title=None), color=alt.Color("identifiable:N"),
        row=alt.Row("law:N", title=None), tooltip=list(df.columns),
    ).properties(width=380, title="Study design: expected precision of the allocation exponent a")
