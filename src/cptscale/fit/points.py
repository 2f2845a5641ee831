"""Fitting data: validated (N, D, loss) points with run ids, read from a DataFrame, tuple or points file."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cptscale.errors import CLIError


@dataclass
class Points:
    """Validated fitting data: one entry per (run, checkpoint); ``run`` groups points for the bootstrap."""

    N: np.ndarray
    D: np.ndarray
    L: np.ndarray
    run: np.ndarray
    index: np.ndarray  #: row numbers in the caller's table
    excluded: list[int] = field(default_factory=list)
    #: the excluded rows themselves (row, run, N, D, loss; None where not finite), for the fit record
    excluded_points: dict[str, list[Any]] = field(default_factory=dict)

    def subset(self, mask: np.ndarray) -> Points:
        return Points(self.N[mask], self.D[mask], self.L[mask], self.run[mask], self.index[mask], self.excluded,
                      self.excluded_points)

    @property
    def sizes(self) -> list[float]:
        return sorted({float(x) for x in self.N})


def _points(data: Any, exclude: Sequence[Any] | None = None, y: str = "loss") -> Points:
    """Points from a DataFrame (N, D or C, loss, optional run/run_id) or an (N, D, L) tuple; clear errors."""
    if isinstance(data, Points):
        return data
    if isinstance(data, tuple):
        N, D, L = (np.asarray(x, float).ravel() for x in data)
        run = np.array([str(i) for i in range(len(N))])
    else:
        cols = set(data.columns)
        if "D" not in cols and {"C", "N"} <= cols:
            data = data.assign(D=data["C"] / (6 * data["N"]))
        for c in ("N", "D", y):
            if c not in data.columns:
                raise CLIError(f"data lacks column {c!r} (need N, D (or C), {y})")
        N, D, L = (data[c].to_numpy(float) for c in ("N", "D", y))
        rc = "run" if "run" in cols else "run_id" if "run_id" in cols else None
        run = data[rc].astype(str).to_numpy() if rc else np.array([str(i) for i in range(len(N))])
    if not (len(N) == len(D) == len(L)):
        raise CLIError(f"N, D, loss have different lengths ({len(N)}, {len(D)}, {len(L)})")
    keep = np.ones(len(N), bool)
    for x in ([] if exclude is None else list(exclude)):
        if isinstance(x, int | np.integer) or (isinstance(x, str) and x.lstrip("-").isdigit()):
            i = int(x)
            if not -len(N) <= i < len(N):
                raise CLIError(f"--exclude {i}: no such row (the table has {len(N)} rows)")
            keep[i] = False
        else:
            hit = run == str(x)
            if not hit.any():
                raise CLIError(f"--exclude {x!r}: neither a row number nor a run id in the data")
            keep &= ~hit
    for nm, v in (("N", N), ("D", D), (y, L)):
        if not np.all(np.isfinite(v[keep])):
            bad = np.flatnonzero(keep & ~np.isfinite(v))[:5].tolist()
            raise CLIError(f"column {nm!r} has NaN/inf values (rows {bad}); drop, fix or --exclude them")
        if np.any(v[keep] <= 0):
            bad = np.flatnonzero(keep & (v <= 0))[:5].tolist()
            raise CLIError(f"column {nm!r} has non-positive values (rows {bad}); N, D and {y} must be > 0")
    idx = np.arange(len(N))

    def _vals(v: np.ndarray) -> list[float | None]:
        return [float(x) if np.isfinite(x) else None for x in v[~keep]]

    ex = {"rows": idx[~keep].tolist(), "run": run[~keep].tolist(), "N": _vals(N), "D": _vals(D), y: _vals(L)}
    return Points(N[keep], D[keep], L[keep], run[keep], idx[keep], idx[~keep].tolist(), ex)


def _load_df(path: str):
    import pandas as pd

    p = Path(path)
    if not p.exists():
        raise CLIError(f"{path}: no such file")
    try:
        df = pd.read_parquet(p) if p.suffix == ".parquet" else pd.read_csv(p)
    except Exception as exc:
        raise CLIError(f"{path}: cannot read as {'Parquet' if p.suffix == '.parquet' else 'CSV'}: {exc}") from None
    if "D" not in df.columns and {"C", "N"} <= set(df.columns):
        df["D"] = df["C"] / (6 * df["N"])
    return df
