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
    from cptscale.train.engine import setup_parallel, teardown_parallel

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
    from cptscale.ladder import get_shape
    from cptscale.prune import PrunedShape, flops_per_token
    from cptscale.transfer import flops_per_token as fpt

    ladder = get_shape("d128l4")
    same = PrunedShape(ladder.hidden, ladder.layers, ladder.heads, ladder.ffn)
    assert same.params(VOCAB) == ladder.params(VOCAB)
    assert flops_per_token(same, VOCAB, 64) == fpt(ladder, VOCAB, 64)
    half = PrunedShape(128, 4, 2, ladder.ffn, None, 32)  # head_dim stays 32 with 2 heads
    assert half.layer_params() == 128 * (2 + 2 * 2) * 32 + 2 * 32 * 128 + 3 * 128 * ladder.ffn + 2 * 128
    assert flops_per_token(half, VOCAB, 64) < flops_per_token(same, VOCAB, 64)
