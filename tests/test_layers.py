"""cptscale.train.layers against the Megatron-Core modules they stand in for: the same outputs and
gradients (fp32, up to float rounding: the fused kernel sums in another order), and Megatron's own code for
every case the fused path does not cover."""

from __future__ import annotations

import pytest

pytest.importorskip("megatron.core")


@pytest.fixture(scope="module")
def parallel():
    from cptscale.train.parallel import setup_parallel, teardown_parallel

    setup_parallel(1, 1, 0)
    yield
    teardown_parallel()


def _pair(heads: int, groups: int, **cfg):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from cptscale.train.layers import SDPACoreAttention
    from cptscale.train.model import build_config

    config = build_config({"layers": 1, "hidden": 16 * heads, "heads": heads, "kv_heads": groups, "ffn": 32})
    for k, v in cfg.items():
        setattr(config, k, v)
    kw = {"config": config, "layer_number": 1, "attn_mask_type": AttnMaskType.causal, "attention_type": "self"}
    return DotProductAttention(**kw), SDPACoreAttention(**kw)


def _qkv(s: int, b: int, heads: int, groups: int, d: int = 16):
    import torch

    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, b, n, d, generator=g, requires_grad=True) for n in (heads, groups, groups)]


def _mask(s: int):
    import torch

    return torch.ones(1, 1, s, s, dtype=torch.bool).triu(1)  # what step._causal_mask passes


@pytest.mark.parametrize(("heads", "groups"), [(4, 4), (4, 2), (6, 1)])
def test_sdpa_core_attention_matches_megatron(parallel, heads, groups):
    """Causal attention, multi-head and grouped-query: outputs and input gradients agree to fp32 rounding."""
    import torch

    ref, fused = _pair(heads, groups)
    s, b = 24, 3
    outs, grads = [], []
    for mod in (ref, fused):
        q, k, v = _qkv(s, b, heads, groups)
        out = mod(q, k, v, _mask(s), attn_mask_type=None)
        assert out.shape == (s, b, heads * 16)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outs.append(out.detach())
        grads.append([t.grad for t in (q, k, v)])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    for a, b_ in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-6)
    # a sanity check that the comparison can fail: non-causal attention differs
    q, k, v = _qkv(s, b, heads, groups)
    full = torch.nn.functional.scaled_dot_product_attention(
        *(t.permute(1, 2, 0, 3) for t in (q, k, v)), enable_gqa=groups < heads).permute(2, 0, 1, 3).reshape(s, b, -1)
    assert (full - outs[0]).abs().max() > 1e-2


def test_sdpa_core_attention_leaves_other_masks_to_megatron(parallel):
    """A mask other than the causal one (here: also masking the first key) takes Megatron's path: the
    same result as DotProductAttention, which the fused causal kernel would not give."""
    import torch

    ref, fused = _pair(4, 4)
    s = 12
    mask = _mask(s).clone()
    mask[..., 1:, 0] = True
    q, k, v = _qkv(s, 2, 4, 4)
    want = ref(q, k, v, mask)
    torch.testing.assert_close(fused(q, k, v, mask), want, rtol=0, atol=0)
    assert (fused(q, k, v, _mask(s)) - want).abs().max() > 1e-3
    # an in-place change to a mask checked before is seen
    m = _mask(s)
    fused(q, k, v, m)
    m[..., 1:, 0] = True
    torch.testing.assert_close(fused(q, k, v, m), want, rtol=0, atol=0)


def test_sdpa_core_attention_leaves_dropout_to_megatron(parallel):
    """Attention dropout in training is Megatron's code (its RNG tracker), not the fused kernel."""
    _, fused = _pair(4, 4, attention_dropout=0.1)
    fused.attention_dropout.p = 0.1
    fused.train()
    s = 8
    q, k, _ = _qkv(s, 1, 4, 4)
    assert not fused._fused_ok(q, k, _mask(s), None, None, None)
    fused.eval()
    assert fused._fused_ok(q, k, _mask(s), None, None, None)


def test_built_model_uses_sdpa_core_attention(parallel):
    from cptscale.train.layers import SDPACoreAttention
    from cptscale.train.model import build_model

    model = build_model({"layers": 2, "hidden": 32, "heads": 4, "ffn": 64}, 300, 16, te=False)
    cores = [layer.self_attention.core_attention for layer in model.decoder.layers]
    assert len(cores) == 2 and all(isinstance(c, SDPACoreAttention) for c in cores)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rope_without_copies_is_megatrons_rope_bit_for_bit(parallel, dtype):
    """Same values and the same input gradients as Megatron-Core's unfused RoPE (no tolerance: the same
    operations in the same order); the cases it does not cover (YaRN scale, interleaving) are Megatron's."""
    import torch
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from cptscale.train.layers import rope_without_copies
    from cptscale.train.model import build_config

    config = build_config({"layers": 1, "hidden": 64, "heads": 4, "ffn": 32})
    freqs = RotaryEmbedding(kv_channels=16, rotary_percent=1.0, rotary_base=10000)(12)  # [s, 1, 1, d]
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 2, 4, 16, generator=g).to(dt)
    outs, grads = [], []
    for fn in (apply_rotary_pos_emb, rope_without_copies):
        t = x.clone().requires_grad_(True)
        y = fn(t, freqs, config)
        (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append(y.detach())
        grads.append(t.grad)
    assert outs[1].dtype == dt and torch.equal(outs[1], outs[0]) and torch.equal(grads[1], grads[0])
    assert not torch.equal(outs[0], x)  # the rotation did something
    # a YaRN scale goes to Megatron's function (same result as calling it)
    assert torch.equal(rope_without_copies(x, freqs, config, mscale=1.3), apply_rotary_pos_emb(x, freqs, config, mscale=1.3))


def test_built_model_routes_rope_to_rope_without_copies(parallel):
    from megatron.core.transformer import attention

    from cptscale.train.layers import rope_without_copies
    from cptscale.train.model import build_model

    build_model({"layers": 1, "hidden": 32, "heads": 4, "ffn": 64}, 300, 16, te=False)
    assert attention.apply_rotary_pos_emb is rope_without_copies


def test_fused_elementwise_model_matches_unfused(parallel):
    """``fused=True`` (the GPU default: Megatron's compiled SwiGLU, cptscale's compiled RoPE) computes the
    same model: same loss and parameter gradients as the unfused one from the same weights (fp32 on CPU
    through torch.compile's C++ backend, up to float rounding). Megatron's fused cross-entropy casts its
    gradient to bf16, so an fp32 model keeps the plain one."""
    import torch

    from cptscale.train.model import build_model

    shape = {"layers": 2, "hidden": 32, "heads": 4, "ffn": 64}
    torch.manual_seed(0)
    plain = build_model(shape, 300, 16, te=False, fused=False)
    fused = build_model(shape, 300, 16, te=False, fused=True)
    fused.load_state_dict(plain.state_dict())
    assert fused.config.bias_activation_fusion and not fused.config.cross_entropy_loss_fusion
    assert not plain.config.bias_activation_fusion
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 300, (2, 17), generator=g)
    pos = torch.arange(16).expand(2, 16)
    mask = torch.ones(16, 16, dtype=torch.bool).triu(1)
    losses = []
    for m in (plain, fused):
        m.zero_grad()
        loss = m(tokens[:, :-1], pos, mask, labels=tokens[:, 1:]).mean()
        loss.backward()
        losses.append(loss.detach())
    assert torch.allclose(losses[0], losses[1], rtol=1e-5)
    for (name, p), q in zip(plain.named_parameters(), fused.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), name
    assert float(losses[0]) > 5.0  # a random 300-token model: about ln 300
