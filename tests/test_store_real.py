"""Transfer metrics and the store on real tiny Megatron-Core runs (CPU): source -> CPT with/without replay."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow
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


@pytest.fixture(scope="module")
def real_study(tmp_path_factory) -> Path:
    from cptscale.cli import main
    from cptscale.transfer import compute_transfer
    from cptscale.util import write_json

    root = tmp_path_factory.mktemp("real")
    S = root / "real"
    en, zh = structured_docs(200, 10), descending_docs(200, 11)
    data = {
        "en": {"train": write_indexed(root / "d/en/train", en),
               "valid": write_indexed(root / "d/en/valid", structured_docs(12, 100)), "bytes": 3000},
        "zh": {"train": write_indexed(root / "d/zh/train", zh),
               "valid": write_indexed(root / "d/zh/valid", descending_docs(12, 101)), "bytes": 3000},
    }
    mixed = write_indexed(root / "d/mix50/train", [d for pair in zip(zh, en, strict=True) for d in pair])

    def run(spec: dict) -> dict:
        spec["out_dir"] = str(S / "runs" / spec["run_id"])
        spec["study"] = "real"
        Path(spec["out_dir"]).mkdir(parents=True, exist_ok=True)
        p = Path(spec["out_dir"]) / "run.json"
        p.write_text(json.dumps(spec))
        assert main(["train", "--spec", str(p)]) == 0
        return spec

    src = run(make_spec(root, data, run_id="d32l2-scratch-en", lang="en", steps=30, eval_steps=[0, 10, 20, 30]))
    run(make_spec(root, data, run_id="d32l2-scratch-zh", lang="zh", steps=30,
                  eval_steps=[0, 2, 4, 6, 10, 15, 20, 30]))
    done = json.loads((Path(src["out_dir"]) / "done.json").read_text())
    par = {"run_id": src["run_id"], "checkpoint": str(done["final_checkpoint"]), "lang": "en",
           "final_loss": done["final_loss"]["en"], "tolerance": 1e-3}
    for rep, prefix in ((0.0, data["zh"]["train"]), (0.5, mixed)):
        rid = f"d32l2-cpt-zh-r{rep:g}"
        spec = make_spec(root, data, run_id=rid, lang="zh", init="cpt", parent=par, steps=12,
                         eval_steps=[0, 3, 6, 12], replay=rep)
        spec["data"] = {"kind": "single", "prefix": prefix}  # replay = share of English documents
        run(spec)
        write_json(S / "runs" / rid / "transfer.json",
                   compute_transfer(S / "runs" / rid, S / "runs" / "d32l2-scratch-zh", S / "runs" / src["run_id"]))
    return S


def test_real_runs_forgetting_transfer_and_reingest(real_study):
    from cptscale.store import TABLES, ingest

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
