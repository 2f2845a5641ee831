"""Training FLOPs, counted one way for the whole package: the ``6·N·D`` rule, the exact count from a
model shape (what the trainer, the store, transfer and the IPLT budgets use) and the MFU convention.

A shape is a :class:`cptscale.ladder.ModelShape` (a pruned one, :class:`cptscale.prune.PrunedShape`, is
the same type with its own ``head_dim``): ``hidden``, ``layers``, ``heads``, ``head_dim``, ``query_groups``,
``ffn`` and ``params(vocab, embeddings=, tp=)``.
"""

from __future__ import annotations

from typing import Any

from cptscale.ladder import padded_vocab


def flops_6nd(params: float, tokens: float) -> float:
    """Kaplan/Chinchilla approximation ``C = 6·N·D`` (forward 2ND + backward 4ND)."""
    return 6.0 * float(params) * float(tokens)


def flops_per_token(
    shape: Any, vocab: int, seq_length: int, *, embeddings: bool = True, causal_half: bool = False
) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward); see :func:`flops_exact`."""
    d, L, hd = shape.hidden, shape.layers, shape.head_dim
    d_attn = shape.heads * hd
    qkv = d * (shape.heads + 2 * shape.query_groups) * hd
    proj = d_attn * d
    mlp = 3 * d * shape.ffn  # gate, up, down (SwiGLU)
    matmul = 2 * L * (qkv + proj + mlp)
    attn = 2 * 2 * L * seq_length * d_attn  # QK^T scores and attention x V, full (unmasked) matrix
    if causal_half:
        attn /= 2
    logits = 2 * d * padded_vocab(vocab) if embeddings else 0
    return 3.0 * (matmul + attn + logits)


def flops_exact(
    shape: Any,
    vocab: int,
    seq_length: int,
    tokens: float,
    *,
    embeddings: bool = True,
    causal_half: bool = False,
) -> float:
    """Exact-ish training FLOPs for ``tokens`` tokens of a Megatron LLaMA-style model.

    Forward FLOPs per token (a multiply-add = 2 FLOPs), with d = hidden, L = layers,
    h = heads, g = query groups, hd = head dim, d_attn = h·hd, f = SwiGLU width, V = padded vocab,
    s = seq_length::

        matmuls   2·L·[ d·(h + 2g)·hd      (fused QKV)
                      + d_attn·d           (attention output projection)
                      + 3·d·f ]            (gate, up, down)
        attention 2·2·L·s·d_attn           (QK^T scores + softmax·V, per token, per layer)
        logits    2·d·V                    (output layer; only with ``embeddings=True``)

    Training = 3 x forward (backward = 2 x forward), times ``tokens``. Conventions, stated so the
    numbers are comparable: the attention term counts the full s x s score matrix like Megatron's
    ``num_floating_point_operations`` and PaLM's MFU (pass ``causal_half=True`` to halve it for the
    causal mask, as FlashAttention actually computes); the input embedding is a gather (0 FLOPs) but
    its rows still count as parameters in :func:`flops_6nd`; norms, softmax, SwiGLU activation,
    residual adds and the optimizer step are not counted (O(d) per token, <0.1% at every ladder
    size). ``embeddings=False`` drops the output-logit term (Kaplan's non-embedding compute).
    """
    return flops_per_token(shape, vocab, seq_length, embeddings=embeddings, causal_half=causal_half) * float(
        tokens
    )


def mfu_flops_per_token(shape: Any, vocab: int, seq: int, tp: int = 1) -> float:
    """Training FLOPs per token in the standard MFU convention (Megatron-LM / PaLM appendix B):
    ``6 N + 12 L H Q S`` with N = the non-embedding parameters plus the output layer (the input
    embedding is a table lookup, no matmul, so it is excluded; the output projection is a real
    ``hidden x vocab`` matmul, so it counts), L layers, H heads of size Q, sequence length S (the
    attention score and value matmuls, forward + backward, without halving for the causal mask)."""
    n = shape.params(vocab, embeddings=False, tp=tp) + padded_vocab(vocab, tp) * shape.hidden
    return 6.0 * n + 12.0 * shape.layers * shape.heads * int(shape.head_dim or 0) * seq
