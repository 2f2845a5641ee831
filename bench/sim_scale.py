"""How the planner, the workflow's DAG and the store grow with the number of runs (simulated ladders).

    python bench/sim_scale.py [--runs 336 1000 2500 5000] [--steps 200] [--no-dry-run]

A synthetic ladder of tiny d<hidden>l<layers> shapes with the paper study's replay sweep (8 runs per
size: source, target scratch, 6 CPT) is planned at each size of study; the runs are simulated
(train.backend: simulate) and written as the backend writes them, then ingested into DuckDB. Printed per
study size: seconds of `plan_study`, of one `plan --run` (run.json of one run; each workflow job does
one, so the workflow's total is runs x this), of `snakemake -n`, of writing the simulated runs, of the
first ingest, of a no-op ingest, of the points query, and each cost per run relative to the smallest
study (1.0 = linear growth; a per-run cost that grows with the study is worse than linear).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def ladder(n_sizes: int) -> list[str]:
    out = []
    for layers in range(2, 25):
        for hidden in range(64, 1025, 32):
            if layers <= hidden // 16:
                out.append(f"d{hidden}l{layers}")
    if n_sizes > len(out):
        raise SystemExit(f"at most {len(out)} synthetic sizes")
    return out[:n_sizes]


def study_config(tmp: Path, runs: int, steps: int) -> Path:
    raw = yaml.safe_load((ROOT / "workflow/studies/paper-simulated.yaml").read_text())
    n_sizes = max(1, round(runs / (2 + len(raw["replay"]["ratios"]))))
    raw.update(study=f"scale-{runs}", results_dir=str(tmp / "results"))
    raw["ladder"] = {"sizes": ladder(n_sizes)}
    raw["budget"] = {"tokens_per_param": 20, "param_count": "nonembedding"}
    raw["tokenizer"]["vocab_size"] = 2048
    raw["parallel"] = {"default": {"tp": 1, "pp": 1, "dp": 1}}
    raw["train"].update(seq_length=128, micro_batch_size=4, batch_tokens=None)
    raw["slurm"] = {"gpus": False}
    # every run gets `steps` optimizer steps: the batch is the run's tokens / steps (a multiple of 512)
    from cptscale.validation import parse_config

    cfg = parse_config({**raw, "train": {**raw["train"], "batch_tokens": 512}})
    raw["budget"]["tokens"] = {s: 512 * steps for s in cfg.ladder.sizes}
    raw["train"]["batch_tokens"] = 512
    path = tmp / f"scale-{runs}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def timed(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def measure(runs: int, steps: int, dry_run: bool) -> dict:
    from cptscale import plan as P
    from cptscale.simulate.backend import run_simulated, simulated_manifest
    from cptscale.store.ingest import ingest
    from cptscale.store.queries import write_points_table
    from cptscale.util import write_json
    from cptscale.validation import load_config

    tmp = Path(tempfile.mkdtemp(prefix=f"sim-scale-{runs}-"))
    path = study_config(tmp, runs, steps)
    cfg = load_config(path)
    planned, _, c_plan = timed(lambda: P.plan_study(cfg))
    for lang in cfg.languages.all:
        write_json(P.data_dir(cfg) / lang / "data.json",
                   simulated_manifest(lang, cfg.vocab_size, cfg.data.validation_tokens, P.config_hash(cfg), []))
    write_json(cfg.study_dir / "study.json", P.study_manifest(cfg))
    specs = {}

    def write_all():
        for r in sorted(planned, key=lambda r: r.init != "scratch"):
            spec = P.run_spec(cfg, r.run_id).to_dict()
            write_json(Path(spec["out_dir"]) / "run.json", spec)
            run_simulated(spec)
            specs[r.run_id] = spec

    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        _, _, c_write = timed(write_all)
    last = planned[-1]
    _, _, t_spec = timed(lambda: P.run_spec(cfg, last.run_id))  # CPU of one run.json (the last: find_run's worst)
    db = tmp / "store.duckdb"
    rep, t_ing, c_ing = timed(lambda: ingest(cfg.study_dir, db))
    _, t_noop, _ = timed(lambda: ingest(cfg.study_dir, db))
    n_pts, t_pts, _ = timed(lambda: write_points_table(str(db), cfg.study, tmp / "points.csv"))
    out = {"runs": len(planned), "plan_study_s": c_plan, "plan_run_s": t_spec, "write_runs_s": c_write,
           "ingest_s": t_ing, "ingest_cpu_s": c_ing, "noop_ingest_s": t_noop, "points_s": t_pts,
           "eval_rows": rep.totals.get("evals"), "metric_rows": rep.totals.get("train_metrics"), "points": n_pts}
    if dry_run:
        t0 = time.perf_counter()
        res = subprocess.run(["/usr/bin/time", "-f", "%U %S", str(Path(sys.executable).with_name("snakemake")), "-n",
                              "--profile", "workflow/profiles/local", "--configfile", str(path), "--forceall"],
                             cwd=ROOT, capture_output=True, text=True, timeout=3600)
        out["dry_run_wall_s"] = time.perf_counter() - t0
        user, sys_ = res.stderr.strip().splitlines()[-1].split()
        out["dry_run_cpu_s"] = float(user) + float(sys_)
        out["dry_run_ok"] = res.returncode == 0
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, nargs="+", default=[336, 1000, 2500, 5000])
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps per run (metrics rows)")
    ap.add_argument("--no-dry-run", action="store_true")
    args = ap.parse_args()
    rows = []
    for n in args.runs:
        rows.append(measure(n, args.steps, not args.no_dry_run))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    base = rows[0]
    keys = ["plan_study_s", "plan_run_s", "dry_run_cpu_s", "write_runs_s", "ingest_s", "noop_ingest_s", "points_s"]
    print(f"{'runs':>6} " + " ".join(f"{k:>14}" for k in keys))
    for r in rows:
        print(f"{r['runs']:>6} " + " ".join(f"{r.get(k, float('nan')):>14.3f}" for k in keys))
    print("per-run cost relative to the smallest study (1.0 = linear; plan_run: per job, 1.0 = constant):")
    for r in rows:
        rel = []
        for k in keys:
            if k not in r or k not in base or not base[k]:
                rel.append(float("nan"))
            elif k == "plan_run_s":
                rel.append(r[k] / base[k])
            else:
                rel.append((r[k] / r["runs"]) / (base[k] / base["runs"]))
        print(f"{r['runs']:>6} " + " ".join(f"{x:>14.2f}" for x in rel))
    return 0


if __name__ == "__main__":
    sys.exit(main())
