"""The two study kinds of issue 10, IPLT pruning and the Reuse, Don't Retrain recipe ablation.

Fast tests: arm planning, the FLOP equalisation arithmetic (counted step by step here, independently of
cptscale.iplt), config validation errors, the variants' switch points, and the store's FLOPs for a real
pruned run. Slow tests: each study end to end through real Snakemake at toy scale (a copy of
workflow/studies/{iplt,reuse-ablation}.yaml with results in tmp_path and tiny budgets), with the report
drawn from the real runs.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cptscale.config.problems import ConfigError
from cptscale.plan import plan_study, schedule_for
from cptscale.runs import RUN_ID
from cptscale.validation import parse_config

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")


def _raw(name: str) -> dict:
    return yaml.safe_load((ROOT / "workflow" / "studies" / name).read_text())


def _cfg(raw: dict):
    return parse_config(raw, base_dir=ROOT)


# ---------------------------------------------------------------------------------------------- IPLT
def _fpt(shape: dict, vocab: int, seq: int) -> float:
    """Training FLOPs per token of a (possibly pruned) shape, from the formula in transfer.flops_exact."""
    from cptscale.ladder import padded_vocab

    d, L, h, f = shape["hidden"], shape["layers"], shape["heads"], shape["ffn"]
    hd = shape.get("head_dim") or d // h
    g = shape.get("kv_heads") or h
    per_layer = d * (h + 2 * g) * hd + h * hd * d + 3 * d * f
    return 3.0 * (2 * L * per_layer + 4 * L * seq * h * hd + 2 * d * padded_vocab(vocab))


def _spent(spec_shape: dict, events: list[dict], steps: int, vocab: int, seq: int, tps: int) -> float:
    """FLOPs of a run counted step by step, the way the trainer counts them: each step at the shape in
    force after the prune events at or before it."""
    at = {int(e["step"]): e["shape"] for e in events}
    shape, total = dict(spec_shape), 0.0
    for s in range(steps):
        if s in at:
            shape = {**shape, **{k: v for k, v in at[s].items() if v is not None or k == "kv_heads"}}
        total += _fpt(shape, vocab, seq) * tps
    return total


def test_iplt_arms_are_planned_runs_with_prune_events() -> None:
    cfg = _cfg(_raw("iplt.yaml"))
    runs = {r.run_id: r for r in plan_study(cfg)}
    arms = {r.run_id: r for r in runs.values() if r.arm}
    by_arm = {(r.arm, r.lang): r for r in arms.values()}
    assert {a for a, _ in by_arm} == {"dense", "small", "f1", "f5", "f20", "classic", "cpt-dense", "cpt-start",
                                      "cpt-incremental"}
    for rid, r in arms.items():
        p = RUN_ID.match(rid)
        assert p, rid
        assert (p["size"], p["init"], p["lang"], p["variant"]) == (r.size, r.init, r.lang, r.variant)
        assert r.variant.startswith("iplt")
    dense_en = runs["d64l3-scratch-en"]  # the ordinary dense run: classic's full training, the CPT source
    assert dense_en.arm is None
    classic = by_arm[("classic", "en")]
    assert classic.run_id == "d64l3-cpt-en-r0-ipltclassic" and classic.init == "cpt"
    assert classic.parent == "d64l3-scratch-en" and classic.source_lang == "en"
    for a in ("cpt-dense", "cpt-start", "cpt-incremental"):
        assert by_arm[(a, "zh")].parent == "d64l3-scratch-en" and by_arm[(a, "zh")].source_lang == "en"
    assert by_arm[("small", "en")].run_id == "d64l3p-scratch-en-ipltsmall"

    from cptscale.iplt import arm_for, fraction_tag

    assert [fraction_tag(f) for f in (0.01, 0.05, 0.2, 0.005)] == ["f1", "f5", "f20", "f0p5"]
    ic = cfg.iplt
    steps_l = dense_en.steps
    for f in (0.01, 0.05, 0.2):
        a = arm_for(cfg, f"d64l3-scratch-en-iplt{fraction_tag(f)}")
        first = max(1, round(f * steps_l))
        assert [e["step"] for e in a.events] == [first + round(round(ic.span * steps_l) * i / 2) for i in range(3)]
        assert a.events[-1]["shape"] == {"hidden": 64, "layers": 2, "heads": 2, "ffn": 96, "kv_heads": None,
                                              "head_dim": 16}
        assert a.shape == cfg.shape("d64l3").as_dict()
    start = arm_for(cfg, "d64l3-cpt-zh-r0-ipltstart")
    assert [e["step"] for e in start.events] == [0] and start.events[0]["shape"]["heads"] == 2
    incr = arm_for(cfg, "d64l3-cpt-zh-r0-ipltincr")
    assert incr.events[0]["step"] == 0 and len(incr.events) == 3
    small = arm_for(cfg, "d64l3p-scratch-en-ipltsmall")
    assert small.events == [] and small.shape["head_dim"] == 16 and small.shape["heads"] == 2
    # arms plan their own evaluations: around every prune (before and after)
    from cptscale.iplt import eval_steps_for

    ev = eval_steps_for(incr, cfg.evaluation.points)
    assert {0, 1, *(e["step"] for e in incr.events), *(e["step"] + 1 for e in incr.events)} <= set(ev)


def test_iplt_flop_budget_is_equal_within_half_a_step() -> None:
    """Every arm's FLOPs, counted step by step here (not with cptscale.iplt's helpers), meet the budget
    B = budget_factor x F_dense to within half a step of its final shape; the classic arm counts its
    parent's full training."""
    from cptscale.iplt import plan_arms

    cfg = _cfg(_raw("iplt.yaml"))
    vocab, seq = cfg.vocab_size, cfg.train.seq_length
    runs = {r.run_id: r for r in plan_study(cfg)}
    dense = runs["d64l3-scratch-en"]
    tps = dense.global_batch_size * seq
    big = cfg.shape("d64l3").as_dict()
    f_dense = _spent(big, [], dense.steps, vocab, seq, tps)
    budget = cfg.iplt.budget_factor * f_dense
    arms = plan_arms(cfg)
    assert len(arms) == 9
    for a in arms:
        assert a.budget_flops == pytest.approx(budget, rel=1e-12)
        inherited = f_dense if a.arm == "classic" else 0.0
        assert a.inherited_flops == pytest.approx(inherited, rel=1e-12)
        own = _spent(a.shape, a.events, a.run.steps, vocab, seq, tps)
        assert own == pytest.approx(a.planned_flops, rel=1e-9)
        final = _fpt({**a.shape, **a.final_shape}, vocab, seq) * tps
        assert abs(own + inherited - budget) <= 0.5 * final + 1e-6 * budget, (a.arm, own + inherited, budget)
    # pruned arms train more tokens than the dense one for the same FLOPs; the small one the most
    tok = {a.arm: a.run.tokens for a in arms if a.panel == "pretrain-en"}
    assert tok["dense"] < tok["f20"] < tok["f5"] < tok["f1"] < tok["small"]
    # the spec the store counts FLOPs from (transfer.flops_at_step) agrees with the step-by-step count
    from cptscale.transfer import flops_at_step

    for a in arms:
        spec = {"shape": a.shape, "prune": {"events": a.events}, "vocab_size": vocab, "seq_length": seq,
                "global_batch_size": a.run.global_batch_size}
        assert flops_at_step(spec, a.run.steps)["flops_exact"] == pytest.approx(a.planned_flops, rel=1e-9)


@pytest.mark.parametrize(("mutate", "needle"), [
    (lambda r: r["iplt"].update(target="d32l2"), r"iplt\.target: .*hidden"),
    (lambda r: r["iplt"].update(target={"heads": 8}), r"iplt\.target: .*cannot grow"),
    (lambda r: r["iplt"].update(target={"width": 8}), r"iplt\.target.*unknown per-unit"),
    (lambda r: r["iplt"].update(target={"heads": 4, "ffn": 192, "layers": 3}), r"iplt\.target: .*nothing to prune"),
    (lambda r: r["iplt"].update(size="nope"), r"iplt\.size 'nope' is not a ladder size"),
    (lambda r: r["iplt"].update(langs=["fr"]), r"iplt\.langs: 'fr' is not a language"),
    (lambda r: r["iplt"]["cpt"].update(targets=["en"]), r"iplt\.cpt\.targets: 'en' is not a target"),
    (lambda r: r["iplt"].update(start_fractions=[0.2, 0.2]), r"iplt\.start_fractions.*repeat"),
    (lambda r: r["iplt"].update(start_fractions=[0.0]), r"iplt\.start_fractions\.0"),
    (lambda r: r["iplt"].update(budget_factor=1.0), r"arm classic .* raise iplt\.budget_factor"),
    (lambda r: r["iplt"].update(increments=40, span=0.01), r"arm f1 .* raise iplt\.span or lower iplt\.increments"),
    (lambda r: r.update(ladder={"sizes": ["d32l2", "d64l3"]}, parallel={"per_size": {"d64l3": {"tp": 2}}}),
     r"iplt\.size 'd64l3': structured pruning needs tp = pp = 1"),
    (lambda r: r.update(variants={"ipltx": {"cpt": {"warmup": False}}}), r"variants\.ipltx: .*reserved"),
])
def test_iplt_validation_errors_name_the_field(mutate, needle) -> None:
    raw = _raw("iplt.yaml")
    mutate(raw)
    with pytest.raises(ConfigError, match=needle):
        _cfg(raw)


def test_iplt_cli_validate_and_plan(capsys) -> None:
    from cptscale.cli import main

    assert main(["validate", str(ROOT / "workflow/studies/iplt.yaml")]) == 0
    assert "13 training runs" in capsys.readouterr().out  # 4 ordinary (d32l2: 3, d64l3-scratch-en) + 9 arms
    assert main(["plan", str(ROOT / "workflow/studies/iplt.yaml")]) == 0
    out = capsys.readouterr().out
    assert "IPLT arms: d64l3 -> d64l3p" in out and "d64l3-cpt-en-r0-ipltclassic" in out


# --------------------------------------------------------------------------------------- Reuse recipe
def test_reuse_ablation_variants_switch_points_and_schedules() -> None:
    """The shipped ablation: the recipe (source final LR, no warmup, cosine to start/100, switch at
    max/5) and one run per variant, each switching when its own LR reaches the stated fraction."""
    from cptscale.mix import MixConfig, _phase_ends
    from cptscale.schedule import lr_at

    cfg = _cfg(_raw("reuse-ablation.yaml"))
    runs = {r.variant: r for r in plan_study(cfg) if r.init == "cpt"}
    assert set(runs) == {None, "warmup", "minlr10", "minlr0", "peak", "wsd", "switch2", "switch10", "switch50",
                         "oneblend"}
    t = cfg.train
    base = schedule_for(cfg, runs[None])
    assert base.warmup_steps == 0 and base.max_lr == pytest.approx(t.lr * t.min_lr_ratio)
    assert base.min_lr == pytest.approx(base.max_lr / 100)
    assert schedule_for(cfg, runs["warmup"]).warmup_steps > 0
    assert schedule_for(cfg, runs["minlr10"]).min_lr == pytest.approx(base.max_lr / 10)
    assert schedule_for(cfg, runs["minlr0"]).min_lr == 0.0
    assert schedule_for(cfg, runs["peak"]).max_lr == pytest.approx(t.lr)
    assert schedule_for(cfg, runs["wsd"]).kind == "wsd"
    for variant, frac in ((None, 0.2), ("switch2", 0.5), ("switch10", 0.1), ("switch50", 0.02), ("minlr10", 0.2)):
        r = runs[variant]
        s = schedule_for(cfg, r)
        end = _phase_ends(MixConfig.model_validate(cfg.mix_for(variant)), s, r.steps)[0]
        assert lr_at(s, end) <= frac * s.max_lr < lr_at(s, end - 1), (variant, end)
    # cosine to start/100: the max/5 switch falls at 71 % of the run (recipes.md section 1.9)
    assert _phase_ends(MixConfig.model_validate(cfg.mix), base, runs[None].steps)[0] / runs[None].steps == \
        pytest.approx(0.711, abs=0.01)
    assert MixConfig.model_validate(cfg.mix_for("oneblend")).phases == []


# ------------------------------------------------------------------- store: the trainer's FLOPs
def test_store_takes_pruned_runs_flops_from_the_trainer(tmp_path: Path) -> None:
    """A real pruned run (two prune events), ingested: evals and runs carry the trainer's FLOPs, which
    the spec's piecewise count (used when a file has none) reproduces; head_dim shapes are honoured."""
    import duckdb
    from train_helpers import make_data, make_spec, read_jsonl

    from cptscale.prune import PrunedShape, flops_per_token
    from cptscale.store.ingest import ingest
    from cptscale.train.launch import run_spec
    from cptscale.transfer import flops_at_step, run_compute, shape_from_spec
    from cptscale.util import write_json

    data = make_data(tmp_path / "data")
    events = [{"step": 3, "shape": {"hidden": 32, "layers": 2, "heads": 1, "ffn": 48, "kv_heads": None}},
              {"step": 7, "shape": {"hidden": 32, "layers": 1, "heads": 1, "ffn": 48, "kv_heads": None}}]
    study = tmp_path / "study"
    spec = make_spec(study, data, run_id="d32l2-scratch-en-ipltf5", steps=12, every=0, eval_steps=[0, 3, 4, 7, 12])
    spec["prune"] = {"importance": "weight", "calib_batches": 1, "events": events}
    spec["iplt"] = {"arm": "f5", "panel": "pretrain-en", "flops_inherited": 0.0, "budget_flops": 1.0}
    spec["out_dir"] = str(study / "runs" / spec["run_id"])
    assert run_spec(spec) == 0
    write_json(study / "runs" / spec["run_id"] / "run.json", spec)
    db = tmp_path / "db.duckdb"
    rep = ingest(study, db)
    assert rep.ok, rep.errors
    out = Path(spec["out_dir"])
    done = json.loads((out / "done.json").read_text())
    evs = {(e["step"], e["lang"]): e for e in read_jsonl(out / "evals.jsonl")}
    con = duckdb.connect(str(db), read_only=True)
    rows = con.execute("select step, lang, flops, flops_6nd from evals").fetchall()
    run = con.execute("select arm, arm_panel, flops_exact, flops_6nd, flops_spent, final_params, prune, "
                      "final_shape from runs").fetchone()
    con.close()
    assert len(rows) == len(evs)
    for step, lang, fl, f6 in rows:
        assert (fl, f6) == (evs[(step, lang)]["flops"], evs[(step, lang)]["flops_6nd"])
        assert fl == pytest.approx(flops_at_step(spec, step)["flops_exact"], rel=1e-12)
        assert f6 == pytest.approx(flops_at_step(spec, step)["flops_6nd"], rel=1e-12)
    arm, panel, fx, f6, spent, final_params, prune, final_shape = run
    assert (arm, panel) == ("f5", "pretrain-en")
    assert fx == spent == done["flops_spent"] and f6 == done["flops_spent_6nd"]
    assert run_compute(spec)["flops_exact"] == pytest.approx(spent, rel=1e-12)
    unpruned = run_compute({k: v for k, v in spec.items() if k != "prune"})["flops_exact"]
    assert spent < 0.8 * unpruned  # the starting shape's count (the old behaviour) is far off
    assert [p["step"] for p in json.loads(prune)] == [3, 7]
    assert final_params == done["final_params"] and json.loads(final_shape)["layers"] == 1
    # a pruned shape as a run's own shape: head_dim is kept (hidden / heads no longer holds)
    sh = shape_from_spec({"shape": {"hidden": 32, "layers": 1, "heads": 1, "ffn": 48, "head_dim": 16}})
    assert isinstance(sh, PrunedShape) and sh.head_dim == 16
    assert flops_per_token(sh, 256, 32) < flops_per_token(PrunedShape(32, 1, 1, 48), 256, 32)


# ------------------------------------------------------------------ whole studies (real Snakemake)
def _run_study(tmp_path: Path, raw: dict, timeout: int = 1500) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = subprocess.run([str(SNAKEMAKE), "--profile", "workflow/profiles/local", "--configfile", str(path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    return Path(raw["results_dir"]) / raw["study"]


def _renders(report_dir: Path, names: tuple[str, ...]) -> None:
    """The study's page renders offline in headless Chromium (when installed) with marks in ``names``."""
    from test_report import CHROMIUM, render

    if not Path(CHROMIUM).exists():
        return
    st = render(report_dir / "index.html", timeout=120)["status"]
    assert st is not None and st["errors"] == [], st
    for name in names:
        assert st["rendered"].get(name, 0) > 0, (name, st["rendered"])


def _toy(raw: dict, tmp_path: Path, tokens_per_param: float) -> dict:
    raw = copy.deepcopy(raw)
    raw["results_dir"] = str(tmp_path / "results")
    raw["data"] = {"validation_tokens": 4000, "min_doc_chars": 16, "max_chars": 600000, "workers": 1}
    raw["tokenizer"]["sample_chars_per_language"] = 200000
    raw["budget"]["tokens_per_param"] = tokens_per_param
    raw["evaluation"]["points"] = 5
    raw["fit"]["bootstrap"] = 4
    return raw


@pytest.mark.slow
def test_iplt_study_end_to_end(tmp_path: Path) -> None:
    """workflow/studies/iplt.yaml at a quarter of its token budget: every arm trains through the ordinary
    rules, spends the budget (its own FLOPs from the trainer, plus the classic arm's full training) to
    within half a step, the store holds the trainer's FLOPs, and the report draws the IPLT figure. The
    ladder gets three tiny sizes and fit.next_run_budget, so the fit's suggested run trains too and
    the report's next-run figure is drawn from it."""
    import duckdb

    from cptscale.iplt import plan_arms
    from cptscale.prune import PrunedShape, flops_per_token
    from cptscale.validation import load_config

    raw = _toy(_raw("iplt.yaml"), tmp_path, tokens_per_param=1)
    raw["ladder"] = {"sizes": ["d32l2", "d48l2", "d64l2"]}
    raw["fit"]["next_run_budget"] = 2.0e10
    study = _run_study(tmp_path, raw)
    cfg = load_config(tmp_path / "study.yaml")
    arms = plan_arms(cfg)
    con = duckdb.connect(str(study / "cptscale.duckdb"), read_only=True)
    runs = {r[0]: r[1:] for r in con.execute(
        "select run_id, arm, flops_spent, flops_exact, flops_inherited, final_params, status from runs").fetchall()}
    last_ev = dict(con.execute("select run_id, max(flops) from evals group by run_id").fetchall())
    con.close()
    tps = arms[0].run.global_batch_size * cfg.train.seq_length
    for a in arms:
        rid = a.run.run_id
        done = json.loads((study / "runs" / rid / "done.json").read_text())
        arm, spent, exact, inherited, _final_params, status = runs[rid]
        assert (arm, status) == (a.arm, "done")
        assert spent == exact == done["flops_spent"] == last_ev[rid]  # the store holds the trainer's FLOPs
        assert spent == pytest.approx(a.planned_flops, rel=1e-9)
        if a.inherited_from:
            parent = json.loads((study / "runs" / a.inherited_from / "done.json").read_text())
            assert inherited == parent["flops_spent"]
        half_step = 0.5 * flops_per_token(PrunedShape.from_dict(a.final_shape), cfg.vocab_size,
                                          cfg.train.seq_length) * tps
        assert abs(spent + inherited - a.budget_flops) <= half_step * (1 + 1e-9), a.arm
        assert PrunedShape.from_dict(done["final_shape"]) == PrunedShape.from_dict(a.final_shape)
        n_prunes = len((study / "runs" / rid / "prune.jsonl").read_text().splitlines()) \
            if (study / "runs" / rid / "prune.jsonl").exists() else 0
        assert n_prunes == len(a.events)
    # no arm leaks into the scaling-law fits or the transfer metrics
    points = (study / "fits" / "points.csv").read_text()
    assert "iplt" not in points
    assert not any((study / "runs" / a.run.run_id / "transfer.json").exists() for a in arms)
    info = json.loads((study / "report" / "report.json").read_text())
    assert "iplt" in info["drawn"], info["missing"]
    assert (study / "report" / info["drawn"]["iplt"]["svg"]).stat().st_size > 10_000
    assert "next_run" in info["drawn"], info["missing"]
    assert (study / "fits" / "next-zh.json").exists()
    svg = (study / "report" / "figures" / "iplt.svg").read_text()
    for a in arms:
        assert f"{a.panel}: {a.arm}" in svg  # the per-arm table
    _renders(study / "report", ("iplt", "next_run"))


@pytest.mark.slow
def test_reuse_ablation_study_end_to_end(tmp_path: Path) -> None:
    """workflow/studies/reuse-ablation.yaml at an eighth of its token budget: the recipe and its nine
    variants train from the same source checkpoint, each switching blends where its LR says, and the
    report draws the variants figure from them."""
    import duckdb

    raw = _toy(_raw("reuse-ablation.yaml"), tmp_path, tokens_per_param=1)
    study = _run_study(tmp_path, raw)
    con = duckdb.connect(str(study / "cptscale.duckdb"), read_only=True)
    variants = dict(con.execute("select coalesce(variant, '-'), count(distinct run_id) from runs "
                                "where init = 'cpt' group by 1").fetchall())
    phases = con.execute("select run_id, max(phase_index) from blend_realizations group by 1").fetchall()
    con.close()
    assert set(variants) == {"-", "warmup", "minlr10", "minlr0", "peak", "wsd", "switch2", "switch10", "switch50",
                             "oneblend"}
    assert all(n == 1 for n in variants.values())
    two = {rid for rid, n in phases if n == 1}
    assert "d64l2-cpt-zh-r0.5" in two and "d64l2-cpt-zh-r0.5-oneblend" not in two
    spec = json.loads((study / "runs" / "d64l2-cpt-zh-r0.5-switch2" / "run.json").read_text())
    switch = spec["data"]["phases"][0]["end_step"]
    lrs = {m["step"]: m["lr"] for m in map(json.loads, (study / "runs" / "d64l2-cpt-zh-r0.5-switch2" /
                                                         "metrics.jsonl").read_text().splitlines())}
    assert lrs[switch] <= 0.5 * spec["schedule"]["max_lr"] < lrs[switch - 1]
    info = json.loads((study / "report" / "report.json").read_text())
    assert "variants" in info["drawn"], info["missing"]
    svg = (study / "report" / "figures" / "variants.svg").read_text()
    assert all(v in svg for v in ("switch50", "minlr0", "warmup", "(study recipe)"))
    _renders(study / "report", ("variants",))


def test_store_schema_v1_database_gains_the_new_columns(tmp_path: Path) -> None:
    """A database written before the IPLT columns existed (schema 1) is migrated by the next ingest:
    the columns are added and every run is read again, so they are filled for old runs too."""
    import duckdb

    from cptscale.store.ingest import ingest
    from cptscale.store.schema import ADDED_COLUMNS, SCHEMA_VERSION
    from cptscale.store.synthetic import generate_study

    sdir = tmp_path / "s"
    ids = generate_study(sdir, sizes=["d32l2"], replays=[0.0], steps_per_run=5, evals_per_run=3)
    db = tmp_path / "db.duckdb"
    assert ingest(sdir, db).ok
    con = duckdb.connect(str(db))
    for name in ADDED_COLUMNS["runs"]:
        con.execute(f"ALTER TABLE runs DROP COLUMN {name}")
    con.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    con.close()
    assert ingest(sdir, db).runs_unchanged == 0  # schema 1 -> current: every run is read again
    con = duckdb.connect(str(db), read_only=True)
    cols = {r[0] for r in con.execute("select column_name from information_schema.columns "
                                      "where table_name = 'runs'").fetchall()}
    version = con.execute("select value from meta where key = 'schema_version'").fetchone()[0]
    n = con.execute("select count(*) from runs where arm is null").fetchone()[0]
    con.close()
    assert set(ADDED_COLUMNS["runs"]) <= cols and version == str(SCHEMA_VERSION) and n == len(ids)
    assert ingest(sdir, db).runs_unchanged == len(ids)
