"""Training engine on real Megatron-Core (CPU, gloo, tiny shapes)."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
from train_helpers import VOCAB, make_data, make_spec, read_jsonl, run_until_sigterm, write_spec

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
    import sys

    import megatron.core
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as moptimizer
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as mrandom

    from cptscale.train import cpu_compat

    # requirements.lock pins 0.16.1 on Python 3.11 and 0.19.2 on Python >= 3.12
    assert megatron.core.__version__ == ("0.16.1" if sys.version_info < (3, 12) else "0.19.2")
    assert megatron.core.__version__ in cpu_compat.PATCHED_VERSIONS
    assert 'device="cuda"' in Path(schedules.__file__).read_text(), "schedules no longer allocates on cuda"
    assert "device='cuda'" in Path(moptimizer.__file__).read_text(), "optimizers no longer allocate on cuda"
    assert "'torch.cuda.FloatTensor'" in Path(clip_grads.__file__).read_text(), "clipping no longer asserts cuda"
    for name in ("CudaRNGStatesTracker", "_CUDA_RNG_STATE_TRACKER", "_MODEL_PARALLEL_RNG_TRACKER_NAME",
                 "_DATA_PARALLEL_RNG_TRACKER_NAME", "_EXPERT_PARALLEL_RNG_TRACKER_NAME"):
        assert hasattr(mrandom, name), f"megatron RNG tracker API changed ({name}): update cpu_compat"
    # the call sites that patches 1 and 2 (current_device -> "cpu", synchronize -> no-op) neutralise on
    # our code path: rotary embeddings and DDP buffers (device=current_device()), p2p communication (PP)
    from megatron.core.distributed import param_and_grad_buffer
    from megatron.core.models.common.embeddings import rotary_pos_embedding
    from megatron.core.pipeline_parallel import p2p_communication

    for mod, fn in ((rotary_pos_embedding, "current_device"), (param_and_grad_buffer, "current_device"),
                    (p2p_communication, "current_device"), (p2p_communication, "synchronize")):
        assert _cuda_calls(mod.__file__, fn) > 0, (
            f"{mod.__name__} no longer calls torch.cuda.{fn}(): megatron-core changed what cpu_compat patches; "
            f"check whether the torch.cuda.{fn} patch in cptscale/train/cpu_compat.py is still needed (drop it if not)")
    cpu_compat.apply()
    cpu_compat.seed_rng_tracker(1)
    import torch

    assert torch.cuda.current_device() == "cpu" and torch.cuda.synchronize() is None
    # patch 6: megatron-core 0.19's DDP buckets wait on CUDA-graph events through current_stream()
    if megatron.core.__version__ != "0.16.1":
        assert _cuda_calls(param_and_grad_buffer.__file__, "current_stream") > 0, "current_stream patch no longer needed"
    stream = torch.cuda.current_stream()
    assert stream.wait_event(None) is None and stream.wait_stream(None) is None
    assert torch.zeros(1, device="cuda").device.type == "cpu"  # the device mode is active
    if not torch.cuda.is_available():  # bench/train.py times its plain baseline outside the mode
        with cpu_compat.device_mode_suspended(), pytest.raises((RuntimeError, AssertionError)):
            torch.zeros(1, device="cuda")
        assert torch.zeros(1, device="cuda").device.type == "cpu"
    assert moptimizer.clip_grad_by_total_norm_fp32 is cpu_compat._clip_grad_by_total_norm_cpu
    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.full((4,), 2.0)
    moptimizer.clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=4.0)
    assert torch.allclose(p.grad, torch.full((4,), 0.5), atol=1e-6)
    before = torch.get_rng_state()
    with mrandom.get_cuda_rng_tracker().fork():
        torch.rand(3)
    assert torch.equal(before, torch.get_rng_state())


def _cuda_calls(path: str, fn: str) -> int:
    """Calls ``torch.cuda.<fn>(...)`` in a source file (parsed, so comments and docstrings do not count)."""
    import ast

    n = 0
    for node in ast.walk(ast.parse(Path(path).read_text())):
        f = getattr(node, "func", None) if isinstance(node, ast.Call) else None
        if (isinstance(f, ast.Attribute) and f.attr == fn and isinstance(f.value, ast.Attribute)
                and f.value.attr == "cuda" and isinstance(f.value.value, ast.Name) and f.value.value.id == "torch"):
            n += 1
    return n


def test_spec_validation_names_field(root, data):
    from cptscale.runspec import RunSpec, SpecError

    good = make_spec(root, data)
    RunSpec.parse(good)
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
            RunSpec.parse(bad)


def test_cli_bad_spec_exit_2(root, capsys):
    from cptscale.cli import main

    p = root / "bad.json"
    p.write_text('{"run_id": "x"}')
    assert main(["train", "--spec", str(p)]) == 2
    assert "missing field" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["d32l2", "d64l2", "d64l3"])
def test_param_count_matches_built_model(name):
    from cptscale.ladder import get_shape
    from cptscale.train.model import build_model, count_params
    from cptscale.train.parallel import setup_parallel, teardown_parallel

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
    prov = done["provenance"]  # recorded at training time, by rank 0
    assert {"git_commit", "git_dirty", "packages", "config_hash", "input_hashes"} <= set(prov)
    assert prov["config_hash"] == "test" and prov["packages"]["megatron-core"] == "0.16.1"
    assert set(prov["input_hashes"]) == {"run.json"}
    ck = Path(parent_run["checkpoint"]["dir"])
    assert sorted(p.name for p in ck.iterdir()) == ["final", "step_10", "step_12"]  # keep=2
    assert (ck / "step_12" / "verified.json").exists()  # the final eval checked its weights


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
        ev = res[lang]  # the whole set: bpb divides by the data stage's byte count of it
        assert ev["bytes"] == parent_run["eval"]["languages"][lang]["bytes"]
        assert ev["bpb"] == pytest.approx(ev["loss"] * ev["n_tokens"] / (math.log(2) * ev["bytes"]), rel=1e-12)


def test_evaluate_cli_without_spec_uses_checkpoint_shape(root, data, capsys):
    """`cptscale evaluate CHECKPOINT` finds run.json from the checkpoint (its recorded out_dir, or the
    planner's <study>/checkpoints/<run> -> <study>/runs/<run> layout) and builds the model at the
    checkpoint's own shape: here a run pruned during training, whose final model is smaller than the
    spec's shape."""
    from cptscale.cli import main
    from cptscale.train.launch import run_spec

    spec = make_spec(root, data, run_id="pruned-eval", steps=4, every=0, eval_steps=[])
    spec["prune"] = {"importance": "weight", "calib_batches": 2, "events": [{"step": 2, "shape": {"heads": 1, "ffn": 48}}]}
    assert run_spec(spec) == 0
    out_dir = Path(spec["out_dir"])
    done = json.loads((out_dir / "done.json").read_text())
    final = Path(done["final_checkpoint"])
    assert main(["evaluate", str(final), "--lang", "en"]) == 2  # no run.json anywhere yet
    assert "no run.json found" in capsys.readouterr().err
    (out_dir / "run.json").write_text(json.dumps(spec))  # where the planner puts it
    res_path = root / "ev-pruned.json"
    assert main(["evaluate", str(final), "--lang", "en", "--out", str(res_path)]) == 0
    assert abs(json.loads(res_path.read_text())["en"]["loss"] - done["final_loss"]["en"]) < 1e-9
    # a checkpoint that does not record its out_dir: found through the planner's directory layout
    study = root / "study-layout"
    shutil.copytree(final, study / "checkpoints" / "pruned-eval" / "final")
    st = study / "checkpoints" / "pruned-eval" / "final" / "state.json"
    st.write_text(json.dumps({k: v for k, v in json.loads(st.read_text()).items() if k != "out_dir"}))
    (st.parent / "manifest.json").unlink()  # such an older checkpoint had no manifest either
    (study / "runs" / "pruned-eval").mkdir(parents=True)
    shutil.copy(out_dir / "run.json", study / "runs" / "pruned-eval" / "run.json")
    assert main(["evaluate", str(study / "checkpoints" / "pruned-eval" / "final"), "--out", str(res_path)]) == 0
    assert abs(json.loads(res_path.read_text())["en"]["loss"] - done["final_loss"]["en"]) < 1e-9


def test_resume_after_sigterm_is_exact(root, data):
    """Run 12 steps straight; run again with a SIGTERM after step 7 (save, exit 143), then resume."""
    from cptscale.train.launch import run_spec

    a = make_spec(root, data, run_id="straight", steps=12, every=5)
    assert run_spec(a) == 0
    b = make_spec(root, data, run_id="killed", steps=12, every=5)
    run_until_sigterm(b, 7)
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


def _optimizer_sharded_tensors(distributed: bool):
    """A tiny model's optimizer after one step, and the ShardedTensors its checkpoint would write."""
    import torch
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from cptscale.ladder import get_shape
    from cptscale.train import checkpoint as ck
    from cptscale.train.engine import build_optimizer, collate, run_microbatches, setup_parallel, wrap_ddp
    from cptscale.train.model import build_model

    setup_parallel(1, 1, 0)
    model = wrap_ddp(build_model(get_shape("d32l2").as_dict(), VOCAB, 32), distributed_optimizer=distributed)
    opt = build_optimizer(model, {"grad_clip": 1.0, "weight_decay": 0.1}, 1e-3, distributed_optimizer=distributed)
    toks = torch.randint(0, VOCAB, (2, 33), generator=torch.Generator().manual_seed(0))
    batch = collate([{"tokens": t[:-1], "labels": t[1:], "loss_mask": torch.ones(32),
                      "position_ids": torch.arange(32)} for t in toks])
    model.zero_grad_buffer()
    opt.zero_grad()
    run_microbatches(model, [batch], 32, 2, forward_only=False)
    model.finish_grad_sync()
    opt.step()
    sd = opt.sharded_state_dict(model.module.sharded_state_dict(), metadata=ck.optimizer_metadata(opt))
    return model, opt, [v for v in nested_values(sd) if isinstance(v, ShardedTensor)]


def test_plain_optimizer_checkpoint_format_is_unchanged():
    """The CPU path's plain optimizer gets no sharding metadata: its checkpoints stay as before."""
    from cptscale.train import checkpoint as ck
    from cptscale.train.engine import teardown_parallel

    try:
        _, opt, tensors = _optimizer_sharded_tensors(distributed=False)
        assert ck.optimizer_metadata(opt) is None
        assert tensors and all(t.flattened_range is None for t in tensors)
    finally:
        teardown_parallel()


@pytest.mark.skipif(not __import__("torch").cuda.is_available(),
                    reason="Megatron-Core's distributed optimizer takes only CUDA tensors")
def test_distributed_optimizer_checkpoint_round_trip(tmp_path):
    """GPU only: the distributed optimizer's state is written without ShardedTensor.flattened_range
    (Megatron-Core 0.19 refuses it at save) and loads back to the same step."""
    from megatron.core import dist_checkpointing

    from cptscale.train import checkpoint as ck
    from cptscale.train.engine import teardown_parallel

    try:
        model, opt, tensors = _optimizer_sharded_tensors(distributed=True)
        assert ck.optimizer_metadata(opt) == {"distrib_optim_sharding_type": "dp_reshardable"}
        assert all(t.flattened_range is None for t in tensors)
        meta = ck.optimizer_metadata(opt)
        (tmp_path / "optimizer").mkdir()
        dist_checkpointing.save(opt.sharded_state_dict(model.module.sharded_state_dict(), metadata=meta),
                                str(tmp_path / "optimizer"))
        loading = opt.sharded_state_dict(model.module.sharded_state_dict(), is_loading=True, metadata=meta)
        opt.load_state_dict(dist_checkpointing.load(loading, str(tmp_path / "optimizer")))
        inner = opt.chained_optimizers[0].optimizer if hasattr(opt, "chained_optimizers") else opt.optimizer
        ck.unshare_adam_steps(inner)
        assert len({id(st["step"]) for st in inner.state.values()}) == len(inner.state)
        assert {float(st["step"]) for st in inner.state.values()} == {1.0}
    finally:
        teardown_parallel()


def test_unshare_adam_steps_keeps_adam_counting_one_per_step():
    """Megatron-Core 0.19's distributed optimizer (no Apex/TE) loads one ``step`` tensor into every
    parameter's state; torch's AdamW increments each in place, so a shared one counts once per
    parameter. After :func:`unshare_adam_steps` each parameter's step grows by exactly one."""
    import torch

    from cptscale.train import checkpoint as ck

    params = [torch.nn.Parameter(torch.randn(3)) for _ in range(4)]
    opt = torch.optim.AdamW(params, lr=1e-3)
    shared = torch.tensor(7.0)
    opt.load_state_dict({"state": {i: {"step": shared, "exp_avg": torch.zeros(3), "exp_avg_sq": torch.zeros(3)}
                                   for i in range(4)}, "param_groups": opt.state_dict()["param_groups"]})
    assert ck.unshare_adam_steps(opt) == 3 and ck.unshare_adam_steps(opt) == 0
    for p in params:
        p.grad = torch.ones(3)
    opt.step()
    assert [float(st["step"]) for st in opt.state.values()] == [8.0] * 4  # 11.0 each while shared


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
    # every evaluation has bits per byte, the source language's too (the gate's evaluation of it comes first)
    evals = read_jsonl(Path(spec["out_dir"]) / "evals.jsonl")
    assert {e["lang"] for e in evals} == {"en", "zh"} and all(e["bpb"] and e["bpb"] > 0 for e in evals), evals
    m = read_jsonl(Path(spec["out_dir"]) / "metrics.jsonl")
    assert m[0]["lr"] == pytest.approx(0.005)  # fresh schedule: warmup step 0 of 2


def test_cpt_gate_fails_on_corrupted_checkpoint(root, data, parent_run, capsys):
    from cptscale.train.launch import run_spec

    ck = Path(parent_run["checkpoint"]["dir"])
    bad = root / "corrupt" / "final"
    shutil.copytree(ck / "final", bad)
    shutil.rmtree(bad / "model")
    shutil.copytree(ck / "step_10" / "model", bad / "model")  # weights from another step
    (bad / "manifest.json").unlink()  # an older checkpoint without digests: the gate is what catches it
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
    assert run_spec(spec2) == 3  # permanent: a retry cannot change it
    assert f"checkpoint {bad2} is damaged" in capsys.readouterr().err  # its manifest names the shard


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


# ----------------------------------------------------------------------------------------------
# last good checkpoint: verified checkpoints, rejection, rotation, atomicity
def _run_injected(spec, hook):
    """Run a Trainer with a fault-injection hook (called with the number of completed steps)."""
    from cptscale.train.engine import Trainer, TrainingError, teardown_parallel

    tr = Trainer(spec)
    tr.on_step = lambda s: hook(tr, s)
    try:
        with pytest.raises(TrainingError) as err:
            tr.run()
    finally:
        teardown_parallel()
    return str(err.value)


def test_nan_keeps_last_verified_checkpoint_and_resume_works(root, data):
    """Checkpoint every step, keep=1. After step 5 the LR becomes inf: update 5 writes non-finite weights,
    which step_6 holds. Step 6's loss is NaN: step_6 is rejected, step_5 (whose loss at step 5 was fine)
    survives rotation as the newest verified checkpoint, and a re-run resumes from it. Partial dirs (a
    .step_N.tmp of a killed save, a step dir without state.json) are ignored."""
    from cptscale.schedule import Schedule
    from cptscale.train import checkpoint as ck
    from cptscale.train.launch import run_spec

    spec = make_spec(root, data, run_id="nan-at-6", steps=9, every=1, eval_steps=[])
    spec["checkpoint"]["keep"] = 1
    inf = float("inf")

    def hook(tr, done):
        if done == 5:
            tr.schedule = Schedule("constant", inf, inf, 0, 9)

    msg = _run_injected(spec, hook)
    d = Path(spec["checkpoint"]["dir"])
    assert "loss is nan at step 6" in msg
    assert f"moved to {d / 'rejected-step_6'}" in msg and f"last good checkpoint: {d / 'step_5'}" in msg
    assert sorted(p.name for p in d.iterdir()) == ["rejected-step_6", "step_5"]
    assert ck.is_verified(d / "step_5") and json.loads((d / "step_5" / "verified.json").read_text())["step"] == 5
    first = read_jsonl(Path(spec["out_dir"]) / "metrics.jsonl")
    assert [m["step"] for m in first] == list(range(6))
    assert read_jsonl(Path(spec["out_dir"]) / "events.jsonl")[-1]["event"] == "failed"
    # a killed save's temp dir and a step dir without state.json are not checkpoints
    (d / ".step_8.tmp" / "model").mkdir(parents=True)
    (d / "step_7" / "model").mkdir(parents=True)
    (d / "step_7" / "model" / "junk").write_text("partial")
    assert ck.latest_checkpoint(d) == d / "step_5" and [s for s, _ in ck.list_checkpoints(d)] == [5]
    # resume (the spec's own schedule): from step_5, the kept weights give the same finite loss again
    assert run_spec(spec) == 0
    done = json.loads((Path(spec["out_dir"]) / "done.json").read_text())
    assert done["resumed_from"] == 5
    metrics = read_jsonl(Path(spec["out_dir"]) / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(9))
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) for m in metrics)
    assert metrics[5]["loss"] == first[5]["loss"]  # step_5 held the weights after update 4, as saved
    assert all(math.isfinite(v) for v in done["final_loss"].values())
    assert (d / "rejected-step_6").is_dir() and not (d / ".step_8.tmp").exists()


def test_loss_spike_stops_run_and_rejects_its_checkpoint(root, data):
    """An LR jump (0.01 -> 1.0 after step 12) makes step 13's loss ~17 against a recent mean ~5.3."""
    from cptscale.schedule import Schedule
    from cptscale.train import checkpoint as ck

    spec = make_spec(root, data, run_id="spike", steps=16, every=1, eval_steps=[])
    spec["schedule"] = {"kind": "constant", "max_lr": 0.01, "min_lr": 0.01, "warmup_steps": 0, "total_steps": 16}

    def hook(tr, done):
        if done == 12:
            tr.schedule = Schedule("constant", 1.0, 1.0, 0, 16)

    msg = _run_injected(spec, hook)
    assert "loss spike at step 13" in msg and "loss_spike_factor 3 x mean of the last 13 losses" in msg
    d = Path(spec["checkpoint"]["dir"])
    assert (d / "rejected-step_13").is_dir()
    assert ck.latest_checkpoint(d) == ck.latest_verified(d) == d / "step_12"


def test_nonfinite_grad_norm_stops_run(root, data):
    """Gradients overflowing to an infinite global norm (the step's loss still finite) stop the run;
    the checkpoint of the weights that produced them is not trusted."""
    from cptscale.train import checkpoint as ck

    spec = make_spec(root, data, run_id="grad-inf", steps=6, every=1, eval_steps=[])

    def hook(tr, done):
        if done == 3:
            next(tr.model.module.parameters()).register_hook(lambda g: g * 1e30)  # fp32 squares overflow

    msg = _run_injected(spec, hook)
    assert "gradient norm is inf at step 3 (the loss was" in msg
    d = Path(spec["checkpoint"]["dir"])
    assert (d / "rejected-step_3").is_dir() and ck.latest_verified(d) == d / "step_2"


# ----------------------------------------------------------------------------------------------
def test_changed_spec_moves_stale_checkpoints_aside(root, data):
    """A re-planned run (another config_hash: here fewer steps) must not resume from the old run's
    checkpoints: they are moved aside, not deleted, and the run trains afresh."""
    from cptscale.train.launch import run_spec

    old = make_spec(root, data, run_id="respec", steps=6, every=3, eval_steps=[])
    assert run_spec(old) == 0
    out, d = Path(old["out_dir"]), Path(old["checkpoint"]["dir"])
    old_done = json.loads((out / "done.json").read_text())
    new = make_spec(root, data, run_id="respec", steps=4, every=3, eval_steps=[], config_hash="test-v2")
    assert run_spec(new) == 0
    done = json.loads((out / "done.json").read_text())
    assert done["resumed_from"] is None and done["steps"] == 4
    assert [m["step"] for m in read_jsonl(out / "metrics.jsonl")] == [0, 1, 2, 3]
    assert done["final_loss"]["en"] != old_done["final_loss"]["en"]
    stale = d.with_name("respec.stale-test")
    assert (stale / "step_6" / "state.json").is_file() and (stale / "final" / "state.json").is_file()
    assert json.loads((d / "final" / "state.json").read_text())["config_hash"] == "test-v2"
    assert read_jsonl(out / "events.jsonl")[0] == {"event": "stale_checkpoints_moved", "to": str(stale),
                                                   "time": read_jsonl(out / "events.jsonl")[0]["time"]}


def test_cpt_without_parent_final_loss_is_refused(root, data, parent_run, capsys):
    """Without the source run's final loss the init-sanity gate has nothing to compare: an error that
    names the parent's done.json and the fix, before any work."""
    from cptscale.train.launch import run_spec

    spec = _cpt_spec(root, data, parent_run, "cpt-noloss")
    spec["parent"]["final_loss"] = None
    assert run_spec(spec) == 3  # permanent: a retry cannot change it
    err = capsys.readouterr().err
    assert "parent.final_loss is None" in err and "init-sanity gate" in err
    assert str(Path(parent_run["out_dir"]) / "done.json") in err and "cptscale plan" in err
    assert not Path(spec["out_dir"]).exists()


# ----------------------------------------------------------------------------------------------
LICENSES = Path("/usr/share/common-licenses")


def test_loss_falls_on_real_english_text(tmp_path):
    """Real English (the license texts every Debian system ships) through the data stage (ingest,
    byte-level BPE training, validation split, Megatron indexing), then 60 steps of a tiny model: the
    held-out loss falls by more than 1.5 nats. The evaluation is capped at 1000 tokens, so bits per
    byte must divide by the bytes of those tokens, counted here by decoding them."""
    if not (LICENSES / "GPL-3").is_file():
        pytest.skip(f"{LICENSES / 'GPL-3'} not present (Debian's base-files ships it)")
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from cptscale.data.indexed import prepare
    from cptscale.data.ingest import ingest
    from cptscale.data.sources import parse_sources
    from cptscale.data.tokenizer import Tokenizer, train_tokenizer
    from cptscale.train.evaluate import text_bytes
    from cptscale.train.launch import run_spec

    docs = tmp_path / "data" / "en" / "docs.parquet"
    src = parse_sources([{"name": "licenses", "kind": "local", "paths": [str(LICENSES / "*")], "format": "txt",
                          "split": "paragraphs"}])
    ingest("en", src, docs, progress=False)
    tok_path = tmp_path / "tok" / "tokenizer.json"
    train_tokenizer([docs], tok_path, vocab_size=512, sample_chars_per_language=400_000, valid_tokens=3000,
                    progress=False)
    man = prepare("en", docs, tok_path, 3000, docs.parent, workers=1, progress=False)
    assert man["train"]["tokens"] > 50_000 and man["vocab_size"] == 512
    data = {"en": {"train": str(docs.parent / "train"), "valid": str(docs.parent / "valid"),
                   "bytes": man["valid"]["bytes"]}}
    spec = make_spec(tmp_path, data, run_id="real-en", steps=60, every=0, eval_steps=[0], seq=64, mb=8, gb=16,
                     tokenizer=str(tok_path), vocab_size=512)
    spec["schedule"].update(max_lr=0.01, min_lr=0.001, warmup_steps=6, total_steps=60)
    spec["eval"]["max_tokens"] = 1000
    assert run_spec(spec) == 0
    ev = {e["step"]: e for e in read_jsonl(Path(spec["out_dir"]) / "evals.jsonl")}
    print(f"real-text validation loss {ev[0]['loss']:.3f} -> {ev[60]['loss']:.3f}")
    assert ev[60]["loss"] < ev[0]["loss"] - 1.5
    # bits per byte over the capped set
    vds = IndexedDataset(str(docs.parent / "valid"))
    toks = np.concatenate([np.asarray(vds[i], dtype=np.int64) for i in range(len(vds))])
    tok = Tokenizer(tok_path)
    labels = toks[1:1001]
    cuts = [-1, *np.flatnonzero(labels == tok.eod).tolist(), len(labels)]
    n_bytes = sum(len(tok.decode(labels[a + 1:b].tolist()).encode("utf-8")) for a, b in pairwise(cuts))
    for e in ev.values():
        assert e["n_tokens"] == 1000 and e["bytes"] == n_bytes
        assert e["bpb"] == pytest.approx(e["loss"] * e["n_tokens"] / (math.log(2) * n_bytes), rel=1e-12)
    assert n_bytes < man["valid"]["bytes"] / 2  # the old formula divided by all of these
    assert text_bytes(tok_path, toks) == man["valid"]["bytes"]  # the same count over the whole set


# ----------------------------------------------------------------------------------------------
def test_mfu_formula_by_hand():
    """MFU = (6 N + 12 L H Q S) x tokens/s / (GPUs x peak), N = non-embedding + output layer."""
    from cptscale.train.meter import DEFAULT_PEAK_FLOPS, mfu, mfu_flops_per_token, peak_flops

    shape = {"hidden": 32, "layers": 2, "heads": 2, "ffn": 96, "kv_heads": None}
    # per layer: qkv 32x96 + proj 32x32 + fc1 32x192 + fc2 96x32 + 2 RMSNorms x 32 = 13,376;
    # x 2 layers + final norm 32 = 26,784; output layer 256 x 32 = 8,192 (256 is already a multiple
    # of 128); the input embedding (another 8,192) is left out. 6 N = 6 x 34,976 = 209,856;
    # attention 12 x L 2 x H 2 x Q 16 x S 32 = 24,576: 234,432 FLOPs per token.
    assert mfu_flops_per_token(shape, 256, 32) == 234_432
    assert mfu(shape, 256, 32, 1000.0, 1, 1e9) == pytest.approx(0.234432, rel=1e-12)
    assert mfu(shape, 256, 32, 1000.0, 4, 1e9) == pytest.approx(0.058608, rel=1e-12)
    # vocab 300 pads to 384 rows (TP=1) or 512 (TP=2, 256 per shard): the output layer computes them all
    assert mfu_flops_per_token(shape, 300, 32) - mfu_flops_per_token(shape, 256, 32) == 6 * 128 * 32
    assert mfu_flops_per_token(shape, 300, 32, tp=2) - mfu_flops_per_token(shape, 256, 32) == 6 * 256 * 32
    assert peak_flops({}) == DEFAULT_PEAK_FLOPS == 989e12
    assert peak_flops({"resources": {"gpu_peak_flops": 1.979e15}}) == 1.979e15


# ----------------------------------------------------------------------------------------------
# WSD decay branches
def _wsd_spec(root, data, run_id, steps, branches=(), schedule=None):
    spec = make_spec(root, data, run_id=run_id, steps=steps, every=0, eval_steps=[])
    spec["schedule"] = schedule or {"kind": "wsd", "max_lr": 0.01, "min_lr": 0.001, "warmup_steps": 2,
                                    "total_steps": steps, "decay_steps": 4, "decay_shape": "linear",
                                    "branches": list(branches)}
    return spec


def test_wsd_branch_equals_separate_run_and_main_run_is_unchanged(root, data):
    """A 12-step WSD run (decay over steps 8-11) with a branch ending at 8 steps (decay over 6-7): the
    branch's final eval equals a separate 8-step run with the branch's schedule, and the main run
    equals a 12-step run without branches (the branch is run from a snapshot that is restored)."""
    from dataclasses import asdict

    from cptscale.runspec import ScheduleSpec
    from cptscale.train.launch import run_spec

    main = _wsd_spec(root, data, "wsd-branched", 12, branches=[8])
    assert run_spec(main) == 0
    alone = _wsd_spec(root, data, "wsd-8", 8, schedule={**asdict(ScheduleSpec.model_validate(main["schedule"]).make().branch(8)),
                                                        "branches": []})
    assert alone["schedule"]["decay_steps"] == 2 and run_spec(alone) == 0
    plain = _wsd_spec(root, data, "wsd-12", 12)
    assert run_spec(plain) == 0
    out = Path(main["out_dir"])
    done = json.loads((out / "done.json").read_text())
    d8 = json.loads((Path(alone["out_dir"]) / "done.json").read_text())
    d12 = json.loads((Path(plain["out_dir"]) / "done.json").read_text())
    (br,) = done["branches"]
    assert br["steps"] == 8 and br["tokens"] == 8 * 4 * 32 and set(br["final_loss"]) == {"en", "zh"}
    print("WSD branch vs separate run, main vs unbranched run (max |diff| of final losses):",
          max(abs(br["final_loss"][k] - d8["final_loss"][k]) for k in ("en", "zh")),
          max(abs(done["final_loss"][k] - d12["final_loss"][k]) for k in ("en", "zh")))
    for lang in ("en", "zh"):
        assert abs(br["final_loss"][lang] - d8["final_loss"][lang]) <= 1e-6, lang
        assert abs(done["final_loss"][lang] - d12["final_loss"][lang]) <= 1e-6, lang
    assert br["flops_spent"] == pytest.approx(d8["flops_spent"])
    assert done["flops_spent"] == pytest.approx(d12["flops_spent"])
    evals = read_jsonl(out / "evals.jsonl")
    assert sorted((e["step"], e["lang"]) for e in evals if e.get("branch") == 8) == [(8, "en"), (8, "zh")]
    assert all("branch" not in e for e in evals if e.get("branch") != 8)
    bm = read_jsonl(out / "branch_metrics.jsonl")
    m8 = read_jsonl(Path(alone["out_dir"]) / "metrics.jsonl")
    assert [(r["step"], r["branch"]) for r in bm] == [(6, 8), (7, 8)]
    assert [r["lr"] for r in bm] == [m["lr"] for m in m8[6:]]
    m = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in m] == list(range(12))
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(m, read_jsonl(Path(plain["out_dir"]) / "metrics.jsonl"),
                                                         strict=True)) <= 1e-6
    assert not list(Path(main["checkpoint"]["dir"]).glob("branch_*"))  # the snapshot is gone


def test_sigterm_inside_wsd_branch_resumes_and_redoes_it(root, data):
    """A stop signal during a branch keeps the branch's snapshot as the main run's step_<decay start>;
    the re-run resumes there, redoes the branch and ends exactly like an uninterrupted run."""
    from cptscale.train.engine import Terminated, Trainer, teardown_parallel
    from cptscale.train.launch import run_spec

    ref = Path(root / "runs" / "wsd-branched" / "done.json")
    if not ref.exists():
        assert run_spec(_wsd_spec(root, data, "wsd-branched", 12, branches=[8])) == 0
    spec = _wsd_spec(root, data, "wsd-branch-killed", 12, branches=[8])
    tr = Trainer(spec)
    tr.on_branch_step = lambda total, s: os.kill(os.getpid(), signal.SIGTERM) if s == 7 else None
    with pytest.raises(Terminated, match="inside WSD branch 8"):
        try:
            tr.run()
        finally:
            teardown_parallel()
    d, out = Path(spec["checkpoint"]["dir"]), Path(spec["out_dir"])
    assert sorted(p.name for p in d.iterdir()) == ["step_6"]
    assert run_spec(spec) == 0
    done, want = json.loads((out / "done.json").read_text()), json.loads(ref.read_text())
    assert done["resumed_from"] == 6
    for lang in ("en", "zh"):
        assert abs(done["branches"][0]["final_loss"][lang] - want["branches"][0]["final_loss"][lang]) <= 1e-6
        assert abs(done["final_loss"][lang] - want["final_loss"][lang]) <= 1e-6
    assert [r["step"] for r in read_jsonl(out / "branch_metrics.jsonl")] == [6, 7]  # the aborted try is gone
    assert len([e for e in read_jsonl(out / "evals.jsonl") if "branch" in e]) == 2


def _split_vocab_data(d: Path) -> dict:
    """A source language in ids 1..100 (and EOD 0) and a target in ids 101..255: the target's tokens are ones
    the source model never saw, as Chinese characters are for a model trained on English text."""
    from train_helpers import structured_docs, write_indexed

    def hi(docs):
        return [np.where(x > 0, x + 100, 0).astype(np.int32) for x in docs]

    out = {}
    for lang, shift in (("en", lambda x: x), ("zh", hi)):
        tr = write_indexed(d / lang / "train", shift(structured_docs(200, 3, vocab=101 if lang == "en" else 156)))
        va_docs = shift(structured_docs(12, 4, vocab=101 if lang == "en" else 156))
        out[lang] = {"train": tr, "valid": write_indexed(d / lang / "valid", va_docs),
                     "bytes": int(sum(len(x) for x in va_docs) * 3)}
    return out


def test_cpt_unseen_tokens_start_at_the_mean_of_the_seen_rows(root, capsys):
    """cpt.unseen_tokens: mean. The rows of the 155 ids the source never trained on start at the mean of the
    101 seen rows, in the embedding and the output layer, after the gate checked the checkpoint as saved. The
    target then starts lower than from the source model as saved, and the source language pays at most
    log(1 + 155/101) nats (each unseen logit is the mean of the seen logits: Jensen)."""
    from cptscale.cli import main
    from cptscale.train.engine import Trainer
    from cptscale.train.launch import run_spec
    from cptscale.train.parallel import teardown_parallel

    d = root / "unseen"
    data = _split_vocab_data(d / "data")
    parent = make_spec(d, data, run_id="src-lo", steps=12)
    assert main(["train", "--spec", str(write_spec(d, parent))]) == 0
    keep = _cpt_spec(d, data, parent, "cpt-keep")
    mean = _cpt_spec(d, data, parent, "cpt-mean")
    mean["parent"].update(unseen_tokens="mean", source_data=[data["en"]["train"]])
    assert run_spec(keep) == 0
    capsys.readouterr()
    assert run_spec(mean) == 0
    out = capsys.readouterr().out
    assert out.index("init-sanity gate passed") < out.index("unseen tokens: 155 of 256 ids"), out

    def step0(spec):
        return {e["lang"]: e["loss"] for e in read_jsonl(Path(spec["out_dir"]) / "evals.jsonl") if e["step"] == 0}

    k, m = step0(keep), step0(mean)
    assert k["en"] == pytest.approx(parent_final := json.loads((Path(parent["out_dir"]) / "done.json").read_text())
                                    ["final_loss"]["en"], abs=1e-9)
    # the source pushed the unseen tokens below uniform; the reset gives the 155 of them one shared logit, so
    # each target token gets at most 1/155 of the probability (measured: 6.17 -> 5.57 nats after 12 source steps)
    assert k["zh"] > math.log(VOCAB) and math.log(155) <= m["zh"] < k["zh"] - 0.3, (k, m)
    assert 0 < m["en"] - parent_final <= math.log(1 + 155 / 101), (k, m)
    ev = [e for e in read_jsonl(Path(mean["out_dir"]) / "events.jsonl") if e["event"] == "unseen_tokens_reset"]
    assert len(ev) == 1 and ev[0]["ids"] == 155 and ev[0]["vocab"] == VOCAB

    # the weights themselves, right after the reset
    spec = _cpt_spec(d, data, parent, "cpt-mean-weights")
    spec["parent"].update(unseen_tokens="mean", source_data=[data["en"]["train"]])
    tr = Trainer(spec)
    try:
        tr._validate()
        tr._setup()
        tr._build_model()
        tr._build_parts()
        tr._init_sanity_gate()
        tr._init_unseen_tokens()
        import torch

        gpt = tr.model.module
        for w in (gpt.embedding.word_embeddings.weight, gpt.output_layer.weight):
            w = w.detach().double()
            assert torch.allclose(w[101:VOCAB], w[:101].mean(0).expand(VOCAB - 101, -1), rtol=0, atol=1e-6)
    finally:
        tr.runlog.close()
        teardown_parallel()
    # a spec asking for it without the source data is refused before anything is built
    bad = _cpt_spec(d, data, parent, "cpt-mean-bad")
    bad["parent"]["unseen_tokens"] = "mean"
    capsys.readouterr()
    assert run_spec(bad) != 0
    assert "parent.unseen_tokens 'mean' needs parent.source_data" in capsys.readouterr().err


def test_seen_tokens_names_a_dataset_of_another_tokenizer(root):
    """An id outside the run's vocabulary in the source data: the error names the dataset and the cause."""
    from train_helpers import write_indexed

    from cptscale.train.vocab_init import seen_tokens

    ok = write_indexed(root / "seen" / "ok", [np.array([1, 2, 3, 0], np.int32)])
    assert np.flatnonzero(seen_tokens([ok], VOCAB)).tolist() == [0, 1, 2, 3]
    bad = write_indexed(root / "seen" / "bad", [np.array([1, 300, 0], np.int32)])
    with pytest.raises(ValueError, match=r"seen/bad holds token id 300, outside the vocabulary of 256"):
        seen_tokens([ok, bad], VOCAB)
    with pytest.raises(FileNotFoundError, match=r"missing\.bin/\.idx not found"):
        seen_tokens([str(root / "seen" / "missing")], VOCAB)
