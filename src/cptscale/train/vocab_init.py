"""Rows of the tokens a source model never saw, set to the mean of the seen rows at the start of CPT.

A model trained on text that never contains a token learns to give it almost no probability: every step
pushes that token's output row down (it is in every softmax denominator, never a target) and none pushes it
up. When the target language is written in another script, nearly every target token is such a token. In
the EN -> ZH demo, 1,496 of the 2,048 ids never occur in the English training data, and they carry 96.5 % of
the Chinese tokens. CPT then starts at ~19 nats on Chinese, far above a fresh model's log V = 7.6, and the
first steps undo that with clipped gradients. With those rows at the mean of the seen rows (Hewitt 2021,
"Initializing new word embeddings for pretrained language models"), Chinese starts at ~9.4 nats. The source
language pays for the probability mass the unseen tokens gain: +0.07 nats on the demo's d64l3.

``cpt.unseen_tokens: mean`` turns this on (``keep``, the default, loads the source model unchanged); the
trainer applies it after the init-sanity gate, so the gate still checks the checkpoint as it was saved.
Measured on that demo, it is an ablation, not an improvement: the shock is undone within ~15 steps either
way, and every re-initialisation transferred less than keep (mean CPT-minus-scratch loss at the 12
annealed points: keep -0.044 nats, these rows at the mean -0.005; README, "Why the ZH CPT law misses").
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

_CHUNK = 1 << 26  # tokens counted at a time


def seen_tokens(prefixes: Sequence[str], vocab_size: int) -> np.ndarray:
    """Boolean mask over the tokenizer's ids: True where the id occurs in any of the indexed datasets."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    if not prefixes:
        raise ValueError("no source datasets given: the tokens a model has seen come from its training data")
    seen = np.zeros(vocab_size, bool)
    for prefix in prefixes:
        if not (Path(prefix + ".bin").exists() and Path(prefix + ".idx").exists()):
            raise FileNotFoundError(f"source dataset {prefix}.bin/.idx not found (parent.source_data); the data "
                                    "stage writes it, or set cpt.unseen_tokens: keep")
        tokens = np.memmap(prefix + ".bin", dtype=IndexedDataset(prefix, mmap=True).index.dtype, mode="r")
        for i in range(0, tokens.size, _CHUNK):  # chunks: bincount widens to int64 (8x a uint16 corpus)
            counts = np.bincount(tokens[i : i + _CHUNK], minlength=vocab_size)
            if len(counts) > vocab_size:
                raise ValueError(f"source dataset {prefix} holds token id {len(counts) - 1}, outside the vocabulary "
                                 f"of {vocab_size}: it was not tokenized with this run's tokenizer")
            seen |= counts > 0
    return seen


def _vocab_matrices(model: Any) -> list[tuple[Any, int]]:
    """This rank's vocabulary-indexed weights with the global id of their first row: the input embedding
    (first pipeline stage) and the output layer (last stage; absent when tied to the embedding there)."""
    from megatron.core import parallel_state as ps

    gpt = getattr(model, "module", model)  # the DDP wrapper holds the GPTModel
    out: list[tuple[Any, int]] = []
    emb = getattr(gpt, "embedding", None)
    if emb is not None:
        out.append((emb.word_embeddings.weight, int(emb.word_embeddings.vocab_start_index)))
    head = getattr(gpt, "output_layer", None)
    w = getattr(head, "weight", None) if head is not None else None
    if w is not None and all(w is not m for m, _ in out):
        out.append((w, ps.get_tensor_model_parallel_rank() * w.shape[0]))
    return out


def reset_unseen_rows(model: Any, seen: np.ndarray) -> int:
    """Set every unseen id's rows (ids < len(seen); padding rows stay) to the mean of the seen ids' rows, in
    the input embedding and the output layer, on this rank's vocabulary shard; the mean is over all shards
    (summed across the tensor-parallel group). Returns how many ids were reset."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if not seen.any():
        raise ValueError("the source datasets contain no token ids: nothing to take the mean of")
    vocab = len(seen)
    tp_group = ps.get_tensor_model_parallel_group() if ps.get_tensor_model_parallel_world_size() > 1 else None
    with torch.no_grad():
        for w, start in _vocab_matrices(model):
            ids = np.arange(start, start + w.shape[0])
            real = ids < vocab
            known = seen[np.minimum(ids, vocab - 1)]
            is_seen = torch.from_numpy(real & known).to(w.device)
            is_unseen = torch.from_numpy(real & ~known).to(w.device)
            count = torch.tensor([float(is_seen.sum())], dtype=torch.float64, device=w.device)
            total = torch.cat([w[is_seen].double().sum(0), count])
            if tp_group is not None:
                dist.all_reduce(total, group=tp_group)
            mean = (total[:-1] / total[-1]).to(w.dtype)
            w[is_unseen] = mean
    return int((~seen).sum())
