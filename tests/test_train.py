"""Training engine on real Megatron-Core (CPU, gloo, tiny shapes)."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
from train_helpers import VOCAB, make_data, make_spec, read_jsonl, write_spec

pytest.importorskip("megatron.core")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train")


@pytest.fixture(scope="module")
def data(root):
    return make_data(root / "data")


@pytest.fixture(scope="module")
def parent_run(root, data):
    """A scratch English run through the CLI: the parent of the CPT tests."""
    from cptscale.cli import main

    spec = make_spec(root, data, run_id="parent-en", steps=12)
    assert main(["train", "--spec", str(write_spec(root, spec))]) == 0
    return spec


def test_cpu_compat_patches_what_it_expects():
    """Fails loudly if a Megatron-Core upgrade changes what cpu_compat patches (or stops needing it)."""
    import megatron.core
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as moptimizer
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as mrandom

    from cptscale.train import cpu_compat

    assert megatron.core.__version__ == cpu_compat.PATCHED_VERSION == "0.16.1"
    assert 'device="cuda"' in Path(schedules.__file__).read_text(), "schedules no longer allocates on cuda"
    assert "device='cuda'" in Path(moptimizer.__file__).read_text(), "optimizers no longer allocate on cuda"
    assert "'torch.cuda.FloatTensor'" in Path(clip_grads.__file__).read_text(), "clipping no longer asserts cuda"
    for name in ("CudaRNGStatesTracker", "_CUDA_RNG_STATE_TRACKER", "_MODEL_PARALLEL_RNG_TRACKER_NAME",
                 "_DATA_PARALLEL_RNG_TRACKER_NAME", "_EXPERT_PARALLEL_RNG_TRACKER_NAME"):
        assert hasattr(mrandom, name), f"megatron RNG tracker API changed ({name}): update cpu_compat"
    cpu_compat.apply()
    cpu_compat.seed_rng_tracker(1)
    import torch

    assert torch.zeros(1, device="cuda").device.type == "cpu"  # the device mode is active
    assert moptimizer.clip_grad_by_total_norm_fp32 is cpu_compat._clip_grad_by_total_norm_cpu
    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.full((4,), 2.0)
    moptimizer.clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=4.0)
    assert torch.allclose(p.grad, torch.full((4,), 0.5), atol=1e-6)
    before = torch.get_rng_state()
    with mrandom.get_cuda_rng_tracker().fork():
        torch.rand(3)
    assert torch.equal(before, torch.get_rng_state())


def test_spec_validation_names_field(root, data):
    from cptscale.train.spec import SpecError, validate_spec

    good = make_spec(root, data)
    validate_spec(good)
    for mutate, needle in [
        (lambda s: s.pop("steps"), "steps"),
        (lambda s: s.update(init="finetune"), "init"),
        (lambda s: s.update(global_batch_size=5), "global_batch_size"),
        (lambda s: s["layout"].update(tp=3), "tp"),
        (lambda s: s.update(init="cpt", parent=None), "parent"),
        (lambda s: s["schedule"].update(warmup_steps=99), "schedule"),
        (lambda s: s.update(data={"kind": "nope"}), "data.kind"),
    ]:
        bad = json.loads(json.dumps(good))
        mutate(bad)
        with pytest.raises(SpecError, match=needle):
            validate_spec(bad)


def test_cli_bad_spec_exit_2(root, capsys):
    from cptscale.cli import main

    p = root / "bad.json"
    p.write_text('{"run_id": "x"}')
    assert main(["train", "--spec", str(p)]) == 2
    assert "missing field" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["d32l2", "d64l2", "d64l3"])
def test_param_count_matches_built_model(name):
    from cptscale.ladder import get_shape
    from cptscale.train.engine import setup_parallel, teardown_parallel
    from cptscale.train.model import build_model, count_params

    shape = get_shape(name)
    try:
        setup_parallel(1, 1, 0)
        model = build_model(shape.as_dict(), 300, 32)
        n = count_params(model)
        emb = model.embedding.word_embeddings.weight.numel() + model.output_layer.weight.numel()
    finally:
        teardown_parallel()
    assert n == shape.params(300)
    assert n - emb == shape.params(300, embeddings=False)


def test_scratch_run_outputs_and_loss_falls(parent_run):
    out = Path(parent_run["out_dir"])
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(12))
    assert metrics[-1]["tokens"] == 12 * 4 * 32
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mem_bytes", "mfu"):
        assert key in metrics[0]
    evals = read_jsonl(out / "evals.jsonl")
    assert {(e["step"], e["lang"]) for e in evals} >= {(0, "en"), (0, "zh"), (12, "en"), (12, "zh")}
    en = [e for e in evals if e["lang"] == "en"]
    assert en[-1]["loss"] < en[0]["loss"] - 0.2, "loss must fall on the structured corpus"
    done = json.loads((out / "done.json").read_text())
    assert done["steps"] == 12 and done["resumed_from"] is None
    assert done["final_loss"]["en"] == en[-1]["loss"]
    ck = Path(parent_run["checkpoint"]["dir"])
    assert sorted(p.name for p in ck.iterdir()) == ["final", "step_10", "step_12"]  # keep=2


def test_evaluate_cli_matches_trainer(root, parent_run):
    from cptscale.cli import main

    spec_path = root / "parent-en.json"
    out = root / "ev.json"
    ck = Path(parent_run["checkpoint"]["dir"]) / "final"
    assert main(["evaluate", str(ck), "--spec", str(spec_path), "--lang", "en,zh", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    done = json.loads((Path(parent_run["out_dir"]) / "done.json").read_text())
    for lang in ("en", "zh"):
        assert abs(res[lang]["loss"] - done["final_loss"][lang]) < 1e-9


def test_resume_after_sigterm_is_exact(root, data):
    """Run 12 steps straight; run again with a SIGTERM after step 7 (save, exit 143), then resume."""
    from cptscale.train.engine import Terminated, Trainer, teardown_parallel
    from cptscale.train.launch import run_spec

    a = make_spec(root, data, run_id="straight", steps=12, every=5)
    assert run_spec(a) == 0
    b = make_spec(root, data, run_id="killed", steps=12, every=5)
    tr = Trainer(b)
    tr.on_step = lambda s: os.kill(os.getpid(), signal.SIGTERM) if s == 7 else None
    with pytest.raises(Terminated):
        try:
            tr.run()
        finally:
            teardown_parallel()
    assert (Path(b["checkpoint"]["dir"]) / "step_7").is_dir()
    assert not (Path(b["out_dir"]) / "done.json").exists()
    assert run_spec(b) == 0
    done = json.loads((Path(b["out_dir"]) / "done.json").read_text())
    assert done["resumed_from"] == 7
    la = [m["loss"] for m in read_jsonl(Path(a["out_dir"]) / "metrics.jsonl")]
    lb = [m["loss"] for m in read_jsonl(Path(b["out_dir"]) / "metrics.jsonl")]
    assert len(lb) == 12
    diff = max(abs(x - y) for x, y in zip(la, lb, strict=True))
    print(f"max resume loss difference {diff:.3g}")
    assert diff <= 1e-6


def test_sigterm_to_every_process_of_the_job_still_checkpoints(root, data):
    """Like a cluster time limit: SIGTERM to the whole process group, including the helper processes
    dist_checkpointing starts to write files. The run must still save and exit 143 (it exited 1 with
    a broken pipe when the writers' queue process died with the trainer's signal)."""
    import subprocess
    import sys
    import time

    spec = make_spec(root, data, run_id="group-term", steps=100_000, every=3, eval_steps=[])
    path = write_spec(root, spec)
    proc = subprocess.Popen([sys.executable, "-m", "cptscale.cli", "train", "--spec", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    ck = Path(spec["checkpoint"]["dir"])
    deadline = time.time() + 120
    while time.time() < deadline and len(list(ck.glob("step_*"))) < 2:  # the writers' processes exist by now
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out[-3000:]
    assert "stop signal: checkpoint saved at step" in out
    saved = max(int(p.name.removeprefix("step_")) for p in ck.glob("step_*"))
    assert f"checkpoint saved at step {saved}" in out


def _cpt_spec(root, data, parent, run_id, ckpt=None, **kw):
    done = json.loads((Path(parent["out_dir"]) / "done.json").read_text())
    par = {"run_id": parent["run_id"], "checkpoint": str(ckpt or done["final_checkpoint"]), "lang": "en",
           "final_loss": done["final_loss"]["en"], "tolerance": 1e-3}
    return make_spec(root, data, run_id=run_id, lang="zh", init="cpt", parent=par, steps=6, **kw)


def test_cpt_gate_passes_and_step0_equals_parent(root, data, parent_run):
    from cptscale.train.launch import run_spec

    spec = _cpt_spec(root, data, parent_run, "cpt-zh")
    assert run_spec(spec) == 0
    ev0 = next(e for e in read_jsonl(Path(spec["out_dir"]) / "evals.jsonl") if e["step"] == 0 and e["lang"] == "en")
    assert abs(ev0["loss"] - spec["parent"]["final_loss"]) < 1e-9
    m = read_jsonl(Path(spec["out_dir"]) / "metrics.jsonl")
    assert m[0]["lr"] == pytest.approx(0.005)  # fresh schedule: warmup step 0 of 2


def test_cpt_gate_fails_on_corrupted_checkpoint(root, data, parent_run, capsys):
    from cptscale.train.launch import run_spec

    ck = Path(parent_run["checkpoint"]["dir"])
    bad = root / "corrupt" / "final"
    shutil.copytree(ck / "final", bad)
    shutil.rmtree(bad / "model")
    shutil.copytree(ck / "step_10" / "model", bad / "model")  # weights from another step
    spec = _cpt_spec(root, data, parent_run, "cpt-bad", ckpt=bad)
    assert run_spec(spec) == 1
    err = capsys.readouterr().err
    assert "init-sanity gate failed" in err
    assert not (Path(spec["out_dir"]) / "done.json").exists()
    # a truncated shard: a clear checkpoint error, not a traceback
    bad2 = root / "corrupt2" / "final"
    shutil.copytree(ck / "final", bad2)
    for f in (bad2 / "model").glob("*.distcp"):
        f.write_bytes(f.read_bytes()[:100])
    spec2 = _cpt_spec(root, data, parent_run, "cpt-bad2", ckpt=bad2)
    assert run_spec(spec2) == 1
    assert "could not load weights" in capsys.readouterr().err


def test_nan_loss_stops_run(root, data):
    from cptscale.train.launch import run_spec

    spec = make_spec(root, data, run_id="nan", steps=4, eval_steps=[])
    spec["schedule"]["max_lr"] = 1e30
    spec["schedule"]["min_lr"] = 1e29
    spec["optimizer"]["grad_clip"] = 0.0
    rc = run_spec(spec)
    assert rc == 1
    assert not (Path(spec["out_dir"]) / "done.json").exists()


def test_vocab_constant():
    assert VOCAB == 256
