"""Recipes: every planned run of every shipped study is trained by exactly one recipe, and the recipe's
answers are what run.json and the training hash use."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import yaml

from cptscale.plan import find_run, mix_for_run, plan_study, schedule_for
from cptscale.recipes import recipe_for, study_recipes
from cptscale.validation import load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]
STUDIES = [ROOT / "config.yaml", *sorted((ROOT / "workflow" / "studies").glob("*.yaml"))]


@pytest.mark.parametrize("study", STUDIES, ids=lambda p: p.stem)
def test_every_run_has_exactly_one_recipe(study: Path, tmp_path: Path) -> None:
    from hf_helpers import with_tiny_source_model

    cfg = parse_config(with_tiny_source_model(yaml.safe_load(study.read_text()), tmp_path), base_dir=study.parent)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runs = plan_study(cfg)
        recipes = study_recipes(cfg)
        assert len({r.run_id for r in runs}) == len(runs)
        for run in runs[:60]:
            owners = [r.name for r in recipes if r.owns(run)]
            assert len(owners) == 1, (run.run_id, owners)
            recipe = recipe_for(cfg, run)
            assert schedule_for(cfg, run) == recipe.schedule(cfg, run)
            assert mix_for_run(cfg, run) == recipe.mix(cfg, run)
            assert (recipe.cpt_config(cfg, run) is not None) == (run.init == "cpt"), run.run_id
    names = [r.name for r in recipes]
    if cfg.source_model is not None:  # one model, no scratch ladder: only its own recipe
        assert names == ["existing"]
        return
    assert names[:2] == ["scratch", "cpt"] and ("iplt" in names) == (cfg.iplt is not None)
    assert names[2:2 + len(cfg.variants)] == [f"cpt-{v}" for v in cfg.variants]


@pytest.mark.parametrize("study", STUDIES, ids=lambda p: p.stem)
def test_find_run_plans_the_run_plan_study_lists(study: Path, tmp_path: Path) -> None:
    """find_run (one workflow job's lookup, which plans only that run where its recipe can) returns
    exactly the run plan_study lists under that id, for every run (variants, IPLT arms and an existing
    model's runs included); an id that is no run of the study is a KeyError naming the command that lists
    them."""
    from hf_helpers import with_tiny_source_model

    cfg = parse_config(with_tiny_source_model(yaml.safe_load(study.read_text()), tmp_path), base_dir=study.parent)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for run in plan_study(cfg):
            assert find_run(cfg, run.run_id) == run, run.run_id
        with pytest.raises(KeyError, match="cptscale plan CONFIG"):
            find_run(cfg, "d1l1-scratch-xx")


def test_plan_order_is_the_ladder_grid() -> None:
    """Per size: the source's scratch run, then per target its scratch run and its CPT runs by replay
    ratio and, within a ratio, the study's recipe before its variants (the order `cptscale plan` prints)."""
    cfg = load_config(ROOT / "workflow" / "studies" / "reuse-ablation.yaml")
    runs = [r.run_id for r in plan_study(cfg)]
    size, src, tgt = cfg.ladder.sizes[0], cfg.languages.source, cfg.languages.targets[0]
    expect = [f"{size}-scratch-{src}", f"{size}-scratch-{tgt}"]
    for r in cfg.replay.ratios:
        expect += [f"{size}-cpt-{tgt}-r{r:g}"] + [f"{size}-cpt-{tgt}-r{r:g}-{v}" for v in cfg.variants]
    assert runs[: len(expect)] == expect


def test_id_pattern_matches_exactly_the_study_runs() -> None:
    """The workflow's wildcard constraint (a trie regex of the run ids) matches every run id of a study and
    nothing else: no prefix, extension or near miss of one (a '.' in an id is no wildcard)."""
    import re

    from cptscale.plan import id_pattern

    cfg = load_config(ROOT / "workflow" / "studies" / "paper.yaml")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids = [r.run_id for r in plan_study(cfg)]
    pat = re.compile(id_pattern([*ids, "next-zh"]))
    assert all(pat.fullmatch(i) for i in [*ids, "next-zh"])
    near = [i[:-1] for i in ids] + [i + "0" for i in ids] + [i.replace(".", "x") for i in ids if "." in i]
    assert not [n for n in near if n not in ids and pat.fullmatch(n)]
    assert not pat.fullmatch("") and not re.compile(id_pattern([])).fullmatch("x")
