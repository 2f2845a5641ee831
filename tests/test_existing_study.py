"""CPT of an existing model as a study kind (``source_model:``): config validation (a model the study
cannot use is refused at validate time, naming the field and the fix) and the recipe (runs from the
imported checkpoint, budgets x replay ratios). Fast: the model directory is a config.json, a weights file
and a tokenizer trained here on a few lines; nothing is loaded into torch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hf_helpers import LLAMA_CONFIG, VOCAB, make_model_dir

from cptscale.config.problems import ConfigError
from cptscale.validation import parse_config

LLAMA = LLAMA_CONFIG


def _model_dir(dest: Path, config: dict | None = None, tokenizer: bool = True) -> Path:
    return make_model_dir(dest, config, tokenizer)


def _raw(tmp_path: Path, **source_model) -> dict:
    (tmp_path / "en.txt").write_text("some english text\n" * 50)
    (tmp_path / "zh.txt").write_text("一些中文文本\n" * 50)
    return {
        "study": "existing-test", "results_dir": str(tmp_path / "results"),
        "languages": {"source": "en", "targets": ["zh"]},
        "corpora": {lang: [{"name": "gen", "kind": "local", "paths": [str(tmp_path / f"{lang}.txt")], "split": "lines"}]
                    for lang in ("en", "zh")},
        "source_model": {"path": "model", "target_tokens": [4096, 8192, 16384], **source_model},
        "replay": {"ratios": [0.0, 0.25]},
        "train": {"seq_length": 64, "micro_batch_size": 8, "batch_tokens": 512, "checkpoint_every": 0},
        "slurm": {"gpus": False},
    }


def _problems(raw: dict, base: Path) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        parse_config(raw, base_dir=base, where="test.yaml")
    return {p.path: p.message for p in info.value.found}


def test_the_model_gives_the_ladder_and_the_tokenizer(tmp_path):
    _model_dir(tmp_path / "model")
    cfg = parse_config(_raw(tmp_path), base_dir=tmp_path)
    assert cfg.ladder.sizes == ["model"]
    shape = cfg.shape("model")
    assert (shape.hidden, shape.layers, shape.heads, shape.ffn, shape.kv_heads) == (64, 2, 4, 96, 2)
    assert cfg.tokenizer.kind == "file" and cfg.tokenizer.path == "model/tokenizer.json"
    assert cfg.vocab_size == 300  # the tokenizer's own (the data stage); the model's 320 rows come from its checkpoint


@pytest.mark.parametrize("case, field, words", [
    ("missing dir", "source_model.path", "is not a directory"),
    ("not llama", "source_model.path", "LLaMA-family"),
    ("no weights", "source_model.path", "no weights"),
    ("no tokenizer", "source_model.tokenizer", "source_model.tokenizer:"),
    ("foreign tokenizer", "source_model.tokenizer", "the model's own tokenizer"),
    ("neither", "source_model.path", "neither config.json"),
])
def test_a_model_the_study_cannot_use_is_refused_naming_the_field(tmp_path, case, field, words):
    model = tmp_path / "model"
    if case == "not llama":
        _model_dir(model, {**LLAMA, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    elif case == "no weights":
        _model_dir(model)
        (model / "model.safetensors").unlink()
    elif case == "no tokenizer":
        _model_dir(model, tokenizer=False)
    elif case == "foreign tokenizer":
        _model_dir(model, {**LLAMA, "vocab_size": 280})  # 300 tokens, 280 embedding rows
    elif case == "neither":
        model.mkdir()
    problems = _problems(_raw(tmp_path), tmp_path)
    assert field in problems, problems
    assert words in problems[field]
    assert "ladder" not in problems  # the derived sections are not reported as missing too


def test_sections_the_model_decides_or_the_kind_lacks_are_refused(tmp_path):
    _model_dir(tmp_path / "model")
    raw = _raw(tmp_path)
    raw["ladder"] = {"sizes": ["d64l2"]}
    raw["tokenizer"] = {"kind": "train", "vocab_size": 1024}
    raw["variants"] = {"nowarm": {"cpt": {"warmup": False}}}
    raw["fit"] = {"next_run_budget": 1e12}
    problems = _problems(raw, tmp_path)
    assert "remove this section" in problems["ladder"] and "remove this section" in problems["tokenizer"]
    assert "source_model" in problems["variants"] and "scratch ladder" in problems["fit.next_run_budget"]


def test_budgets_are_checked(tmp_path):
    _model_dir(tmp_path / "model")
    problems = _problems(_raw(tmp_path, target_tokens=[4096, 8192]), tmp_path)
    assert "source_model.target_tokens" in problems and "at least 3" in problems["source_model.target_tokens"]
    problems = _problems(_raw(tmp_path, target_tokens=[4096, 4096, 8192]), tmp_path)
    assert "repeat" in problems["source_model.target_tokens"]
    problems = _problems(_raw(tmp_path, target_tokens=[100, 8192, 16384]), tmp_path)
    assert "below one step" in problems["source_model.target_tokens"]


def test_a_study_needs_a_ladder_or_a_source_model(tmp_path):
    raw = _raw(tmp_path)
    del raw["source_model"]
    problems = _problems(raw, tmp_path)
    assert [m for m in problems.values() if m.startswith("ladder: missing") and "source_model" in m]


def test_recipe_sweeps_budgets_and_ratios_from_the_imported_model(tmp_path):
    from cptscale.plan import plan_study, training_hash
    from cptscale.recipes import recipe_for
    from cptscale.recipes.existing import ExistingModel

    _model_dir(tmp_path / "model")
    cfg = parse_config(_raw(tmp_path), base_dir=tmp_path)
    runs = plan_study(cfg)
    assert [r.run_id for r in runs] == [f"model-cpt-zh-r{r}-d{d}" for d in (4096, 8192, 16384) for r in ("0", "0.25")]
    for run in runs:
        assert isinstance(recipe_for(cfg, run), ExistingModel)
        assert run.init == "cpt" and run.parent is None and run.source_lang == "en"
        # every ratio sees its budget of target tokens (whole steps), plus replay on top
        target = int(run.run_id.rsplit("-d", 1)[1])
        assert run.tokens * (1 - run.replay) >= target and run.tokens - 512 < target / (1 - run.replay)
    assert len({training_hash(cfg, r) for r in runs}) == len(runs)

    # run.json's parent, shape, architecture and vocabulary come from the imported checkpoint and its eval
    from cptscale.source_model import CHECKPOINT, EVAL

    recipe, run = ExistingModel(), runs[1]
    with pytest.raises(FileNotFoundError, match="import the model first"):
        recipe.spec_fields(cfg, run, None)
    ck = cfg.study_dir / CHECKPOINT
    ck.mkdir(parents=True)
    shape = {"name": "hf-llama-d64l2", "hidden": 64, "layers": 2, "heads": 4, "ffn": 96, "kv_heads": 2}
    (ck / "state.json").write_text(json.dumps({"shape": shape, "vocab_size": VOCAB, "arch": {"family": "llama"}}))
    (cfg.study_dir / EVAL).write_text(json.dumps({"reference": {"lang": "en", "loss": 5.25, "by": "transformers"}}))
    assert recipe.spec_fields(cfg, run, None) == {"arch": {"family": "llama"}, "vocab_size": VOCAB, "shape": shape}
    par = recipe.parent(cfg, run)
    assert (par.checkpoint, par.lang, par.final_loss, par.tolerance) == (str(ck), "en", 5.25, cfg.cpt.init_tolerance)
    assert recipe.shape(cfg, run) == shape


def test_scratch_studies_are_unchanged(tmp_path):
    """Without source_model the recipes and report sections are the scratch study's."""
    from cptscale.report.page import sections_for
    from cptscale.validation import load_config

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "tests/configs/micro.yaml")
    assert "existing" not in sections_for(cfg)
    _model_dir(tmp_path / "model")
    cfg = parse_config(_raw(tmp_path), base_dir=tmp_path)
    assert "existing" in sections_for(cfg)
    assert "isoloss" not in sections_for(cfg)


def test_summary_gives_the_answer_and_the_fertility(tmp_path):
    """The printed summary of an existing-model study leads with the answer, not the ladder's skipped laws."""
    from cptscale.summary import format_summary, summarize
    from cptscale.util import write_json

    fits = tmp_path / "fits"
    write_json(fits / "existing.json", {
        "format": "cptscale-existing/1", "source_loss_before": 3.2,
        "recommendation": {"zh": {"answer": "replay 0.25 keeps en forgetting within 0.05 nats; ..."}},
        "fertility": {"en": {"tokens_per_word": 1.31, "tokens_per_char": 0.25},
                      "zh": {"tokens_per_word": None, "tokens_per_char": 0.71}}})
    write_json(fits / "scratch-chinchilla-zh.json", {"law": "chinchilla", "kind": "scratch", "params": {},
                                                     "status": "skipped", "reason": "1 size"})
    text = format_summary(summarize(tmp_path, "s"))
    assert "how many zh tokens and how much replay for this model: replay 0.25" in text
    assert "en: 1.310 per word, 0.250 per character" in text and "zh: 0.710 per character" in text
    assert "chinchilla" not in text and "compute saving" not in text


def test_a_cptscale_checkpoint_source_is_verified_and_copied(tmp_path):
    """source_model may be a cptscale checkpoint (state.json + manifest): its shape comes from state.json, its
    tokenizer from source_model.tokenizer; the import checks every file against the manifest before copying."""
    from hf_helpers import make_tokenizer

    from cptscale.existing_study import import_model
    from cptscale.integrity import write_dir_manifest
    from cptscale.train.checkpoint import CheckpointError

    ck = tmp_path / "ckpt"
    (ck / "model").mkdir(parents=True)
    (ck / "model" / "weights.distcp").write_bytes(b"weights" * 100)
    shape = {"name": "d64l2", "hidden": 64, "layers": 2, "heads": 4, "ffn": 192}
    (ck / "state.json").write_text(json.dumps({"step": 100, "shape": shape, "vocab_size": 384}))
    write_dir_manifest(ck)
    (tmp_path / "tok").mkdir()
    make_tokenizer(tmp_path / "tok")
    raw = _raw(tmp_path)
    raw["source_model"]["path"] = "ckpt"
    assert "source_model.tokenizer" in _problems(raw, tmp_path)  # a trained run's tokenizer is the study's: name it
    raw["source_model"]["tokenizer"] = "tok/tokenizer.json"
    cfg = parse_config(raw, base_dir=tmp_path)
    assert cfg.shape("model").ffn == 192 and cfg.tokenizer.path == "tok/tokenizer.json"
    state = import_model(cfg, tmp_path, tmp_path / "imported")
    assert state["shape"] == shape and (tmp_path / "imported" / "model" / "weights.distcp").read_bytes() == b"weights" * 100
    (ck / "model" / "weights.distcp").write_bytes(b"damaged" * 100)
    with pytest.raises(CheckpointError, match="damaged"):
        import_model(cfg, tmp_path, tmp_path / "imported-again")
    assert not (tmp_path / "imported-again").exists()


def test_fit_step_reads_the_store_and_writes_records_the_store_keeps(tmp_path):
    """`existing-model fit` on a real DuckDB store (synthetic run files of the real formats, ingested): one
    data-law record per replay ratio (largest budget held out), the answer as a fit record, and the file
    ingests back into the fits table; the points are each run's last evaluation."""
    import duckdb

    from cptscale.cli import main
    from cptscale.existing_study import final_points
    from cptscale.store.ingest import ingest
    from cptscale.store.synthetic import generate_study
    from cptscale.util import read_json, write_json

    _model_dir(tmp_path / "model")
    raw = _raw(tmp_path)
    sdir = tmp_path / "results" / "existing-test"
    # four CPT budgets per ratio: four sizes' runs stand in for one model's budgets (the fit only sees D and L)
    generate_study(sdir, sizes=("d32l2", "d48l2", "d64l2", "d96l2"), inits=("cpt",), replays=(0.0, 0.5),
                   steps_per_run=20, evals_per_run=4, study="existing-test")
    db = tmp_path / "store.duckdb"
    assert ingest(sdir, db).ok
    pts = final_points(db, "existing-test", "en", "zh")
    con = duckdb.connect(str(db), read_only=True)
    n_cpt = con.execute("select count(*) from runs where init = 'cpt' and lang = 'zh'").fetchone()[0]
    con.close()
    assert len(pts) == n_cpt == 8 and {p.replay for p in pts} == {0.0, 0.5}
    write_json(sdir / "model" / "eval.json", {"languages": {"en": {"loss": 3.0}, "zh": {"loss": 6.0}},
                                              "reference": {"lang": "en", "loss": 3.0, "by": "transformers"}})
    cfg_path = tmp_path / "existing.yaml"
    cfg_path.write_text(json.dumps(raw))
    out = sdir / "fits" / "existing.json"
    assert main(["existing-model", "fit", str(cfg_path), "--db", str(db), "--model-eval", str(sdir / "model" / "eval.json"),
                 "--out", str(out)]) == 0
    fit = read_json(out)
    laws = [f for f in fit["fits"] if f["law"] == "data_law"]
    assert [f["replay"] for f in laws] == [0.0, 0.5] and all(f["status"] == "ok" and f["heldout"] for f in laws)
    rec = fit["recommendation"]["zh"]
    assert rec["status"] == "ok" and rec["replay"] in (0.0, 0.5) and "zh tokens" in rec["answer"]
    assert ingest(sdir, db).ok
    con = duckdb.connect(str(db), read_only=True)
    kinds = con.execute("select law, count(*) from fits where kind = 'existing' group by law order by law").fetchall()
    con.close()
    assert kinds == [("data_law", 2), ("existing_recommendation", 1)]
    assert main(["existing-model", "fit", str(cfg_path), "--db", str(tmp_path / "none.duckdb"), "--model-eval",
                 str(sdir / "model" / "eval.json"), "--out", str(out)]) == 2  # no store: an error naming it


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_runs_count_the_models_own_parameters(tmp_path, family):
    """N of every run is the model's exact parameter count (what transformers counts: its embedding rows,
    tied embeddings and QKV biases (qwen2), head_dim != hidden / heads (mistral)), and FLOPs follow it."""
    pytest.importorskip("transformers")
    from hf_helpers import make_hf_model
    from transformers import AutoModelForCausalLM

    from cptscale.compute import flops_6nd
    from cptscale.plan import plan_study

    model = make_hf_model(tmp_path / "model", family)
    n = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(str(model)).parameters())
    cfg = parse_config(_raw(tmp_path), base_dir=tmp_path)
    for run in plan_study(cfg):
        assert run.params == n and run.flops_6nd == flops_6nd(n, run.tokens)
