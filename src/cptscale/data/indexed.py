"""Split and index one language: held-out validation by document hash, Megatron-Core ``.bin/.idx``, manifest.

Split (exact, after the tokenizer exists): documents sorted by ascending hash are taken into the
validation set until it holds at least ``valid_tokens`` tokens (EOD included); every other document is
training data. The choice depends only on document text, so it is deterministic and independent of
input order; a document is in exactly one set. The tokenizer sample is drawn from the *other* end of the
hash order (see :mod:`cptscale.data.tokenizer`), and the manifest reports any overlap with it.

Indexing streams the docs store in row groups, tokenizes batches with ``workers`` threads of the tokenizer's pool
(ordered, the next batches read ahead in a thread) and writes through Megatron-Core's ``IndexedDatasetBuilder`` (a
subclass that appends whole batches and streams the ``.idx``) to temp files, renamed ``.bin`` then ``.idx``
once complete. Per-corpus training splits (``train.<corpus>``, for ``lang/corpus`` blend keys) are written
in the same pass.

Memory per document: the split keeps only the validation prefix (:func:`cptscale.data.keys.hash_prefix`)
and its boundary key; each dataset being written keeps one int32 length per document (4 B/doc; the stock
builder keeps two Python lists, ~70 B/doc, and builds a third at finalize). Everything else is bounded by
a row group and the batches in flight.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import struct
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from cptscale.data.ingest import check_enough_text
from cptscale.data.keys import KeyPrefix, hash_prefix, iter_doc_batches, iter_key_range, key_hex
from cptscale.data.sources import SourceError
from cptscale.data.tokenizer import RESERVE_BYTES_PER_TOKEN, Tokenizer
from cptscale.integrity import sample_fingerprint
from cptscale.util import file_hash, provenance, read_json, write_json

BATCH_DOCS = 256
BATCH_BYTES = 1 << 20
T = TypeVar("T")

# ----------------------------------------------------------------------------------------------------
# tokenization

#: one encoded batch: token ids with EOD after each document, per-document token counts, chars and bytes
Encoded = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def encode_batch(tok: Tokenizer, texts: list[str]) -> Encoded:
    """Token ids of a batch with EOD after each document, and per-document tokens (EOD included), chars,
    bytes. The flat array is filled one document slice at a time (numpy converts each id list in C), not
    through a Python iterator over every token."""
    encs = tok.hf.encode_batch_fast(texts, add_special_tokens=False)  # no offsets: faster
    ids = [e.ids for e in encs]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)) + 1
    ends = np.cumsum(lengths)
    flat = np.empty(int(ends[-1]) if len(ends) else 0, dtype=tok.dtype)
    for start, doc in zip((ends - lengths).tolist(), ids, strict=True):
        flat[start: start + len(doc)] = doc
    flat[ends - 1] = tok.eod
    chars = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    nbytes = np.fromiter((len(t.encode("utf-8")) for t in texts), dtype=np.int64, count=len(texts))
    return flat, lengths, chars, nbytes


def _read_ahead(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """``items`` produced by a background thread, up to ``depth`` ahead (reading the docs store and
    batching overlap with tokenization; parquet decoding runs without the GIL). An exception in the
    producer is raised here; closing this generator stops the producer."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put((done, None))
        except BaseException as exc:  # handed to the consumer
            q.put((done, exc))

    thread = threading.Thread(target=produce, name="cptscale-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            item, exc = q.get()
            if item is done:
                if exc is not None:
                    raise exc
                return
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


def _batches(items: Iterable[tuple[str, int]]) -> Iterator[tuple[list[str], np.ndarray]]:
    """Group (text, tag) items into batches of at most BATCH_DOCS documents / about BATCH_BYTES chars."""
    texts: list[str] = []
    tags: list[int] = []
    size = 0
    for t, g in items:
        texts.append(t)
        tags.append(g)
        size += len(t)
        if len(texts) >= BATCH_DOCS or size >= BATCH_BYTES:
            yield texts, np.asarray(tags, dtype=np.int32)
            texts, tags, size = [], [], 0
    if texts:
        yield texts, np.asarray(tags, dtype=np.int32)


def encode_stream(batches: Iterable[tuple[list[str], T]], tok_path: str | Path, workers: int = 1
                  ) -> Iterator[tuple[Encoded, T]]:
    """Encoded batches in input order, each with its tag.

    ``workers > 1``: in this process, with the tokenizer's own thread pool (Rayon; ``cptscale data index``
    sets ``RAYON_NUM_THREADS`` to ``workers`` before the pool starts) encoding each batch across the
    documents, while a reader thread reads and batches the next ones. (Worker processes, used before,
    cost a pickle of every batch each way and their own start-up, and on 2 cores measured 0.81 of bare
    ``encode_batch_fast``; bench/tokenize_throughput.py.) ``workers == 1``: single-threaded."""
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if workers > 1 else "false"
    try:
        tok = Tokenizer(tok_path)
        source = _read_ahead(batches) if workers > 1 else iter(batches)
        for texts, tag in source:
            yield encode_batch(tok, texts), tag
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


# ----------------------------------------------------------------------------------------------------
# writing Megatron-Core indexed datasets

#: sequences per chunk when streaming the .idx arrays
_IDX_CHUNK = 1 << 20


@functools.cache
def _builder_class() -> type:
    """Megatron-Core's ``IndexedDatasetBuilder`` with whole-batch appends and compact index state.

    The ``.bin`` bytes are what ``add_document`` writes (the token arrays in ``dtype``, back to back). The
    stock builder keeps ``sequence_lengths`` and ``document_indices`` as Python lists (~70 B/doc) and its
    ``_IndexWriter.write`` builds a Python list of pointers (~40 B/doc more) at finalize; this subclass keeps
    int32 lengths (4 B/doc) and streams the same ``.idx`` layout in chunks after the header that Megatron's
    ``_IndexWriter`` writes. The files are byte-identical to the stock builder's (tested)."""
    import warnings

    with warnings.catch_warnings():  # "Transformer Engine and Apex are not installed": not relevant here
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder, _IndexWriter

    class CompactIndexedDatasetBuilder(IndexedDatasetBuilder):
        def __init__(self, bin_path: str, dtype: type[np.number]) -> None:
            super().__init__(bin_path, dtype=dtype, multimodal=False)
            self._chunks: list[np.ndarray] = []  # int32 sequence lengths, one document = one sequence
            self._pending: list[np.ndarray] = []
            self._n_pending = 0

        def add_documents(self, flat: np.ndarray, lengths: np.ndarray) -> None:
            """Append documents: ``flat`` holds their tokens back to back, ``lengths`` their token counts."""
            if not len(lengths):
                return
            flat = np.ascontiguousarray(flat, dtype=self.dtype)
            self.data_file.write(memoryview(flat).cast("B"))
            self._pending.append(np.asarray(lengths, dtype=np.int32))
            self._n_pending += len(lengths)
            if self._n_pending >= 1 << 16:  # few large arrays: ~0 bytes of object overhead per document
                self._chunks.append(np.concatenate(self._pending))
                self._pending, self._n_pending = [], 0

        def finalize(self, idx_path: str) -> None:
            self.data_file.close()
            if self._pending:
                self._chunks.append(np.concatenate(self._pending))
                self._pending, self._n_pending = [], 0
            n = sum(len(c) for c in self._chunks)
            itemsize = DType.size(self.dtype)
            with _IndexWriter(idx_path, self.dtype) as writer:  # header, version, dtype code
                f = writer.idx_writer
                f.write(struct.pack("<Q", n))  # sequences
                f.write(struct.pack("<Q", n + 1))  # document indices: 0, 1, ..., n
                for c in self._chunks:
                    f.write(c.astype("<i4", copy=False).tobytes())
                ptr = 0
                for c in self._chunks:  # byte offset of each sequence
                    ends = np.cumsum(c, dtype=np.int64) * itemsize + ptr
                    starts = np.empty_like(ends)
                    starts[0] = ptr
                    starts[1:] = ends[:-1]
                    f.write(starts.astype("<i8", copy=False).tobytes())
                    ptr = int(ends[-1])
                for a in range(0, n + 1, _IDX_CHUNK):
                    f.write(np.arange(a, min(n + 1, a + _IDX_CHUNK), dtype="<i8").tobytes())

    return CompactIndexedDatasetBuilder


class _Output:
    """One dataset being written: temp .bin/.idx beside ``prefix``, renamed into place by :meth:`commit`."""

    def __init__(self, prefix: Path, dtype: type[np.number]) -> None:
        self.prefix = prefix
        prefix.parent.mkdir(parents=True, exist_ok=True)
        for stale in prefix.parent.glob(f"{prefix.name}.[bi][id][nx].tmp*"):  # left by a killed (SIGKILL) run
            stale.unlink(missing_ok=True)
        tag = f".tmp{os.getpid()}"
        self.tmp_bin, self.tmp_idx = Path(f"{prefix}.bin{tag}"), Path(f"{prefix}.idx{tag}")
        self.builder = _builder_class()(str(self.tmp_bin), dtype)
        self.stats: dict[str, Any] = {"docs": 0, "chars": 0, "bytes": 0, "tokens": 0}

    def add(self, flat: np.ndarray, lengths: np.ndarray, chars: np.ndarray, nbytes: np.ndarray) -> None:
        self.builder.add_documents(flat, lengths)
        self.stats["docs"] += len(lengths)
        self.stats["chars"] += int(chars.sum())
        self.stats["bytes"] += int(nbytes.sum())
        self.stats["tokens"] += int(lengths.sum())

    def finalize(self) -> None:
        self.builder.finalize(str(self.tmp_idx))

    def commit(self) -> dict[str, Any]:
        os.replace(self.tmp_bin, f"{self.prefix}.bin")
        os.replace(self.tmp_idx, f"{self.prefix}.idx")
        st = self.stats
        st["tokens_per_byte"] = st["tokens"] / st["bytes"] if st["bytes"] else None
        st["tokens_per_char"] = st["tokens"] / st["chars"] if st["chars"] else None
        for ext in ("bin", "idx"):
            st[f"{ext}_hash"] = file_hash(f"{self.prefix}.{ext}")
            # size + sampled blocks: what every training start checks (cptscale.integrity.check_dataset)
            st.update({f"{ext}_{k}": v for k, v in sample_fingerprint(f"{self.prefix}.{ext}").items()})
        return st

    def discard(self) -> None:
        with contextlib.suppress(Exception):
            self.builder.data_file.close()
        for p in (self.tmp_bin, self.tmp_idx):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def write_datasets(batches: Iterable[tuple[list[str], np.ndarray]], tok: Tokenizer, prefix: str | Path,
                   subsets: Sequence[tuple[str, str | Path]] = (), *, workers: int = 1, progress: bool = True,
                   total_bytes: int | None = None, desc: str = "index") -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Tokenize tagged batches into ``prefix.bin/.idx`` (every document, EOD-terminated) and, in the same
    pass, each ``subsets[i] = (name, prefix_i)`` with the documents tagged ``i`` (same order). All outputs
    are written to temp files and renamed only when every one is complete. Returns (stats, {name: stats})."""
    from tqdm import tqdm

    outs: list[_Output] = []
    bar = tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True, disable=not progress,
               file=sys.stderr, mininterval=1.0)
    try:
        main = _Output(Path(prefix), tok.dtype)
        outs.append(main)
        subs = []
        for _name, p in subsets:
            subs.append(_Output(Path(p), tok.dtype))
            outs.append(subs[-1])
        for (flat, lengths, chars, nbytes), tags in encode_stream(batches, tok.path, workers):
            main.add(flat, lengths, chars, nbytes)
            for i, out in enumerate(subs):
                m = tags == i
                if m.all():
                    out.add(flat, lengths, chars, nbytes)
                elif m.any():
                    out.add(flat[np.repeat(m, lengths)], lengths[m], chars[m], nbytes[m])
            bar.update(int(nbytes.sum()))
        for out in outs:
            out.finalize()
        stats = [out.commit() for out in outs]
    except BaseException:
        for out in outs:
            out.discard()
        raise
    finally:
        bar.close()
    return stats[0], {name: st for (name, _p), st in zip(subsets, stats[1:], strict=True)}


def write_indexed(texts: Iterable[str], tok: Tokenizer, prefix: str | Path, *, workers: int = 1,
                  progress: bool = True, total_bytes: int | None = None, desc: str = "index") -> dict[str, Any]:
    """Tokenize ``texts`` into ``prefix.bin/.idx`` (one document per text, EOD-terminated), atomically."""
    stats, _ = write_datasets(_batches((t, 0) for t in texts), tok, prefix, workers=workers, progress=progress,
                              total_bytes=total_bytes, desc=desc)
    return stats


# ----------------------------------------------------------------------------------------------------
# split


@dataclass(frozen=True)
class Validation(KeyPrefix):
    """The validation set: its texts and keys (ascending hash), and totals of the whole docs store.
    It is a prefix of the hash order, so training data is exactly the documents with key > ``boundary``."""

    texts: list[str]
    keys: np.ndarray
    total_bytes: int
    total_docs: int

    @property
    def hashes(self) -> list[str]:
        return [key_hex(k) for k in self.keys.tolist()]


def select_validation(docs: Path, tok: Tokenizer, valid_tokens: int, lang: str) -> Validation:
    """Validation docs (ascending hash) holding >= ``valid_tokens`` tokens (EOD counted).

    Only a low-hash candidate window is kept (bytes ~ ``valid_tokens * 8``), widened if needed; memory
    grows with the window, not the corpus. Raises a clear error before anything is written when the
    language has too little text.
    """

    if valid_tokens <= 0:
        pre = hash_prefix(docs, "bytes", 0)
        return Validation([], np.empty(0, np.uint64), pre.total_weight, pre.total_docs)
    window = valid_tokens * RESERVE_BYTES_PER_TOKEN
    while True:
        pre = hash_prefix(docs, "bytes", window)
        check_enough_text(lang, pre.total_weight, pre.total_docs, valid_tokens)  # cheap: totals only
        texts: dict[int, str] = {}
        for keys, batch in iter_key_range(docs, ["text"], hi=pre.boundary):
            texts.update(zip(keys.tolist(), batch.column(1).to_pylist(), strict=True))
        got = chosen = 0
        cand = pre.keys.tolist()
        for i in range(0, len(cand), BATCH_DOCS):
            chunk = cand[i: i + BATCH_DOCS]
            counts = np.cumsum([len(ids) + 1 for ids in tok.encode_batch([texts[k] for k in chunk])]) + got
            j = int(np.searchsorted(counts, valid_tokens))
            if j < len(counts):
                chosen, got = i + j + 1, int(counts[j])
                break
            chosen, got = i + len(chunk), int(counts[-1])
        if got >= valid_tokens:
            break
        if len(cand) >= pre.total_docs:
            raise SourceError(
                f"language {lang!r}: the whole corpus has only {got:,} tokens, fewer than the {valid_tokens:,} "
                "validation tokens requested; add corpora or lower the validation size (data.validation_tokens)"
            )
        window *= 4
    keys = pre.keys[:chosen]
    valid_bytes = int(pre.weights[:chosen].sum())
    if valid_bytes * 2 > pre.total_weight:
        raise SourceError(
            f"language {lang!r}: {valid_tokens:,} validation tokens would take {valid_bytes:,} of its "
            f"{pre.total_weight:,} bytes (more than half); add corpora for {lang!r} or lower the validation size"
        )
    return Validation([texts[k] for k in keys.tolist()], keys, pre.total_weight, pre.total_docs)


def store_corpora(docs: str | Path) -> list[str]:
    """Corpus names (the ``source`` column) of a docs store, in order of first appearance."""
    import pyarrow.compute as pc

    seen: dict[str, None] = {}
    for batch in iter_doc_batches(docs, ("source",), batch_size=1 << 16):
        for name in pc.unique(batch.column(0)).to_pylist():
            seen.setdefault(name, None)
    return list(seen)


def _check_split_corpora(lang: str, docs: Path, split_corpora: Sequence[str]) -> list[str]:
    """The corpora to write their own training splits for (duplicates dropped): each must be a corpus of the
    docs store and usable as a file name."""
    split_corpora = list(dict.fromkeys(split_corpora))
    if split_corpora:
        known = store_corpora(docs)
        unknown = [n for n in split_corpora if n not in known]
        if unknown:
            raise SourceError(
                f"language {lang!r}: --split-corpora names {', '.join(map(repr, unknown))}, but the docs store "
                f"{docs} has documents only from the corpora {', '.join(known)}; blend keys '{lang}/<corpus>' "
                f"must use one of these names (from corpora.{lang} in the study config)"
            )
        bad = [n for n in split_corpora if "/" in n or n.startswith(".")]
        if bad:
            raise SourceError(f"language {lang!r}: corpus names {bad} cannot name files; rename them in corpora.{lang}")
    return split_corpora


def _sample_overlap(val: Validation, tokenizer: str | Path, lang: str) -> int:
    """Validation documents that were in the tokenizer's training sample (keys at or above the sample's lowest
    key; the tokenizer report beside it says), 0 without a report."""
    tok_report_path = Path(tokenizer).parent / "report.json"
    tok_report = read_json(tok_report_path) if tok_report_path.exists() else {}
    lowest = (tok_report.get("sample") or {}).get(lang, {}).get("lowest_hash")
    return int((val.keys >= np.uint64(int(lowest, 16))).sum()) if lowest is not None else 0


def _train_items(docs: Path, boundary: int | None, split_corpora: list[str]) -> Iterator[tuple[str, int]]:
    """(text, subset tag) of every training document (key above the validation set) in key order; the tag is
    the index of its corpus in ``split_corpora``, -1 for the others (0 when there are none)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    value_set = pa.array(split_corpora, type=pa.string())
    lo = boundary + 1 if boundary is not None else None  # training: every key above the validation set
    for keys, batch in iter_key_range(docs, ["text", "source"] if split_corpora else ["text"], lo=lo):
        if split_corpora:
            tags = pc.fill_null(pc.index_in(batch.column(2), value_set=value_set), -1).to_numpy()
        else:
            tags = np.zeros(len(keys), dtype=np.int32)
        yield from zip(batch.column(1).to_pylist(), tags.tolist(), strict=True)


def prepare(lang: str, docs: str | Path, tokenizer: str | Path, valid_tokens: int, out_dir: str | Path,
            *, workers: int = 1, split_corpora: Sequence[str] = (), progress: bool = True) -> dict[str, Any]:
    """Split + index one language: writes valid.bin/.idx, train.bin/.idx, ``train.<corpus>.bin/.idx`` for
    each of ``split_corpora`` (its training documents, same order) and data.json in ``out_dir``."""
    docs, out_dir = Path(docs), Path(out_dir)
    if not docs.exists():
        raise SourceError(f"language {lang!r}: docs store {docs} is missing; run `cptscale data ingest` first")
    tok = Tokenizer(tokenizer)
    split_corpora = _check_split_corpora(lang, docs, split_corpora)
    t0 = time.time()
    val = select_validation(docs, tok, valid_tokens, lang)
    valid_hashes = val.hashes
    (out_dir / "data.json").unlink(missing_ok=True)  # never leave a manifest describing older outputs
    overlap = _sample_overlap(val, tokenizer, lang)
    valid = write_indexed(val.texts, tok, out_dir / "valid", workers=1, progress=progress, desc=f"valid {lang}")
    boundary, total_bytes = val.boundary, val.total_bytes
    del val
    subsets = [(name, out_dir / f"train.{name}") for name in split_corpora]
    train, train_corpora = write_datasets(_batches(_train_items(docs, boundary, split_corpora)), tok,
                                          out_dir / "train", subsets, workers=workers,
                                          progress=progress, total_bytes=total_bytes - valid["bytes"],
                                          desc=f"train {lang}")
    ingest_path = docs.parent / "ingest.json"
    manifest = {
        "lang": lang,
        "train": train,
        "train_corpora": train_corpora,
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
