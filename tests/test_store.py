"""DuckDB results store: schema, idempotent + atomic ingest, bad input, CLI."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

duckdb = pytest.importorskip("duckdb")

from cptscale.cli import main  # noqa: E402
from cptscale.store import TABLES, generate_study, ingest, write_generated_transfers  # noqa: E402

RUN = "d64l2-cpt-zh-r0"


@pytest.fixture(scope="module")
def study_src(tmp_path_factory) -> Path:
    s = tmp_path_factory.mktemp("gen") / "gs"
    generate_study(s, sizes=["d32l2", "d64l2"], replays=[0.0, 0.25], steps_per_run=20, evals_per_run=5)
    write_generated_transfers(s)
    (s / "fits").mkdir()
    (s / "fits" / "summary.json").write_text(json.dumps({
        "scratch": {"law": "chinchilla", "params": {"E": 1.55, "A": 420.0, "alpha": 0.4, "B": 719.5, "beta": 0.3},
                    "fixed": {}, "meta": {"n": 3}, "heldout": {"mae": 0.01},
                    "points": [{"N": 1e6, "D": 2e7, "predicted": 3.1, "observed": 3.0, "run_id": "a"},
                               {"N": 2e6, "D": 4e7, "predicted": 2.9, "observed": 2.95, "run_id": "b"}]},
        "cpt": {"law": "extended_cpt", "params": {"B": 433.3, "beta": 0.2, "gamma": 0.08}, "fixed": {"E": 1.55},
                "meta": {}, "allocation": [{"C": 1e18, "N_opt": 4.08e7, "D_opt": 4.11e9}]},
    }))
    return s


@pytest.fixture()
def study(study_src, tmp_path) -> Path:
    dst = tmp_path / "gs"
    shutil.copytree(study_src, dst)
    return dst


def counts(db: Path) -> dict[str, int]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return {t: con.execute(f"select count(*) from {t}").fetchone()[0] for t in TABLES}
    finally:
        con.close()


def q(db: Path, sql: str, params: list | None = None):
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(sql, params or []).fetchall()
    finally:
        con.close()


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_ingest_fills_every_table_with_provenance(study):
    db = study / "cptscale.duckdb"
    rep = ingest(study, db)
    assert rep.ok, rep.errors
    c = counts(db)
    assert all(c[t] > 0 for t in TABLES), c
    assert c["runs"] == 8 and c["train_metrics"] == 8 * 20 and c["evals"] == 8 * 5 * 2
    row = q(db, "select study, config_hash, git_commit, git_dirty, packages->>'cptscale', input_hashes, status, "
                "params, params_nonemb, flops_exact > flops_exact_nonemb, size, init, replay from runs "
                "where run_id = ?", [RUN])[0]
    assert row[0] == "gs" and row[1] and len(row[2]) == 40 and row[3] is False and row[4] == "0.1.0"
    assert json.loads(row[5]) and row[6] == "done" and row[7] > row[8] and row[9]
    assert row[10:] == ("d64l2", "cpt", 0.0)
    # evals carry compute; exact and 6ND agree within the attention/embedding terms
    fl, f6 = q(db, "select flops, flops_6nd from evals where run_id = ? and step = 20 and lang = 'zh'", [RUN])[0]
    assert 0.5 < fl / f6 < 1.5
    # forgetting positive without replay, smaller with replay (synthetic study)
    f0 = q(db, "select forgetting from forgetting where run_id = ? order by step desc limit 1", [RUN])[0][0]
    f25 = q(db, "select forgetting from forgetting where run_id = 'd64l2-cpt-zh-r0.25' order by step desc limit 1")[0][0]
    assert f0 > 0.5 and f25 < f0
    assert q(db, "select count(*) from transfer where frac_saved > 0")[0][0] > 0
    assert q(db, "select count(*) from fits")[0][0] == 2
    kinds = dict(q(db, "select row_kind, count(*) from predictions group by 1"))
    assert kinds == {"points": 2, "allocation": 1}
    assert q(db, "select tokens_per_byte from data_manifests where lang = 'zh'")[0][0] == 0.45
    assert q(db, "select count(*) from blend_realizations where run_id = 'd64l2-cpt-zh-r0.25'")[0][0] == 2
    assert q(db, "select count(*) from checkpoints where kind = 'final'")[0][0] == 8


def test_reingest_is_idempotent_and_rerun_replaces(study):
    db = study / "x.duckdb"
    ingest(study, db)
    first = counts(db)
    rep = ingest(study, db)
    assert counts(db) == first and sum(rep.rows.values()) == 0 and rep.runs_unchanged == 8
    # re-run one run with fewer steps: its rows are replaced, nothing else moves
    m = study / "runs" / RUN / "metrics.jsonl"
    m.write_text("".join(m.read_text().splitlines(keepends=True)[:7]))
    rep = ingest(study, db)
    assert rep.runs_ingested == 1
    after = counts(db)
    assert after["train_metrics"] == first["train_metrics"] - 13
    assert {k: v for k, v in after.items() if k != "train_metrics"} == \
        {k: v for k, v in first.items() if k != "train_metrics"}
    assert not list(study.glob(".x.duckdb.ingest-*")) and not Path(str(db) + ".wal").exists()


def test_malformed_metrics_reported_skipped_and_nothing_lost(study, capsys):
    db = study / "cptscale.duckdb"
    ingest(study, db)
    before = counts(db)
    m = study / "runs" / RUN / "metrics.jsonl"
    lines = m.read_text().splitlines(keepends=True)
    lines[4] = '{"step": 5, "tokens": 1\n'  # truncated by a kill, then the resumed job appended
    lines.append('{"step": 99, "loss": ')
    m.write_text("".join(lines))
    rc = main(["db", "ingest", "--study-dir", str(study), "--db", str(db)])
    err = capsys.readouterr().err
    assert rc == 1 and f"{m}:5:" in err and "--allow-partial" in err
    assert counts(db) == before  # the run's old rows are still there
    assert main(["db", "ingest", "--study-dir", str(study), "--db", str(db), "--allow-partial"]) == 0
    err = capsys.readouterr().err
    assert f"{m}:5:" in err and f"{m}:21:" in err
    assert q(db, "select count(*) from train_metrics where run_id = ?", [RUN])[0][0] == 19
    # a partially ingested run is retried on the next ingest (once fixed it is complete again)
    m.write_text("".join(lines[:4] + lines[5:-1]))
    assert ingest(study, db).runs_ingested == 1


def test_bad_eval_line_names_path_and_line(study):
    e = study / "runs" / RUN / "evals.jsonl"
    e.write_text(e.read_text() + '["not", "an", "object"]\n')
    rep = ingest(study, study / "db.duckdb")
    assert not rep.ok and f"{e}:11:" in rep.errors[0] and rep.runs_skipped == 1
    assert q(study / "db.duckdb", "select count(*) from runs")[0][0] == 7


KILL_SCRIPT = """
import sys
from cptscale.store import ingest
ingest(sys.argv[1], sys.argv[2], _pause_before_replace=float(sys.argv[3]))
"""


@pytest.mark.parametrize("when", ["building", "before_replace"])
def test_sigkill_during_ingest_leaves_old_db_intact(study, when):
    db = study / "cptscale.duckdb"
    ingest(study, db)
    before, before_hash = counts(db), sha(db)
    # change every run so the killed ingest has real work (deletes + inserts) in flight
    for m in (study / "runs").glob("*/metrics.jsonl"):
        m.write_text(m.read_text().replace('"mfu": 0.4', '"mfu": 0.5'))
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(study), str(db), "60"],
                            stderr=subprocess.PIPE, text=True)
    try:
        if when == "before_replace":
            line = proc.stderr.readline()
            assert "pausing before replace" in line, line
        else:
            t0 = time.time()
            while not list(study.glob(".cptscale.duckdb.ingest-*")) and time.time() - t0 < 30:
                time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert sha(db) == before_hash and counts(db) == before
    assert q(db, "select max(mfu) from train_metrics")[0][0] == 0.4
    rep = ingest(study, db)  # the next ingest cleans up and applies the change
    assert rep.runs_ingested == 8 and counts(db) == before
    assert q(db, "select max(mfu) from train_metrics")[0][0] == 0.5
    assert not list(study.glob(".cptscale.duckdb.ingest-*"))


def test_cli_status_sql_export_points(study, tmp_path, capsys):
    db = study / "cptscale.duckdb"
    (study / "runs" / "d32l2-cpt-zh-r0.25" / "done.json").unlink()
    shutil.rmtree(study / "runs" / "d32l2-cpt-zh-r0")
    assert main(["db", "ingest", "--study-dir", str(study)]) == 0
    capsys.readouterr()
    assert main(["db", "status", "--study-dir", str(study), "--json"]) == 0
    st = {(r["size"], r["init"], r["replay"]): r for r in json.loads(capsys.readouterr().out)}
    assert st[("d32l2", "cpt", 0.0)]["missing"] == 1 and st[("d32l2", "cpt", 0.25)]["partial"] == 1
    assert st[("d64l2", "scratch", 0.0)] | {} == st[("d64l2", "scratch", 0.0)]
    assert st[("d64l2", "scratch", 0.0)]["done"] == 2 and st[("d64l2", "scratch", 0.0)]["evals"] == 20
    assert main(["db", "status", "--study-dir", str(study)]) == 0
    assert "evals_expected" in capsys.readouterr().out
    assert main(["db", "sql", "--db", str(db), "--format", "csv",
                 "select status, count(*) n from runs group by 1 order by 1"]) == 0
    assert capsys.readouterr().out.splitlines() == ["status,n", "done,6", "partial,1"]
    assert main(["db", "sql", "--db", str(db), "select nope from runs"]) == 2
    assert main(["db", "export", "--db", str(db), "--out", str(tmp_path / "exp"), "--format", "parquet"]) == 0
    import pandas as pd

    assert len(pd.read_parquet(tmp_path / "exp" / "runs.parquet")) == 7
    assert main(["db", "export", "--db", str(db), "--out", str(tmp_path / "csv"), "--format", "csv"]) == 0
    assert (tmp_path / "csv" / "evals.csv").exists()
    out = tmp_path / "points.csv"
    assert main(["db", "points", "--db", str(db), "--study", "gs", "--out", str(out)]) == 0
    pts = pd.read_csv(out)
    assert list(pts.columns[:9]) == ["run", "N", "D", "loss", "init", "lang", "size", "replay", "C"]
    assert (pts["D"] > 0).all() and (pts["lang"] == "zh").all() and len(pts) == 5 * 4
    assert (pts["C"] == 6 * pts["N"] * pts["D"]).all()


def test_two_studies_share_one_db(study, tmp_path):
    other = tmp_path / "other"
    generate_study(other, sizes=["d32l2"], replays=[0.1], steps_per_run=5, evals_per_run=3)
    db = tmp_path / "all.duckdb"
    assert ingest(study, db).ok and ingest(other, db).ok
    assert dict(q(db, "select study, count(*) from runs group by 1")) == {"gs": 8, "other": 3}
    assert ingest(other, db).runs_unchanged == 3
    assert dict(q(db, "select study, count(*) from runs group by 1")) == {"gs": 8, "other": 3}


def test_resumed_run_relogged_steps_keep_the_last(study):
    m = study / "runs" / RUN / "metrics.jsonl"
    lines = m.read_text().splitlines(keepends=True)
    relog = [ln.replace('"mfu": 0.4', '"mfu": 0.9') for ln in lines[10:15]]  # resumed from step 10
    m.write_text("".join(lines[:15] + relog + lines[15:]))
    db = study / "db.duckdb"
    assert ingest(study, db).ok
    rows = q(db, "select count(*), count(distinct step), sum(case when mfu = 0.9 then 1 else 0 end) "
                 "from train_metrics where run_id = ?", [RUN])[0]
    assert rows == (20, 20, 5)
