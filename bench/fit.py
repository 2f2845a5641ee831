"""Benchmark: vectorised-grid fit vs a plain per-start scipy L-BFGS-B loop (Chinchilla 240 points).

The naive loop is timed on a random sample of starts (--naive-sample) and extrapolated to the full
grid; the naive optimum reported is the best over the sample plus the grid's best start.
"""

import argparse
import sys
import time
from pathlib import Path

# bench/tokenize.py would shadow the stdlib module pandas needs: drop this script's folder from the path.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy.optimize import minimize  # noqa: E402

from cptscale.fit import _grid, _obj_batch, fit_law  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--naive-sample", type=int, default=300)
args = ap.parse_args()
raw = pd.read_csv(Path(__file__).parents[1] / "tests/fixtures/chinchilla-fig4-extracted.csv")
df = pd.DataFrame({"N": raw["Model Size"], "D": raw["Training FLOP"] / (6 * raw["Model Size"]), "loss": raw["loss"]})
df = df[df["loss"] < np.sort(df["loss"])[-5]]
t = time.perf_counter()
r = fit_law(df)
t_fast = time.perf_counter() - t
lN, lD, lL = (np.log(df[c].to_numpy())[None] for c in ("N", "D", "loss"))
starts = _grid("chinchilla")
f0, _ = _obj_batch(starts, lN, lD, lL, 1e-3, "sum")
rng = np.random.default_rng(0)
idx = np.unique(np.r_[rng.choice(len(starts), args.naive_sample, replace=False), np.argmin(f0)])


def fun(x):
    f, g = _obj_batch(x[None], lN, lD, lL, 1e-3, "sum")
    return f[0], g[0]


t = time.perf_counter()
best = min((minimize(fun, starts[i], jac=True, method="L-BFGS-B") for i in idx), key=lambda z: z.fun)
t_naive = (time.perf_counter() - t) * len(starts) / len(idx)
print(f"vectorised fit: {t_fast:.2f}s  objective={r.meta['objective']:.8g}  params={r.params}")
print(f"naive loop (extrapolated to {len(starts)} starts from {len(idx)}): {t_naive:.1f}s  objective={best.fun:.8g}")
print(f"speed-up: {t_naive / t_fast:.1f}x  same optimum: {abs(best.fun - r.meta['objective']) < 1e-8}")
