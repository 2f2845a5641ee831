"""A re-logged evaluation must not change transfer, forgetting or the fits.

The fault suite once found the transfer, forgetting and fits tables different after SIGKILLs while the
evals table matched: a run killed between its final checkpoint and done.json resumed from that
checkpoint and logged its final evaluation a second time. The store keeps the last row of each
(step, lang, branch); transfer.json read every row, so its final transfer and forgetting rows came
twice and the Hernandez fit on the transfer table got a duplicate point. These tests run the real
stages (transfer, DuckDB ingest, db points, fit-study) and the fault suite's own table comparison."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from faults import CLOCK_KEYS, HISTORY_KEYS, table_rows

STUDY = "relog"


def _study_tables(sdir: Path, db: Path) -> dict[str, tuple[list[str], list[str]]]:
    """transfer.json of every CPT run, ingest, points, every fit, ingest again: the store's tables."""
    from cptscale.fit.study import fit_study
    from cptscale.store.ingest import ingest
    from cptscale.store.queries import write_points_table
    from cptscale.store.synthetic import write_generated_transfers

    assert write_generated_transfers(sdir) == 3
    assert ingest(sdir, db).ok
    points = sdir / "fits" / "points.csv"
    write_points_table(str(db), STUDY, points)
    fit_study(str(points), str(sdir / "fits"), budgets=[1e12], bootstrap=3, grid="coarse", db=str(db), study=STUDY)
    assert ingest(sdir, db).ok
    return table_rows(db, CLOCK_KEYS | HISTORY_KEYS)  # what the fault suite compares


def _fresh(template: Path) -> tuple[Path, Path]:
    """The generated study, as written, at one fixed path (paths are part of the tables), no store yet."""
    sdir, db = template.parent / STUDY, template.parent / f"{STUDY}.duckdb"
    shutil.rmtree(sdir, ignore_errors=True)
    db.unlink(missing_ok=True)
    shutil.copytree(template, sdir)
    return sdir, db


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, tuple[list[str], list[str]]]]:
    from cptscale.store.synthetic import generate_study

    template = tmp_path_factory.mktemp("relog") / "template"
    generate_study(template, sizes=["d32l2", "d64l2", "d96l2"], replays=[0.0], steps_per_run=20,
                   evals_per_run=6, study=STUDY)
    return template, _study_tables(*_fresh(template))


def test_relogged_final_eval_leaves_every_table_identical(straight) -> None:
    template, base = straight
    assert base["transfer"][1] and base["forgetting"][1]
    hern = [r for r in base["fits"][1] if '"hernandez"' in r]
    assert hern and all('"ok"' in r for r in hern), "the Hernandez law must be fitted for this test to mean anything"
    sdir, db = _fresh(template)
    for ev in sorted((sdir / "runs").glob("*/evals.jsonl")):  # what a resume from the final checkpoint wrote
        rows = [json.loads(x) for x in ev.read_text().splitlines() if x.strip()]
        last = max(r["step"] for r in rows)
        ev.write_text(ev.read_text() + "".join(json.dumps(r) + "\n" for r in rows if r["step"] == last))
    got = _study_tables(sdir, db)
    assert set(got) == set(base)
    differ = [t for t in base if got[t] != base[t]]
    assert not differ, {t: (f"{len(base[t][1])} rows straight, {len(got[t][1])} with the re-logged evals",
                            sorted(set(got[t][1]) ^ set(base[t][1]))[:2]) for t in differ}


def test_transfer_fit_reads_the_store_in_a_fixed_order(straight) -> None:
    """The Hernandez fit's inputs do not follow the physical order of the transfer table's rows."""
    import duckdb

    from cptscale.fit.study import _transfer_table

    template, _ = straight
    sdir, db = _fresh(template)
    _study_tables(sdir, db)
    first = _transfer_table(str(db), None, STUDY)
    con = duckdb.connect(str(db))  # the same rows, stored in the reverse order
    con.execute("CREATE TABLE t2 AS SELECT * FROM transfer ORDER BY run_id DESC, step DESC")
    con.execute("DELETE FROM transfer")
    con.execute("INSERT INTO transfer SELECT * FROM t2")
    con.execute("DROP TABLE t2")
    con.close()
    again = _transfer_table(str(db), None, STUDY)
    assert len(first) > 4
    assert first.to_dict("records") == again.to_dict("records")


def test_resume_from_final_checkpoint_logs_each_final_eval_once(tmp_path: Path) -> None:
    """A SIGKILL after the final checkpoint, before done.json: the re-run resumes from that checkpoint,
    evaluates it again and logs each final evaluation once."""
    pytest.importorskip("megatron.core")
    from train_helpers import make_data, make_spec, read_jsonl

    from cptscale.train.launch import run_spec

    spec = make_spec(tmp_path, make_data(tmp_path / "data"), run_id="once", steps=4, every=2, eval_steps=[0, 2, 4])
    assert run_spec(spec) == 0
    out = Path(spec["out_dir"])
    before = read_jsonl(out / "evals.jsonl")
    (out / "done.json").unlink()
    assert run_spec(spec) == 0
    after = read_jsonl(out / "evals.jsonl")
    assert json.loads((out / "done.json").read_text())["resumed_from"] == 4
    keys = [(r["step"], r["lang"]) for r in after]
    assert len(keys) == len(set(keys)) == len(before) == 6
    assert [r["loss"] for r in after] == [r["loss"] for r in before]
