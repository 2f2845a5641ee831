"""``cptscale db`` (ingest, status, sql, export, points, generate): argument parsing and printing around
:mod:`cptscale.store`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from cptscale.errors import CLIError
from cptscale.store.ingest import MixedStore, ingest, publish
from cptscale.store.queries import connect, export, status_table, write_points_table
from cptscale.store.schema import default_db
from cptscale.store.synthetic import generate_study, write_generated_transfers


def _cmd_ingest(args: Any) -> int:
    if not Path(args.study_dir).is_dir():
        raise CLIError(f"{args.study_dir}: not a directory (pass the study dir, results/<study>)")
    db = Path(args.db) if args.db else default_db(args.study_dir)
    if args.publish and Path(args.publish).resolve() == db.resolve():
        raise CLIError(f"--publish {args.publish} is the store itself (--db); publish to another path")
    try:
        rep = ingest(args.study_dir, db, allow_partial=args.allow_partial, allow_mixed=args.allow_mixed)
    except MixedStore as exc:
        raise CLIError(str(exc)) from None
    for w in rep.warnings:
        print(f"warning: {w}", file=sys.stderr)
    for e in rep.errors:
        print(f"error: {e}", file=sys.stderr)
    print(rep.summary())
    if args.publish:  # the store is consistent even when some inputs were skipped: publish it either way
        publish(db, args.publish)
        print(f"published {db} -> {args.publish}")
    if rep.errors:
        print(f"{len(rep.errors)} input(s) skipped; their previous rows (if any) are unchanged. Fix them and "
              "ingest again, or pass --allow-partial to keep the good lines (in the workflow: "
              "`store: {allow_partial: true}` in the study config).", file=sys.stderr)
        return 1
    return 0


def _cmd_status(args: Any) -> int:
    df = status_table(args.study_dir, args.db)
    if args.json:
        print(df.to_json(orient="records"))
    else:
        print(df.to_string(index=False))
        tot = df[["expected", "done", "partial", "missing", "evals", "evals_expected"]].sum()
        print(f"total: {tot['done']}/{tot['expected']} runs done, {tot['partial']} partial, {tot['missing']} missing; "
              f"{tot['evals']}/{tot['evals_expected']} eval rows")
    return 0


def _cmd_sql(args: Any) -> int:
    import duckdb

    con = connect(args.db)
    try:
        df = con.execute(args.query).df()
    except duckdb.Error as exc:
        raise CLIError(f"query failed: {exc}") from None
    finally:
        con.close()
    if args.format == "csv":
        print(df.to_csv(index=False), end="")
    elif args.format == "json":
        print(df.to_json(orient="records"))
    else:
        import pandas as pd

        with pd.option_context("display.max_rows", args.max_rows, "display.max_columns", None, "display.width", 200):
            print(df.to_string(index=False, max_rows=args.max_rows))
    return 0


def _cmd_export(args: Any) -> int:
    for p in export(args.db, args.out, args.format, args.tables):
        print(p)
    return 0


def _cmd_points(args: Any) -> int:
    n = write_points_table(args.db, args.study, args.out, min_step_fraction=args.min_step_fraction,
                           langs=args.langs)
    print(f"{args.out}: {n} points")
    return 0


def _cmd_generate(args: Any) -> int:
    sizes: Any = int(args.sizes[0]) if len(args.sizes) == 1 and args.sizes[0].isdigit() else args.sizes
    ids = generate_study(args.study_dir, sizes, args.inits, args.replays, args.steps, args.seed,
                         evals_per_run=args.evals)
    n = write_generated_transfers(args.study_dir)
    print(f"{args.study_dir}: {len(ids)} synthetic runs, {n} transfer.json")
    return 0


def add_commands(subparsers: Any) -> None:
    p = subparsers.add_parser("db", help="DuckDB results store: ingest, status, sql, export, points")
    sub = p.add_subparsers(dest="db_command", metavar="DB_COMMAND", required=True)

    q = sub.add_parser("ingest", help="ingest a study directory's files (atomic, idempotent)")
    q.add_argument("--study-dir", required=True)
    q.add_argument("--db", help="database file, updated in place (default: STUDY_DIR/cptscale.duckdb)")
    q.add_argument("--publish", metavar="PATH",
                   help="then copy the database atomically to PATH (the workflow's declared output: the store "
                        "itself is not a Snakemake output, so a failed job cannot delete it)")
    q.add_argument("--allow-partial", action="store_true", help="keep the good lines of malformed files")
    q.add_argument("--allow-mixed", action="store_true",
                   help="keep simulated and trained runs in one store (each flagged in runs.simulated)")
    q.set_defaults(func=_cmd_ingest)

    q = sub.add_parser("status", help="expected vs present runs and evals per size x init x replay")
    q.add_argument("--study-dir", required=True)
    q.add_argument("--db", help="also show which runs are in this database (default: STUDY_DIR/cptscale.duckdb)")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=_cmd_status)

    q = sub.add_parser("sql", help="run a query (read-only)")
    q.add_argument("--db", required=True)
    q.add_argument("query")
    q.add_argument("--format", choices=("table", "csv", "json"), default="table")
    q.add_argument("--max-rows", type=int, default=200)
    q.set_defaults(func=_cmd_sql)

    q = sub.add_parser("export", help="write every table as Parquet or CSV")
    q.add_argument("--db", required=True)
    q.add_argument("--out", required=True)
    q.add_argument("--format", choices=("parquet", "csv"), default="parquet")
    q.add_argument("--tables", nargs="*")
    q.set_defaults(func=_cmd_export)

    q = sub.add_parser("points", help="fitting input CSV (run, N, D, loss, init, lang, size, replay, C)")
    q.add_argument("--db", required=True)
    q.add_argument("--study", required=True)
    q.add_argument("--out", required=True)
    q.add_argument("--min-step-fraction", type=float, default=0.0)
    q.add_argument("--langs", nargs="+", help="languages to include (default: the CPT target languages)")
    q.set_defaults(func=_cmd_points)

    q = sub.add_parser("generate", help="write a synthetic study tree (tests, benchmarks, report work)")
    q.add_argument("--study-dir", required=True)
    q.add_argument("--sizes", nargs="+", default=["d64l2", "d128l4"], help="size names, or one integer n")
    q.add_argument("--inits", nargs="+", default=["scratch", "cpt"])
    q.add_argument("--replays", nargs="+", type=float, default=[0.0, 0.25])
    q.add_argument("--steps", type=int, default=50)
    q.add_argument("--evals", type=int, default=10)
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(func=_cmd_generate)
