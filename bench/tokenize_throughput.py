"""Benchmark: end-to-end indexing throughput vs bare ``tokenizers`` ``encode_batch_fast``.

End to end = ``cptscale data index`` work (stream docs.parquet, tokenize in ``--workers`` processes,
write Megatron ``.bin/.idx``, hash outputs, write data.json). Baseline = the call the pipeline makes,
``encode_batch_fast`` (no offsets), over the same texts already in memory, in batches of the same size,
same process, with the same parallelism (``RAYON_NUM_THREADS`` = workers). Prints MB/s of UTF-8 text for
both and the ratio (target >= 0.8).

    .venv/bin/python bench/tokenize_throughput.py --mb 50 --workers 2
    .venv/bin/python bench/tokenize_throughput.py --mb 50 --pss   # peak PSS of the ingest and index CLIs
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path


def make_corpus(path: Path, mb: float, seed: int = 0) -> None:
    """Synthetic mixed English-like / Chinese-like documents (no third-party text)."""
    r = random.Random(seed)
    words = ["".join(r.choice("etaoinshrdlucmfwypvbgkqjxz") for _ in range(r.randint(1, 10))) for _ in range(20000)]
    han = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]
    target = int(mb * 1e6)
    size = 0
    with open(path, "w", encoding="utf-8") as fh:
        i = 0
        while size < target:
            if i % 3 == 2:
                text = "，".join("".join(r.choices(han, k=r.randint(5, 20))) for _ in range(r.randint(20, 200))) + "。"
            else:
                text = " ".join(r.choices(words, k=r.randint(100, 1500))) + "."
            line = json.dumps({"text": f"{i} {text}"}, ensure_ascii=False) + "\n"
            fh.write(line)
            size += len(text.encode("utf-8"))
            i += 1


def peak_pss(cmd: list[str]) -> tuple[int, float]:
    """Run ``cmd``; return (peak summed PSS of it and its worker processes in bytes, seconds): PSS
    counts pages shared between processes once."""
    import subprocess

    import psutil

    t0 = time.perf_counter()
    proc = psutil.Popen(cmd, stdout=subprocess.DEVNULL)
    peak = 0
    while proc.poll() is None:
        try:
            procs = [proc, *proc.children(recursive=True)]
            peak = max(peak, sum(p.memory_full_info().pss for p in procs if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    if proc.returncode:
        raise SystemExit(f"{cmd} failed with {proc.returncode}")
    return peak, time.perf_counter() - t0


def pss_mode(args: argparse.Namespace, work: Path) -> int:
    """Peak PSS (summed over the process tree) of `cptscale data ingest` and `cptscale data index` on a
    generated corpus of --mb MB. bench/index_memory.py reports RSS, PSS and USS."""
    exe = [sys.executable, "-m", "cptscale.cli", "data"]
    corpus = work / "corp" / "bench.jsonl"
    if not corpus.exists():
        make_corpus(corpus, args.mb)
    src = work / "sources.json"
    src.write_text(json.dumps([{"name": "bench", "kind": "local", "paths": [str(corpus)], "format": "jsonl"}]))
    docs = work / "data" / "xx" / "docs.parquet"
    ing, ing_s = peak_pss([*exe, "ingest", "--lang", "xx", "--sources-json", str(src), "--out", str(docs),
                           "--no-progress"])
    tok = work / "tok" / "tokenizer.json"
    if not tok.exists():
        peak_pss([*exe, "tokenizer", "--docs", str(docs), "--vocab-size", str(args.vocab_size),
                  "--sample-chars-per-language", "3000000", "--out", str(tok), "--no-progress"])
    idx, idx_s = peak_pss([*exe, "index", "--lang", "xx", "--docs", str(docs), "--tokenizer", str(tok),
                           "--valid-tokens", "1000000", "--out-dir", str(docs.parent), "--workers",
                           str(args.workers), "--no-progress"])
    manifest = json.loads((docs.parent / "data.json").read_text())
    text_mb = (manifest["train"]["bytes"] + manifest["valid"]["bytes"]) / 1e6
    print(json.dumps({"text_mb": round(text_mb, 1), "workers": args.workers,
                      "ingest_peak_pss_mib": round(ing / 2**20, 1), "ingest_s": round(ing_s, 1),
                      "index_peak_pss_mib": round(idx / 2**20, 1), "index_s": round(idx_s, 1),
                      "index_mb_s": round(text_mb / idx_s, 2)}, indent=2))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=50.0, help="MB of generated text")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--vocab-size", type=int, default=8000)
    ap.add_argument("--tokenizer", type=Path, default=None, help="use this tokenizer.json (else train one)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--pss", action="store_true",
                    help="measure peak PSS (proportional set size) of the ingest and index CLIs instead")
    args = ap.parse_args()
    if args.pss:
        work = args.workdir or Path(tempfile.mkdtemp(prefix="cptscale-pss-"))
        (work / "corp").mkdir(parents=True, exist_ok=True)
        return pss_mode(args, work)
    os.environ["RAYON_NUM_THREADS"] = str(args.workers)  # before tokenizers starts its thread pool

    from cptscale.data.indexed import prepare
    from cptscale.data.ingest import ingest, iter_doc_batches
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
