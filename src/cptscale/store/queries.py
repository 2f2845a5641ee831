"""Reading the store: connections, the points table the fits read, the status table of a study, exports."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cptscale.errors import CLIError
from cptscale.runspec import load_spec
from cptscale.store.readers import read_jsonl_rows
from cptscale.store.schema import TABLES, default_db
from cptscale.transfer import latest_evals
from cptscale.util import read_json


def connect(db: str | os.PathLike[str], read_only: bool = True) -> Any:
    """Open the store; read-only by default so a query never leaves a WAL beside it."""
    import duckdb

    if not Path(db).exists():
        raise CLIError(f"{db}: no such database; run `cptscale db ingest --study-dir S --db {db}` first")
    return duckdb.connect(str(db), read_only=read_only)


def write_points_table(db: str | os.PathLike[str] | Any, study: str, out_csv: str | os.PathLike[str], *,
                       min_step_fraction: float = 0.0, langs: Sequence[str] | None = None) -> int:
    """The fitting input: one row per eval step > 0 of each run's target-language loss, plus the final
    eval of each of its WSD decay branches (``branch`` = the branch's total steps; empty for the main
    trajectory): a branch is a completed short run, so its end is an extra (N, D, loss) point of that
    run (same ``run``, so the bootstrap resamples it with the run).

    Columns ``run, N, D, loss, init, lang, size, replay, C`` (+ ``step, D_target, params_nonemb, branch``).
    N = parameters **with** embeddings (``runs.params``), D = tokens seen by the run (for CPT: CPT tokens,
    source pre-training excluded, replay included; ``D_target = D·(1 - replay)``), C = 6·N·D.
    ``min_step_fraction`` drops the earliest evals (warm-up) of every run. Only runs in ``langs`` are
    written (default: the CPT target languages, so source-language scratch runs stay out of the fit;
    every run when the study has no CPT runs). IPLT arms (``runs.arm``) change shape mid-run and are left
    out: they are compared with each other (report figure ``iplt``), not fitted.
    """
    from cptscale.util import atomic_path

    con = connect(db) if isinstance(db, str | os.PathLike) else db
    if langs is None:  # the target languages of the study's CPT runs; the source runs are not fitted
        langs = [r[0] for r in con.execute(
            "SELECT DISTINCT lang FROM runs WHERE study = ? AND init = 'cpt' AND arm IS NULL", [study]).fetchall()]
    df = con.execute(
        """WITH ev AS (
               SELECT *, max(step) OVER (PARTITION BY run_id, lang, branch) AS branch_end
               FROM evals WHERE study = ?)
           SELECT e.run_id AS run, r.params::DOUBLE AS N, e.tokens::DOUBLE AS D, e.loss, r.init, r.lang, r.size,
                  coalesce(r.replay, 0.0) AS replay, 6.0 * r.params * e.tokens AS C, e.step,
                  e.tokens * (1 - coalesce(r.replay, 0.0)) AS D_target, r.params_nonemb AS params_nonemb,
                  e.branch
           FROM ev e JOIN runs r ON r.study = ? AND r.run_id = e.run_id
           WHERE e.lang = r.lang AND e.step > 0 AND r.arm IS NULL
             AND (e.branch IS NULL OR e.step = e.branch_end)
             AND e.step >= ? * coalesce(r.steps, 0)
             AND (list_contains(?::VARCHAR[], r.lang) OR ? IS NULL)
           ORDER BY r.init, r.params, r.replay, e.run_id, e.step, e.branch NULLS FIRST""",
        [study, study, float(min_step_fraction), list(langs), 1 if langs else None],
    ).df()
    df["branch"] = df["branch"].astype("Int64")
    with atomic_path(out_csv) as tmp:
        df.to_csv(tmp, index=False)
    return len(df)


def _expected_runs(sdir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """study.json and the runs it expects, plus the runs on disk that the plan no longer lists (unplanned)."""
    if (sdir / "study.json").exists():
        sj = read_json(sdir / "study.json")
        expected = sj.get("expected_runs") or []
    else:
        sj, expected = {}, []
    known = {e["run_id"] for e in expected}
    for p in sorted((sdir / "runs").glob("*/run.json")):
        if p.parent.name not in known:
            s = load_spec(p)
            expected.append({"run_id": s.run_id, "size": s.size, "init": s.init, "replay": s.replay,
                             "variant": s.variant, "params": s.params, "unplanned": True})
    if not expected:
        raise CLIError(f"{sdir}: no study.json and no runs; run `cptscale plan CONFIG --study-json "
                       f"{sdir}/study.json` first")
    return sj, expected


def _runs_in_db(dbp: Path, study: str) -> set[str]:
    """The run ids the store holds for the study (none when it is missing or unreadable)."""
    in_db: set[str] = set()
    if dbp.exists():
        with contextlib.suppress(Exception):
            con = connect(dbp)
            in_db = {r[0] for r in con.execute("SELECT run_id FROM runs WHERE study = ?", [study]).fetchall()}
            con.close()
    return in_db


def _run_status(e: dict[str, Any], d: Path, in_db: set[str]) -> dict[str, Any]:
    """One expected run's status row: done or partial, evals logged against those planned, transfer, store."""
    spec = load_spec(d / "run.json") if (d / "run.json").exists() else None
    n_exp = len(spec.eval.steps) * len(spec.eval.languages) if spec else 0
    n_ev, n_br = _eval_counts(d / "evals.jsonl")
    return {
        "size": e.get("size"), "params": e.get("params") or (spec.params if spec else None) or 0,
        "init": e.get("init"), "replay": float(e.get("replay") or 0.0), "variant": e.get("variant") or "",
        "expected": 0 if e.get("unplanned") else 1,
        "done": int((d / "done.json").exists()),
        "partial": int((d / "run.json").exists() and not (d / "done.json").exists()
                       and (d / "metrics.jsonl").exists()),
        "evals": n_ev, "evals_expected": n_exp, "branch_evals": n_br,
        "transfer": int((d / "transfer.json").exists()) if e.get("init") == "cpt" and not e.get("arm") else None,
        "in_db": int(e["run_id"] in in_db),
    }


def status_table(study_dir: str | os.PathLike[str], db: str | os.PathLike[str] | None = None) -> Any:
    """Expected vs present runs and eval rows per size x init x replay x variant (CPT recipe variants and
    IPLT arms are their own rows), from the files, plus the DB."""
    import pandas as pd

    sdir = Path(study_dir)
    sj, expected = _expected_runs(sdir)
    in_db = _runs_in_db(Path(db) if db else default_db(sdir), sj.get("study", sdir.name))
    df = pd.DataFrame.from_records([_run_status(e, sdir / "runs" / e["run_id"], in_db) for e in expected])
    g = (df.groupby(["params", "size", "init", "replay", "variant"], dropna=False)
         .agg(expected=("expected", "sum"), done=("done", "sum"), partial=("partial", "sum"),
              evals=("evals", "sum"), evals_expected=("evals_expected", "sum"),
              transfer=("transfer", "sum"), in_db=("in_db", "sum"), branch_evals=("branch_evals", "sum"))
         .reset_index().sort_values(["params", "init", "replay", "variant"]).drop(columns="params"))
    g["missing"] = (g["expected"] - g["done"] - g["partial"]).clip(lower=0)
    return g[["size", "init", "replay", "variant", "expected", "done", "partial", "missing", "evals", "evals_expected",
              "transfer", "in_db", "branch_evals"]]


def _eval_counts(path: Path) -> tuple[int, int]:
    """Distinct evaluations of a run's evals.jsonl, as the store keeps them (``transfer.latest_evals``: the
    last row per step, language and branch; a run resumed from a checkpoint logs the evals after it again):
    main-trajectory evals and WSD decay-branch evals. Unreadable lines are not counted (ingest reports them)."""
    if not path.exists():
        return 0, 0
    rows = latest_evals(read_jsonl_rows(path, ("step", "lang"), allow_partial=True, problems=[]))
    n_branch = sum(r.get("branch") is not None for r in rows)
    return len(rows) - n_branch, n_branch


def export(db: str | os.PathLike[str], out_dir: str | os.PathLike[str], fmt: str = "parquet",
           tables: Sequence[str] | None = None) -> list[Path]:
    """Write every table (or ``tables``) to ``out_dir/<table>.<fmt>``, each file atomically.

    Table names are checked against the schema before anything is written (they end up in SQL)."""
    from cptscale.util import atomic_path

    if fmt not in ("parquet", "csv"):
        raise CLIError(f"export format must be parquet or csv, not {fmt!r}")
    chosen = list(tables) if tables else list(TABLES)
    unknown = [t for t in chosen if t not in TABLES]
    if unknown:
        raise CLIError(f"--tables: unknown table(s) {', '.join(map(repr, unknown))}; the store has "
                       f"{', '.join(TABLES)}")
    con = connect(db)
    out = []
    try:
        for t in dict.fromkeys(chosen):
            dest = Path(out_dir) / f"{t}.{fmt}"
            with atomic_path(dest) as tmp:
                opts = "(FORMAT parquet)" if fmt == "parquet" else "(FORMAT csv, HEADER)"
                path = str(tmp).replace("'", "''")
                con.execute(f"COPY (SELECT * FROM \"{t}\") TO '{path}' {opts}")
            out.append(dest)
    finally:
        con.close()
    return out
