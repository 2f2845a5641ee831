"""Benchmark blend index building: a two-phase replay blend drawing 10^8 tokens.

    .venv/bin/python bench/mix.py                          # 10^8 tokens, seq 1024, replay 0.3
    .venv/bin/python bench/mix.py --seq-length 128         # 8x more samples for the same tokens
    .venv/bin/python bench/mix.py --tokens 1e7             # a quick smoke run

Writes two generated corpora (each half the blend's size, so the target repeats and the source does
not), then times planning, the cold build (Megatron builds and caches every GPTDataset and blending
index), the warm build (everything loaded from the cache) and the realization report.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np


class _Tok:
    """The fields GPTDatasetConfig reads from a Megatron tokenizer."""

    def __init__(self, vocab: int) -> None:
        self.eod = self.pad = self.eos = 0
        self.vocab_size = vocab
        self.unique_identifiers = OrderedDict([("class", "bench"), ("vocab_size", vocab)])
        self.unique_description = json.dumps(self.unique_identifiers)


def write_corpus(prefix: Path, n_tokens: int, lo: int, hi: int, seed: int) -> int:
    """Documents of 50-2000 tokens ending in EOD (0), written in large chunks (generation is not timed)."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    b = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.uint16)
    total = 0
    while total < n_tokens:
        lengths = rng.integers(50, 2000, 5000)
        toks = rng.integers(lo, hi, int(lengths.sum()), dtype=np.uint16)
        toks[np.cumsum(lengths) - 1] = 0
        b.add_document(torch.from_numpy(toks.astype(np.int64)), lengths.tolist())
        total += int(lengths.sum())
    b.finalize(str(prefix) + ".idx")
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=float, default=1e8, help="tokens drawn by the blend")
    ap.add_argument("--seq-length", type=int, default=1024)
    ap.add_argument("--global-batch-size", type=int, default=256)
    ap.add_argument("--replay", type=float, default=0.3)
    ap.add_argument("--dir", help="work folder (default: a temporary one, removed afterwards)")
    args = ap.parse_args()

    from cptscale.mix import MixConfig, build_training_dataset, plan_blend, realize
    from cptscale.schedule import Schedule
    from cptscale.util import file_hash

    work = Path(args.dir or tempfile.mkdtemp(prefix="bench-mix-"))
    try:
        tokens = int(args.tokens)
        t0 = time.perf_counter()
        prefixes, avail = {}, {}
        for i, (lang, lo, hi) in enumerate((("en", 1, 30000), ("zh", 30000, 60000))):
            prefixes[lang] = str(work / lang / "train")
            Path(prefixes[lang]).parent.mkdir(parents=True, exist_ok=True)
            avail[lang] = write_corpus(Path(prefixes[lang]), tokens // 2, lo, hi, seed=i)
        t_gen = time.perf_counter() - t0
        # content hashes, as the data manifest carries them: the index cache is keyed by content
        hashes = {lang: {"bin_hash": file_hash(pre + ".bin"), "idx_hash": file_hash(pre + ".idx")}
                  for lang, pre in prefixes.items()}

        gbs, seq = args.global_batch_size, args.seq_length
        steps = max(2, round(tokens / (gbs * seq)))
        sched = Schedule("cosine", max_lr=3e-4, min_lr=3e-5, warmup_steps=max(1, steps // 100), total_steps=steps)
        mix = MixConfig(phases=[{"end": {"lr_fraction": 0.2}}, {"weights": {"target": 0.9, "source": 0.1}}],
                        max_epochs=4.0)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            spec = plan_blend(mix, replay=args.replay, target="zh", source="en", train_prefixes=prefixes,
                              train_tokens=avail, train_hashes=hashes, schedule=sched, steps=steps, global_batch_size=gbs,
                              seq_length=seq, seed=1234, cache_dir=str(work / "cache"))
        t_plan = time.perf_counter() - t0
        tok = _Tok(60000)

        def build():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return build_training_dataset(spec, tok, seq, gbs, steps, 1234, spec["cache_dir"])

        t0 = time.perf_counter()
        build()
        t_cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        ds = build()
        t_warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        rep = realize(spec, tok, dataset=ds)
        t_real = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(0, len(ds), max(1, len(ds) // 1000)):
            ds[i]
        t_read = (time.perf_counter() - t0) / 1000

        n = steps * gbs
        print(f"blend: {n:,} samples x {seq} tokens = {n * seq:,} tokens, {steps:,} steps x GBS {gbs}, "
              f"replay {args.replay}, switch at step {spec['switch_steps']}")
        print(f"corpora: en {avail['en']:,} + zh {avail['zh']:,} tokens (generated in {t_gen:.1f} s, not timed below)")
        print(f"plan_blend:                       {t_plan * 1e3:8.1f} ms")
        print(f"build_training_dataset (cold):    {t_cold:8.2f} s   <- index building, cache miss")
        print(f"build_training_dataset (warm):    {t_warm:8.2f} s   (cache hit)")
        print(f"realize (report from the indices): {t_real * 1e3:7.1f} ms")
        print(f"random sample read:               {t_read * 1e6:8.1f} us")
        for ph in rep["phases"]:
            shares = ", ".join(f"{s['name']} {s['realized_share']:.4f} (plan {s['planned_share']:.4f}, "
                               f"{s['cumulative_epochs']:.2f} ep)" for s in ph["sources"])
            print(f"  phase {ph['index']} steps {ph['start_step']}-{ph['end_step']}: {shares}")
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
