"""Build Megatron-Core's GPTModel (LLaMA-2 style) from a run spec's shape.

``arch`` (optional, from run.json / a checkpoint's state.json) carries what an imported Hugging Face
model has beyond the ladder shape: RoPE base and LLaMA-3 scaling, RMSNorm epsilon, QKV biases
(Qwen2), tied input/output embeddings and its vocabulary padding. Absent keys mean the ladder's own
architecture (see :data:`DEFAULT_ARCH`), so scratch runs and their checkpoints are unchanged.
"""

from __future__ import annotations

import functools
from typing import Any

#: The architecture of the ladder's models (what an absent ``arch`` key means).
DEFAULT_ARCH: dict[str, Any] = {
    "rope_theta": 10000.0, "rope_scaling": None, "norm_eps": 1e-5, "qkv_bias": False, "tie_embeddings": False,
    "vocab_divisor": None,
}
ARCH_KEYS = (*DEFAULT_ARCH, "family", "hf_vocab_size", "max_position_embeddings", "sliding_window")


def resolve_arch(arch: dict[str, Any] | None) -> dict[str, Any]:
    """``arch`` with defaults filled in; unknown keys are an error (a typo would silently change the model)."""
    arch = dict(arch or {})
    unknown = sorted(set(arch) - set(ARCH_KEYS))
    if unknown:
        raise ValueError(f"unknown arch key(s) {', '.join(unknown)}; known: {', '.join(ARCH_KEYS)}")
    return {**DEFAULT_ARCH, **{k: v for k, v in arch.items() if v is not None}}


def model_vocab(vocab_size: int, tp: int = 1, arch: dict[str, Any] | None = None) -> int:
    """Rows of the embedding and output layer: the ladder pads to a multiple of 128 x TP; an imported
    model pads only to its own ``vocab_divisor`` x TP (usually no padding at all: padded rows would add
    logits to the softmax that the source model does not have)."""
    from cptscale.ladder import padded_vocab

    div = resolve_arch(arch)["vocab_divisor"]
    return padded_vocab(vocab_size, tp) if div is None else padded_vocab(vocab_size, tp, divisor=int(div))


def use_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def build_config(shape: dict[str, Any], *, init_std: float = 0.02, tp: int = 1, pp: int = 1,
                 bf16: bool = False, arch: dict[str, Any] | None = None, fused: bool | None = None):
    """Megatron-Core's TransformerConfig for a ladder shape. ``fused`` (default: on a CUDA device where
    ``torch.compile`` works, :func:`fused_elementwise_available`) turns on the element-wise fusions that
    need no Transformer Engine: Megatron's compiled SwiGLU and (bf16 only) cross-entropy, and cptscale's
    compiled RoPE (:func:`cptscale.train.layers.rope_without_copies` reads ``bias_activation_fusion``)."""
    import torch
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    a = resolve_arch(arch)
    gpu = use_gpu()
    dtype = torch.bfloat16 if bf16 else torch.float32
    if fused is None:
        fused = gpu and fused_elementwise_available()
    return TransformerConfig(
        num_layers=shape["layers"], hidden_size=shape["hidden"], num_attention_heads=shape["heads"],
        num_query_groups=shape.get("kv_heads") or None, ffn_hidden_size=shape["ffn"],
        kv_channels=shape.get("head_dim") or None,  # set for pruned shapes (head_dim != hidden / heads)
        init_method_std=init_std, normalization="RMSNorm", layernorm_epsilon=float(a["norm_eps"]),
        gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, add_qkv_bias=bool(a["qkv_bias"]), hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, pipeline_dtype=dtype,
        params_dtype=dtype, bf16=bf16, use_cpu_initialization=not gpu,
        gradient_accumulation_fusion=False, masked_softmax_fusion=False, bias_activation_fusion=bool(fused),
        # Megatron's native fused cross-entropy returns its logits gradient in bf16: bf16 models only
        cross_entropy_loss_fusion=bool(fused and bf16), cross_entropy_fusion_impl="native",
        bias_dropout_fusion=False, persist_layer_norm=False, apply_rope_fusion=False,
        sequence_parallel=False,
    )


@functools.cache
def fused_elementwise_available() -> bool:
    """Whether ``torch.compile`` fuses element-wise work here: a CUDA device, Triton, and a trial compile
    that runs (checked once per process). Without Transformer Engine these fusions are the ones left
    (measured on an H200 without them: RoPE, SwiGLU and the loss ~20 % of a 992M step in ``mul``/``cat``)."""
    import logging

    import torch

    if not torch.cuda.is_available():
        return False
    try:
        from torch.utils._triton import has_triton

        if not has_triton():
            return False
        x = torch.randn(64, device="cuda")
        y = torch.compile(lambda t: torch.nn.functional.silu(t) * t)(x)
        return bool(torch.allclose(y, torch.nn.functional.silu(x) * x, atol=1e-5))
    except Exception as e:  # a broken compiler toolchain: train unfused rather than not at all
        logging.getLogger(__name__).warning("torch.compile does not work here (%s): element-wise fusions off", e)
        return False


def build_model(shape: dict[str, Any], vocab_size: int, seq_length: int, *, init_std: float = 0.02,
                tp: int = 1, pp: int = 1, bf16: bool = False, te: bool | None = None,
                arch: dict[str, Any] | None = None, fused: bool | None = None):
    """GPTModel for this rank's pipeline stage (parallel state must be initialised)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    a = resolve_arch(arch)
    if a.get("sliding_window") and seq_length > int(a["sliding_window"]):
        raise ValueError(f"seq_length {seq_length} exceeds the model's sliding attention window "
                         f"{a['sliding_window']}: Megatron-Core's local attention here is full causal attention, so "
                         "the model would compute something else; use seq_length <= the window")
    config = build_config(shape, init_std=init_std, tp=tp, pp=pp, bf16=bf16, arch=a, fused=fused)
    if te is None:
        te = use_gpu() and _has_te()
    if te:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        spec = get_gpt_layer_with_transformer_engine_spec()
    else:
        spec = local_spec()
    scaling = a["rope_scaling"] or {}
    model = GPTModel(
        config=config, transformer_layer_spec=spec, vocab_size=model_vocab(vocab_size, tp, a),
        max_sequence_length=seq_length, pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(), share_embeddings_and_output_weights=bool(a["tie_embeddings"]),
        position_embedding_type="rope", rotary_base=a["rope_theta"],
        rope_scaling=bool(scaling), rope_scaling_factor=float(scaling.get("factor", 8.0)),
    )
    if bf16:
        # what Megatron-LM's Float16Module does: the norms (torch.nn.RMSNorm without TE ignores
        # params_dtype) become bf16 too, else torch.rms_norm falls back from its fused kernel to ~5
        # elementwise kernels per call (measured on an H200: 992M at 32 % MFU, many aten::mul)
        model.bfloat16()
    if use_gpu():
        model.cuda()
    return model


def local_spec():
    """Megatron-Core's local layer spec (no Transformer Engine) with its core attention computed by
    ``scaled_dot_product_attention`` (:class:`cptscale.train.layers.SDPACoreAttention`) and its RoPE
    without Megatron's redundant copies (:func:`cptscale.train.layers.rope_without_copies`): the same
    model, 1-thread engine/plain PyTorch 0.86 -> 0.99 at d256l4 seq 256 on CPU."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from cptscale.train.layers import SDPACoreAttention, use_rope_without_copies

    use_rope_without_copies()
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    return spec


def _has_te() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())
