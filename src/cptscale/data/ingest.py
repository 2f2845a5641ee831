"""Ingest: read every source of one language, clean, de-duplicate and stream documents to a parquet store.

Cleaning: invalid UTF-8 replaced by U+FFFD and counted; Unicode NFC (not NFKC, which folds CJK
full-width punctuation); surrounding whitespace stripped; empty and short documents dropped; exact
duplicates (same NFC text) dropped. The store ``docs.parquet`` has columns ``text``, ``hash`` (sha256
of the UTF-8 text, 16 hex digits: the split orders documents by it), ``source``, ``chars``, ``bytes``,
written in row groups of at most 16 MB of text and 16,384 documents so that readers stream it. Memory is
bounded by one row group plus the de-duplication keys (:class:`cptscale.data.keys.SeenKeys`): 8 bytes
per kept document in a sorted array plus headroom, 8.5-11 B/doc measured at 1M and 4M documents (a Python
``set`` of 8-byte digests took 75 B/doc).
"""

from __future__ import annotations

import hashlib
import sys
import time
import unicodedata
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cptscale.data.keys import SeenKeys
from cptscale.data.readers import decode
from cptscale.data.sources import (
    HFSource,
    LocalSource,
    PackageSource,
    SourceError,
    default_cache_dir,
    open_source,
)
from cptscale.util import atomic_path, provenance, write_json

ROW_GROUP_BYTES = 16 << 20
#: also cap documents per row group: with short documents the Python lists of a row group would
#: otherwise hold ~300 B per document for up to a million documents, and readers' working set (allocator
#: warm-up) follows the row group: indexing 400k short documents peaked 20-25 MB higher than 66k with
#: 65,536 documents per row group, 9 MB higher with 8,192 (in-process measurement).
ROW_GROUP_DOCS = 1 << 14
SCHEMA_FIELDS = ("text", "hash", "source", "chars", "bytes")


def doc_hash(text: str) -> str:
    """The document's identity: decides exact duplicates and its place in the validation split."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def check_enough_text(lang: str, total_bytes: int, n_docs: int, valid_tokens: int) -> None:
    """Fail when ``total_bytes`` of text in ``n_docs`` documents cannot hold ``valid_tokens`` validation
    tokens plus training data.

    Byte-level BPE gives at most one token per byte, plus one EOD per document, and the split refuses a
    validation set of more than half the bytes; so any accepted split has ``valid_tokens <=
    total_bytes / 2 + n_docs``. Checked by ``ingest`` (``--valid-tokens``, before the tokenizer exists)
    and again by ``index``.
    """
    if valid_tokens > 0 and total_bytes / 2 + n_docs < valid_tokens:
        raise SourceError(
            f"language {lang!r}: only {total_bytes:,} bytes of text ({n_docs:,} documents), too little for "
            f"{valid_tokens:,} validation tokens plus training data; add corpora for {lang!r} or lower the "
            "validation size (data.validation_tokens)"
        )


@dataclass
class SourceCounts:
    name: str
    docs_read: int = 0
    docs_kept: int = 0
    dropped_empty: int = 0
    dropped_short: int = 0
    dropped_duplicate: int = 0
    invalid_utf8_replaced: int = 0
    chars: int = 0
    bytes: int = 0
    truncated_at_max_chars: bool = False
    input_hashes: dict[str, str] = field(default_factory=dict)


def _schema():
    import pyarrow as pa

    return pa.schema([("text", pa.string()), ("hash", pa.string()), ("source", pa.string()),
                      ("chars", pa.int64()), ("bytes", pa.int64())])


class _DocWriter:
    """The docs parquet, written in row groups of about ``ROW_GROUP_BYTES`` or ``ROW_GROUP_DOCS``."""

    def __init__(self, path: Path) -> None:
        import pyarrow.parquet as pq

        self.schema = _schema()
        self.writer = pq.ParquetWriter(path, self.schema, compression="zstd")
        self._reset()

    def _reset(self) -> None:
        self.buf: dict[str, list[Any]] = {k: [] for k in SCHEMA_FIELDS}
        self.buf_bytes = 0

    def add(self, text: str, h: str, source: str, nb: int) -> None:
        for k, v in zip(SCHEMA_FIELDS, (text, h, source, len(text), nb), strict=True):
            self.buf[k].append(v)
        self.buf_bytes += nb
        if self.buf_bytes >= ROW_GROUP_BYTES or len(self.buf["text"]) >= ROW_GROUP_DOCS:
            self.flush()

    def flush(self) -> None:
        import pyarrow as pa

        if self.buf["text"]:
            self.writer.write_table(pa.table(self.buf, schema=self.schema))
        self._reset()


def _clean(raw: Any, c: SourceCounts, min_chars: int) -> str | None:
    """A read document as stored text (decoded, NFC, stripped), or None when it is empty or shorter than
    ``min_chars`` (counted in ``c``)."""
    c.invalid_utf8_replaced += raw.replaced
    if isinstance(raw.text, bytes):
        text, n = decode(raw.text)
        c.invalid_utf8_replaced += n
    else:
        text = raw.text
    if not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    text = text.strip()
    if not text:
        c.dropped_empty += 1
        return None
    if len(text) < min_chars:
        c.dropped_short += 1
        return None
    return text


def _store_docs(opened: list[Any], counts: list[SourceCounts], out: _DocWriter, seen: SeenKeys, bar: Any,
                min_chars: int, max_chars: int | None) -> None:
    """Clean, deduplicate and write every source's documents in order, up to each source's and the
    language's ``max_chars``."""
    total_chars = 0
    for o, c in zip(opened, counts, strict=True):
        spec_chars = 0
        for raw in o.docs():
            c.docs_read += 1
            bar.update(1)
            text = _clean(raw, c, min_chars)
            if text is None:
                continue
            h = doc_hash(text)
            if not seen.add(int(h, 16)):
                c.dropped_duplicate += 1
                continue
            nb = len(text.encode("utf-8"))
            out.add(text, h, c.name, nb)
            c.docs_kept += 1
            c.chars += len(text)
            c.bytes += nb
            spec_chars += len(text)
            total_chars += len(text)
            if o.spec.max_chars is not None and spec_chars >= o.spec.max_chars:
                c.truncated_at_max_chars = True
                break
            if max_chars is not None and total_chars >= max_chars:
                c.truncated_at_max_chars = True
                return


def _check_kept(lang: str, counts: list[SourceCounts], min_chars: int, valid_tokens: int) -> int:
    """The number of documents kept; an empty corpus or too little text for validation is an error."""
    kept = sum(c.docs_kept for c in counts)
    if kept == 0:
        detail = "; ".join(
            f"{c.name}: read {c.docs_read}, empty {c.dropped_empty}, short {c.dropped_short}" for c in counts
        )
        raise SourceError(
            f"language {lang!r}: empty corpus, no document left after cleaning ({detail}); "
            f"check the corpus files or lower the minimum length (data.min_doc_chars in the study config, "
            f"--min-chars here; now {min_chars})"
        )
    check_enough_text(lang, sum(c.bytes for c in counts), kept, valid_tokens)
    return kept


def ingest(
    lang: str,
    sources: Sequence[PackageSource | LocalSource | HFSource],
    out: str | Path,
    *,
    cache_dir: str | Path | None = None,
    min_chars: int = 20,
    max_chars: int | None = None,
    valid_tokens: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Clean and store the documents of ``lang``; writes ``out`` (parquet) and ``ingest.json`` beside it.

    All sources are opened (files found, parquet readable, packages fetched) before any output is
    written; an empty result, or too little text for ``valid_tokens`` validation tokens (see
    :func:`check_enough_text`), is an error and leaves nothing behind.
    """
    from tqdm import tqdm

    if not sources:
        raise SourceError(f"language {lang!r}: no corpora configured; add at least one under corpora.{lang}")
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    opened = [open_source(s, cache) for s in sources]  # fail early, before writing anything
    out = Path(out)
    if out.parent.is_dir():  # temp files of a killed (SIGKILL) run; atomic_path cleans up other failures
        for stale in out.parent.glob(f".{out.name}.*.tmp"):
            stale.unlink(missing_ok=True)
    counts = [SourceCounts(o.spec.name, input_hashes=o.input_hashes) for o in opened]
    t0 = time.time()
    bar = tqdm(desc=f"ingest {lang}", unit="doc", disable=not progress, file=sys.stderr, mininterval=1.0)
    with atomic_path(out) as tmp:
        writer = _DocWriter(tmp)
        try:
            _store_docs(opened, counts, writer, SeenKeys(), bar, min_chars, max_chars)
            writer.flush()
        finally:
            writer.writer.close()
            bar.close()
        kept = _check_kept(lang, counts, min_chars, valid_tokens)
    report: dict[str, Any] = {
        "lang": lang,
        "docs": kept,
        "chars": sum(c.chars for c in counts),
        "bytes": sum(c.bytes for c in counts),
        "docs_read": sum(c.docs_read for c in counts),
        "dropped_empty": sum(c.dropped_empty for c in counts),
        "dropped_short": sum(c.dropped_short for c in counts),
        "dropped_duplicate": sum(c.dropped_duplicate for c in counts),
        "invalid_utf8_replaced": sum(c.invalid_utf8_replaced for c in counts),
        "min_chars": min_chars,
        "max_chars": max_chars,
        "valid_tokens_checked": valid_tokens,
        "normalization": "NFC",
        "sources": [asdict(c) for c in counts],
        "specs": [s.model_dump(mode="json") for s in sources],
        "seconds": round(time.time() - t0, 3),
        "output": str(out),
        "provenance": provenance(inputs={k: v for c in counts for k, v in c.input_hashes.items()}),
    }
    write_json(out.parent / "ingest.json", report)
    return report


