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
from cptscale.store.ingest import ingest  # noqa: E402
from cptscale.store.schema import TABLES  # noqa: E402
from cptscale.store.synthetic import generate_study, write_generated_transfers  # noqa: E402

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
from cptscale.store.ingest import ingest
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
    # d64l2 scratch: the zh run and the en source run, both finished, both ingested, every eval present
    sc = st[("d64l2", "scratch", 0.0)]
    assert {k: sc[k] for k in ("expected", "done", "partial", "missing", "evals", "evals_expected", "in_db",
                               "branch_evals")} == \
        {"expected": 2, "done": 2, "partial": 0, "missing": 0, "evals": 20, "evals_expected": 20, "in_db": 2,
         "branch_evals": 0}
    # the CPT runs of d32l2: r0 was deleted (missing, not in the DB), r0.25 has no done.json (partial)
    assert (st[("d32l2", "cpt", 0.0)]["in_db"], st[("d32l2", "cpt", 0.25)]["in_db"]) == (0, 1)
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
    assert main(["db", "export", "--db", str(db), "--out", str(tmp_path / "some"), "--tables", "runs", "fits"]) == 0
    assert sorted(p.name for p in (tmp_path / "some").iterdir()) == ["fits.parquet", "runs.parquet"]
    capsys.readouterr()
    # table names end up in SQL: anything not in the schema is refused before a file is written
    for bad in ("nope", "runs; drop table runs", "ingest_log"):
        assert main(["db", "export", "--db", str(db), "--out", str(tmp_path / "bad"), "--tables", "runs", bad]) == 2
        err = capsys.readouterr().err
        assert f"unknown table(s) {bad!r}" in err and "the store has studies, runs" in err
    assert not (tmp_path / "bad").exists() and counts(db)["runs"] == 7
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


# -- provenance from the real pipeline ---------------------------------------------------------------
def _tiny_corpus(path: Path, lang: str, n_docs: int) -> None:
    """A generated corpus (no third-party text): ASCII words for 'en', CJK characters for 'zh'."""
    import random

    r = random.Random(len(lang) * 7 + n_docs)
    alphabet = "etaoinshrdlucmfwyp" if lang == "en" else "".join(chr(c) for c in range(0x4E00, 0x4E00 + 300))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n_docs):
            words = ["".join(r.choices(alphabet, k=r.randint(1, 6))) for _ in range(r.randint(20, 80))]
            fh.write(json.dumps({"text": f"{i} " + " ".join(words) + "."}, ensure_ascii=False) + "\n")


@pytest.fixture(scope="module")
def planned_study(tmp_path_factory) -> tuple[Path, Path, dict]:
    """The micro study planned for real: a real data stage (ingest, tokenizer, split + index) on tiny
    generated corpora, then `cptscale plan` for study.json and plan.run_spec for one run's run.json."""
    import yaml

    from cptscale.data.indexed import prepare
    from cptscale.data.ingest import ingest as ingest_docs
    from cptscale.data.sources import parse_sources
    from cptscale.data.tokenizer import train_tokenizer
    from cptscale.plan import run_spec
    from cptscale.runs import tokenizer_path
    from cptscale.validation import load_config

    root = tmp_path_factory.mktemp("planned")
    cfg = yaml.safe_load((Path(__file__).parent / "configs" / "micro.yaml").read_text())
    cfg["results_dir"] = str(root / "results")
    cfg_path = root / "micro.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    c = load_config(cfg_path)
    S = c.study_dir
    docs = {}
    for lang in ("en", "zh"):
        _tiny_corpus(root / "corp" / f"{lang}.jsonl", lang, 150)
        src = parse_sources([{"name": "gen", "kind": "local", "paths": [str(root / "corp" / f"{lang}.jsonl")],
                              "format": "jsonl"}])
        docs[lang] = S / "data" / lang / "docs.parquet"
        ingest_docs(lang, src, docs[lang], progress=False)
    tok = tokenizer_path(c)
    train_tokenizer(list(docs.values()), tok, vocab_size=300, sample_chars_per_language=20_000, valid_tokens=500,
                    progress=False)
    manifests = {lang: prepare(lang, docs[lang], tok, 500, S / "data" / lang, workers=1, progress=False)
                 for lang in ("en", "zh")}
    assert main(["plan", str(cfg_path), "--study-json", str(S / "study.json")]) == 0
    spec = run_spec(c, "d32l2-scratch-zh")
    spec.write(S / "runs" / spec.run_id / "run.json")
    return S, cfg_path, manifests


def test_ingest_records_real_provenance(planned_study, tmp_path):
    """Provenance as the pipeline writes it, not generator values: the code's git commit (or an explicit
    'unknown' outside a git checkout), the installed cptscale version, the data manifests' content hashes;
    a done.json written at training time overrides the plan-time record."""
    import re
    from importlib import metadata

    from cptscale.util import MANIFEST_HASHES, git_version, provenance, write_json

    S, _, manifests = planned_study
    S = shutil.copytree(S, tmp_path / "micro")
    db = tmp_path / "p.duckdb"
    rep = ingest(S, db)
    assert rep.ok, rep.errors
    commit, dirty, version, inputs, chash, prov = q(
        db, "select git_commit, git_dirty, packages->>'cptscale', input_hashes, config_hash, provenance "
            "from runs where run_id = 'd32l2-scratch-zh'")[0]
    assert re.fullmatch(r"[0-9a-f]{40}", commit) or (commit == "unknown" and dirty is None), commit
    assert commit == git_version()["git_commit"] and version == metadata.version("cptscale")
    inputs = json.loads(inputs)
    assert set(inputs) == {f"data/{lang}/{k}" for lang in ("en", "zh") for k, _ in MANIFEST_HASHES}
    assert all(re.fullmatch(r"[0-9a-f]{16}", v) for v in inputs.values()), inputs
    for lang, m in manifests.items():  # the very hashes of the data the run reads
        assert inputs[f"data/{lang}/docs"] == m["docs_hash"] and inputs[f"data/{lang}/train.bin"] == m["train"]["bin_hash"]
        assert inputs[f"data/{lang}/valid.idx"] == m["valid"]["idx_hash"]
        assert inputs[f"data/{lang}/tokenizer"] == m["tokenizer_hash"]
    study_hash = json.loads((S / "study.json").read_text())["config_hash"]
    assert chash and len(chash) == 16 and q(db, "select config_hash from studies")[0][0] == study_hash
    assert json.loads(prov)["from"]["git_commit"] == "run.json"
    assert q(db, "select docs_hash from data_manifests where lang = 'zh'")[0][0] == manifests["zh"]["docs_hash"]
    # the trainer's done.json provenance (recorded when the run trained) wins over the plan's
    rdir = S / "runs" / "d32l2-scratch-zh"
    spec = json.loads((rdir / "run.json").read_text())
    spec["provenance"]["git_commit"] = "f" * 40  # planned from another checkout
    write_json(rdir / "run.json", spec)
    train_prov = provenance(spec["config_hash"], {"data/zh/train.bin": manifests["zh"]["train"]["bin_hash"]})
    write_json(rdir / "done.json", {"run_id": spec["run_id"], "steps": spec["steps"], "tokens": spec["tokens"],
                                    "final_loss": {"zh": 5.0}, "provenance": train_prov})
    assert ingest(S, db).runs_ingested == 1
    commit2, prov2, inputs2 = q(db, "select git_commit, provenance, input_hashes from runs")[0]
    prov2 = json.loads(prov2)
    assert commit2 == git_version()["git_commit"] != "f" * 40
    assert prov2["from"]["git_commit"] == "done.json" and prov2["plan"]["git_commit"] == "f" * 40
    assert json.loads(inputs2) == inputs  # the trainer hashed one input; the plan's others are kept


def test_run_spec_refuses_a_manifest_without_hashes(planned_study, tmp_path):
    from cptscale.plan import run_spec
    from cptscale.validation import load_config

    S, cfg_path, _ = planned_study
    import yaml

    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["results_dir"] = str(tmp_path / "results")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    c = load_config(tmp_path / "c.yaml")
    shutil.copytree(S / "data", c.study_dir / "data")
    m = json.loads((c.study_dir / "data" / "en" / "data.json").read_text())
    del m["train"]["bin_hash"]
    (c.study_dir / "data" / "en" / "data.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"data/en/data.json: field 'train.bin_hash'.*re-run the data stage"):
        run_spec(c, "d32l2-scratch-zh")


# -- the workflow's persistent store --------------------------------------------------------------------
def test_store_survives_snakemake_deleting_a_failed_jobs_output(study, capsys):
    """The workflow ingests into db/store.duckdb (not a Snakemake output) and publishes a copy as the
    declared output. Snakemake deletes a job's output before it runs and after it fails; the store keeps
    every row, and the next successful job publishes a complete copy."""
    store, out = study / "db" / "store.duckdb", study / "db" / "runs.duckdb"
    args = ["db", "ingest", "--study-dir", str(study), "--db", str(store), "--publish", str(out)]
    assert main(args) == 0
    assert sha(out) == sha(store) and counts(out) == counts(store)
    before = counts(store)
    out.unlink()  # Snakemake removes the declared output before the job runs
    m = study / "runs" / RUN / "metrics.jsonl"
    good = m.read_text()
    m.write_text(good + '{"step": 21, "loss": \n')  # a truncated line: this ingest fails
    assert main(args) == 1
    assert f"{m}:21:" in capsys.readouterr().err
    out.unlink(missing_ok=True)  # ... and removes it again because the job failed
    assert counts(store) == before  # nothing that was in the database is lost
    m.write_text(good.replace('"mfu": 0.4', '"mfu": 0.45'))  # the fixed (re-run) file
    assert main(args) == 0
    assert counts(out) == before and q(out, "select max(mfu) from train_metrics where run_id = ?", [RUN])[0][0] == 0.45
    assert not [p.name for p in (study / "db").iterdir() if p.name.startswith(".")]  # no temp files left
    capsys.readouterr()
    assert main(["db", "ingest", "--study-dir", str(study), "--db", str(store), "--publish", str(store)]) == 2
    assert "is the store itself" in capsys.readouterr().err


def test_workflow_rules_ingest_into_a_store_that_is_not_an_output():
    """Both aggregate rules ingest into db/store.duckdb and publish their declared output from it."""
    import re

    rules = Path(__file__).parents[1] / "workflow" / "rules"
    text = (rules / "evaluate.smk").read_text() + (rules / "fit.smk").read_text()
    cmds = re.findall(r'"cptscale db ingest[^"]*"', text)
    assert len(cmds) == 2, cmds
    for c in cmds:
        assert "--db {params.store}" in c and "--publish {output}" in c, c
    assert text.count('store=f"{S}/db/store.duckdb"') == 2


# -- WSD decay branches ---------------------------------------------------------------------------------
def _add_branches(rdir: Path, branches: dict[int, list[int]], lang_offsets: dict[str, float]) -> list[dict]:
    """Append branch eval rows (``"branch": total steps``) to a run's evals.jsonl and its done.json entry:
    each branch decays from the main trajectory's loss at its steps to a lower final loss."""
    main_rows = [json.loads(line) for line in (rdir / "evals.jsonl").read_text().splitlines()]
    tps = main_rows[-1]["tokens"] // main_rows[-1]["step"]
    rows, done_br = [], []
    for total, steps in branches.items():
        final = {}
        for st in steps:
            for lang, off in lang_offsets.items():
                loss = round(3.0 + off - 0.01 * st - (0.2 if st == total else 0.0), 5)
                rows.append({"step": st, "tokens": st * tps, "lang": lang, "loss": loss, "n_tokens": 100,
                             "branch": total})
                if st == total:
                    final[lang] = loss
        done_br.append({"steps": total, "tokens": total * tps, "final_loss": final})
    with open(rdir / "evals.jsonl", "a") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    done = json.loads((rdir / "done.json").read_text())
    (rdir / "done.json").write_text(json.dumps({**done, "branches": done_br}))
    return rows


def test_branch_rows_are_ingested_and_add_fit_points(study, tmp_path):
    import pandas as pd

    from cptscale.store.queries import write_points_table
    from cptscale.transfer import compute_transfer

    db0, db = tmp_path / "before.duckdb", tmp_path / "after.duckdb"
    assert ingest(study, db0).ok
    write_points_table(db0, "gs", tmp_path / "p0.csv")
    cpt = study / "runs" / RUN
    tr_before = compute_transfer(cpt, study / "runs" / "d64l2-scratch-zh", study / "runs" / "d64l2-scratch-en")
    # branches of 10 and 15 steps (of the 20-step main runs) on a scratch and a CPT run
    br = _add_branches(study / "runs" / "d64l2-scratch-zh", {10: [8, 10], 15: [15]}, {"zh": 0.0, "en": 1.0})
    br += _add_branches(cpt, {12: [12]}, {"zh": 0.0, "en": -0.5})
    rep = ingest(study, db)
    assert rep.ok, rep.errors
    before, after = counts(db0), counts(db)
    assert after["evals"] == before["evals"] + len(br)
    # the main trajectory (branch IS NULL) is exactly what was there before
    assert q(db, "select count(*) from evals where branch is null")[0][0] == before["evals"]
    assert q(db, "select branch, count(*) from evals where branch is not null group by 1 order by 1") == \
        [(10, 4), (12, 2), (15, 2)]
    # a branch at the same step as a main eval is its own row (dedup is per step, language and branch)
    assert q(db, "select count(*) from evals where run_id = 'd64l2-scratch-zh' and step = 10 and lang = 'zh'")[0][0] == 2
    # forgetting and transfer read the main trajectory only: unchanged by the CPT run's branch rows
    assert after["forgetting"] == before["forgetting"] and after["transfer"] == before["transfer"]
    tr_after = compute_transfer(cpt, study / "runs" / "d64l2-scratch-zh", study / "runs" / "d64l2-scratch-en")
    assert tr_after["rows"] == tr_before["rows"] and tr_after["forgetting"] == tr_before["forgetting"]
    branches = json.loads(q(db, "select branches from runs where run_id = 'd64l2-scratch-zh'")[0][0])
    assert [b["steps"] for b in branches] == [10, 15] and branches[0]["final_loss"]["zh"] == 2.7
    # fit points: the main points plus each branch's final eval (not its earlier ones) as points of that run
    write_points_table(db, "gs", tmp_path / "p1.csv")
    p0, p1 = pd.read_csv(tmp_path / "p0.csv"), pd.read_csv(tmp_path / "p1.csv")
    extra = p1[p1["branch"].notna()]
    assert len(p1) == len(p0) + 3 and p1["branch"].isna().sum() == len(p0)
    got = sorted(zip(extra["run"], extra["branch"].astype(int), extra["step"], extra["loss"], strict=True))
    assert got == [(RUN, 12, 12, 2.68), ("d64l2-scratch-zh", 10, 10, 2.7), ("d64l2-scratch-zh", 15, 15, 2.65)]
    tps = q(db, "select tokens // step from evals where run_id = ? and step = 20 and lang = 'zh'", [RUN])[0][0]
    assert (extra.loc[extra["run"] == RUN, "D"] == 12 * tps).all()
    assert (extra["C"] == 6 * extra["N"] * extra["D"]).all()
    # status counts the planned (main-trajectory) evals apart from the branch evals
    from cptscale.store.queries import status_table

    st = status_table(study, db).set_index(["size", "init", "replay"])
    assert st.loc[("d64l2", "scratch", 0.0), "evals"] == 20 and st.loc[("d64l2", "scratch", 0.0), "branch_evals"] == 6


def test_status_counts_an_eval_logged_again_after_a_resume_once(study):
    """A run resumed from a checkpoint logs the evaluations after it again (the store keeps the last of each):
    the status counts distinct (step, language) evals, so a finished run reads 20 of 20, not 22 of 20."""
    from cptscale.store.queries import status_table

    ev = study / "runs" / "d64l2-scratch-zh" / "evals.jsonl"
    lines = ev.read_text().splitlines()
    ev.write_text("\n".join([*lines, *lines[-2:], "{not json"]) + "\n")  # two re-logged evals, one torn line
    st = status_table(study).set_index(["size", "init", "replay"])
    assert st.loc[("d64l2", "scratch", 0.0), "evals"] == st.loc[("d64l2", "scratch", 0.0), "evals_expected"] == 20


def test_bad_branch_rows_name_file_and_line(study):
    e = study / "runs" / RUN / "evals.jsonl"
    n = len(e.read_text().splitlines())
    e.write_text(e.read_text() + json.dumps({"step": 30, "lang": "zh", "loss": 2.0, "branch": 25}) + "\n"
                 + json.dumps({"step": 5, "lang": "zh", "loss": 2.0, "branch": "x"}) + "\n")
    rep = ingest(study, study / "db.duckdb")
    assert not rep.ok and f"{e}:{n + 1}:" in rep.errors[0] and "past the end of its branch" in rep.errors[0]
    rep = ingest(study, study / "db.duckdb", allow_partial=True)
    assert rep.ok and any(f"{e}:{n + 2}:" in w and "positive integer" in w for w in rep.warnings)
    d = study / "runs" / RUN / "done.json"
    d.write_text(json.dumps({**json.loads(d.read_text()), "branches": [{"steps": "ten"}]}))
    rep = ingest(study, study / "db.duckdb")
    assert not rep.ok and f"{d}: branches[0]" in rep.errors[0]


def test_branch_training_steps_are_ingested_apart_from_the_main_trajectory(study):
    """branch_metrics.jsonl (the training steps of WSD decay branches) lands in train_metrics keyed by
    ``branch``; the main trajectory is unchanged, a redone branch step keeps its last row, and a bad line
    is named by path and line."""
    db = study / "db.duckdb"
    assert ingest(study, db).ok
    main_before = q(db, "select step, loss from train_metrics where run_id = ? order by step", [RUN])
    bm = study / "runs" / RUN / "branch_metrics.jsonl"
    rows = [{"step": s, "tokens": 64 * s, "loss": 3.0 - 0.01 * s, "lr": 1e-4 * (12 - s), "grad_norm": 1.0,
             "tokens_per_s": 100.0, "branch": 12} for s in (10, 11)]
    redo = {**rows[1], "loss": 2.5}  # a resumed run redoes the branch: the last row of a step wins
    bm.write_text("".join(json.dumps(r) + "\n" for r in [*rows, redo]))
    rep = ingest(study, db)
    assert rep.ok and rep.runs_ingested == 1, rep.errors
    assert q(db, "select step, loss from train_metrics where run_id = ? and branch is null order by step",
             [RUN]) == main_before
    assert q(db, "select branch, step, loss from train_metrics where run_id = ? and branch is not null "
                 "order by step", [RUN]) == [(12, 10, 2.9), (12, 11, 2.5)]
    assert ingest(study, db).runs_unchanged == 8  # the branch file is part of the run's fingerprint
    n = 3
    bm.write_text(bm.read_text() + json.dumps({**rows[0], "step": 13}) + "\n")
    rep = ingest(study, db)
    assert not rep.ok and f"{bm}:{n + 1}:" in rep.errors[0] and "past the end of its branch" in rep.errors[0]
    assert q(db, "select count(*) from train_metrics where branch is not null")[0][0] == 2  # nothing lost
    bm.write_text(bm.read_text() + json.dumps({k: v for k, v in rows[0].items() if k != "branch"}) + "\n")
    rep = ingest(study, db, allow_partial=True)
    assert rep.ok and any(f"{bm}:{n + 2}:" in w and "missing branch" in w for w in rep.warnings)


def test_schema_2_database_is_migrated(study):
    """A database written before schema 3 gains evals.branch, runs.branches/provenance and the fit
    choice columns on the next ingest, and every run and fit is re-read to fill them."""
    from cptscale.store.schema import ADDED_COLUMNS, SCHEMA_VERSION

    db = study / "old.duckdb"
    assert ingest(study, db).ok
    con = duckdb.connect(str(db))
    for t, cols in ADDED_COLUMNS.items():
        for c in cols:
            if t != "runs" or c in ("branches", "provenance"):
                con.execute(f"ALTER TABLE {t} DROP COLUMN {c}")
    con.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    con.close()
    before = counts(db)
    _add_branches(study / "runs" / "d64l2-scratch-zh", {10: [10]}, {"zh": 0.0})
    rep = ingest(study, db)
    assert rep.ok and rep.runs_ingested == 8
    after = counts(db)
    assert after["evals"] == before["evals"] + 1 and after["fits"] == before["fits"]
    assert q(db, "select value from meta where key = 'schema_version'")[0][0] == str(SCHEMA_VERSION)
    assert q(db, "select count(*) from evals where branch = 10")[0][0] == 1
    assert q(db, "select count(*) from runs where provenance is null")[0][0] == 0
    assert ingest(study, db).runs_unchanged == 8
