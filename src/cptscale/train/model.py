"""Build Megatron-Core's GPTModel (LLaMA-2 style) from a run spec's shape."""

from __future__ import annotations

from typing import Any


def use_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def build_config(shape: dict[str, Any], *, init_std: float = 0.02, tp: int = 1, pp: int = 1,
                 bf16: bool = False):
    import torch
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    gpu = use_gpu()
    dtype = torch.bfloat16 if bf16 else torch.float32
    return TransformerConfig(
        num_layers=shape["layers"], hidden_size=shape["hidden"], num_attention_heads=shape["heads"],
        num_query_groups=shape.get("kv_heads") or None, ffn_hidden_size=shape["ffn"],
        kv_channels=shape.get("head_dim") or None,  # set for pruned shapes (head_dim != hidden / heads)
        init_method_std=init_std, normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, add_qkv_bias=False, hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, pipeline_dtype=dtype,
        params_dtype=dtype, bf16=bf16, use_cpu_initialization=not gpu,
        gradient_accumulation_fusion=False, masked_softmax_fusion=False, bias_activation_fusion=False,
        bias_dropout_fusion=False, persist_layer_norm=False, apply_rope_fusion=False,
        sequence_parallel=False,
    )


def build_model(shape: dict[str, Any], vocab_size: int, seq_length: int, *, init_std: float = 0.02,
                tp: int = 1, pp: int = 1, bf16: bool = False, te: bool | None = None):
    """GPTModel for this rank's pipeline stage (parallel state must be initialised)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from cptscale.ladder import padded_vocab

    config = build_config(shape, init_std=init_std, tp=tp, pp=pp, bf16=bf16)
    if te is None:
        te = use_gpu() and _has_te()
    if te:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        spec = get_gpt_layer_with_transformer_engine_spec()
    else:
        spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    model = GPTModel(
        config=config, transformer_layer_spec=spec, vocab_size=padded_vocab(vocab_size, tp),
        max_sequence_length=seq_length, pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(), share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
    )
    if use_gpu():
        model.cuda()
    return model


def _has_te() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())
