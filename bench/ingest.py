"""Benchmark the results store: ingest a generated study of 1,000 runs x 1,000 metric rows, then
typical aggregate queries.

    .venv/bin/python bench/ingest.py                      # 50 sizes x (2 scratch + 18 CPT) = 1,000 runs
    .venv/bin/python bench/ingest.py --replays 2 --steps 200   # a quick smoke run (200 runs x 200 rows)

Prints generation, first ingest, no-op re-ingest, one-run re-ingest and query times (median of 3).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

QUERIES = {
    "final target loss per size x init x replay": """
        SELECT r.size, r.init, r.replay, e.loss, e.flops
        FROM evals e JOIN runs r USING (study, run_id)
        WHERE e.lang = r.lang AND e.step = r.steps AND e.branch IS NULL ORDER BY r.params, r.init, r.replay""",
    "mean train loss over the last 10% of steps, per run": """
        SELECT t.run_id, avg(t.loss) AS loss, max(t.tokens) AS tokens
        FROM train_metrics t JOIN runs r USING (study, run_id)
        WHERE t.step >= 0.9 * r.steps GROUP BY t.run_id""",
    "FLOPs saved at the last in-range step, per size x replay": """
        SELECT size, replay, arg_max(frac_saved, step) AS frac_saved,
               arg_max(effective_data_transferred, step) AS d_t
        FROM transfer WHERE NOT extrapolated GROUP BY size, replay ORDER BY size, replay""",
}


def timed(fn, *a, **kw):
    t0 = time.perf_counter()
    out = fn(*a, **kw)
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replays", type=int, default=18, help="CPT replay ratios per size (runs = 50 x (2 + R))")
    ap.add_argument("--steps", type=int, default=1000, help="metric rows per run")
    ap.add_argument("--evals", type=int, default=11)
    ap.add_argument("--dir", help="work directory (default: a temp dir, removed afterwards)")
    args = ap.parse_args()

    import duckdb

    from cptscale.ladder import LADDER
    from cptscale.store.ingest import ingest
    from cptscale.store.schema import TABLES
    from cptscale.store.synthetic import generate_study, write_generated_transfers

    work = Path(args.dir or tempfile.mkdtemp(prefix="cptscale-bench-"))
    sdir, db = work / "bench", work / "bench.duckdb"
    try:
        replays = [round(i / (2 * args.replays), 4) for i in range(args.replays)]
        ids, t_gen = timed(generate_study, sdir, list(LADDER), ("scratch", "cpt"), replays, args.steps, 0,
                           evals_per_run=args.evals)
        n_tr, t_tr = timed(write_generated_transfers, sdir)
        print(f"generated {len(ids)} runs x {args.steps} metric rows in {t_gen:.1f}s; "
              f"{n_tr} transfer.json in {t_tr:.1f}s")
        rep, t1 = timed(ingest, sdir, db)
        assert rep.ok, rep.errors[:3]
        print(f"first ingest:     {t1:7.2f}s  ({rep.totals['train_metrics']:,} metric rows, "
              f"{rep.totals['evals']:,} eval rows, {rep.totals['transfer']:,} transfer rows; "
              f"db {db.stat().st_size / 2**20:.0f} MiB)")
        rep2, t2 = timed(ingest, sdir, db)
        assert rep2.totals == rep.totals
        print(f"re-ingest (no-op):{t2:7.2f}s  (identical row counts: {rep2.runs_unchanged} runs unchanged)")
        m = next((sdir / "runs").glob("*/metrics.jsonl"))
        m.write_text(m.read_text().replace('"mfu": 0.4', '"mfu": 0.41'))
        rep3, t3 = timed(ingest, sdir, db)
        assert rep3.runs_ingested == 1 and rep3.totals == rep.totals
        print(f"re-ingest 1 run:  {t3:7.2f}s")
        con = duckdb.connect(str(db), read_only=True)
        for name, sql in QUERIES.items():
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                n = len(con.execute(sql).fetchall())
                times.append(time.perf_counter() - t0)
            print(f"query {statistics.median(times) * 1e3:8.1f} ms  {n:5d} rows  {name}")
        print("tables:", ", ".join(f"{t}={con.execute(f'select count(*) from {t}').fetchone()[0]:,}"
                                   for t in TABLES))
        con.close()
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
