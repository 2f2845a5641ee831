"""Split and index one language: held-out validation by document hash, Megatron-Core ``.bin/.idx``, manifest.

Split (exact, after the tokenizer exists): documents sorted by ascending hash are taken into the
validation set until it holds at least ``valid_tokens`` tokens (EOD included); every other document is
training data. The choice depends only on document text, so it is deterministic and independent of
input order; a document is in exactly one set. The tokenizer sample is drawn from the *other* end of the
hash order (see :mod:`cptscale.data.tokenizer`), and the manifest reports any overlap with it.

Indexing streams the docs store in row groups, tokenizes batches in ``workers`` processes (ordered, with a
bounded number of batches in flight, so peak memory does not grow with corpus size) and writes through
``IndexedDatasetBuilder`` to temp files, renamed ``.bin`` then ``.idx`` once complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing as mp
import os
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from cptscale.data.sources import SourceError
from cptscale.data.tokenizer import RESERVE_BYTES_PER_TOKEN, Tokenizer
from cptscale.util import file_hash, provenance, read_json, write_json

BATCH_DOCS = 256
BATCH_BYTES = 1 << 20

# ----------------------------------------------------------------------------------------------------
# tokenization workers

_TOK: Tokenizer | None = None


def _init_worker(path: str) -> None:
    global _TOK
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker process
    _TOK = Tokenizer(path)


def _encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Token ids of a batch with EOD after each document, per-document lengths, chars, bytes."""
    assert _TOK is not None
    encs = _TOK.hf.encode_batch_fast(texts, add_special_tokens=False)  # no offsets: faster
    eod = _TOK.eod
    parts: list[list[int]] = []
    lengths = np.empty(len(texts), dtype=np.int64)
    for i, e in enumerate(encs):
        ids = e.ids
        ids.append(eod)
        parts.append(ids)
        lengths[i] = len(ids)
    flat = np.array(list(chain.from_iterable(parts)), dtype=_TOK.dtype)
    n_chars = sum(len(t) for t in texts)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return flat, lengths, n_chars, n_bytes


def _batches(texts: Iterable[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for t in texts:
        batch.append(t)
        size += len(t)
        if len(batch) >= BATCH_DOCS or size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def encode_stream(texts: Iterable[str], tok_path: str | Path, workers: int = 1
                  ) -> Iterator[tuple[np.ndarray, np.ndarray, int, int]]:
    """Encoded batches in input order; at most ``2 * workers`` batches in flight."""
    if workers <= 1:
        old = os.environ.get("TOKENIZERS_PARALLELISM")
        _init_worker(str(tok_path))
        try:
            for b in _batches(texts):
                yield _encode(b)
        finally:
            if old is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = old
        return
    ctx = mp.get_context("forkserver")  # lean workers: no torch/Megatron pages copied from the parent
    with ctx.Pool(workers, initializer=_init_worker, initargs=(str(tok_path),)) as pool:
        pending: deque = deque()
        for b in _batches(texts):
            pending.append(pool.apply_async(_encode, (b,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def write_indexed(texts: Iterable[str], tok: Tokenizer, prefix: str | Path, *, workers: int = 1,
                  progress: bool = True, total_bytes: int | None = None, desc: str = "index") -> dict[str, Any]:
    """Tokenize ``texts`` into ``prefix.bin/.idx`` (one document per text, EOD-terminated), atomically."""
    import warnings

    from tqdm import tqdm

    with warnings.catch_warnings():  # "Transformer Engine and Apex are not installed": not relevant here
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    for stale in prefix.parent.glob(f"{prefix.name}.[bi][id][nx].tmp*"):  # left by a killed (SIGKILL) run
        stale.unlink(missing_ok=True)
    tag = f".tmp{os.getpid()}"
    tmp_bin, tmp_idx = Path(f"{prefix}.bin{tag}"), Path(f"{prefix}.idx{tag}")
    stats = {"docs": 0, "chars": 0, "bytes": 0, "tokens": 0}
    bar = tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True, disable=not progress,
               file=sys.stderr, mininterval=1.0)
    try:
        builder = IndexedDatasetBuilder(str(tmp_bin), dtype=tok.dtype)
        for flat, lengths, n_chars, n_bytes in encode_stream(texts, tok.path, workers):
            off = 0
            for n in lengths.tolist():
                builder.add_document(flat[off: off + n], [n])
                off += n
            stats["docs"] += len(lengths)
            stats["chars"] += n_chars
            stats["bytes"] += n_bytes
            stats["tokens"] += int(lengths.sum())
            bar.update(n_bytes)
        builder.finalize(str(tmp_idx))
        os.replace(tmp_bin, f"{prefix}.bin")
        os.replace(tmp_idx, f"{prefix}.idx")
    except BaseException:
        for p in (tmp_bin, tmp_idx):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        raise
    finally:
        bar.close()
    b = stats["bytes"]
    stats["tokens_per_byte"] = stats["tokens"] / b if b else None
    stats["tokens_per_char"] = stats["tokens"] / stats["chars"] if stats["chars"] else None
    stats["bin_hash"] = file_hash(f"{prefix}.bin")
    stats["idx_hash"] = file_hash(f"{prefix}.idx")
    return stats


# ----------------------------------------------------------------------------------------------------
# split


def select_validation(docs: Path, tok: Tokenizer, valid_tokens: int, lang: str) -> tuple[list[str], list[str], int]:
    """Validation docs (texts and hashes, ascending hash) holding >= ``valid_tokens`` tokens (EOD counted).

    Only a low-hash candidate window is loaded (bytes ~ ``valid_tokens * 8``), widened if needed.
    Raises a clear error before anything is written when the language has too little text.
    """
    import pyarrow.parquet as pq

    from cptscale.data.ingest import iter_doc_batches

    meta = pq.read_table(docs, columns=["hash", "bytes"])
    hashes = np.asarray(meta.column("hash").to_pylist(), dtype="U16")
    nbytes = meta.column("bytes").to_numpy()
    total_bytes = int(nbytes.sum())
    order = np.argsort(hashes, kind="stable")
    if valid_tokens <= 0:
        return [], [], total_bytes
    if total_bytes < 2 * valid_tokens:  # each byte-level token covers >= 1 byte
        raise SourceError(
            f"language {lang!r}: only {total_bytes:,} bytes of text, too little for {valid_tokens:,} validation "
            f"tokens plus training data; add corpora for {lang!r} or lower the validation size (data.validation_tokens)"
        )
    window = valid_tokens * RESERVE_BYTES_PER_TOKEN
    while True:
        cum = np.cumsum(nbytes[order])
        k = int(np.searchsorted(cum, window)) + 1
        cand = {str(h) for h in hashes[order[:k]]}
        texts: dict[str, str] = {}
        for batch in iter_doc_batches(docs, ("text", "hash")):
            for t, h in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist(), strict=True):
                if h in cand:
                    texts[h] = t
        got = 0
        chosen: list[str] = []
        for h in hashes[order[:k]]:
            h = str(h)
            chosen.append(h)
            got += len(tok.encode(texts[h])) + 1
            if got >= valid_tokens:
                break
        if got >= valid_tokens:
            break
        if k >= len(order):
            raise SourceError(
                f"language {lang!r}: the whole corpus has only {got:,} tokens, fewer than the {valid_tokens:,} "
                "validation tokens requested; add corpora or lower the validation size (data.validation_tokens)"
            )
        window *= 4
    valid_bytes = int(sum(len(texts[h].encode("utf-8")) for h in chosen))
    if valid_bytes * 2 > total_bytes:
        raise SourceError(
            f"language {lang!r}: {valid_tokens:,} validation tokens would take {valid_bytes:,} of its "
            f"{total_bytes:,} bytes (more than half); add corpora for {lang!r} or lower the validation size"
        )
    return [texts[h] for h in chosen], chosen, total_bytes


def prepare(lang: str, docs: str | Path, tokenizer: str | Path, valid_tokens: int, out_dir: str | Path,
            *, workers: int = 1, progress: bool = True) -> dict[str, Any]:
    """Split + index one language: writes valid.bin/.idx, train.bin/.idx and data.json in ``out_dir``."""
    docs, out_dir = Path(docs), Path(out_dir)
    if not docs.exists():
        raise SourceError(f"language {lang!r}: docs store {docs} is missing; run `cptscale data ingest` first")
    tok = Tokenizer(tokenizer)
    t0 = time.time()
    valid_texts, valid_hashes, total_bytes = select_validation(docs, tok, valid_tokens, lang)
    valid_set = set(valid_hashes)
    (out_dir / "data.json").unlink(missing_ok=True)  # never leave a manifest describing older outputs
    tok_report_path = Path(tokenizer).parent / "report.json"
    tok_report = read_json(tok_report_path) if tok_report_path.exists() else {}
    lowest = (tok_report.get("sample") or {}).get(lang, {}).get("lowest_hash")
    overlap = sum(1 for h in valid_hashes if lowest is not None and h >= lowest)

    valid = write_indexed(valid_texts, tok, out_dir / "valid", workers=1, progress=progress,
                          desc=f"valid {lang}")
    del valid_texts

    def train_texts() -> Iterator[str]:
        from cptscale.data.ingest import iter_doc_batches

        for batch in iter_doc_batches(docs, ("text", "hash")):
            for t, h in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist(), strict=True):
                if h not in valid_set:
                    yield t

    train = write_indexed(train_texts(), tok, out_dir / "train", workers=workers, progress=progress,
                          total_bytes=total_bytes - valid["bytes"], desc=f"train {lang}")
    ingest_path = docs.parent / "ingest.json"
    manifest = {
        "lang": lang,
        "train": train,
        "valid": {**valid, "doc_hashes": valid_hashes},
        "valid_tokens_requested": valid_tokens,
        "valid_bytes": valid["bytes"],
        "split": "ascending sha256(text) order until valid_tokens tokens (EOD included); rest is train",
        "tokenizer_sample_overlap_docs": overlap,
        "fertility": {"tokens_per_byte": train["tokens_per_byte"], "tokens_per_char": train["tokens_per_char"]},
        "eod": tok.eod,
        "vocab_size": tok.vocab_size,
        "dtype": np.dtype(tok.dtype).name,
        "tokenizer": str(tokenizer),
        "tokenizer_hash": tok.hash,
        "docs": str(docs),
        "docs_hash": file_hash(docs),
        "ingest": read_json(ingest_path) if ingest_path.exists() else None,
        "valid_doc_hashes_sha256": hashlib.sha256("\n".join(valid_hashes).encode()).hexdigest()[:16],
        "seconds": round(time.time() - t0, 3),
        "provenance": provenance(inputs={str(docs): file_hash(docs), str(tokenizer): tok.hash}),
    }
    if overlap:
        print(f"warning: {overlap} validation documents of {lang!r} were in the tokenizer sample "
              "(corpus too small for the sample size); see data.json", file=sys.stderr)
    write_json(out_dir / "data.json", manifest)
    return manifest
