"""Study-level fit quality on simulated studies: held-out error and interval coverage, annealed vs all points.

Each seed simulates the whole planned study of a config (its ladder, WSD schedule and decay branches,
evaluation steps; cptscale.fit.simstudy with the tiny-scale truth, losses through the LR schedule and the
simulator's measured noise), then fits the scratch Chinchilla law with both point selections:

* held-out: fit without the largest size, mean relative error of its losses (the number the demo reports);
* coverage: does the 95 % bootstrap interval (over runs) of a = beta/(alpha + beta) contain the truth;
* identified: no parameter on a bound and no interval reaching one.

A selection that cannot fit the law at all (cosine runs with annealed points: one point per run) counts as
not identified and not covered, with no held-out error.

Prints one row per selection and the ratio annealed / all (the baseline is `all`, in the same process).

    python bench/fit_quality.py [--config config.yaml] [--seeds 8] [--bootstrap 30]
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    from cptscale.errors import CLIError
    from cptscale.fit.estimate import exponents, fit_law
    from cptscale.fit.identify import identifiability, select_points
    from cptscale.fit.simstudy import simulated_points, tiny_truth
    from cptscale.fit.uncertainty import bootstrap_law
    from cptscale.validation import load_config

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="config.yaml")
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--bootstrap", type=int, default=30)
    ap.add_argument("--grid", default="coarse")
    args = ap.parse_args()
    cfg = load_config(args.config)
    truth = tiny_truth()
    law = truth.scratch_law(cfg.languages.targets[0])
    a_true = law.beta / (law.alpha + law.beta)
    stats: dict[str, dict[str, list[float]]] = {m: {"heldout": [], "covered": [], "identified": [], "a_err": []}
                                               for m in ("annealed", "all")}
    t0 = time.perf_counter()
    for seed in range(args.seeds):
        df = simulated_points(cfg, truth, seed=seed)
        sc = df[df["init"] == "scratch"].assign(N=lambda d: d["params_nonemb"].astype(float))
        for mode, st in stats.items():
            sel, _ = select_points(sc, mode)
            nmax = sel["N"].max()
            tr, te = sel[sel["N"] < nmax], sel[sel["N"] == nmax]
            try:
                h = fit_law(tr, "chinchilla", grid=args.grid)
            except CLIError:  # the design cannot fit the law with these points at all (e.g. cosine, annealed)
                for k in st:
                    st[k].append(np.nan if k in ("heldout", "a_err") else 0.0)
                continue
            st["heldout"].append(float(np.mean(np.abs(h.predict(te["N"], te["D"]) / te["loss"] - 1))))
            fr = fit_law(sel, "chinchilla", grid=args.grid)
            bs = bootstrap_law(sel, fr, args.bootstrap, seed)
            iv = bs["intervals"]["a"]
            st["covered"].append(float(iv["lo"] is not None and iv["lo"] <= a_true <= iv["hi"]))
            st["identified"].append(float(identifiability(fr, bs["intervals"], None, fr.meta["on_bound"])["identified"]))
            a = exponents(fr)["a"]
            st["a_err"].append(abs(a - a_true) if a is not None else np.nan)
    print(f"config {args.config}: {len(set(sc['N']))} sizes, {args.seeds} simulated studies, truth a = {a_true:.3f}, "
          f"{time.perf_counter() - t0:.0f} s")
    print(f"{'points':<10} {'held-out mean rel err':>22} {'max':>8} {'a coverage (95%)':>17} {'|a - a_true|':>13} "
          f"{'identified':>11}")
    for mode, st in stats.items():
        print(f"{mode:<10} {np.nanmean(st['heldout']):>22.2%} {np.nanmax(st['heldout']):>8.2%} {np.mean(st['covered']):>17.0%} "
              f"{np.nanmean(st['a_err']):>13.3f} {np.mean(st['identified']):>11.0%}")
    a, b = stats["annealed"], stats["all"]
    print(f"ratio annealed/all: held-out error {np.nanmean(a['heldout']) / np.nanmean(b['heldout']):.2f}, "
          f"|a - a_true| {np.nanmean(a['a_err']) / np.nanmean(b['a_err']):.2f}")


if __name__ == "__main__":
    main()
