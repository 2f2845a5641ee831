"""Fault injection for the whole workflow: SIGKILL the Snakemake run (and every job it runs) at seeded
random points inside the jobs of each stage, rerun the same command, and compare the finished study
with an uninterrupted one.

Used by tests/test_faults.py; also a script that prints the stage x kills x outcome table::

    nice .venv/bin/python tests/faults.py [--kills 3] [--seed 0] [--dir /tmp/cptscale-faults]

What "the same" means: every DuckDB results table hashes equal once wall-clock columns (and the
JSON keys holding wall-clock times) are left out; every training curve (metrics.jsonl losses, step
by step) is equal exactly; each stage's own outputs are byte-identical (data, tokenizer, indexed
datasets, blends) or equal without wall-clock keys (fits).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))

#: stage -> the command line of its jobs (the rule's one `cptscale` subcommand)
STAGES: dict[str, re.Pattern[str]] = {
    "ingest": re.compile(r"cptscale data ingest\b"),
    "tokenizer": re.compile(r"cptscale data tokenizer\b"),
    "index": re.compile(r"cptscale data index\b"),
    "blend": re.compile(r"cptscale mix report\b"),
    "train": re.compile(r"cptscale train\b"),
    "evaluate": re.compile(r"cptscale transfer\b"),
    "aggregate": re.compile(r"cptscale db ingest\b"),
    "fit": re.compile(r"cptscale fit-study\b"),
    "report": re.compile(r"cptscale report\b"),
}

#: wall-clock columns and JSON keys: they differ between two identical runs by nature
CLOCK_KEYS = frozenset({"wall_s", "seconds", "time", "tokens_per_s", "mfu", "mem_bytes", "ingested_at",
                        "elapsed_s", "launch", "fit_seconds", "duration_s", "created", "build_s"})
#: columns holding a hash of a whole file that records wall-clock times (done.json, fit JSON, data.json)
FILE_HASH_COLUMNS = frozenset({"file_hash", "file_hashes"})
#: the history of an interrupted run, which an uninterrupted one cannot have: the step a run resumed
#: from (done.json's ``resumed_from``, the store's checkpoint rows of that kind)
HISTORY_KEYS = frozenset({"resumed_from"})
#: the code version (only left out when the code changed between the two runs compared, see ``--ignore-code``):
#: the commit, and the input hash of run.json, which records the planner's provenance
CODE_KEYS = frozenset({"git_commit", "git_dirty", "run.json"})


def fault_config(tmp: Path) -> Path:
    """The tiny study (tests/workflows/faults.yaml) with its generated local corpora and results in ``tmp``."""
    raw = yaml.safe_load((ROOT / "tests" / "workflows" / "faults.yaml").read_text())
    r = random.Random(5)
    words = ["".join(r.choice("etaoinshrdlucmfwyp") for _ in range(r.randint(1, 8))) for _ in range(1500)]
    han = [chr(c) for c in range(0x4E00, 0x4E00 + 600)]
    texts = {
        "en": [f"{i} " + " ".join(r.choices(words, k=r.randint(30, 120))) + "." for i in range(1500)],
        "zh": [f"第{i}篇：" + "，".join("".join(r.choices(han, k=r.randint(4, 12))) for _ in range(r.randint(5, 25)))
               + "。" for i in range(1500)],
    }
    for lang, docs in texts.items():
        path = tmp / "corpora" / f"{lang}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in docs))
        raw["corpora"][lang][0]["paths"] = [str(path)]
    raw["results_dir"] = str(tmp / "results")
    cfg = tmp / "faults.yaml"
    cfg.write_text(yaml.safe_dump(raw, allow_unicode=True))
    return cfg


def snakemake_cmd(cfg: Path) -> list[str]:
    return [SNAKEMAKE, "-s", str(ROOT / "Snakefile"), "--profile", str(ROOT / "workflow" / "profiles" / "local"),
            "--configfile", str(cfg), "--cores", "2"]


def _jobs(pid: int) -> dict[int, str]:
    """pid -> stage of every job process (by command line) under ``pid``."""
    import psutil

    found: dict[int, tuple[str, int]] = {}
    try:
        procs = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return {}
    for p in procs:
        try:
            cmd, ppid = " ".join(p.cmdline()), p.ppid()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        for stage, pat in STAGES.items():
            if pat.search(cmd):
                found[p.pid] = (stage, ppid)
                break
    # the job is the outermost match: forked helpers (checkpoint writers, data workers) share its command line
    return {p: stage for p, (stage, ppid) in found.items() if ppid not in found}


@dataclass
class Kill:
    stage: str
    delay_s: float
    in_job: bool


@dataclass
class Outcome:
    rounds: int = 0
    kills: list[Kill] = field(default_factory=list)
    durations: dict[str, list[float]] = field(default_factory=dict)
    final_rc: int | None = None
    log: str = ""


def run_workflow(cfg: Path, cwd: Path, *, kills: int = 0, seed: int = 0,
                 durations: dict[str, float] | None = None, timeout: float = 3600) -> Outcome:
    """Run the study to the end. With ``kills``, SIGKILL the whole process group (Snakemake and every job)
    ``kills`` times per stage, each at a seeded random point inside a job of that stage (a fraction of
    that stage's uninterrupted job duration, ``durations``), then rerun the same command after
    ``snakemake --unlock`` (the README's instruction after a crash). Records job durations."""
    rng = random.Random(seed)
    left = dict.fromkeys(STAGES, kills)
    out = Outcome()
    deadline = time.time() + timeout
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    seen_start: dict[int, tuple[str, float]] = {}
    while time.time() < deadline:
        out.rounds += 1
        if out.rounds > 1:
            subprocess.run([*snakemake_cmd(cfg), "--unlock"], cwd=cwd, capture_output=True, check=True)
        logf = open(cwd / f"round{out.rounds}.log", "w")  # noqa: SIM115 (closed below)
        proc = subprocess.Popen(snakemake_cmd(cfg), cwd=cwd, env=env, stdout=logf, stderr=subprocess.STDOUT,
                                start_new_session=True)
        target: tuple[int, str, float] | None = None  # (pid, stage, kill time)
        while proc.poll() is None and time.time() < deadline:
            now = time.time()
            jobs = _jobs(proc.pid)
            for pid, stage in jobs.items():
                seen_start.setdefault(pid, (stage, now))
            for pid in [p for p in seen_start if p not in jobs]:
                stage, t0 = seen_start.pop(pid)
                out.durations.setdefault(stage, []).append(now - t0)
            if target is None:
                for pid, stage in jobs.items():
                    if left[stage] > 0 and durations and stage in durations:
                        target = (pid, stage, seen_start[pid][1] + rng.uniform(0.1, 0.9) * durations[stage])
                        break
            if target is not None and now >= target[2]:
                pid, stage, _ = target
                in_job = pid in jobs
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                left[stage] -= 1
                out.kills.append(Kill(stage, round(now - (seen_start.get(pid, (stage, now))[1]), 3), in_job))
                seen_start.clear()
                break
            time.sleep(0.02)
        logf.close()
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise TimeoutError(f"workflow not finished after {timeout} s")
        if proc.returncode != -signal.SIGKILL:
            out.final_rc = proc.returncode
            out.log = (cwd / f"round{out.rounds}.log").read_text()
            return out
    raise TimeoutError(f"workflow not finished after {timeout} s")


# -- what a finished study holds ------------------------------------------------------------------
def _scrub(obj: Any, drop: frozenset[str] = CLOCK_KEYS | HISTORY_KEYS) -> Any:
    if isinstance(obj, dict):
        return {k: _scrub(v, drop) for k, v in sorted(obj.items()) if k not in drop}
    if isinstance(obj, list):
        return [_scrub(v, drop) for v in obj]
    if isinstance(obj, str) and obj[:1] in "{[":
        try:
            return _scrub(json.loads(obj), drop)
        except ValueError:
            return obj
    return obj


def _h(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def table_rows(db: Path, drop: frozenset[str]) -> dict[str, tuple[list[str], list[str]]]:
    """Every results table (the store's TABLES: not its ingest log) as (kept columns, sorted rows as JSON),
    wall-clock and history columns and JSON keys left out."""
    import duckdb

    from cptscale.store.schema import TABLES

    con = duckdb.connect(str(db), read_only=True)
    try:
        out = {}
        for t in TABLES:
            cur = con.execute(f'select * from "{t}"')
            cols = [d[0] for d in cur.description]
            keep = [i for i, c in enumerate(cols) if c not in drop and c not in FILE_HASH_COLUMNS]
            rows = [r for r in cur.fetchall() if not (t == "checkpoints" and r[cols.index("kind")] in HISTORY_KEYS)]
            out[t] = ([cols[i] for i in keep], sorted(json.dumps([_scrub(r[i], drop) for i in keep], default=str)
                                                      for r in rows))
        return out
    finally:
        con.close()


def table_hashes(db: Path, drop: frozenset[str] = CLOCK_KEYS | HISTORY_KEYS) -> dict[str, str]:
    """sha256 of every results table's rows (see :func:`table_rows`)."""
    return {t: _h(v) for t, v in table_rows(db, drop).items()}


def diff_tables(a: Path, b: Path, drop: frozenset[str] = CLOCK_KEYS | HISTORY_KEYS, limit: int = 3) -> list[str]:
    """Rows of ``a`` and ``b`` that differ, per table (for a failure message)."""
    ra, rb = table_rows(a, drop), table_rows(b, drop)
    out = []
    for t in ra:
        only_a = sorted(set(ra[t][1]) - set(rb[t][1]))[:limit]
        only_b = sorted(set(rb[t][1]) - set(ra[t][1]))[:limit]
        if only_a or only_b:
            out.append(f"{t} {ra[t][0]}:\n  - " + "\n  - ".join(only_a) + "\n  + " + "\n  + ".join(only_b))
    return out


def curves(study: Path) -> dict[str, list[float]]:
    out = {}
    for m in sorted((study / "runs").glob("*/metrics.jsonl")):
        out[m.parent.name] = [json.loads(line)["loss"] for line in m.read_text().splitlines() if line.strip()]
    return out


def stage_outputs(study: Path, drop: frozenset[str] = CLOCK_KEYS | HISTORY_KEYS) -> dict[str, dict[str, str]]:
    """Per stage, a hash of each of its own output files (JSON without wall-clock keys)."""
    def files(*globs: str) -> list[Path]:
        return sorted(p for g in globs for p in study.glob(g) if p.is_file())

    def digest(p: Path) -> str:
        if p.suffix == ".json":
            return _h(_scrub(json.loads(p.read_text()), drop))
        return hashlib.sha256(p.read_bytes()).hexdigest()[:16]

    groups = {
        "ingest": files("data/*/docs.parquet"),
        "tokenizer": files("tokenizer/tokenizer.json"),
        "index": files("data/*/*.bin", "data/*/*.idx"),
        "blend": files("runs/*/blend*.json"),
        "train": files("runs/*/evals.jsonl"),
        "evaluate": files("runs/*/transfer*.json", "transfer/*.json"),
        "fit": files("fits/*.json"),
        "report": files("report/*.json"),
    }
    out: dict[str, dict[str, str]] = {}
    for stage, paths in groups.items():
        out[stage] = {}
        for p in paths:
            if p.suffix == ".jsonl":
                out[stage][str(p.relative_to(study))] = _h([_scrub(json.loads(x), drop)
                                                            for x in p.read_text().splitlines() if x.strip()])
            else:
                out[stage][str(p.relative_to(study))] = digest(p)
    return out


def fingerprint(study: Path, drop: frozenset[str] = CLOCK_KEYS | HISTORY_KEYS) -> dict[str, Any]:
    dbs = sorted(study.glob("*.duckdb"))
    return {"tables": table_hashes(dbs[0], drop) if dbs else {}, "curves": curves(study),
            "stages": stage_outputs(study, drop), "db": str(dbs[0]) if dbs else None}


def outcome_table(kills: list[Kill], base: dict[str, Any], got: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per stage: kills, how many landed inside one of its jobs, and whether what the stage and
    the whole study produced is identical to the uninterrupted run."""
    tables_same = base["tables"] == got["tables"]
    curves_same = base["curves"] == got["curves"]
    rows = []
    for stage in STAGES:
        ks = [k for k in kills if k.stage == stage]
        own = base["stages"].get(stage) == got["stages"].get(stage) if stage in base["stages"] else True
        if stage == "train":
            own = own and curves_same
        if stage == "aggregate":
            own = own and tables_same
        same = own and tables_same and curves_same
        rows.append({"stage": stage, "kills": len(ks), "in_job": sum(k.in_job for k in ks),
                     "identical": len(ks) if same else 0})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| stage | SIGKILLs | inside a job | rerun result identical |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['kills']} | {r['in_job']} | {r['identical']}/{r['kills']} |")
    tot = sum(r["kills"] for r in rows)
    lines.append(f"| all | {tot} | {sum(r['in_job'] for r in rows)} | {sum(r['identical'] for r in rows)}/{tot} |")
    return "\n".join(lines)


def campaign(work: Path, kills: int, seed: int) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any], Outcome]:
    """Uninterrupted run, then the same study (same paths) from scratch with kills; returns the table,
    both fingerprints and the faulted run's record."""
    work.mkdir(parents=True, exist_ok=True)
    cfg = fault_config(work)
    study = work / "results" / yaml.safe_load(cfg.read_text())["study"]
    shutil.rmtree(work / "results", ignore_errors=True)
    shutil.rmtree(work / ".snakemake", ignore_errors=True)
    straight = run_workflow(cfg, work)
    if straight.final_rc != 0:
        raise RuntimeError(f"uninterrupted run failed (rc {straight.final_rc}):\n{straight.log[-5000:]}")
    base = fingerprint(study)
    if base["db"]:  # kept for the diff of a failure
        shutil.copy(base["db"], work / "uninterrupted.duckdb")
        base["db"] = str(work / "uninterrupted.duckdb")
    med = {s: sorted(v)[len(v) // 2] for s, v in straight.durations.items()}
    shutil.rmtree(work / "results")
    shutil.rmtree(work / ".snakemake", ignore_errors=True)
    faulted = run_workflow(cfg, work, kills=kills, seed=seed, durations=med)
    if faulted.final_rc != 0:
        raise RuntimeError(f"rerun after the kills failed (rc {faulted.final_rc}):\n{faulted.log[-5000:]}")
    got = fingerprint(study)
    return outcome_table(faulted.kills, base, got), base, got, faulted


def main() -> None:
    ap = argparse.ArgumentParser(description="SIGKILL every workflow stage at seeded random points; compare")
    ap.add_argument("--kills", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", default="/tmp/cptscale-faults")
    ap.add_argument("--compare", nargs=2, metavar=("UNINTERRUPTED", "FAULTED"), default=None,
                    help="only compare two finished study dirs (same paths when they ran)")
    ap.add_argument("--ignore-code", action="store_true",
                    help="leave the code version (git commit, dirty flag) out: for runs across a code change")
    args = ap.parse_args()
    drop = CLOCK_KEYS | HISTORY_KEYS | (CODE_KEYS if args.ignore_code else frozenset())
    if args.compare:
        a, b = (fingerprint(Path(p), drop) for p in args.compare)
        for k in ("tables", "curves", "stages"):
            print(k, "identical" if a[k] == b[k] else "DIFFER")
        print("\n".join(diff_tables(Path(a["db"]), Path(b["db"]), drop)))
        return
    t0 = time.time()
    rows, base, got, faulted = campaign(Path(args.dir), args.kills, args.seed)
    print(format_table(rows))
    print(f"rounds {faulted.rounds}, {time.time() - t0:.0f} s; tables identical: {base['tables'] == got['tables']}, "
          f"curves identical: {base['curves'] == got['curves']}")
    for k in ("tables", "stages"):
        for name in sorted(set(base[k]) | set(got[k])):
            if base[k].get(name) != got[k].get(name):
                print(f"differs: {k} {name}")
    if base["db"] and got["db"]:
        print("\n".join(diff_tables(Path(base["db"]), Path(got["db"]))))


if __name__ == "__main__":
    main()
