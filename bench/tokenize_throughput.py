"""Benchmark: end-to-end indexing throughput vs bare ``tokenizers`` ``encode_batch_fast``.

End to end = ``cptscale data index`` work (stream docs.parquet, tokenize in ``--workers`` processes,
write Megatron ``.bin/.idx``, hash outputs, write data.json). Baseline = the call the pipeline makes,
``encode_batch_fast`` (no offsets), over the same texts already in memory, in batches of the same size,
same process, with the same parallelism (``RAYON_NUM_THREADS`` = workers). Prints MB/s of UTF-8 text for
both and the ratio (target >= 0.8).

    .venv/bin/python bench/tokenize_throughput.py --mb 50 --workers 2

Peak memory of the same commands: bench/index_memory.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from synthetic_corpus import make_corpus


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=50.0, help="MB of generated text")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--vocab-size", type=int, default=8000)
    ap.add_argument("--tokenizer", type=Path, default=None, help="use this tokenizer.json (else train one)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    os.environ["RAYON_NUM_THREADS"] = str(args.workers)  # before tokenizers starts its thread pool

    from cptscale.data.indexed import prepare
    from cptscale.data.ingest import ingest
    from cptscale.data.keys import iter_doc_batches
    from cptscale.data.sources import parse_sources
    from cptscale.data.tokenizer import Tokenizer, train_tokenizer

    work = args.workdir or Path(tempfile.mkdtemp(prefix="cptscale-bench-"))
    (work / "corp").mkdir(parents=True, exist_ok=True)
    corpus = work / "corp" / "bench.jsonl"
    if not corpus.exists():
        make_corpus(corpus, args.mb)
    docs = work / "data" / "xx" / "docs.parquet"
    if not docs.exists():
        spec = parse_sources([{"name": "bench", "kind": "local", "paths": [str(corpus)], "format": "jsonl"}])
        ingest("xx", spec, docs, progress=False)
    tok_path = args.tokenizer or work / "tok" / "tokenizer.json"
    if not tok_path.exists():
        train_tokenizer([f"xx={docs}"], tok_path, vocab_size=args.vocab_size,
                        sample_chars_per_language=3_000_000, progress=False)
    tok = Tokenizer(tok_path)
    import warnings

    with warnings.catch_warnings():  # "Transformer Engine and Apex are not installed": not relevant here
        warnings.simplefilter("ignore")
        import megatron.core.datasets.indexed_dataset  # noqa: F401  (import time is not throughput)
    texts = [t for b in iter_doc_batches(docs) for t in b.column(0).to_pylist()]
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    mb = n_bytes / 1e6

    from cptscale.data.indexed import BATCH_DOCS

    def baseline() -> float:
        os.environ["TOKENIZERS_PARALLELISM"] = "true" if args.workers > 1 else "false"
        t0 = time.perf_counter()
        n = 0
        for i in range(0, len(texts), BATCH_DOCS):  # the pipeline's call and batch size
            n += sum(len(e.ids) for e in tok.hf.encode_batch_fast(texts[i: i + BATCH_DOCS], add_special_tokens=False))
        dt = time.perf_counter() - t0
        os.environ.pop("TOKENIZERS_PARALLELISM", None)
        return dt

    def pipeline() -> float:
        t0 = time.perf_counter()
        prepare("xx", docs, tok_path, 0, work / "out", workers=args.workers, progress=False)
        return time.perf_counter() - t0

    base_t, pipe_t = [], []
    for _ in range(args.repeats):
        pipe_t.append(pipeline())
        base_t.append(baseline())
    b, p = min(base_t), min(pipe_t)
    result = {
        "text_mb": round(mb, 2), "docs": len(texts), "workers": args.workers, "vocab_size": tok.vocab_size,
        "bare_encode_batch_fast_mb_s": round(mb / b, 2), "end_to_end_mb_s": round(mb / p, 2),
        "ratio": round(b / p, 3), "bare_s": [round(x, 2) for x in base_t], "end_to_end_s": [round(x, 2) for x in pipe_t],
    }
    print(json.dumps(result, indent=2))
    print(f"end-to-end {mb / p:.2f} MB/s vs bare encode_batch_fast {mb / b:.2f} MB/s: ratio {b / p:.3f} "
          f"({'OK' if b / p >= 0.8 else 'BELOW 0.8'})", file=sys.stderr)
    return 0 if b / p >= 0.8 else 1


if __name__ == "__main__":
    sys.exit(main())
