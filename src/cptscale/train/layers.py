"""Faster stand-ins for pieces of Megatron-Core's local layer spec (the spec used on CPU, and on GPUs
without Transformer Engine). Same parameters, same state dict, same results up to float rounding.

Megatron-Core's local ``DotProductAttention`` computes attention unfused: ``baddbmm`` into a
``[b·heads, s, s]`` score buffer, a masked fill and a softmax over it, then ``bmm``; its backward keeps
the full probability matrix. :class:`SDPACoreAttention` computes the same causal attention with
``torch.nn.functional.scaled_dot_product_attention`` (the fused flash kernel on CPU), which never
materialises the score matrix. Whatever it does not cover (a mask other than the causal one, attention
dropout, a sliding window, a softmax offset, packed sequences) goes to Megatron's own code.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
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
