"""Experiment tracking: TensorBoard event files (on by default) and an offline W&B run mirror a real
training run's rows; the jsonl files stay the source of truth."""

from __future__ import annotations

from pathlib import Path

import pytest
from train_helpers import make_data, make_spec, read_jsonl, run_until_sigterm

pytest.importorskip("megatron.core")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tracking")


@pytest.fixture(scope="module")
def data(root):
    return make_data(root / "data")


def test_tensorboard_events_mirror_the_run(root, data):
    """A WSD run with a branch: TensorBoard's own event reader finds the training, evaluation and branch
    tags, with the values of metrics.jsonl / evals.jsonl at their steps (float32 in the event file)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from cptscale.train.launch import run_spec

    spec = make_spec(root, data, run_id="tb", steps=8, every=0, eval_steps=[0, 4])
    spec["schedule"] = {"kind": "wsd", "max_lr": 0.01, "min_lr": 0.001, "warmup_steps": 2, "total_steps": 8,
                        "decay_steps": 2, "decay_shape": "linear", "branches": [6]}
    assert "logging" not in spec and run_spec(spec) == 0  # on by default
    out = Path(spec["out_dir"])
    ea = EventAccumulator(str(out / "tensorboard"))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    want = {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s",
            *(f"eval/{lang}/{k}" for lang in ("en", "zh") for k in ("loss", "bpb", "ppl"))}
    assert want <= tags, sorted(want - tags)
    branch = EventAccumulator(str(out / "tensorboard" / "branch_6"))  # a run of its own, the same tags
    branch.Reload()
    assert {"train/loss", "train/lr", "eval/en/loss", "eval/zh/loss"} <= set(branch.Tags()["scalars"])
    assert "train/mfu" not in tags  # null on CPU: left out, not written as 0
    metrics = read_jsonl(out / "metrics.jsonl")
    tb_loss = [(e.step, e.value) for e in ea.Scalars("train/loss")]
    assert [s for s, _ in tb_loss] == [m["step"] for m in metrics] == list(range(8))
    assert [v for _, v in tb_loss] == pytest.approx([m["loss"] for m in metrics], rel=1e-6)
    assert [e.value for e in ea.Scalars("train/lr")] == pytest.approx([m["lr"] for m in metrics], rel=1e-6)
    evals = read_jsonl(out / "evals.jsonl")
    for lang in ("en", "zh"):
        main = [(e["step"], e["loss"]) for e in evals if e["lang"] == lang and "branch" not in e]
        got = [(e.step, e.value) for e in ea.Scalars(f"eval/{lang}/loss")]
        assert [s for s, _ in got] == [s for s, _ in main] == [0, 4, 8]
        assert [v for _, v in got] == pytest.approx([v for _, v in main], rel=1e-6)
        (br,) = [e for e in evals if e["lang"] == lang and e.get("branch") == 6]
        (tb_br,) = branch.Scalars(f"eval/{lang}/loss")
        assert tb_br.step == 6 and tb_br.value == pytest.approx(br["loss"], rel=1e-6)
    bm = read_jsonl(out / "branch_metrics.jsonl")  # the branch's decay steps, ending at step 5
    assert bm and bm[-1]["step"] == 5
    assert [e.step for e in branch.Scalars("train/loss")] == [r["step"] for r in bm]
    assert [e.value for e in branch.Scalars("train/loss")] == pytest.approx([r["loss"] for r in bm], rel=1e-6)


def test_tensorboard_after_resume_shows_each_step_once(root, data):
    """Stopped by SIGTERM after step 5 and resumed: TensorBoard's reader sees every training step once, with
    the losses of metrics.jsonl, and the evaluation at the resume step (kept, not recomputed) too."""

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from cptscale.train.launch import run_spec

    spec = make_spec(root, data, run_id="tb-resumed", steps=8, every=0, eval_steps=[0, 5])
    run_until_sigterm(spec, 5)
    assert run_spec(spec) == 0
    out = Path(spec["out_dir"])
    ea = EventAccumulator(str(out / "tensorboard"))
    ea.Reload()
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [e.step for e in ea.Scalars("train/loss")] == [m["step"] for m in metrics] == list(range(8))
    assert [e.value for e in ea.Scalars("train/loss")] == pytest.approx([m["loss"] for m in metrics], rel=1e-6)
    assert [e.step for e in ea.Scalars("eval/en/loss")] == [0, 5, 8]


def test_tensorboard_off_and_wandb_offline(root, data):
    """``logging: {tensorboard: false, wandb: {project, mode: offline}}``: no event files, and an offline W&B
    run under the run's directory whose history holds the training and evaluation tags."""
    pytest.importorskip("wandb")
    from cptscale.train.launch import run_spec

    spec = make_spec(root, data, run_id="wb", steps=3, every=0, eval_steps=[],
                     logging={"tensorboard": False, "wandb": {"project": "cptscale-test", "mode": "offline"}})
    assert run_spec(spec) == 0
    out = Path(spec["out_dir"])
    assert not (out / "tensorboard").exists()
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    blob = run_file.read_bytes()
    for tag in (b"train/loss", b"train/grad_norm", b"eval/en/loss", b"eval/zh/bpb"):
        assert tag in blob, tag


def test_wandb_bad_mode_is_refused_before_training(root, data, capsys):
    pytest.importorskip("wandb")
    from cptscale.train.launch import run_spec

    spec = make_spec(root, data, run_id="wb-bad", steps=3, logging={"wandb": {"project": "p", "mode": "cloud"}})
    assert run_spec(spec) == 3  # permanent: a retry cannot change it
    assert "'logging.wandb.mode' must be 'offline' or 'online', got 'cloud'" in capsys.readouterr().err
    assert not (Path(spec["out_dir"]) / "metrics.jsonl").exists()
