"""Training and validation data: sample i of the training set is consumed at step i // global_batch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _read_tokens(prefix: str) -> np.ndarray:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    if not Path(prefix + ".idx").exists() or not Path(prefix + ".bin").exists():
        raise FileNotFoundError(f"indexed dataset {prefix}.bin/.idx not found (run the data stage first)")
    ds = IndexedDataset(prefix, mmap=True)
    parts = [np.asarray(ds[i], dtype=np.int64) for i in range(len(ds))]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


class PackedDataset:
    """Documents concatenated and cut into seq_length+1 windows; epochs reshuffled with the seed.

    A small deterministic stand-in for GPTDataset used for ``data.kind == "single"``."""

    def __init__(self, prefix: str, seq_length: int, num_samples: int, seed: int) -> None:
        self.tokens = _read_tokens(prefix)
        self.seq = seq_length
        self.n_windows = (len(self.tokens) - 1) // seq_length
        if self.n_windows < 1:
            raise ValueError(f"{prefix}: fewer than seq_length+1 = {seq_length + 1} tokens")
        self.num_samples = num_samples
        self.seed = seed
        self._perm: tuple[int, np.ndarray] | None = None  # the last epoch's order (samples come in order)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        epoch, j = divmod(int(i), self.n_windows)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n_windows))
        perm = self._perm[1]
        start = int(perm[j]) * self.seq
        w = self.tokens[start:start + self.seq + 1]
        return {"tokens": w[:-1].copy(), "labels": w[1:].copy(),
                "loss_mask": np.ones(self.seq, dtype=np.float32),
                "position_ids": np.arange(self.seq, dtype=np.int64)}


def build_train_dataset(spec: dict[str, Any]):
    data = spec["data"]
    n = spec["steps"] * spec["global_batch_size"]
    if data["kind"] == "single":
        return PackedDataset(data["prefix"], spec["seq_length"], n, spec["seed"])
    from cptscale.data import load_tokenizer
    from cptscale.mix import build_training_dataset

    tok = load_tokenizer(spec["tokenizer"])
    return build_training_dataset(data, tok, spec["seq_length"], spec["global_batch_size"], spec["steps"],
                                  spec["seed"], str(Path(spec["out_dir"]) / "data_cache"))


def validation_tokens(prefix: str, max_tokens: int | None = None) -> tuple[np.ndarray, bool]:
    """The evaluated token stream (the first ``max_tokens`` + 1 tokens when capped: ``max_tokens``
    predictions) and whether the cap cut the set short."""
    toks = _read_tokens(prefix)
    if max_tokens and len(toks) > max_tokens + 1:
        return toks[: max_tokens + 1], True
    return toks, False


def validation_windows(toks: np.ndarray, seq_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every token of the evaluated stream (:func:`validation_tokens`) predicted exactly once:
    (tokens, labels, mask) arrays [n, seq]."""
    n_pred = len(toks) - 1
    n = max(1, -(-n_pred // seq_length))
    tokens = np.zeros((n, seq_length), dtype=np.int64)
    labels = np.zeros((n, seq_length), dtype=np.int64)
    mask = np.zeros((n, seq_length), dtype=np.float32)
    for k in range(n):
        a = k * seq_length
        m = min(seq_length, n_pred - a)
        tokens[k, :m] = toks[a:a + m]
        labels[k, :m] = toks[a + 1:a + 1 + m]
        mask[k, :m] = 1.0
    return tokens, labels, mask
