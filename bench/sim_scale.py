"""How the planner, the workflow's DAG and the store grow with the number of runs (simulated ladders).

    python bench/sim_scale.py [--runs 500 1000 2000 5000] [--steps 200] [--bootstrap 50] [--no-dry-run]
                              [--no-fit]

A synthetic ladder of tiny d<hidden>l<layers> shapes with the paper study's replay sweep (8 runs per
size: source, target scratch, 6 CPT) is planned at each size of study; the runs are simulated
(train.backend: simulate) and written as the backend writes them, then ingested into DuckDB, fitted and
reported as the workflow's rules do. Printed per study size, in CPU seconds (a shared machine's wall
times say little): `plan_study`, one `plan --run` in-process and as the workflow's job runs it (a
`cptscale plan --run` process, best of 3: the workflow runs one per run, so a per-job cost that grows
with the study makes the study's planning quadratic), `snakemake -n`, writing the simulated runs, the
first ingest; in wall seconds the no-op ingest and the points query; then CPU seconds of `fit-study`
(`--bootstrap` resamples) and of `cptscale report`, and the report's size; then each cost's growth exponent k
(cost ~ runs^k, least squares over the study sizes; 1 = linear, per-job costs 0 = constant).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


#: smallest model of the synthetic ladders (non-embedding parameters, 12 x layers x hidden^2)
MIN_PARAMS = 3e7


def ladder(n_sizes: int) -> list[str]:
    """``n_sizes`` d<hidden>l<layers> shapes spread evenly in log N over the same range (3e7 to ~1.6e9
    non-embedding parameters) whatever their number, so a larger study is a denser ladder of the same
    span and every study's laws are identified alike."""
    shapes = sorted((12 * layers * hidden**2, f"d{hidden}l{layers}") for layers in range(2, 33)
                    for hidden in range(64, 2049, 32) if layers <= hidden // 16 and 12 * layers * hidden**2 >= MIN_PARAMS)
    if n_sizes > len(shapes):
        raise SystemExit(f"at most {len(shapes)} synthetic sizes")
    if n_sizes == 1:
        return [shapes[0][1]]
    lo, hi = math.log(shapes[0][0]), math.log(shapes[-1][0])
    out: list[str] = []
    for i in range(n_sizes):  # the shape nearest each log-even target not taken yet
        target = lo + (hi - lo) * i / (n_sizes - 1)
        free = [s for s in shapes if s[1] not in out]
        out.append(min(free, key=lambda s: abs(math.log(s[0]) - target))[1])
    return sorted(out, key=lambda name: next(n for n, nm in shapes if nm == name))


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
    # 20 tokens per parameter (Chinchilla) in batches sized so that the geometric-mean model takes `steps`
    # optimizer steps (from ~steps/7 for the smallest to ~7 x steps for the largest)
    from cptscale.validation import parse_config

    cfg = parse_config({**raw, "train": {**raw["train"], "batch_tokens": 512}})
    logn = [math.log(cfg.params(s)) for s in cfg.ladder.sizes]
    mid = math.exp((min(logn) + max(logn)) / 2)
    raw["train"]["batch_tokens"] = 512 * max(1, round(20 * mid / steps / 512))
    path = tmp / f"scale-{runs}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def timed(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def cptscale(*args: str) -> float:
    """CPU seconds (user + system) of one `cptscale` command, a workflow job's process, which must succeed:
    CPU, not wall, so that the figures hold on a machine shared with other jobs."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    res = subprocess.run([str(Path(sys.executable).with_name("cptscale")), *args], capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if res.returncode:
        raise SystemExit(f"cptscale {' '.join(args)} failed:\n{res.stderr[-3000:]}")
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def fit_and_report(cfg, path: Path, tmp: Path, db: Path, bootstrap: int) -> dict:
    """points, fit-study, the database with the fits and the report, as the workflow's rules run them."""
    f = cfg.fit
    fits = tmp / "fits"
    out = {"points_cmd_s": cptscale("db", "points", "--db", str(db), "--study", cfg.study, "--min-step-fraction",
                                    str(f.min_step_fraction), "--out", str(fits / "points.csv"))}
    out["fit_s"] = cptscale(
        "fit-study", "--points", str(fits / "points.csv"), "--db", str(db), "--study", cfg.study,
        "--out-dir", str(cfg.study_dir / "fits"), "--budgets", *(f"{b:g}" for b in f.budgets),
        "--bootstrap", str(bootstrap), "--delta", str(f.huber_delta), "--reduction", f.reduction, "--grid", f.grid,
        "--min-step-fraction", str(f.min_step_fraction), "--params", "nonembedding", "--select", f.points,
        "--overestimate-penalty", f"{f.overestimate_penalty:g}", "--remedy", f.remedy)
    out["ingest_fits_s"] = cptscale("db", "ingest", "--study-dir", str(cfg.study_dir), "--db", str(db))
    out["report_s"] = cptscale("report", "--db", str(db), "--study", cfg.study, "--out-dir", str(tmp / "report"),
                               "--title", cfg.study, "--max-points", str(cfg.report.max_points), "--config", str(path))
    out["report_mb"] = (tmp / "report" / "index.html").stat().st_size / 1e6
    return out


def measure(runs: int, steps: int, dry_run: bool, bootstrap: int | None) -> dict:
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
    _, _, t_spec = timed(lambda: P.run_spec(cfg, last.run_id))  # CPU of one run.json (the last: a scan's worst)
    t_job = min(cptscale("plan", str(path), "--run", last.run_id, "--out", str(tmp / "run.json")) for _ in range(3))
    db = tmp / "store.duckdb"
    rep, t_ing, c_ing = timed(lambda: ingest(cfg.study_dir, db))
    _, t_noop, _ = timed(lambda: ingest(cfg.study_dir, db))
    n_pts, t_pts, _ = timed(lambda: write_points_table(str(db), cfg.study, tmp / "points.csv"))
    out = {"runs": len(planned), "plan_study_s": c_plan, "plan_run_s": t_spec, "plan_job_s": t_job,
           "write_runs_s": c_write,
           "ingest_s": t_ing, "ingest_cpu_s": c_ing, "noop_ingest_s": t_noop, "points_s": t_pts,
           "eval_rows": rep.totals.get("evals"), "metric_rows": rep.totals.get("train_metrics"), "points": n_pts}
    if bootstrap is not None:
        out.update(fit_and_report(cfg, path, tmp, db, bootstrap))
    if dry_run:
        t0 = time.perf_counter()
        res = subprocess.run(["/usr/bin/time", "-f", "%U %S", str(Path(sys.executable).with_name("snakemake")), "-n",
                              "--profile", "workflow/profiles/local", "--configfile", str(path), "--forceall"],
                             cwd=ROOT, capture_output=True, text=True, timeout=3600)
        out["dry_run_wall_s"] = time.perf_counter() - t0
        user, sys_ = res.stderr.strip().splitlines()[-1].split()
        out["dry_run_cpu_s"] = float(user) + float(sys_)
        out["dry_run_ok"] = res.returncode == 0
        if res.returncode:
            print(res.stderr[-3000:], file=sys.stderr)
    return out


def growth(runs: list[int], costs: list[float]) -> float:
    """Least-squares slope of log cost on log runs (nan with fewer than two studies)."""
    if len(runs) < 2 or min(costs) <= 0:
        return float("nan")
    xs, ys = [math.log(x) for x in runs], [math.log(y) for y in costs]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, nargs="+", default=[500, 1000, 2000, 5000])
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps per run (metrics rows)")
    ap.add_argument("--bootstrap", type=int, default=50, help="fit-study's bootstrap resamples")
    ap.add_argument("--no-dry-run", action="store_true")
    ap.add_argument("--no-fit", action="store_true", help="skip fit-study and the report")
    args = ap.parse_args()
    rows = []
    for n in args.runs:
        rows.append(measure(n, args.steps, not args.no_dry_run, None if args.no_fit else args.bootstrap))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    keys = ["plan_study_s", "plan_run_s", "plan_job_s", "dry_run_cpu_s", "write_runs_s", "ingest_cpu_s", "noop_ingest_s",
            "points_s", "fit_s", "report_s", "report_mb"]
    keys = [k for k in keys if all(k in r for r in rows)]
    print(f"{'runs':>6} " + " ".join(f"{k:>14}" for k in keys))
    for r in rows:
        print(f"{r['runs']:>6} " + " ".join(f"{r[k]:>14.3f}" for k in keys))
    print(f"{'k':>6} " + " ".join(f"{growth([r['runs'] for r in rows], [r[k] for r in rows]):>14.2f}" for k in keys)
          + "   (cost ~ runs^k; plan_run_s/plan_job_s are per job: 0 = constant)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
