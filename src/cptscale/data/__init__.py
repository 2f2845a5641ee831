"""Data stage: ingest corpora, train/load the shared tokenizer, split validation, write Megatron datasets.

Light on import: the tokenizer API is loaded on first use (``cptscale.data.load_tokenizer``).
"""

from __future__ import annotations

from typing import Any

__all__ = ["EOD", "PAD", "MegatronTokenizerAdapter", "Tokenizer", "load_tokenizer"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from cptscale.data import tokenizer

        return getattr(tokenizer, name)
    raise AttributeError(name)
