"""Faster stand-ins for pieces of Megatron-Core's local layer spec (the spec used on CPU, and on GPUs
without Transformer Engine). Same parameters, same state dict, same results up to float rounding.

Megatron-Core's local ``DotProductAttention`` computes attention unfused: ``baddbmm`` into a
``[b·heads, s, s]`` score buffer, a masked fill and a softmax over it, then ``bmm``; its backward keeps
the full probability matrix. :class:`SDPACoreAttention` computes the same causal attention with
``torch.nn.functional.scaled_dot_product_attention`` (the fused flash kernel on CPU), which never
materialises the score matrix. Whatever it does not cover (a mask other than the causal one, attention
dropout, a sliding window, a softmax offset, packed sequences) goes to Megatron's own code.

Megatron-Core's unfused RoPE (``apply_rotary_pos_emb``) takes cos and sin of the frequencies again for
every query and key of every layer and ends with ``cat((t, t_pass))``, a copy of the whole tensor even
when ``t_pass`` is empty. :func:`rope_without_copies` computes the same expression, bit for bit, with
cos and sin taken once per frequency tensor and without that copy (2.5 % of a d128l4 step on CPU).
When the model's element-wise fusions are on (``bias_activation_fusion``, set on CUDA devices by
:func:`cptscale.train.model.build_config`), that expression goes through ``torch.compile`` as one kernel.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings import rope_utils
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


def _is_causal_mask(mask: torch.Tensor | None, sq: int, sk: int) -> bool:
    """True for no mask or Megatron's causal mask (True above the diagonal = masked), which is what the
    trainer passes (``step._causal_mask``); any other mask keeps Megatron's attention."""
    if mask is None:
        return True
    if getattr(mask, "_cptscale_causal", None) == (mask._version, sq, sk):
        return True  # checked before (the trainer passes one cached mask per sequence length)
    if mask.dtype != torch.bool or mask.shape[-2:] != (sq, sk) or mask.numel() != sq * sk:
        return False
    if not torch.equal(mask.reshape(sq, sk), _triu(sq, sk, str(mask.device))):
        return False
    mask._cptscale_causal = (mask._version, sq, sk)  # an in-place change bumps _version: checked again
    return True


_TRIU: dict[tuple[int, int, str], torch.Tensor] = {}


def _triu(sq: int, sk: int, device: str) -> torch.Tensor:
    key = (sq, sk, device)
    if key not in _TRIU:
        _TRIU[key] = torch.ones(sq, sk, dtype=torch.bool, device=device).triu(1)
    return _TRIU[key]


class SDPACoreAttention(DotProductAttention):
    """Megatron-Core's ``DotProductAttention`` with its causal, dropout-free case computed by
    ``scaled_dot_product_attention`` (grouped-query attention included). Input ``[s, b, heads, d]``
    (keys and values ``[s, b, groups, d]``), output ``[s, b, heads·d]``, as Megatron's."""

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, attn_mask_type: AttnMaskType | None = None,
                attention_bias: torch.Tensor | None = None, packed_seq_params: Any = None) -> torch.Tensor:
        if not self._fused_ok(query, key, attention_mask, attn_mask_type, attention_bias, packed_seq_params):
            return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                   attention_bias=attention_bias, packed_seq_params=packed_seq_params)
        groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads|groups, s, d]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale,
                                             enable_gqa=groups > 1)
        sq, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)

    def _fused_ok(self, query, key, attention_mask, attn_mask_type, attention_bias, packed_seq_params) -> bool:
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        softmax = self.scale_mask_softmax  # its extra scale (query-key layer scaling) and window: Megatron's path
        return (mask_type == AttnMaskType.causal and query.shape[0] == key.shape[0] and attention_bias is None
                and packed_seq_params is None and self.softmax_offset is None and softmax.window_size is None
                and softmax.scale is None
                and not (self.training and self.attention_dropout.p > 0)
                and _is_causal_mask(attention_mask, query.shape[0], key.shape[0]))


_COS_SIN: list[Any] = []  # (freqs, dtype, cos, sin) of the last frequency tensor seen (one per forward)


def rope_without_copies(t: torch.Tensor, freqs: torch.Tensor, config: Any, cu_seqlens: torch.Tensor | None = None,
                        mscale: float = 1.0, cp_group: Any = None, **kwargs: Any) -> torch.Tensor:
    """Megatron-Core's ``apply_rotary_pos_emb`` (same signature, 0.16 and 0.19) for its common case (unfused,
    not packed, not interleaved, no MLA, no YaRN scale, RoPE over the whole head): ``t·cos + rotate_half(t)·sin``,
    the same operations in the same order, so the same bits. Anything else goes to Megatron's function."""
    if (cu_seqlens is not None or kwargs or mscale != 1.0 or freqs.shape[-1] != t.shape[-1]
            or config.apply_rope_fusion or config.rotary_interleaved or config.multi_latent_attention):
        return rope_utils.apply_rotary_pos_emb(t, freqs, config, cu_seqlens=cu_seqlens, mscale=mscale,
                                               cp_group=cp_group, **kwargs)
    if not (_COS_SIN and _COS_SIN[0] is freqs and _COS_SIN[1] == t.dtype):
        _COS_SIN[:] = [freqs, t.dtype, torch.cos(freqs).to(t.dtype), torch.sin(freqs).to(t.dtype)]
    cos, sin = _COS_SIN[2], _COS_SIN[3]
    if config.bias_activation_fusion:  # the model's element-wise fusions are on (GPU default)
        return _rope_compiled()(t, cos, sin)
    return _rope(t, cos, sin)


def _rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = torch.chunk(t, 2, dim=-1)
    return t * cos + torch.cat((-x2, x1), dim=-1) * sin


@functools.cache
def _rope_compiled():
    """:func:`_rope` through ``torch.compile``: one kernel that reads ``t`` once instead of six passes
    (neg, cat, two mul, add), forward and backward; created on first use."""
    return torch.compile(_rope)


def use_rope_without_copies() -> None:
    """Route Megatron-Core's attention layers to :func:`rope_without_copies` (idempotent; process-wide, and
    every case it does not cover still runs Megatron's own function)."""
    from megatron.core.transformer import attention

    if attention.apply_rotary_pos_emb is not rope_utils.apply_rotary_pos_emb:  # what this replaces
        if attention.apply_rotary_pos_emb is not rope_without_copies:
            raise RuntimeError("megatron.core.transformer.attention.apply_rotary_pos_emb is neither Megatron's nor "
                               "cptscale's: re-check cptscale.train.layers against this megatron-core")
        return
    attention.apply_rotary_pos_emb = rope_without_copies
