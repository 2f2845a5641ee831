"""The model ladder: size name -> LLaMA-2-style shape, and parameter counts from the shape.

Two families:

* the 42 shapes of Zheng et al. 2024, Table 4 (names are the paper's "Param size (M)" column, e.g.
  ``"1393M"``). The paper's "Intermediate" column equals ``2 * 256 * (floor(8d/768) + 1)``, which is
  the fused gate+up width; the per-matrix SwiGLU width used here is half of it. Row 39 prints 22
  heads at d=2688 (non-integer head size); we use 21, as in row 40.
* tiny CPU shapes named ``d<hidden>l<layers>`` (e.g. ``d64l2``) for tests and the laptop demo.

Parameter counts are computed from the shape with the same layout Megatron-Core builds (fused QKV,
gated FC1, RMSNorm weights, untied input/output embeddings, no biases); a test checks them against
the built ``GPTModel``.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

#: Vocabulary padding granularity (Megatron's ``make_vocab_size_divisible_by``), times TP.
VOCAB_DIVISOR = 128


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    layers: int
    heads: int
    ffn: int  #: per-matrix SwiGLU width (gate and up are each hidden x ffn)
    kv_heads: int | None = None  #: query groups (GQA); None = full multi-head attention

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise ValueError(f"{self.name}: hidden {self.hidden} is not divisible by heads {self.heads}")
        if self.kv_heads is not None and self.heads % self.kv_heads:
            raise ValueError(f"{self.name}: heads {self.heads} not divisible by kv_heads {self.kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def query_groups(self) -> int:
        return self.kv_heads or self.heads

    def as_dict(self) -> dict[str, int | str | None]:
        return asdict(self)

    # -- parameter counts ---------------------------------------------------------------------
    def layer_params(self) -> int:
        d, hd = self.hidden, self.head_dim
        qkv = d * (self.heads + 2 * self.query_groups) * hd
        proj = self.heads * hd * d
        mlp = 3 * d * self.ffn
        norms = 2 * d
        return qkv + proj + mlp + norms

    def params(self, vocab: int, *, embeddings: bool = True, tp: int = 1) -> int:
        """Total trainable parameters for a (padded) vocabulary; ``embeddings=False`` drops the
        input embedding and the output projection (Kaplan-style non-embedding count)."""
        body = self.layers * self.layer_params() + self.hidden  # + final norm
        if not embeddings:
            return body
        return body + 2 * padded_vocab(vocab, tp) * self.hidden

    def paper_params(self) -> int:
        """The paper's reported size convention: 16 L d^2 + 32000 d."""
        return 16 * self.layers * self.hidden**2 + 32000 * self.hidden


def padded_vocab(vocab: int, tp: int = 1, divisor: int = VOCAB_DIVISOR) -> int:
    """Vocabulary padded so each tensor-parallel shard is a multiple of ``divisor``."""
    div = divisor * tp
    return int(math.ceil(vocab / div) * div)


def paper_ffn(hidden: int) -> int:
    """Per-matrix SwiGLU width implied by the paper's Intermediate column (half of it)."""
    return 256 * ((8 * hidden) // 768 + 1)


def tiny_ffn(hidden: int) -> int:
    """8d/3 rounded up to a multiple of 32, for the tiny CPU shapes."""
    return 32 * math.ceil(8 * hidden / 3 / 32)


# (name, hidden, intermediate as printed, heads, layers): Zheng et al. 2024, Table 4.
_PAPER_TABLE4 = [
    ("49M", 512, 3072, 8, 8), ("66M", 576, 3584, 9, 9), ("86M", 640, 3584, 10, 10),
    ("105M", 640, 3584, 10, 13), ("125M", 640, 3584, 10, 16), ("137M", 768, 4608, 12, 12),
    ("166M", 768, 4608, 12, 15), ("194M", 768, 4608, 12, 18), ("208M", 896, 5120, 14, 14),
    ("234M", 896, 5120, 14, 16), ("259M", 896, 5120, 14, 18), ("301M", 1024, 5632, 16, 16),
    ("334M", 1024, 5632, 16, 18), ("368M", 1024, 5632, 16, 20), ("512M", 1280, 7168, 10, 18),
    ("591M", 1280, 7168, 10, 21), ("616M", 1408, 7680, 11, 18), ("670M", 1280, 7168, 10, 24),
    ("711M", 1408, 7680, 11, 21), ("766M", 1536, 8704, 12, 19), ("806M", 1408, 7680, 11, 24),
    ("879M", 1536, 8704, 12, 22), ("992M", 1536, 8704, 12, 25), ("1085M", 1792, 9728, 14, 20),
    ("1239M", 1792, 9728, 14, 23), ("1393M", 1792, 9728, 14, 26), ("1542M", 2048, 11264, 16, 22),
    ("1736M", 2176, 11776, 17, 22), ("1743M", 2048, 11264, 16, 25), ("1944M", 2048, 11264, 16, 28),
    ("1963M", 2176, 11776, 17, 25), ("2112M", 2304, 12800, 18, 24), ("2191M", 2176, 11776, 17, 28),
    ("2452M", 2304, 12800, 18, 28), ("2791M", 2304, 12800, 18, 32), ("2808M", 2560, 13824, 20, 26),
    ("3227M", 2560, 13824, 20, 30), ("3647M", 2560, 13824, 20, 34),
    ("4016M", 2688, 14848, 21, 34),  # printed as 22 heads: 2688/22 is not an integer
    ("4248M", 2688, 14848, 21, 36), ("4657M", 2816, 15360, 22, 36), ("5534M", 3072, 16896, 24, 36),
]

PAPER_SHAPES: dict[str, ModelShape] = {}
for _name, _d, _inter, _h, _l in _PAPER_TABLE4:
    assert _inter == 2 * paper_ffn(_d), _name  # the intermediate-size rule holds for every row
    PAPER_SHAPES[_name] = ModelShape(_name, _d, _l, _h, paper_ffn(_d))

# Tiny CPU shapes: (hidden, layers, heads). Head size 16-32 keeps attention meaningful at this scale.
_TINY = [(32, 2, 2), (48, 2, 3), (64, 2, 4), (64, 3, 4), (96, 3, 4), (128, 4, 4), (192, 4, 6), (256, 6, 8)]
TINY_SHAPES: dict[str, ModelShape] = {
    f"d{d}l{n}": ModelShape(f"d{d}l{n}", d, n, h, tiny_ffn(d)) for d, n, h in _TINY
}

LADDER: dict[str, ModelShape] = {**TINY_SHAPES, **PAPER_SHAPES}

_TINY_NAME = re.compile(r"^d(\d+)l(\d+)$")


def tiny_shape(hidden: int, layers: int) -> ModelShape:
    """A CPU shape ``d<hidden>l<layers>`` outside the table: head size 16 up to d=64, 32 above."""
    head = 16 if hidden <= 64 else 32
    if hidden % head:
        raise ValueError(f"d{hidden}l{layers}: hidden must be a multiple of {head}")
    return ModelShape(f"d{hidden}l{layers}", hidden, layers, hidden // head, tiny_ffn(hidden))


def get_shape(name: str, custom: dict[str, ModelShape] | None = None) -> ModelShape:
    """Look a size name up in the custom shapes, the built-in ladder, then the ``d<h>l<n>`` rule."""
    if custom and name in custom:
        return custom[name]
    if name in LADDER:
        return LADDER[name]
    m = _TINY_NAME.match(name)
    if m:
        return tiny_shape(int(m.group(1)), int(m.group(2)))
    raise KeyError(
        f"unknown model size {name!r}; known sizes: {', '.join(known_sizes(custom))}, or any d<hidden>l<layers> "
        "(or define it under ladder.custom in the config)"
    )


def known_sizes(custom: dict[str, ModelShape] | None = None) -> list[str]:
    return [*(custom or {}), *LADDER]


def batch_tier_tokens(paper_params: int) -> int:
    """The paper's batch tiers (Table 1): 1M tokens up to 1B, 2M up to 2.5B, 4M above (2^20 units)."""
    if paper_params <= 1.0e9:
        return 2**20
    if paper_params <= 2.5e9:
        return 2**21
    return 2**22


def shape_for_params(target: float, vocab: int, family: str = "tiny", *, embeddings: bool = True) -> ModelShape:
    """The shape of a ladder family whose parameter count (with or without embeddings, as the fits
    count N) is closest to ``target`` in log space: the paper's 42 shapes, or tiny ``d<h>l<n>`` shapes
    (hidden a multiple of 32 from 32 to 1024, 1-24 layers, layers <= hidden/16 for a sane aspect)."""
    if family == "paper":
        cands = list(PAPER_SHAPES.values())
    else:
        cands = [tiny_shape(d, n) for d in range(32, 1025, 32) for n in range(1, 25) if n <= max(2, d // 16)]
    return min(cands, key=lambda s: (abs(math.log(s.params(vocab, embeddings=embeddings) / target)), s.hidden))
