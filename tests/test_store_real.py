"""Transfer metrics and the store on real tiny Megatron-Core runs (CPU): source -> CPT with/without replay.

The default suite trains the cheapest study that still shows forgetting (a source run and two short CPT
runs, evaluated at their start and end: ~25 s on 2 cores); the slow test adds the scratch pair, the
transfer metrics and more eval steps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("megatron.core")
duckdb = pytest.importorskip("duckdb")

from train_helpers import EOD, VOCAB, make_spec, structured_docs, write_indexed  # noqa: E402


def descending_docs(n_docs: int, seed: int) -> list[np.ndarray]:
    """The 'target language': descending progressions over the upper half of the vocabulary, a
    distribution the English (ascending) source model predicts badly."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_docs):
        length = int(rng.integers(40, 120))
        start, stride = int(rng.integers(1, VOCAB)), int(rng.integers(5, 9))
        ids = (start - stride * np.arange(length)) % (VOCAB // 2 - 1) + VOCAB // 2
        out.append(np.concatenate([ids, [EOD]]).astype(np.int32))
    return out


def _data(root: Path) -> tuple[dict, str, list, list]:
    """English (ascending) and 'target' (descending) train/valid sets, and a 50/50 mix for replay."""
    en, zh = structured_docs(200, 10), descending_docs(200, 11)
    data = {
        "en": {"train": write_indexed(root / "d/en/train", en),
               "valid": write_indexed(root / "d/en/valid", structured_docs(12, 100)), "bytes": 3000},
        "zh": {"train": write_indexed(root / "d/zh/train", zh),
               "valid": write_indexed(root / "d/zh/valid", descending_docs(12, 101)), "bytes": 3000},
    }
    mixed = write_indexed(root / "d/mix50/train", [d for pair in zip(zh, en, strict=True) for d in pair])
    return data, mixed, en, zh


def _train(S: Path, spec: dict) -> dict:
    from cptscale.cli import main

    spec["out_dir"] = str(S / "runs" / spec["run_id"])
    spec["study"] = S.name
    Path(spec["out_dir"]).mkdir(parents=True, exist_ok=True)
    p = Path(spec["out_dir"]) / "run.json"
    p.write_text(json.dumps(spec))
    assert main(["train", "--spec", str(p)]) == 0
    return spec


def _parent(src: dict) -> dict:
    done = json.loads((Path(src["out_dir"]) / "done.json").read_text())
    return {"run_id": src["run_id"], "checkpoint": str(done["final_checkpoint"]), "lang": "en",
            "final_loss": done["final_loss"]["en"], "tolerance": 1e-3}


@pytest.fixture(scope="module")
def forgetting_study(tmp_path_factory) -> Path:
    """The cheapest real study that shows forgetting: a 30-step English source run (evaluated at its end)
    and two 12-step CPT runs from it, without replay and with 50 % replay (evaluated at 0 and 12)."""
    root = tmp_path_factory.mktemp("forget")
    S = root / "forget"
    data, mixed, _, _ = _data(root)
    # no intermediate checkpoints (every=1000): saving dominates a 30-step run; the final one is kept
    src = _train(S, make_spec(root, data, run_id="d32l2-scratch-en", lang="en", steps=30, eval_steps=[30],
                              every=1000))
    for rep, prefix in ((0.0, data["zh"]["train"]), (0.5, mixed)):
        spec = make_spec(root, data, run_id=f"d32l2-cpt-zh-r{rep:g}", lang="zh", init="cpt", parent=_parent(src),
                         steps=12, eval_steps=[0, 12], replay=rep, every=1000)
        spec["data"] = {"kind": "single", "prefix": prefix}  # replay = share of English documents
        _train(S, spec)
    return S


def test_real_runs_forgetting_positive_without_replay_smaller_with(forgetting_study):
    """Issue 6's acceptance check on real training, in the default suite: the store's forgetting (source
    loss during CPT minus the source model's final loss) is ~0 at CPT step 0 (the loaded source model),
    positive after 12 steps without replay and smaller with 50 % replay (measured: 0.74 vs 0.08)."""
    from cptscale.store.ingest import ingest

    db = forgetting_study / "cptscale.duckdb"
    rep = ingest(forgetting_study, db)  # no transfer.json: the store computes forgetting from the evals
    assert rep.ok, rep.errors
    con = duckdb.connect(str(db), read_only=True)
    f = dict(con.execute("select run_id, forgetting from forgetting where step = 12").fetchall())
    f0 = con.execute("select max(abs(forgetting)) from forgetting where step = 0").fetchone()[0]
    con.close()
    print("forgetting at step 12:", f, "step-0 |forgetting|:", f0)
    assert f0 < 1e-6
    assert f["d32l2-cpt-zh-r0"] > 0.2, "no-replay CPT must forget the source language"
    assert f["d32l2-cpt-zh-r0.5"] < 0.5 * f["d32l2-cpt-zh-r0"], "replay must reduce forgetting"


@pytest.fixture(scope="module")
def real_study(tmp_path_factory) -> Path:
    from cptscale.transfer import compute_transfer
    from cptscale.util import write_json

    root = tmp_path_factory.mktemp("real")
    S = root / "real"
    data, mixed, _, _ = _data(root)
    src = _train(S, make_spec(root, data, run_id="d32l2-scratch-en", lang="en", steps=30, eval_steps=[0, 10, 20, 30]))
    _train(S, make_spec(root, data, run_id="d32l2-scratch-zh", lang="zh", steps=30,
                        eval_steps=[0, 2, 4, 6, 10, 15, 20, 30]))
    for rep, prefix in ((0.0, data["zh"]["train"]), (0.5, mixed)):
        rid = f"d32l2-cpt-zh-r{rep:g}"
        spec = make_spec(root, data, run_id=rid, lang="zh", init="cpt", parent=_parent(src), steps=12,
                         eval_steps=[0, 3, 6, 12], replay=rep)
        spec["data"] = {"kind": "single", "prefix": prefix}  # replay = share of English documents
        _train(S, spec)
        write_json(S / "runs" / rid / "transfer.json",
                   compute_transfer(S / "runs" / rid, S / "runs" / "d32l2-scratch-zh", S / "runs" / src["run_id"]))
    return S


@pytest.mark.slow
def test_real_runs_forgetting_transfer_and_reingest(real_study):
    from cptscale.store.ingest import ingest
    from cptscale.store.schema import TABLES

    db = real_study / "cptscale.duckdb"
    rep = ingest(real_study, db)
    assert rep.ok, rep.errors
    con = duckdb.connect(str(db), read_only=True)
    f = dict(con.execute("select run_id, forgetting from forgetting where step = 12").fetchall())
    f0 = con.execute("select max(abs(forgetting)) from forgetting where step = 0").fetchone()[0]
    n_tr = con.execute("select count(*) from transfer").fetchone()[0]
    print(con.execute("select run_id, step, tokens, loss, scratch_tokens_equiv, frac_saved, "
                      "effective_data_transferred from transfer order by run_id, step").df().to_string())
    counts = {t: con.execute(f"select count(*) from {t}").fetchone()[0] for t in TABLES}
    con.close()
    print("forgetting at the last step:", f, "step-0 |forgetting|:", f0)
    assert f0 < 1e-6  # step 0 of CPT is the loaded source model
    assert f["d32l2-cpt-zh-r0"] > 0, "no-replay CPT must forget the source language"
    assert f["d32l2-cpt-zh-r0.5"] < f["d32l2-cpt-zh-r0"], "replay must reduce forgetting"
    assert n_tr == 8 and counts["runs"] == 4 and counts["train_metrics"] > 0
    assert ingest(real_study, db).runs_unchanged == 4
    con = duckdb.connect(str(db), read_only=True)
    assert {t: con.execute(f"select count(*) from {t}").fetchone()[0] for t in TABLES} == counts
    con.close()
