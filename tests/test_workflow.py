"""The Snakemake DAG: derived from the config only, thin rules, targets run only what they need."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


def _dry_run(configfile: Path, *targets: str, timeout: int = 120) -> dict[str, int]:
    out = subprocess.run(
        [SNAKEMAKE, *targets, "-n", "--profile", "workflow/profiles/local", "--configfile", str(configfile)],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    if "Nothing to be done" in out.stdout:
        return {}
    stats = re.search(r"Job stats:\n(.*?)\n\n", out.stdout, re.S)
    assert stats, out.stdout[-2000:]
    counts = {}
    for line in stats.group(1).splitlines()[2:]:
        name, n = line.split()
        counts[name] = int(n)
    return counts


@pytest.fixture()
def demo_config(tmp_path: Path) -> Path:
    raw = yaml.safe_load((ROOT / "config.yaml").read_text())
    raw["results_dir"] = str(tmp_path / "results")
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_dry_run_lists_every_stage(demo_config: Path) -> None:
    counts = _dry_run(demo_config)
    raw = yaml.safe_load(demo_config.read_text())
    n_langs = 1 + len(raw["languages"]["targets"])
    n_sizes, n_ratios = len(raw["ladder"]["sizes"]), len(raw["replay"]["ratios"])
    n_runs = n_sizes * (1 + (n_langs - 1) * (1 + n_ratios))
    assert counts["ingest"] == n_langs and counts["index"] == n_langs and counts["tokenizer"] == 1
    assert counts["train"] == n_runs and counts["run_spec"] == n_runs
    assert counts["transfer"] == n_sizes * (n_langs - 1) * n_ratios
    for rule in ("aggregate_runs", "fit", "database", "report", "summary"):
        assert counts[rule] == 1


def test_one_language_target_runs_only_what_it_needs(demo_config: Path) -> None:
    raw = yaml.safe_load(demo_config.read_text())
    target = f"{raw['results_dir']}/{raw['study']}/data/zh/train.bin"
    counts = _dry_run(demo_config, target)
    # the shared tokenizer needs every language's documents; only zh is indexed; nothing trains
    assert counts == {"corpus_sources": 2, "ingest": 2, "tokenizer": 1, "index": 1, "total": 6}


def test_one_run_target_pulls_its_parent_only(demo_config: Path) -> None:
    raw = yaml.safe_load(demo_config.read_text())
    target = f"{raw['results_dir']}/{raw['study']}/runs/d32l2-cpt-zh-r0.25/done.json"
    counts = _dry_run(demo_config, target)
    assert counts["train"] == 2  # the CPT run and its English source model
    assert counts["index"] == 2


def test_export_target_by_run_name(demo_config: Path) -> None:
    """`results/<study>/export/<run>` exports that run (and trains only what it needs)."""
    raw = yaml.safe_load(demo_config.read_text())
    target = f"{raw['results_dir']}/{raw['study']}/export/d32l2-cpt-zh-r0.25"
    counts = _dry_run(demo_config, target)
    assert counts["export_hf"] == 1 and counts["train"] == 2


def test_paper_scale_dry_run_is_fast(tmp_path: Path) -> None:
    raw = yaml.safe_load((ROOT / "workflow/studies/paper.yaml").read_text())
    raw["results_dir"] = str(tmp_path / "results")
    path = tmp_path / "paper.yaml"
    path.write_text(yaml.safe_dump(raw))
    t0 = time.perf_counter()
    counts = _dry_run(path)
    elapsed = time.perf_counter() - t0
    assert counts["train"] == 42 * (1 + 1 + 6)  # 42 sizes x (en, zh scratch + 6 replay ratios)
    assert elapsed < 30, f"snakemake -n took {elapsed:.1f}s"


@pytest.mark.parametrize("target", [
    "runs/d99l9-scratch-en/done.json",  # a size not in ladder.sizes
    "runs/d32l2-cpt-zh-r0.5/done.json",  # a replay ratio not in replay.ratios
    "runs/d32l2-scratch-fr/done.json",  # a language the study does not have
    "data/xx/train.bin",  # the data stage of an unknown language
])
def test_wildcard_constraints_reject_unplanned_targets(demo_config: Path, target: str) -> None:
    """Run and language wildcards only match what config.yaml plans: anything else has no rule."""
    raw = yaml.safe_load(demo_config.read_text())
    path = f"{raw['results_dir']}/{raw['study']}/{target}"
    out = subprocess.run([SNAKEMAKE, path, "-n", "--profile", "workflow/profiles/local", "--configfile", str(demo_config)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0, out.stdout[-2000:]
    text = out.stdout + out.stderr
    assert "MissingRuleException" in text and f"No rule to produce {path}" in text, text[-2000:]


@pytest.mark.parametrize("allow_partial", [False, True])
def test_store_allow_partial_reaches_both_aggregate_commands(demo_config: Path, allow_partial: bool) -> None:
    """``store.allow_partial`` in the study config is what lets the workflow's aggregate jobs keep the good
    lines of a malformed metrics file: Snakemake renders it into both ingest commands."""
    raw = yaml.safe_load(demo_config.read_text())
    raw["store"] = {"allow_partial": allow_partial}
    demo_config.write_text(yaml.safe_dump(raw))
    out = subprocess.run([SNAKEMAKE, "-n", "-p", "--profile", "workflow/profiles/local", "--configfile",
                          str(demo_config)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    ingests = [line for line in out.stdout.splitlines() if "cptscale db ingest" in line]
    assert len(ingests) == 2, ingests
    assert all(("--allow-partial" in line) == allow_partial for line in ingests), ingests
