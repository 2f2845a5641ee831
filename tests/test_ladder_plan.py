"""Model ladder bookkeeping and the derived study plan."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import yaml

from cptscale.config.problems import ConfigError
from cptscale.ladder import PAPER_SHAPES, TINY_SHAPES, get_shape, padded_vocab, shape_for_params
from cptscale.plan import plan_next_run, plan_study, schedule_for, suggested_run
from cptscale.runs import RUN_ID, eval_steps
from cptscale.validation import load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]


def test_paper_table4_has_42_shapes_matching_reported_sizes() -> None:
    assert len(PAPER_SHAPES) == 42
    for name, shape in PAPER_SHAPES.items():
        reported = int(name.removesuffix("M")) * 1e6
        assert abs(shape.paper_params() - reported) / reported < 0.02, name  # max error 1.9 % (49M row)


def test_paper_intermediate_rule() -> None:
    assert PAPER_SHAPES["1393M"].ffn * 2 == 9728
    assert PAPER_SHAPES["5534M"].ffn * 2 == 16896


def test_param_count_hand_check() -> None:
    s = TINY_SHAPES["d32l2"]  # hidden 32, 2 heads, ffn 96
    per_layer = 32 * 3 * 32 + 32 * 32 + 3 * 32 * 96 + 2 * 32
    assert s.layer_params() == per_layer
    assert s.params(1000, embeddings=False) == 2 * per_layer + 32
    assert s.params(1000) == 2 * per_layer + 32 + 2 * 1024 * 32
    assert padded_vocab(1000, tp=2) == 1024


def test_unknown_size_lists_known() -> None:
    with pytest.raises(KeyError, match="d64l2"):
        get_shape("nope")


def test_demo_plan_runs_and_derivations() -> None:
    cfg = load_config(ROOT / "config.yaml")
    runs = plan_study(cfg)
    n_sizes, n_targets, n_ratios = len(cfg.ladder.sizes), len(cfg.languages.targets), len(cfg.replay.ratios)
    assert len(runs) == n_sizes * (1 + n_targets * (1 + n_ratios))
    for r in runs:
        assert r.tokens >= cfg.tokens(r.size)
        assert r.steps * r.global_batch_size * r.seq_length == r.tokens
        assert r.global_batch_size == r.micro_batch_size * r.grad_accum * r.dp
        if r.init == "cpt":
            assert r.parent == f"{r.size}-scratch-{cfg.languages.source}"
        assert RUN_ID.match(r.run_id)["size"] == r.size


def test_paper_scale_plan_uses_tiers_and_20_tokens_per_param() -> None:
    raw = yaml.safe_load((ROOT / "config.yaml").read_text())
    raw["ladder"]["sizes"] = ["49M", "1393M", "5534M"]
    raw["budget"] = {"tokens_per_param": 20, "param_count": "paper"}
    raw["train"].update(seq_length=2048, batch_tokens=None, micro_batch_size=4)
    raw["tokenizer"]["vocab_size"] = 32000
    cfg = parse_config(raw, base_dir=ROOT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runs = {r.run_id: r for r in plan_study(cfg)}
    r = runs["1393M-scratch-en"]
    assert r.global_batch_size == 1024  # 2M-token tier / 2048
    assert abs(r.tokens - 27.86e9) / 27.86e9 < 0.001
    assert 13_000 < r.steps < 14_000  # paper: ~13.9k steps
    assert runs["5534M-scratch-en"].global_batch_size == 2048


def test_cpt_schedule_options() -> None:
    raw = yaml.safe_load((ROOT / "config.yaml").read_text())
    raw["cpt"] = {"warmup": False, "start_lr": "source_final", "min_lr": "start/100"}
    cfg = parse_config(raw, base_dir=ROOT)
    run = next(r for r in plan_study(cfg) if r.init == "cpt")
    s = schedule_for(cfg, run)
    assert s.warmup_steps == 0
    assert s.max_lr == pytest.approx(cfg.train.lr * cfg.train.min_lr_ratio)
    assert s.min_lr == pytest.approx(s.max_lr / 100)


def test_eval_steps_log_spaced() -> None:
    steps = eval_steps(1000, 8)
    assert steps[0] == 0 and steps[-1] == 1000 and steps == sorted(set(steps))
    assert 8 <= len(steps) <= 10


def test_variants_add_cpt_runs_with_their_own_recipe() -> None:
    raw = yaml.safe_load((ROOT / "config.yaml").read_text())
    raw["variants"] = {"nowarm": {"cpt": {"warmup": False, "min_lr": "zero"}}}
    cfg = parse_config(raw, base_dir=ROOT)
    runs = {r.run_id: r for r in plan_study(cfg)}
    base, variant = runs["d32l2-cpt-zh-r0.25"], runs["d32l2-cpt-zh-r0.25-nowarm"]
    assert variant.variant == "nowarm" and base.variant is None
    assert RUN_ID.match(variant.run_id).groupdict() == {"size": "d32l2", "init": "cpt", "lang": "zh",
                                                        "replay": "0.25", "variant": "nowarm"}
    assert schedule_for(cfg, base).warmup_steps > 0
    s = schedule_for(cfg, variant)
    assert s.warmup_steps == 0 and s.min_lr == 0.0


def test_bad_variant_override_is_named() -> None:
    raw = yaml.safe_load((ROOT / "config.yaml").read_text())
    raw["variants"] = {"bad": {"cpt": {"min_lr": "start/3"}}}
    from cptscale.config.problems import ConfigError

    with pytest.raises(ConfigError, match=r"variants\.bad\.cpt"):
        parse_config(raw, base_dir=ROOT)


def _paper_cfg(**slurm):
    raw = yaml.safe_load((ROOT / "workflow/studies/paper.yaml").read_text())
    raw["slurm"] = {**(raw.get("slurm") or {}), **slurm}
    return parse_config(raw, base_dir=ROOT)


def test_job_resources_single_node_one_launcher() -> None:
    """GPUs = TP x PP x DP on one node; cores follow the GPUs; the time limit follows FLOPs / throughput."""
    cfg = _paper_cfg(gpus=True, cpus_per_gpu=6, gpu_peak_flops=1e15, assumed_mfu=0.5, runtime_overhead_minutes=7,
                     min_runtime_minutes=1)
    for r in plan_study(cfg):
        world = r.tp * r.pp * r.dp
        assert r.gpus == world and r.cpus == 6 * world
        expect = r.flops_6nd / (world * 1e15 * 0.5) / 60 * 1.5 + 7
        assert r.runtime_minutes == max(1, -(-expect // 1))
    cpu = _paper_cfg(gpus=False, threads_per_rank=3, cpu_flops_per_core=1e10)
    r = plan_study(cpu)[0]
    assert r.gpus == 0 and r.cpus == 3 * r.tp * r.pp * r.dp


def test_layout_beyond_one_node_spans_nodes() -> None:
    """TP x PP x DP = 16 GPUs on 8-GPU nodes: 2 nodes of 8 ranks, cores and memory per node; `cptscale
    plan` shows the nodes. A layout that cannot split evenly, or whose TP group would span nodes, is a
    config error naming the fix."""
    from cptscale.commands.plan import PLAN_COLUMNS, format_plan

    raw = yaml.safe_load((ROOT / "workflow/studies/paper.yaml").read_text())
    raw["ladder"] = {"sizes": ["49M", "301M", "1542M"]}  # heads divisible by tp=4, layers by pp=2
    raw["parallel"] = {"default": {"tp": 4, "pp": 2, "dp": 2}, "per_size": {"49M": {"tp": 1, "pp": 1, "dp": 8}}}
    raw["slurm"] = {"gpus": True, "gpus_per_node": 8, "cpus_per_gpu": 6, "mem_gb_per_gpu": 60}
    cfg = parse_config(raw, base_dir=ROOT)
    runs = plan_study(cfg)
    big = [r for r in runs if r.size != "49M"]
    assert big and all((r.nodes, r.gpus, r.cpus, r.mem_gb) == (2, 16, 48, 480) for r in big)
    assert all((r.nodes, r.gpus, r.cpus) == (1, 8, 48) for r in runs if r.size == "49M")
    table = format_plan(cfg, runs).splitlines()
    col = PLAN_COLUMNS.index("nodes")
    assert table[0].split()[col + 2] == "nodes"  # "mbs x acc" is three words in the header, one in a row
    row = next(ln for ln in table if ln.startswith(big[0].run_id))
    assert row.split()[col:col + 2] == ["2", "16"]
    # CPU-only cluster: ranks per node from slurm.cpu_ranks_per_node
    raw["slurm"] = {"gpus": False, "cpu_ranks_per_node": 4, "threads_per_rank": 2}
    cpu = plan_study(parse_config(raw, base_dir=ROOT))
    assert all((r.nodes, r.cpus) == (4, 8) for r in cpu if r.size != "49M")
    for layout, msg in (({"tp": 4, "pp": 1, "dp": 3}, r"tp = 4 does not divide the 6 ranks per node"),
                        ({"tp": 1, "pp": 1, "dp": 9}, r"does not split evenly over 2 nodes")):
        raw["parallel"] = {"default": layout}
        raw["slurm"] = {"gpus": True, "gpus_per_node": 8}
        with pytest.raises(ConfigError, match=msg):
            parse_config(raw, base_dir=ROOT)


def test_generic_tiny_names_and_nearest_shape() -> None:
    assert get_shape("d96l5").heads == 3 and get_shape("d48l2") == TINY_SHAPES["d48l2"]
    with pytest.raises(ValueError):
        get_shape("d80l3")  # 80 is not a multiple of the 32-wide heads above d=64
    for target in (3e5, 2e6, 5e7):
        best = shape_for_params(target, 4096)
        ratio = best.params(4096) / target
        assert 0.8 < ratio < 1.25, (target, best)
    for name in ("49M", "1393M", "5534M"):  # a paper shape's own count finds it again
        for emb in (True, False):
            n = PAPER_SHAPES[name].params(32000, embeddings=emb)
            assert shape_for_params(n, 32000, "paper", embeddings=emb).name == name


def test_next_run_planned_from_a_fit_suggestion(tmp_path: Path) -> None:
    """The scratch fit's next_run (N, D) becomes a run of the nearest ladder shape for D tokens."""
    import json

    cfg = load_config(ROOT / "config.yaml")
    fit = {"fit_id": "scratch-chinchilla-zh", "law": "chinchilla", "kind": "scratch", "lang": "zh", "status": "ok",
           "next_run": {"C": 1e15, "valid": True, "N": 9.0e5, "D": 1.9e8, "predicted_loss": 3.1}}
    (tmp_path / "scratch-chinchilla-zh.json").write_text(json.dumps(fit))
    (tmp_path / "cpt-extended-zh.json").write_text(json.dumps({**fit, "kind": "cpt", "law": "cpt"}))
    assert suggested_run(tmp_path, "es") is None
    sug = suggested_run(tmp_path, "zh")
    assert sug["fit_id"] == "scratch-chinchilla-zh"
    run = plan_next_run(cfg, sug, "zh")
    assert run.run_id == "next-zh" and run.init == "scratch" and run.lang == "zh"
    n = cfg.shape(run.size).params(cfg.vocab_size, embeddings=cfg.budget.param_count != "nonembedding")
    assert 0.8 < n / 9.0e5 < 1.25
    assert 1.9e8 <= run.tokens < 1.9e8 + run.global_batch_size * run.seq_length


# -- rerun triggers and the plan table -------------------------------------------------------------
def _demo_raw() -> dict:
    return yaml.safe_load((ROOT / "config.yaml").read_text())


def _hashes(raw: dict) -> dict[str, str]:
    from cptscale.plan import training_hash

    cfg = parse_config(raw, base_dir=ROOT)
    return {r.run_id: training_hash(cfg, r) for r in plan_study(cfg)}


@pytest.mark.parametrize("edit", [
    {"slurm": {"gpus": False, "min_runtime_minutes": 90, "runtime_overhead_minutes": 3, "threads_per_rank": 2,
               "cpu_flops_per_core": 5e9, "partition": "gpu-long", "account": "proj"}},
    {"data": {"workers": 7, "cache_dir": "/tmp/elsewhere"}},
    {"train": {"checkpoint_every": 7, "keep_checkpoints": 5}},
    {"report": {"title": "retitled", "max_points": 50}, "description": "edited"},
    {"store": {"allow_partial": True}},
    {"logging": {"tensorboard": False, "wandb": {"project": "cptscale", "mode": "offline"}}},
], ids=["slurm-resources", "data-io", "checkpoints", "presentation", "store", "logging"])
def test_training_hash_ignores_resources_and_io(edit: dict) -> None:
    """Job resources, runtime estimates, thread counts, data workers/cache, checkpoint cadence, report and
    experiment-tracking options change no run's training hash (the rerun trigger of run.json, hence of training) and not the
    study manifest's trigger either, while they do change the plan's resources where they should."""
    from cptscale.plan import results_hash

    raw = _demo_raw()
    edited = copy.deepcopy(raw)
    for section, values in edit.items():
        edited[section] = {**edited.get(section, {}), **values} if isinstance(values, dict) else values
    assert _hashes(edited) == _hashes(raw)
    assert results_hash(parse_config(edited, base_dir=ROOT)) == results_hash(parse_config(raw, base_dir=ROOT))
    if "slurm" in edit:  # the resources themselves did change
        before = plan_study(parse_config(raw, base_dir=ROOT))[0]
        after = plan_study(parse_config(edited, base_dir=ROOT))[0]
        assert (after.cpus, after.runtime_minutes) != (before.cpus, before.runtime_minutes)


def test_training_hash_follows_what_a_run_computes() -> None:
    """A hyper-parameter of one size changes that size's runs only; study-wide ones change every run."""
    raw = _demo_raw()
    base = _hashes(raw)
    one_size = copy.deepcopy(raw)
    one_size["budget"]["tokens"] = {"d48l2": 600_000}
    changed = {k for k, v in _hashes(one_size).items() if v != base[k]}
    assert changed == {r for r in base if r.startswith("d48l2-")} and len(changed) == 4
    for section, key, value in [("train", "lr", 1e-3), ("train", "warmup_fraction", 0.1), ("data", "max_chars", 10**6),
                                ("tokenizer", "vocab_size", 4096), ("evaluation", "points", 5)]:
        edited = copy.deepcopy(raw)
        edited[section] = {**edited[section], key: value}
        new = _hashes(edited)
        assert all(new[k] != base[k] for k in base), (section, key)
    seeded = dict(raw, seed=99)
    assert all(v != base[k] for k, v in _hashes(seeded).items())


def test_plan_table_columns_and_totals(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """`cptscale plan config.yaml`: one row per run with N (with and without embeddings), tokens, FLOPs,
    steps, batch, micro-batch x accumulation, layout and resources; a totals line in CPU core-hours for
    this CPU study (GPU-hours only for GPU studies). Results in an empty directory: no finished runs, so
    the assumed rates (the calibrated ones: tests/test_throughput.py)."""
    import math
    import re

    from cptscale.cli import main
    from cptscale.commands.plan import PLAN_COLUMNS
    from cptscale.util import fmt_num as _fmt_num

    raw = yaml.safe_load((ROOT / "config.yaml").read_text())
    raw["results_dir"] = str(tmp_path / "results")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path)
    assert main(["plan", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert re.split(r"\s{2,}", lines[0].strip()) == list(PLAN_COLUMNS)
    assert PLAN_COLUMNS == ("run", "N", "N_nonemb", "tokens", "FLOPs", "steps", "batch", "mbs x acc", "tp/pp/dp",
                            "nodes", "gpus", "cpus", "time", "mem")
    assert set(lines[1]) == {"-"}
    runs = plan_study(cfg)
    rows = [ln.split() for ln in lines[2:2 + len(runs)]]
    assert lines[2 + len(runs)] == ""
    s = cfg.slurm
    for row, r in zip(rows, runs, strict=True):
        shape = cfg.shape(r.size)
        n, n_nonemb = shape.params(cfg.vocab_size), shape.params(cfg.vocab_size, embeddings=False)
        assert n > n_nonemb
        batch_seqs = cfg.train.batch_tokens // cfg.train.seq_length
        steps = math.ceil(cfg.tokens(r.size) / cfg.train.batch_tokens)
        tokens = steps * cfg.train.batch_tokens
        cpus = s.threads_per_rank  # tp = pp = dp = 1
        minutes = max(s.min_runtime_minutes, math.ceil(6 * n * tokens / (cpus * s.cpu_flops_per_core) / 60 * 1.5
                                                        + s.runtime_overhead_minutes))
        assert row == [r.run_id, _fmt_num(n), _fmt_num(n_nonemb), _fmt_num(tokens), _fmt_num(6 * n * tokens), str(steps),
                       f"{batch_seqs}x{cfg.train.seq_length}",
                       f"{cfg.train.micro_batch_size}x{batch_seqs // cfg.train.micro_batch_size}", "1/1/1", "1", "0",
                       str(cpus), f"{minutes}m", f"{r.mem_gb}G"], row
    total = next(ln for ln in lines if ln.startswith(f"study {cfg.study}:"))
    assert any(ln.startswith("Can the planned points identify each law?") for ln in lines)  # after the totals
    flops = sum(6 * r.params * r.tokens for r in runs)
    assert total.startswith(f"study {cfg.study}: {len(runs)} runs, {_fmt_num(sum(r.tokens for r in runs))} tokens, "
                            f"{_fmt_num(flops)} FLOPs (6ND), ~{flops / s.cpu_flops_per_core / 3600:.3g} CPU core-hours")
    requested = sum(r.cpus * r.runtime_minutes for r in runs) / 60
    assert total.endswith(f"time limits request {requested:.3g} CPU core-hours") and "GPU" not in total

    assert main(["plan", str(ROOT / "workflow/studies/paper.yaml")]) == 0
    paper_total = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("study "))
    assert "GPU-hours at 30% MFU" in paper_total and "core-hours" not in paper_total


def test_lr_scaling_inverse_cbrt_params() -> None:
    """``train.lr_scaling: inverse_cbrt_params``: the smallest size keeps ``train.lr``, a size with 8x the
    non-embedding parameters gets half of it, a CPT run its own size's LR; ``constant`` (the default)
    gives every run ``train.lr`` and leaves the dumped config (and so the run hashes) unchanged."""
    raw = _demo_raw()
    raw["ladder"]["sizes"] = ["d32l2", "d64l2"]
    cfg = parse_config(raw)
    assert "lr_scaling" not in cfg.model_dump(mode="json")["train"]
    assert {schedule_for(cfg, r).max_lr for r in plan_study(cfg)} == {cfg.train.lr}
    raw["train"]["lr_scaling"] = "inverse_cbrt_params"
    cfg = parse_config(raw)
    runs = plan_study(cfg)
    small = min(r.params_nonemb for r in runs)
    for r in runs:
        s = schedule_for(cfg, r)
        assert s.max_lr == pytest.approx(cfg.train.lr * (small / r.params_nonemb) ** (1 / 3), rel=1e-12)
        assert s.min_lr == pytest.approx(s.max_lr * cfg.train.min_lr_ratio, rel=1e-12)
    lrs = {r.size: schedule_for(cfg, r).max_lr for r in runs}
    assert lrs["d32l2"] == cfg.train.lr and lrs["d64l2"] < cfg.train.lr
    cpt = next(r for r in runs if r.init == "cpt" and r.size == "d64l2")
    assert schedule_for(cfg, cpt).max_lr == lrs["d64l2"]
    raw["train"]["lr_scaling"] = "sqrt"
    with pytest.raises(ConfigError, match=r"train\.lr_scaling"):
        parse_config(raw)
