"""The study config: the shipped config validates, and every kind of bad input names its field."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cptscale.config import ConfigError, json_schema, load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def raw() -> dict:
    return yaml.safe_load((ROOT / "config.yaml").read_text())


def _errors(data: dict, base: Path = ROOT) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data, base_dir=base, where="test.yaml")
    return str(info.value)


def test_default_config_validates() -> None:
    cfg = load_config(ROOT / "config.yaml")
    assert cfg.languages.source == "en" and cfg.languages.targets == ["zh"]
    assert len(cfg.ladder.sizes) >= 4
    assert len(cfg.replay.ratios) >= 2


def test_unknown_key_is_named(raw: dict) -> None:
    raw["train"]["learning_rate"] = 1e-3
    msg = _errors(raw)
    assert "train.learning_rate: unknown key" in msg


def test_wrong_type_is_named(raw: dict) -> None:
    raw["train"]["seq_length"] = "long"
    msg = _errors(raw)
    assert "train.seq_length" in msg and '"long"' in msg


def test_unknown_language(raw: dict) -> None:
    raw["languages"]["targets"] = ["xx"]
    msg = _errors(raw)
    assert "languages.targets" in msg and "unknown language code 'xx'" in msg and "ISO 639-1" in msg


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5])
def test_replay_ratio_outside_unit_interval(raw: dict, ratio: float) -> None:
    raw["replay"]["ratios"] = [0.0, ratio]
    msg = _errors(raw)
    assert "replay.ratios.1" in msg and str(ratio) in msg


def test_size_not_in_ladder(raw: dict) -> None:
    raw["ladder"]["sizes"] = ["d64l2", "huge"]
    msg = _errors(raw)
    assert "size 'huge' is not in the ladder" in msg and "d64l2" in msg and "ladder.custom" in msg


def test_custom_size_is_accepted(raw: dict) -> None:
    raw["ladder"]["custom"] = {"mine": {"hidden": 40, "layers": 2, "heads": 4}}
    raw["ladder"]["sizes"] = ["mine"]
    cfg = parse_config(raw, base_dir=ROOT)
    assert cfg.shape("mine").hidden == 40


def test_token_budget_below_one_batch(raw: dict) -> None:
    raw["budget"]["tokens"] = {"d32l2": 1000}
    msg = _errors(raw)
    assert "token budget of size 'd32l2' (1000) is below one batch" in msg


def test_target_without_corpus(raw: dict) -> None:
    del raw["corpora"]["zh"]
    msg = _errors(raw)
    assert "corpora.zh: no corpus for the target language 'zh'" in msg


def test_local_corpus_that_does_not_exist(raw: dict, tmp_path: Path) -> None:
    pytest.importorskip("cptscale.data.sources")
    raw["corpora"]["zh"] = [{"name": "mine", "kind": "local", "paths": ["nowhere/*.txt"], "format": "txt"}]
    msg = _errors(raw, base=tmp_path)
    assert "corpora.zh" in msg and "nowhere/*.txt" in msg


def test_source_equal_target(raw: dict) -> None:
    raw["languages"]["targets"] = ["en"]
    assert "cannot also be a target" in _errors(raw)


def test_cli_validate_exit_codes(raw: dict, tmp_path: Path) -> None:
    bad = copy.deepcopy(raw)
    bad["replay"]["ratios"] = [1.2]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    out = subprocess.run([sys.executable, "-m", "cptscale.cli", "validate", str(path)], capture_output=True, text=True)
    assert out.returncode == 2
    assert "replay.ratios.0" in out.stderr and "1.2" in out.stderr
    ok = subprocess.run([sys.executable, "-m", "cptscale.cli", "validate", str(ROOT / "config.yaml")],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr


def test_json_schema_is_up_to_date() -> None:
    shipped = json.loads((ROOT / "workflow/schemas/config.schema.json").read_text())
    assert shipped == json_schema(), "regenerate with `cptscale schema`"
