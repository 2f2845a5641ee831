"""RunSpec: every run.json the planner, the synthetic-study generator and the test helpers write validates,
reads back unchanged, and a bad or foreign-version spec is refused naming the field and the fix."""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from cptscale import plan as P
from cptscale import runs as R
from cptscale.runspec import SPEC_VERSION, RunSpec, SpecError
from cptscale.util import write_json
from cptscale.validation import parse_config

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import make_spec

ROOT = Path(__file__).resolve().parents[1]
STUDIES = [ROOT / "config.yaml", *sorted((ROOT / "workflow" / "studies").glob("*.yaml"))]
#: run.json's top-level keys as the planner has always written them (plus spec_version); arms add prune/iplt
PLANNED_KEYS = {"spec_version", "run_id", "study", "size", "init", "lang", "source_lang", "replay", "variant",
                "shape", "vocab_size", "params", "params_nonemb", "tokens", "seq_length", "micro_batch_size",
                "global_batch_size", "steps", "seed", "schedule", "optimizer", "init_std", "precision", "layout",
                "data", "tokenizer", "eval", "checkpoint", "parent", "out_dir", "loss_spike_factor", "resources",
                "config_hash", "provenance", "logging"}


def _planned_study(path: Path, tmp: Path, edit: Callable[[dict], None] | None = None):
    """The study config (changed by ``edit``) with its results in ``tmp``, fake data manifests (real-looking
    hashes, ample tokens) and a done.json for every run, so run_spec can plan each run's run.json. The
    config is validated in memory with the original's directory as base (its corpus paths resolve), so
    nothing is written beside it."""
    from hf_helpers import fake_import, with_tiny_source_model

    raw = with_tiny_source_model(yaml.safe_load(path.read_text()), tmp)
    raw["results_dir"] = str(tmp / "results")
    if edit is not None:
        edit(raw)
    cfg = parse_config(raw, base_dir=path.resolve().parent, where=str(path))
    hashes = {"bin_hash": "b1" * 8, "idx_hash": "c2" * 8}
    for lang in cfg.languages.all:
        write_json(R.data_dir(cfg) / lang / "data.json", {
            "lang": lang, "train": {"tokens": 10**12, **hashes}, "valid": {"tokens": 10**6, "bytes": 3 * 10**6, **hashes},
            "train_corpora": {s["name"]: {"tokens": 10**12, **hashes} for s in cfg.corpora.get(lang, [])},
            "docs_hash": "d3" * 8, "tokenizer_hash": "e4" * 8})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runs = P.plan_study(cfg)
    for r in runs:
        write_json(R.run_dir(cfg, r.run_id) / "done.json", {"final_loss": dict.fromkeys(cfg.languages.all, 4.0)})
        if r.init == "scratch":  # a parent's run.json: the data it trained on (cpt.unseen_tokens: mean reads it)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                P.run_spec(cfg, r.run_id).write(R.run_dir(cfg, r.run_id) / "run.json")
    if cfg.source_model is not None:
        fake_import(cfg.study_dir)
    return cfg, runs


def test_cpt_unseen_tokens_mean_names_the_parents_own_training_data(tmp_path: Path) -> None:
    """cpt.unseen_tokens: mean (an ablation knob; the demo keeps the default): each CPT run.json carries the
    datasets its parent trained on, read from the parent's run.json, and reads back; the default writes
    neither key (run.json as before version 2)."""
    def mean_start(raw: dict) -> None:
        raw["cpt"]["unseen_tokens"] = "mean"

    cfg, runs = _planned_study(ROOT / "config.yaml", tmp_path, edit=mean_start)
    cpt = [r for r in runs if r.init == "cpt"]
    assert cpt
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for run in cpt:
            spec = P.run_spec(cfg, run.run_id)
            parent = RunSpec.load(R.run_dir(cfg, run.parent) / "run.json")
            assert spec.parent.unseen_tokens == "mean"
            assert spec.parent.source_data == parent.train_prefixes() == [str(R.data_dir(cfg) / "en" / "train")]
            assert RunSpec.parse(spec.to_dict()) == spec
    plain, _ = _planned_study(ROOT / "config.yaml", tmp_path / "plain")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = P.run_spec(plain, cpt[0].run_id).to_dict()
    assert "unseen_tokens" not in d["parent"] and "source_data" not in d["parent"]


@pytest.mark.parametrize("study", STUDIES, ids=lambda p: p.stem)
def test_every_planned_run_json_validates_and_reads_back(study: Path, tmp_path: Path) -> None:
    cfg, runs = _planned_study(study, tmp_path)
    if len(runs) > 40:  # the paper study: every size's scratch and one CPT run (all 336 take minutes)
        runs = [r for r in runs if r.init == "scratch" or r.replay == cfg.replay.ratios[-1]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for run in runs:
            spec = P.run_spec(cfg, run.run_id)
            spec.write(tmp_path / "run.json")
            text = (tmp_path / "run.json").read_text()
            back = RunSpec.load(tmp_path / "run.json")
            assert back == spec and back.to_dict() == json.loads(text), run.run_id
            keys = set(json.loads(text))
            assert keys - {"prune", "iplt", "simulate", "arch"} == PLANNED_KEYS, (run.run_id, keys ^ PLANNED_KEYS)
            assert ("arch" in keys) == (cfg.source_model is not None)  # an imported model's architecture
            assert json.loads(text)["spec_version"] == SPEC_VERSION
            assert ("iplt" in keys) == (run.arm is not None)
            assert ("simulate" in keys) == (cfg.train.backend == "simulate")


def test_generated_study_specs_are_what_the_trainer_accepts(tmp_path: Path) -> None:
    """store.generate_study writes run.json files that pass the trainer's own check (RunSpec.parse, run
    before any work in Trainer.run), CPT runs with their parent's final loss."""
    from cptscale.store.synthetic import generate_study

    ids = generate_study(tmp_path / "s", sizes=("d64l2",), replays=(0.0, 0.5), steps_per_run=10)
    for rid in ids:
        spec = RunSpec.load(tmp_path / "s" / "runs" / rid / "run.json")
        assert spec.run_id == rid and spec.spec_version == SPEC_VERSION
        assert spec.schedule.make().total_steps == spec.steps
        if spec.init == "cpt":
            assert spec.parent is not None and spec.parent.final_loss is not None
            assert {s["name"] for s in spec.data.phases[0]["sources"]} == {"zh", "en"} or spec.replay == 0


def test_test_helper_specs_validate(tmp_path: Path) -> None:
    """The hand-written run.json of the training tests (train_helpers.make_spec) is a valid RunSpec, and
    to_dict gives back exactly what was written (nothing added: readers of the dict see the same keys)."""
    data = {lang: {"train": str(tmp_path / lang / "train"), "valid": str(tmp_path / lang / "valid"), "bytes": 100}
            for lang in ("en", "zh")}
    scratch = make_spec(tmp_path, data)
    cpt = make_spec(tmp_path, data, run_id="t-cpt-zh", lang="zh", init="cpt",
                    parent={"run_id": "t-scratch-en", "checkpoint": "ck", "lang": "en", "final_loss": 5.0})
    for d in (scratch, cpt):
        parsed = RunSpec.parse(d)
        assert parsed.to_dict() == {**d, "spec_version": SPEC_VERSION}
        assert parsed.layout.world == 1 and parsed.shape.hidden == 32


def test_versions_migrate_or_are_refused(tmp_path: Path) -> None:
    data = {"en": {"train": "t", "valid": "v", "bytes": 1}}
    old = make_spec(tmp_path, data)  # no spec_version: written before versioning (version 0, same layout)
    assert "spec_version" not in old and RunSpec.parse(old).spec_version == SPEC_VERSION
    with pytest.raises(SpecError, match=r"spec_version 99 is newer.*upgrade cptscale or regenerate"):
        RunSpec.parse({**old, "spec_version": 99}, "x/run.json")
    with pytest.raises(SpecError, match="spec_version must be a non-negative integer"):
        RunSpec.parse({**old, "spec_version": "one"})
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(SpecError, match="not valid JSON"):
        RunSpec.load(p)
    with pytest.raises(SpecError, match="does not exist"):
        RunSpec.load(tmp_path / "missing.json")


def test_every_bad_field_is_named(tmp_path: Path) -> None:
    """All field problems in one message, each with its dotted path."""
    spec = make_spec(tmp_path, {"en": {"train": "t", "valid": "v", "bytes": 1}})
    spec["layout"]["tp"] = True  # a bool is not a count
    spec["vocab_size"] = 0
    spec["surprise"] = 1
    spec["eval"]["languages"]["en"].pop("prefix")
    with pytest.raises(SpecError) as exc:
        RunSpec.parse(spec, "r/run.json")
    msg = str(exc.value)
    assert msg.startswith("r/run.json: ")
    for needle in ("'layout.tp' must be an integer", "'vocab_size' must be an integer >= 1, got 0",
                   "unknown field 'surprise'", "missing field 'eval.languages.en.prefix'"):
        assert needle in msg, msg
