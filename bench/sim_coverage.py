"""Interval coverage over simulated studies with a known truth (cptscale.simulate).

    python bench/sim_coverage.py [--config workflow/studies/paper.yaml] [--studies 50] [--design planned|wsd]
                                 [--points all|annealed] [--bootstrap 200] [--scheme pairs|bayes|wild|wild3]
                                 [--out bench/results/sim_coverage]

Each study is the config's runs simulated with another seed; its points are selected as `cptscale db
points` selects them (``--points all``: every evaluation after fit.min_step_fraction, the pipeline's
default; ``annealed``: only each run's final evaluation and its WSD branches' ends) and fitted as
`cptscale fit-study` fits them (cptscale.fit.fit_law with the config's grid, Huber delta and reduction;
bootstrap over runs, ``--scheme`` pairs (the default: runs resampled with replacement), bayes (one Exp(1)
weight per run), wild (one random sign per run on its residuals, design fixed) or wild3 (the same on
jackknife residuals); the CPT law with E, A, alpha frozen from the scratch fit and resampled with its
bootstrap). Printed: the share of studies whose 95 % interval contains the truth, for alpha, beta, a and
N_opt at --budget (scratch law) and beta', gamma, a (CPT law), against the nominal 95 % (target 90-98 %),
with the median interval width and the mean bias. ``--design wsd`` adds WSD decay branches at 0.25 and
0.5 of every run. Writes coverage.json and coverage.svg (the figure in the README).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np


def _contains(iv: dict, x: float) -> bool | None:
    if iv.get("lo") is None or iv.get("hi") is None:
        return None
    return bool(iv["lo"] <= x <= iv["hi"])


def one_study(cfg, truth, seed: int, points: str, bootstrap: int, budget: float, grid: str,
              scheme: str = "pairs") -> dict:
    from cptscale.fit.estimate import fit_law
    from cptscale.fit.uncertainty import bootstrap_law
    from cptscale.simulate.study import points_frame, simulate_study

    sims = simulate_study(cfg, truth, seed)
    df = points_frame(sims, cfg.fit.min_step_fraction)
    if points == "annealed":
        last = df.groupby("run")["step"].transform("max")
        df = df[(df["step"] == last) | df["branch"].notna()]
    kw = {"delta": cfg.fit.huber_delta, "reduction": cfg.fit.reduction, "grid": grid}
    out: dict = {"seed": seed}
    for lang in sorted(df.loc[df["init"] == "cpt", "lang"].unique()):
        sc = df[(df["init"] == "scratch") & (df["lang"] == lang)]
        law = truth.scratch_law(lang)
        fr = fit_law(sc, "chinchilla", **kw)
        bs = bootstrap_law(sc, fr, bootstrap, seed, [budget], scheme=scheme)
        true = {"alpha": law.alpha, "beta": law.beta, "a": law.allocation()["a"], "N_opt": law.n_opt(budget)}
        iv = {**{k: bs["intervals"][k] for k in ("alpha", "beta", "a")},
              "N_opt": _iv(bs["alloc"][budget]["N_opt"])}
        est = {k: fr.params.get(k) for k in ("alpha", "beta")}
        out[f"scratch-{lang}"] = _record(true, iv, est, fr.meta.get("on_bound", []))
        cp = df[(df["init"] == "cpt") & (df["lang"] == lang)]
        cp = cp[cp["replay"] == cp["replay"].min()].assign(D=lambda x: x["D_target"])
        c = truth.cpt_law(lang)
        fixed = {k: fr.params[k] for k in ("E", "A", "alpha")}
        fc = fit_law(cp, "cpt", fixed, **kw)
        bc = bootstrap_law(cp, fc, bootstrap, seed, [budget], scheme=scheme,
                           fixed_samples={k: bs["samples"][k] for k in fixed},
                           frozen_from="the scratch fit's bootstrap", pair_with=bs["run_draws"])
        ctrue = {"beta'": c.beta, "gamma": c.gamma, "a": c.allocation(law)["a"]}
        civ = {"beta'": bc["intervals"]["beta"], "gamma": bc["intervals"]["gamma"], "a": bc["intervals"]["a"]}
        out[f"cpt-{lang}"] = _record(ctrue, civ, {"beta'": fc.params["beta"], "gamma": fc.params["gamma"]},
                                     fc.meta.get("on_bound", []))
    return out


def _iv(x) -> dict:
    x = np.asarray(x, float)
    x = x[np.isfinite(x)]
    if len(x) < 2:
        return {"lo": None, "hi": None}
    lo, hi = np.quantile(x, [0.025, 0.975])
    return {"lo": float(lo), "hi": float(hi)}


def _record(true: dict, iv: dict, est: dict, on_bound: list) -> dict:
    return {k: {"truth": true[k], "lo": iv[k].get("lo"), "hi": iv[k].get("hi"), "estimate": est.get(k),
                "contains": _contains(iv[k], true[k])} for k in true} | {"on_bound": list(on_bound)}


def summarize(studies: list[dict]) -> list[dict]:
    rows = []
    for law in sorted({k for s in studies for k in s if k != "seed"}):
        recs = [s[law] for s in studies if law in s]
        for q in [k for k in recs[0] if k != "on_bound"]:
            hits = [r[q]["contains"] for r in recs]
            valid = [h for h in hits if h is not None]
            widths = [r[q]["hi"] - r[q]["lo"] if q != "N_opt" else r[q]["hi"] / r[q]["lo"]
                      for r in recs if r[q]["lo"] is not None and r[q]["lo"] > (0 if q == "N_opt" else -math.inf)]
            est = [r[q]["estimate"] for r in recs if r[q].get("estimate") is not None]
            rows.append({"law": law, "quantity": q, "studies": len(recs), "with_interval": len(valid),
                         "coverage": float(np.mean(valid)) if valid else None,
                         "median_width": float(np.median(widths)) if widths else None,
                         "width_unit": "hi/lo" if q == "N_opt" else "hi-lo",
                         "mean_bias": float(np.mean(est) - recs[0][q]["truth"]) if est else None,
                         # median interval width over the normal width of the estimates' spread across studies:
                         # ~1 when the intervals are as wide as the sampling spread calls for (pairs: beta 1.3)
                         "width_over_spread": float(np.median(widths) / (2 * 1.96 * np.std(est, ddof=1)))
                         if len(est) > 2 and widths and q != "N_opt" else None,
                         "on_bound_share": float(np.mean([bool(r["on_bound"]) for r in recs]))})
    return rows


def figure(rows: list[dict], path: Path, title: str) -> None:
    import altair as alt
    import pandas as pd
    import vl_convert as vlc

    df = pd.DataFrame([r for r in rows if r["coverage"] is not None])
    df["label"] = df["law"] + " " + df["quantity"]
    bars = alt.Chart(df).mark_bar().encode(
        x=alt.X("coverage:Q", scale=alt.Scale(domain=[0, 1]), title="share of studies whose 95 % interval holds the truth"),
        y=alt.Y("label:N", title=None, sort=None), tooltip=["label", "coverage", "median_width", "mean_bias"])
    band = alt.Chart(pd.DataFrame({"lo": [0.90], "hi": [0.98]})).mark_rect(opacity=0.2, color="green").encode(
        x="lo:Q", x2="hi:Q")
    chart = (band + bars).properties(title=title, width=420, height=22 * len(df))
    path.write_text(vlc.vegalite_to_svg(chart.to_json()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="workflow/studies/paper.yaml")
    ap.add_argument("--truth", help="law file (default: cptscale.simulate.default_truth())")
    ap.add_argument("--studies", type=int, default=50)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + studies - 1 "
                    "(to add studies to an earlier run: --summarize both studies.jsonl files together)")
    ap.add_argument("--design", choices=["planned", "wsd"], default="planned")
    ap.add_argument("--points", choices=["all", "annealed"], default=None, help="default: the config's fit.points")
    ap.add_argument("--bootstrap", type=int, default=None, help="default: the config's fit.bootstrap")
    ap.add_argument("--scheme", choices=["pairs", "bayes", "wild", "wild3", "wildjk"], default="pairs",
                    help="bootstrap: pairs (runs resampled) or wild (per-run signs on the residuals, design fixed)")
    ap.add_argument("--budget", type=float, default=1e21)
    ap.add_argument("--grid", choices=["chinchilla", "coarse"], default=None,
                    help="start grid of the fits (default: the config's fit.grid; coarse: 243 starts, for speed)")
    ap.add_argument("--out", default="bench/results/sim_coverage")
    ap.add_argument("--summarize", nargs="+", help="only summarize the studies.jsonl files of earlier (interrupted "
                    "or complementary) runs")
    args = ap.parse_args()

    from cptscale.simulate import Truth, default_truth
    from cptscale.simulate.design import _variant
    from cptscale.validation import load_config

    if args.summarize:
        studies = [json.loads(line) for f in args.summarize for line in Path(f).read_text().splitlines() if line.strip()]
        seeds = [s["seed"] for s in studies]
        if len(set(seeds)) != len(seeds):
            raise SystemExit("a seed appears twice in the --summarize files: give runs with disjoint seeds")
        rows = summarize(studies)
        for r in rows:
            print(json.dumps(r))
        svg = Path(args.summarize[0]).with_name("coverage.svg")
        figure(rows, svg, f"{Path(args.summarize[0]).parent.name}: {len(studies)} studies")
        print(f"wrote {svg}", file=sys.stderr)
        return 0
    cfg = load_config(args.config)
    if args.design == "wsd":
        cfg = _variant(cfg, {"train": {"schedule": "wsd", "wsd_branches": [0.25, 0.5]}})
    truth = Truth.load(args.truth) if args.truth else default_truth()
    nboot = args.bootstrap or cfg.fit.bootstrap
    args.points = args.points or cfg.fit.points
    grid = args.grid or cfg.fit.grid
    out = Path(args.out) / (f"{cfg.study}-{args.design}-{args.points}" + ("" if args.scheme == "pairs" else f"-{args.scheme}")) / (f"seed{args.first_seed}" if args.first_seed else "")
    out.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.perf_counter(), time.process_time()
    studies = []
    for i, seed in enumerate(range(args.first_seed, args.first_seed + args.studies)):
        studies.append(one_study(cfg, truth, seed, args.points, nboot, args.budget, grid, args.scheme))
        print(f"study {i + 1}/{args.studies} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        # after every study, so an interrupted bench still reports the studies it finished
        (out / "studies.jsonl").open("a" if i else "w").write(json.dumps(studies[-1]) + "\n")
    rows = summarize(studies)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"{args.studies} simulated studies of {cfg.study} (design {args.design}, points {args.points}, "
          f"{nboot} {args.scheme} bootstrap resamples over runs, grid {grid}): {wall:.0f} s wall, {cpu:.0f} s CPU")
    print(f"{'law':<12} {'quantity':<8} {'coverage':>8} {'vs 0.95':>8} {'median width':>13} {'mean bias':>10} "
          f"{'width/spread':>12} {'on bound':>8}")
    for r in rows:
        cov = r["coverage"]
        print(f"{r['law']:<12} {r['quantity']:<8} {cov if cov is None else format(cov, '.2f'):>8} "
              f"{'' if cov is None else format(cov / 0.95, '.2f'):>8} "
              f"{'' if r['median_width'] is None else format(r['median_width'], '.3g'):>13} "
              f"{'' if r['mean_bias'] is None else format(r['mean_bias'], '+.3g'):>10} "
              f"{'' if r['width_over_spread'] is None else format(r['width_over_spread'], '.2f'):>12} "
              f"{r['on_bound_share']:>8.2f}")
    (out / "coverage.json").write_text(json.dumps({"config": args.config, "design": args.design, "points": args.points,
                                                   "bootstrap": nboot, "scheme": args.scheme, "grid": grid, "budget": args.budget, "wall_s": wall,
                                                   "cpu_s": cpu, "rows": rows, "studies": studies}, indent=1))
    figure(rows, out / "coverage.svg", f"{cfg.study}: {args.design} design, {args.points} points, {args.scheme} bootstrap, "
           f"{args.studies} studies")
    print(f"wrote {out}/coverage.json and coverage.svg")
    return 0


if __name__ == "__main__":
    sys.exit(main())
