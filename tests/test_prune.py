"""Structured pruning (cptscale.prune) on real Megatron-Core GPT models (CPU, tiny shapes)."""

from __future__ import annotations

import contextlib
import itertools

import pytest

pytest.importorskip("megatron.core")

VOCAB = 256
SEQ = 32


@contextlib.contextmanager
def parallel(seed: int = 0):
    from cptscale.train.parallel import setup_parallel, teardown_parallel

    setup_parallel(1, 1, seed)
    try:
        yield
    finally:
        teardown_parallel()


def _model(kv_heads=None, hidden=64, layers=3, heads=4, ffn=96, seed=5):
    import torch

    from cptscale.train.model import build_model

    torch.manual_seed(seed)
    return build_model({"hidden": hidden, "layers": layers, "heads": heads, "ffn": ffn, "kv_heads": kv_heads},
                       VOCAB, SEQ)


def _batches(n=2, b=2, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return [{"tokens": torch.randint(0, VOCAB, (b, SEQ), generator=g),
             "position_ids": torch.arange(SEQ).expand(b, SEQ).contiguous()} for _ in range(n)]


def _logits(model, batch):
    import torch

    from cptscale.prune import _causal_mask

    model.eval()
    with torch.no_grad():
        return model(batch["tokens"], batch["position_ids"], _causal_mask(SEQ, batch["tokens"].device))


def test_qkv_layout_is_grouped_per_query_group():
    """Megatron-Core 0.16.1 fuses QKV as [q_1..q_{h/g}, k, v] per query group: zeroing one group's
    rows (as cptscale.prune indexes them) must zero exactly that group's query heads, key and value."""
    import torch

    from cptscale.prune import _qkv_rows

    with parallel():
        m = _model(kv_heads=2, heads=4)
        att = m.decoder.layers[0].self_attention
        hd = m.config.kv_channels
        with torch.no_grad():
            att.linear_qkv.weight[torch.tensor(_qkv_rows([1], 2, hd))] = 0
            q, k, v = att.get_query_key_value_tensors(torch.randn(SEQ, 2, 64), None)[:3]
        # q: [s, b, heads, hd]; k, v: [s, b, groups, hd]; group 1 owns query heads 2 and 3
        assert q.shape[2] == 4 and k.shape[2] == 2
        assert q[:, :, 2:].abs().max() == 0 and q[:, :, :2].abs().min() >= 0 and q[:, :, :2].abs().max() > 0
        assert k[:, :, 1].abs().max() == 0 and v[:, :, 1].abs().max() == 0
        assert k[:, :, 0].abs().max() > 0 and v[:, :, 0].abs().max() > 0


TARGETS = [{"heads": 2}, {"ffn": 40}, {"layers": 2}, {"heads": 2, "ffn": 50, "layers": 1},
           {"heads": 2, "layers": 2}]


@pytest.mark.parametrize("importance", ["activation", "weight"])
@pytest.mark.parametrize("kv_heads", [None, 2])
@pytest.mark.parametrize("target", TARGETS, ids=lambda t: "-".join(f"{k}{v}" for k, v in t.items()))
def test_pruned_equals_zeroed_unpruned(target, kv_heads, importance):
    """The pruned model's logits equal the unpruned model's with the pruned units zeroed.

    Head and layer pruning are bit-exact (the kept heads' attention is computed identically and a
    zeroed block adds exactly 0 to the residual); channel pruning differs by float32 round-off
    because the fc2 matmul sums over fewer terms in another blocking order (~1e-7 observed at logit
    magnitudes ~0.6, i.e. ~1 ulp); bound 1e-5."""
    import torch

    from cptscale import prune as P
    from cptscale.train.model import count_params

    with parallel():
        m = _model(kv_heads=kv_heads)
        batches = _batches()
        scores = P.compute_importance(m, batches, importance)
        plan = P.plan_pruning(m, target, scores)
        small = P.apply_plan(m, plan)
        shape = P.model_shape(small)
        for k, v in target.items():
            assert getattr(shape, k) == v
        assert shape.head_dim == 16 and shape.hidden == 64
        assert shape.query_groups == (shape.heads if kv_heads is None else shape.heads // 2)
        assert count_params(small) == shape.params(VOCAB) < count_params(m)
        before = _logits(m, batches[0])
        P.zero_pruned(m, plan)
        zeroed = _logits(m, batches[0])
        pruned = _logits(small, batches[0])
        diff = float((pruned - zeroed).abs().max())
        assert diff <= 1e-5, f"pruned vs zeroed logits differ by {diff:.3g}"
        assert float((pruned - before).abs().max()) > 1e-3, "pruning must change the function"
        if "ffn" not in target:
            assert torch.equal(pruned, zeroed)


def test_pruned_model_trains_and_prunes_again():
    """A pruned model is an ordinary GPTModel: it back-propagates, and can be pruned again."""
    import torch

    from cptscale import prune as P

    with parallel():
        m = _model(kv_heads=2)
        small, plan1 = P.prune(m, {"heads": 2, "ffn": 64}, batches=_batches())
        b = _batches(1)[0]
        loss = small(b["tokens"], b["position_ids"], P._causal_mask(SEQ, b["tokens"].device),
                     labels=b["tokens"]).mean()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in small.parameters())
        smaller, plan2 = P.prune(small, {"layers": 2, "ffn": 32}, importance="weight")
        assert P.model_shape(smaller).as_dict() == {"hidden": 64, "layers": 2, "heads": 2, "ffn": 32,
                                                    "kv_heads": 1, "head_dim": 16}
        assert plan2.source == plan1.target


@pytest.mark.parametrize("importance", ["activation", "weight"])
def test_importance_finds_planted_dead_units(importance):
    """Units made useless by hand score lowest and are the ones pruned."""
    import torch

    from cptscale import prune as P

    with parallel():
        m = _model(kv_heads=None, layers=3, heads=4)
        hd, f = 16, 96
        with torch.no_grad():
            lay = m.decoder.layers
            # layer 1: a near-identity block (tiny output projections)
            lay[1].self_attention.linear_proj.weight.mul_(1e-4)
            lay[1].mlp.linear_fc2.weight.mul_(1e-4)
            # layer 0: head 2 dead (its value rows and projection columns zero)
            att = lay[0].self_attention
            rows = P._qkv_rows([2], 1, hd)
            att.linear_qkv.weight[torch.tensor(rows[2 * hd:])] = 0  # v rows of group 2
            att.linear_proj.weight[:, 2 * hd:3 * hd] = 0
            # layer 2: channels 5 and 7 dead (gate, up rows and fc2 columns zero)
            mlp = lay[2].mlp
            for c in (5, 7):
                mlp.linear_fc1.weight[[c, f + c]] = 0
                mlp.linear_fc2.weight[:, c] = 0
        scores = P.compute_importance(m, _batches(), importance)
        assert int(scores.layers.argmin()) == 1
        assert int(scores.groups[0].argmin()) == 2
        assert sorted(int(i) for i in scores.channels[2].argsort()[:2]) == [5, 7]
        plan = P.plan_pruning(m, {"layers": 2, "heads": 3, "ffn": 94}, scores)
        assert plan.layers == [0, 2]
        assert plan.groups[0] == [0, 1, 3]
        assert 5 not in plan.channels[1] and 7 not in plan.channels[1]


def test_incremental_targets():
    from cptscale.prune import PruneError, incremental_targets

    start = {"hidden": 128, "layers": 4, "heads": 8, "ffn": 352, "kv_heads": None}
    steps = incremental_targets(start, {"heads": 2, "ffn": 88, "layers": 2}, 3)
    assert [s["heads"] for s in steps] == [6, 4, 2]
    assert [s["ffn"] for s in steps] == [264, 176, 88]
    assert [s["layers"] for s in steps] == [3, 3, 2]  # round(2/3), round(4/3), 2
    assert all(s["hidden"] == 128 and s["head_dim"] == 16 and s["kv_heads"] is None for s in steps)
    # GQA: heads move in whole query groups
    gqa = {"hidden": 128, "layers": 4, "heads": 8, "ffn": 352, "kv_heads": 4}
    steps = incremental_targets(gqa, {"heads": 2}, 4)
    assert [(s["heads"], s["kv_heads"]) for s in steps] == [(6, 3), (4, 2), (4, 2), (2, 1)]
    for a, b in itertools.pairwise(steps):
        assert all(b[k] <= a[k] for k in ("heads", "ffn", "layers"))
        assert b["heads"] % 2 == 0 and b["heads"] // b["kv_heads"] == 2
    assert incremental_targets(start, {"ffn": 100}, 1) == [{**start, "ffn": 100, "head_dim": 16}]
    with pytest.raises(PruneError, match="k must be"):
        incremental_targets(start, {"ffn": 100}, 0)
    with pytest.raises(PruneError, match="heads per group"):
        incremental_targets(gqa, {"heads": 3}, 2)


def test_bad_targets_name_the_field():
    from cptscale.prune import PrunedShape, PruneError, resolve_target

    cur = PrunedShape(64, 3, 4, 96, 2)
    for target, needle in [({"ffn": 128}, "cannot grow"), ({"hidden": 32}, "hidden"),
                           ({"heads": 3}, "heads per group"), ({"heads": 2, "kv_heads": 2}, "kv_heads"),
                           ({"head_dim": 8}, "head_dim"), ({"width": 3}, "unknown field"),
                           ({"layers": 0}, "layers")]:
        with pytest.raises(PruneError, match=needle):
            resolve_target(cur, target)


def test_refuses_tensor_parallel_models():
    from cptscale import prune as P

    with parallel():
        m = _model()
        m.config.tensor_model_parallel_size = 2  # as a TP=2 rank's model would report
        with pytest.raises(P.PruneError, match="TP=1, PP=1 only"):
            P.compute_importance(m, _batches(), "weight")


def test_pruned_shape_flops_and_params():
    from cptscale.compute import flops_per_token as fpt
    from cptscale.ladder import get_shape
    from cptscale.prune import PrunedShape, flops_per_token

    ladder = get_shape("d128l4")
    same = PrunedShape(ladder.hidden, ladder.layers, ladder.heads, ladder.ffn)
    assert same.params(VOCAB) == ladder.params(VOCAB)
    assert flops_per_token(same, VOCAB, 64) == fpt(ladder, VOCAB, 64)
    half = PrunedShape(128, 4, 2, ladder.ffn, None, 32)  # head_dim stays 32 with 2 heads
    assert half.layer_params() == 128 * (2 + 2 * 2) * 32 + 2 * 32 * 128 + 3 * 128 * ladder.ffn + 2 * 128
    assert flops_per_token(half, VOCAB, 64) < flops_per_token(same, VOCAB, 64)


def test_cli_prune_schedule(capsys):
    """``cptscale prune`` (prune.add_commands; cli.COMMAND_MODULES decides whether it is registered)."""
    import argparse
    import json

    from cptscale.commands.prune import add_commands
    from cptscale.errors import CLIError

    ap = argparse.ArgumentParser()
    add_commands(ap.add_subparsers())

    def main(argv):
        args = ap.parse_args(argv)
        try:
            return args.func(args)
        except CLIError as exc:
            print(exc, file=__import__("sys").stderr)
            return 2

    assert main(["prune", "d128l4", "--to", "heads=2,ffn=176", "--k", "3", "--first-step", "10",
                 "--last-step", "30", "--vocab", "256"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [e["step"] for e in out["events"]] == [10, 20, 30]
    assert out["events"][-1]["shape"] == {"hidden": 128, "layers": 4, "heads": 2, "ffn": 176, "kv_heads": None,
                                          "head_dim": 32}
    assert out["params"] == sorted(out["params"], reverse=True) and out["compression"] > 1
    assert main(["prune", "d128l4", "--to", "heads=3x", "--first-step", "1"]) == 2
    assert "key=integer" in capsys.readouterr().err
    assert main(["prune", "d128l4", "--to", "ffn=999", "--first-step", "1"]) == 2
    assert "cannot grow" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# the trainer's "prune" spec key (tiny runs on the generated structured corpus)
@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("prune")


@pytest.fixture(scope="module")
def data(root):
    from train_helpers import make_data

    return make_data(root / "data")


def _pspec(root, data, run_id, events, *, steps=12, every=5, importance="activation", **kw):
    from train_helpers import make_spec

    spec = make_spec(root, data, run_id=run_id, steps=steps, every=every, **kw)
    spec["prune"] = {"importance": importance, "calib_batches": 2, "events": events}
    return spec


# d32l2: hidden 32, 2 layers, 2 heads (head_dim 16), ffn 96
EVENTS = [{"step": 3, "shape": {"hidden": 32, "layers": 2, "heads": 1, "ffn": 48, "kv_heads": None}},
          {"step": 7, "shape": {"hidden": 32, "layers": 1, "heads": 1, "ffn": 48, "kv_heads": None}}]


def test_prune_spec_validation_names_field(root, data):
    import json

    from cptscale.runspec import RunSpec, SpecError

    good = _pspec(root, data, "v", EVENTS)
    RunSpec.parse(good)
    for mutate, needle in [
        (lambda s: s["prune"].update(importance="grad"), "prune.importance"),
        (lambda s: s["prune"].update(calib_batches=0), "calib_batches"),
        (lambda s: s["prune"].update(foo=1), "prune.foo"),
        (lambda s: s["prune"].update(events=[]), "prune.events"),
        (lambda s: s["prune"]["events"][0].update(step=12), r"prune.events\[0\].step"),
        (lambda s: s["prune"]["events"][1].update(step=3), r"prune.events\[1\].step"),
        (lambda s: s["prune"]["events"][0]["shape"].update(ffn=200), r"prune.events\[0\].shape.*cannot grow"),
        (lambda s: s["prune"]["events"][1]["shape"].update(heads=2), r"prune.events\[1\].shape.*cannot grow"),
        (lambda s: s["prune"]["events"][0]["shape"].update(hidden=16), r"prune.events\[0\].shape.*hidden"),
        (lambda s: s["prune"]["events"][0].update(when=3), r"prune.events\[0\]"),
        (lambda s: s["layout"].update(tp=2), "prune needs layout.tp"),
    ]:
        bad = json.loads(json.dumps(good))
        mutate(bad)
        with pytest.raises(SpecError, match=needle):
            RunSpec.parse(bad)
    # a pruned shape as a run's own shape (the small model trained from scratch): head_dim given
    small = json.loads(json.dumps(good))
    small.pop("prune")
    small["shape"].update(heads=1, ffn=48, head_dim=16)
    RunSpec.parse(small)


def _expected(shapes):
    from cptscale.prune import PrunedShape, flops_per_token

    out = []
    for sh in shapes:
        ps_ = PrunedShape.from_dict(sh)
        out.append((ps_.params(256), flops_per_token(ps_, 256, 32)))
    return out


@pytest.fixture(scope="module")
def pruned_run(root, data):
    from cptscale.train.launch import run_spec

    spec = _pspec(root, data, "pruned", EVENTS, eval_steps=[0, 3, 6, 9])
    assert run_spec(spec) == 0
    return spec


def test_pruned_run_bookkeeping(pruned_run):
    """params / shape / FLOPs per step, evals and done.json after two prune events."""
    import json
    from pathlib import Path

    from train_helpers import read_jsonl

    out = Path(pruned_run["out_dir"])
    m = read_jsonl(out / "metrics.jsonl")
    start = {**pruned_run["shape"], "head_dim": 16}
    (p0, f0), (p1, f1), (p2, f2) = _expected([start, EVENTS[0]["shape"] | {"head_dim": 16},
                                              EVENTS[1]["shape"] | {"head_dim": 16}])
    assert p0 > p1 > p2
    assert [r["params"] for r in m] == [p0] * 3 + [p1] * 4 + [p2] * 5
    tps = 4 * 32
    want = 0.0
    for r, f in zip(m, [f0] * 3 + [f1] * 4 + [f2] * 5, strict=True):
        want += f * tps
        assert r["flops"] == pytest.approx(want, rel=1e-12)
    assert m[-1]["flops_6nd"] == pytest.approx(6 * tps * (3 * p0 + 4 * p1 + 5 * p2), rel=1e-12)
    ev = {(e["step"], e["lang"]): e for e in read_jsonl(out / "evals.jsonl")}
    assert ev[(0, "en")]["flops"] == 0 and ev[(0, "en")]["params"] == p0
    assert ev[(3, "en")]["params"] == p0  # an eval at step s is before the prune at s
    assert ev[(9, "en")]["flops"] == m[8]["flops"] and ev[(9, "en")]["params"] == p2
    assert ev[(12, "en")]["loss"] < ev[(0, "en")]["loss"] - 0.2, "loss must fall on the structured corpus"
    pr = read_jsonl(out / "prune.jsonl")
    assert [(r["step"], r["params_before"], r["params"]) for r in pr] == [(3, p0, p1), (7, p1, p2)]
    assert pr[0]["calib_samples"] == [8, 12]  # the 2 x 2 samples of step 2 and pr[0]["importance"] == "activation"
    assert len(pr[1]["kept"]["layers"]) == 1 and len(pr[0]["kept"]["channels"][0]) == 48
    done = json.loads((out / "done.json").read_text())
    assert done["params"] == p0 and done["final_params"] == p2
    assert done["flops_spent"] == m[-1]["flops"] and done["flops_spent_6nd"] == m[-1]["flops_6nd"]
    assert done["final_shape"] == {"hidden": 32, "layers": 1, "heads": 1, "ffn": 48, "kv_heads": None,
                                   "head_dim": 16}
    assert done["final_loss"]["en"] == ev[(12, "en")]["loss"]


def test_pruned_final_checkpoint_loads_at_its_shape(pruned_run):
    """A CPT run from a pruned source builds the model at the final checkpoint's shape."""
    import json
    from pathlib import Path

    from cptscale.train import checkpoint as ck
    from cptscale.train.evaluate import evaluate_model
    from cptscale.train.model import build_model

    done = json.loads((Path(pruned_run["out_dir"]) / "done.json").read_text())
    state = ck.read_state(done["final_checkpoint"])
    assert state["shape"] == done["final_shape"]
    with parallel():
        model = build_model(state["shape"], 256, 32)
        ck.load_weights(done["final_checkpoint"], model)
        loss = evaluate_model(model, pruned_run["eval"]["languages"]["en"]["prefix"], 32, 4)["loss"]
    assert abs(loss - done["final_loss"]["en"]) < 1e-9


def test_resume_after_prune_is_exact(root, data, pruned_run, capsys):
    """Killed after the first prune (checkpoint at the pruned shape), resumed at the step of the
    second prune event: losses, FLOPs and pruning decisions equal the uninterrupted run's."""
    import json
    from pathlib import Path

    from train_helpers import read_jsonl, run_until_sigterm

    from cptscale.train.launch import run_spec

    b = _pspec(root, data, "pruned-killed", EVENTS, eval_steps=[0, 3, 6, 9])
    run_until_sigterm(b, 7)
    ckpt = Path(b["checkpoint"]["dir"]) / "step_7"
    state = json.loads((ckpt / "state.json").read_text())
    assert state["shape"]["heads"] == 1 and state["shape"]["layers"] == 2  # after event 1, before event 2
    # a spec whose events no longer match the checkpoint is refused with a clear message
    changed = json.loads(json.dumps(b))
    changed["prune"]["events"][0]["shape"]["ffn"] = 64
    capsys.readouterr()
    assert run_spec(changed) == 3  # permanent: a retry cannot change it
    assert "prune events give" in capsys.readouterr().err
    assert run_spec(b) == 0
    out_a, out_b = Path(pruned_run["out_dir"]), Path(b["out_dir"])
    done = json.loads((out_b / "done.json").read_text())
    assert done["resumed_from"] == 7
    ma, mb_ = read_jsonl(out_a / "metrics.jsonl"), read_jsonl(out_b / "metrics.jsonl")
    assert [r["step"] for r in mb_] == list(range(12))
    diff = max(abs(x["loss"] - y["loss"]) for x, y in zip(ma, mb_, strict=True))
    print(f"max resume loss difference {diff:.3g}")
    assert diff <= 1e-6, f"resumed losses differ by {diff:.3g}"
    assert [r["flops"] for r in ma] == [r["flops"] for r in mb_]
    assert [r["params"] for r in ma] == [r["params"] for r in mb_]
    pa, pb = read_jsonl(out_a / "prune.jsonl"), read_jsonl(out_b / "prune.jsonl")
    assert [(r["step"], r["kept"]) for r in pa] == [(r["step"], r["kept"]) for r in pb]
    assert json.loads((out_a / "done.json").read_text())["flops_spent"] == done["flops_spent"]


def test_cpt_prunes_source_at_step0_after_gate(root, data, pruned_run, capsys):
    """CPT with a prune at step 0: the init-sanity gate checks the unpruned loaded model (its loss
    must equal the source run's), then the model is pruned before the first step."""
    import json
    from pathlib import Path

    from train_helpers import make_spec, read_jsonl

    from cptscale.train.launch import run_spec

    src = make_spec(root, data, run_id="src-en", steps=6, eval_steps=[])
    assert run_spec(src) == 0
    sdone = json.loads((Path(src["out_dir"]) / "done.json").read_text())
    par = {"run_id": "src-en", "checkpoint": sdone["final_checkpoint"], "lang": "en",
           "final_loss": sdone["final_loss"]["en"], "tolerance": 1e-6}
    spec = _pspec(root, data, "cpt-pruned", [{"step": 0, "shape": {"heads": 1, "ffn": 48}}], steps=4,
                  every=0, importance="weight", lang="zh", init="cpt", parent=par, eval_steps=[0])
    assert run_spec(spec) == 0
    assert "init-sanity gate passed" in capsys.readouterr().out
    out = Path(spec["out_dir"])
    ev0 = next(e for e in read_jsonl(out / "evals.jsonl") if e["step"] == 0 and e["lang"] == "en")
    assert abs(ev0["loss"] - par["final_loss"]) < 1e-9  # step-0 eval: the unpruned source model
    pr = read_jsonl(out / "prune.jsonl")
    assert len(pr) == 1 and pr[0]["step"] == 0 and pr[0]["calib_samples"] == [0, 4]
    (p0, _), (p1, _) = _expected([{**spec["shape"], "head_dim": 16},
                                  {"hidden": 32, "layers": 2, "heads": 1, "ffn": 48, "head_dim": 16}])
    assert [r["params"] for r in read_jsonl(out / "metrics.jsonl")] == [p1] * 4
    done = json.loads((out / "done.json").read_text())
    assert done["params"] == p0 and done["final_params"] == p1


@pytest.mark.slow
def test_pruned_run_data_parallel_matches(root, data, pruned_run):
    """DP=2 (two gloo processes through torchrun): both ranks prune the same units (scores are
    broadcast from rank 0), the rebuilt DDP wrapper averages gradients, and the loss curve matches
    the DP=1 run to fp32 reduction-order noise (bound as in test_train_parallel: 1e-4)."""
    import json
    from pathlib import Path

    from train_helpers import read_jsonl, write_spec

    from cptscale.cli import main

    spec = _pspec(root, data, "pruned-dp2", EVENTS, eval_steps=[0, 3, 6, 9], dp=2)
    assert main(["train", "--spec", str(write_spec(root, spec))]) == 0
    a, b = Path(pruned_run["out_dir"]), Path(spec["out_dir"])
    assert json.loads((b / "done.json").read_text())["world_size"] == 2
    la = [m["loss"] for m in read_jsonl(a / "metrics.jsonl")]
    lb = [m["loss"] for m in read_jsonl(b / "metrics.jsonl")]
    diff = max(abs(x - y) for x, y in zip(la, lb, strict=True))
    print(f"DP=2 vs DP=1 max loss difference {diff:.3g}")
    assert diff < 1e-4
    pa, pb = read_jsonl(a / "prune.jsonl"), read_jsonl(b / "prune.jsonl")
    assert [(r["step"], r["kept"]) for r in pa] == [(r["step"], r["kept"]) for r in pb]
