"""What the report reads from the DuckDB store: tables and columns that must be there (else :class:`Missing`),
main-trajectory steps, fits and their laws."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TOTAL_POINTS = 20000  # per figure, across all series


class Missing(Exception):
    """Raised by a figure builder when its inputs are not in the store yet."""


def _connect(db_path: str | Path) -> Any:
    import duckdb

    return duckdb.connect(str(db_path), read_only=True)


def _columns(con: Any, table: str) -> set[str]:
    rows = con.execute(
        "select column_name from information_schema.columns where table_name = ?", [table]
    ).fetchall()
    return {r[0] for r in rows}


def _main_steps(con: Any, alias: str = "") -> str:
    """SQL condition keeping a run's main trajectory in train_metrics (WSD decay branches' steps carry
    ``branch``); empty for a database from before the column existed."""
    return f" and {alias}branch is null" if "branch" in _columns(con, "train_metrics") else ""


def _need(con: Any, table: str, cols: list[str]) -> None:
    have = _columns(con, table)
    if not have:
        raise Missing(f"table `{table}`")
    lack = [c for c in cols if c not in have]
    if lack:
        raise Missing(f"columns {', '.join(lack)} in `{table}`")


def _df(con: Any, sql: str, params: list[Any] | None = None) -> Any:
    return con.execute(sql, params or []).df()


def _downsample(df: Any, key: str, order: str, max_points: int) -> Any:
    """Keep at most `max_points` roughly evenly spaced rows per series (first and last kept)."""
    if df.empty or max_points <= 0:
        return df
    import numpy as np

    # a total budget too, so a page with hundreds of runs stays responsive
    max_points = max(20, min(max_points, TOTAL_POINTS // max(1, df[key].nunique())))
    parts = []
    for _, g in df.sort_values([key, order]).groupby(key, sort=False):
        if len(g) > max_points:
            idx = np.unique(np.linspace(0, len(g) - 1, max_points).round().astype(int))
            g = g.iloc[idx]
        parts.append(g)
    import pandas as pd

    return pd.concat(parts, ignore_index=True)


def _fits(con: Any, study: str) -> list[dict[str, Any]]:
    have = _columns(con, "fits")
    if not have or "params" not in have:
        return []
    cols = [c for c in ("fit_id", "law", "kind", "params", "fixed", "meta", "heldout", "intervals") if c in have]
    rows = con.execute(f"select {', '.join(cols)} from fits where study = ? order by fit_id", [study]).fetchall()
    out = []
    for r in rows:
        d = dict(zip(cols, r, strict=True))
        for k in ("params", "fixed", "meta", "heldout", "intervals"):
            v = d.get(k)
            if isinstance(v, str):
                try:
                    d[k] = json.loads(v)
                except ValueError:
                    d[k] = {}
            elif v is None:
                d[k] = {}
        out.append(d)
    return out


def _p(params: dict[str, Any], *names: str) -> float | None:
    """First present key among spellings (B', Bp, B_p, ...)."""
    for n in names:
        if n in params and params[n] is not None:
            return float(params[n])
    return None


def _law(fit: dict[str, Any]) -> dict[str, float] | None:
    """Normalise a Chinchilla or extended-CPT parameter dict to E, A, alpha, B, beta, gamma."""
    p = {**(fit.get("fixed") or {}), **(fit.get("params") or {})}
    e, a, al = _p(p, "E"), _p(p, "A"), _p(p, "alpha")
    b = _p(p, "B'", "Bp", "B_p", "B_prime", "B")
    be = _p(p, "beta'", "beta_p", "betap", "beta_prime", "beta")
    ga = _p(p, "gamma") or 0.0
    if None in (e, a, al, b, be):
        return None
    return {"E": e, "A": a, "alpha": al, "B": b, "beta": be, "gamma": ga}  # type: ignore[dict-item]


def _law_loss(law: dict[str, float], n: float, d: float) -> float:
    return (
        law["E"]
        + law["A"] / n ** law["alpha"]
        + law["B"] / (d ** law["beta"] * n ** law["gamma"])
    )


def _fit_kind(fit: dict[str, Any]) -> str:
    """scratch or cpt: the fit's ``kind`` (cptscale fit-study writes it), else guessed from law and id."""
    if fit.get("kind") in ("scratch", "cpt"):
        return str(fit["kind"])
    s = f"{fit.get('law', '')} {fit.get('fit_id', '')}".lower()
    return "cpt" if ("cpt" in s or "extended" in s) else "scratch"


def _main_laws(con: Any, study: str) -> dict[str, dict[str, Any]]:
    """The law to draw per kind: Chinchilla for scratch data, the extended law for CPT data (fit-study's
    ``scratch-chinchilla-*`` and ``cpt-extended-*``); any loss law of that kind otherwise."""
    best: dict[str, tuple[int, dict[str, Any]]] = {}
    for f in _fits(con, study):
        law = _law(f)
        if law is None:
            continue
        kind, name = _fit_kind(f), str(f.get("law", "")).lower()
        rank = 0 if (kind, name) in (("scratch", "chinchilla"), ("cpt", "cpt"), ("cpt", "extended_cpt")) else 1
        if kind not in best or rank < best[kind][0]:
            best[kind] = (rank, {**f, "law_params": law})
    return {k: v for k, (_, v) in best.items()}
