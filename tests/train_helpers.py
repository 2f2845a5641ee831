"""Fixtures for the training-engine tests: tiny indexed datasets and run specs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

VOCAB = 256
EOD = 0


def structured_docs(n_docs: int, seed: int, vocab: int = VOCAB, lang_offset: int = 0) -> list[np.ndarray]:
    """A generated structured corpus (the data stage's real text is not used here): each document
    repeats short arithmetic patterns, so a tiny model's loss falls quickly."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n_docs):
        length = int(rng.integers(40, 120))
        start, stride = int(rng.integers(1, vocab)), int(rng.integers(1, 5))
        ids = (start + stride * np.arange(length)) % (vocab - 1) + 1
        ids = (ids + lang_offset) % (vocab - 1) + 1
        docs.append(np.concatenate([ids, [EOD]]).astype(np.int32))
    return docs


def write_indexed(prefix: Path, docs: list[np.ndarray]) -> str:
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix.parent.mkdir(parents=True, exist_ok=True)
    b = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.int32)
    for d in docs:
        b.add_document(torch.from_numpy(d), [len(d)])
    b.finalize(str(prefix) + ".idx")
    return str(prefix)


def make_data(root: Path) -> dict[str, Any]:
    """Train/valid sets for two languages; returns prefixes and validation byte counts."""
    out = {}
    for i, lang in enumerate(("en", "zh")):
        tr = write_indexed(root / lang / "train", structured_docs(200, 10 + i, lang_offset=37 * i))
        va_docs = structured_docs(12, 100 + i, lang_offset=37 * i)
        va = write_indexed(root / lang / "valid", va_docs)
        out[lang] = {"train": tr, "valid": va, "bytes": int(sum(len(d) for d in va_docs) * 3)}
    return out


def make_spec(root: Path, data: dict[str, Any], *, run_id: str = "t-scratch-en", lang: str = "en",
              init: str = "scratch", parent: dict | None = None, steps: int = 12, tp: int = 1, pp: int = 1,
              dp: int = 1, every: int = 5, hidden: int = 32, layers: int = 2, heads: int = 2, seq: int = 32,
              mb: int = 2, gb: int = 4, eval_steps: list[int] | None = None, **extra: Any) -> dict[str, Any]:
    spec = {
        "run_id": run_id, "study": "test", "size": f"d{hidden}l{layers}", "init": init, "lang": lang,
        "source_lang": "en", "replay": 0.0,
        "shape": {"name": f"d{hidden}l{layers}", "hidden": hidden, "layers": layers, "heads": heads,
                  "ffn": 96 if hidden == 32 else 4 * hidden, "kv_heads": None},
        "vocab_size": VOCAB, "seq_length": seq, "micro_batch_size": mb, "global_batch_size": gb, "steps": steps,
        "seed": 1234,
        "schedule": {"kind": "cosine", "max_lr": 0.01, "min_lr": 0.001, "warmup_steps": 2, "total_steps": steps,
                     "start_lr": 0.0, "decay_steps": 0, "decay_shape": "linear"},
        "optimizer": {"weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "grad_clip": 1.0},
        "init_std": 0.02, "precision": "auto", "layout": {"tp": tp, "pp": pp, "dp": dp},
        "data": {"kind": "single", "prefix": data[lang]["train"]},
        "tokenizer": "unused",
        "eval": {"steps": eval_steps if eval_steps is not None else [0, 1, 2, 4, 8],
                 "languages": {k: {"prefix": v["valid"], "bytes": v["bytes"]} for k, v in data.items()},
                 "micro_batch_size": 4, "max_tokens": None},
        "checkpoint": {"dir": str(root / "ckpt" / run_id), "every": every, "keep": 2},
        "parent": parent, "out_dir": str(root / "runs" / run_id), "loss_spike_factor": 3.0,
        "config_hash": "test", "provenance": {},
    }
    spec.update(extra)
    return spec


def write_spec(root: Path, spec: dict[str, Any]) -> Path:
    p = root / f"{spec['run_id']}.json"
    p.write_text(json.dumps(spec))
    return p


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def run_until_sigterm(spec: dict[str, Any], step: int) -> None:
    """Train ``spec`` in this process and send it SIGTERM after main step ``step``: the run saves
    ``step_<step>`` and stops (Terminated), as a SLURM time limit or Ctrl-C would stop it."""
    import os
    import signal

    import pytest

    from cptscale.train.engine import Terminated, Trainer
    from cptscale.train.parallel import teardown_parallel

    tr = Trainer(spec)
    tr.on_step = lambda s: os.kill(os.getpid(), signal.SIGTERM) if s == step else None
    with pytest.raises(Terminated):
        try:
            tr.run()
        finally:
            teardown_parallel()
