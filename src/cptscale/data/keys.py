"""Compact per-document state: 64-bit document keys instead of Python strings, bytes or sets.

A document's identity is the first 16 hex digits of sha256(text) (:func:`cptscale.data.ingest.doc_hash`),
i.e. exactly 64 bits. As ``uint64`` it orders like the hex string (fixed width, lower case) and costs
8 bytes instead of ~65 (a ``str``) or 64 (numpy ``U16``). Everything that must hold per-document state
uses these keys:

* :class:`SeenKeys` (ingest de-duplication): a sorted ``uint64`` array searched with ``bisect`` plus a
  small set of recent keys merged in geometrically: 8 B/doc plus headroom, 8.5-11 B/doc in all (measured
  with tracemalloc at 1M and 4M keys) vs 75 B/doc for a ``set`` of 8-byte ``bytes``.
* :func:`hash_prefix` (validation split, tokenizer sample, fertility sample): the shortest run of documents
  in ascending (or descending) key order whose weight (bytes, chars) reaches a target, found in one
  streaming pass with a bounded buffer: memory grows with the *prefix*, never with the corpus.

Because those selections are prefixes of the key order, a selection is fully described by its boundary
key, so the passes that read the selected texts back keep one integer, not a set of hashes.

:func:`bound_heap_growth` keeps glibc from holding on to freed row-group buffers (the data commands and
tokenizer worker processes call it).
"""

from __future__ import annotations

import bisect
import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cptscale.data.corpus import SourceError


def hash_keys(col) -> np.ndarray:  # col: pyarrow (Large)StringArray or ChunkedArray of 16-hex-digit hashes
    """``uint64`` keys of a column of 16-hex-digit hashes, vectorized (no Python object per document)."""
    import pyarrow as pa

    if isinstance(col, pa.ChunkedArray):
        parts = [hash_keys(c) for c in col.chunks]
        return np.concatenate(parts) if parts else np.empty(0, np.uint64)
    n = len(col)
    if n == 0:
        return np.empty(0, np.uint64)
    if col.null_count:
        raise SourceError("docs store: the hash column has nulls; re-run `cptscale data ingest`")
    off_type = np.int64 if pa.types.is_large_string(col.type) else np.int32
    bufs = col.buffers()
    offsets = np.frombuffer(bufs[1], dtype=off_type, count=n + 1, offset=col.offset * np.dtype(off_type).itemsize)
    start, end = int(offsets[0]), int(offsets[-1])
    if end - start != 16 * n or not bool(np.all(np.diff(offsets) == 16)):
        raise SourceError("docs store: the hash column is not 16 hex digits per document; re-run `cptscale data ingest`")
    try:
        raw = bytes.fromhex(bytes(memoryview(bufs[2])[start:end]).decode("ascii"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise SourceError(f"docs store: the hash column is not hexadecimal ({exc}); re-run `cptscale data ingest`") from exc
    return np.frombuffer(raw, dtype=">u8").astype(np.uint64)


def key_hex(key: int) -> str:
    """The 16-hex-digit hash string of a key (what the docs store and manifests show)."""
    return f"{int(key):016x}"


def iter_doc_batches(path: str | Path, columns: Sequence[str] = ("text",), batch_size: int = 1024):
    """Stream record batches from a docs store, one row group in memory at a time.

    ``read_row_group`` rather than ``iter_batches``: the latter kept decoded buffers alive across row
    groups (arrow-allocated memory grew with file size in a measurement)."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:
        raise SourceError(f"cannot read docs store {path}: {exc}; re-run `cptscale data ingest`") from exc
    for i in range(pf.metadata.num_row_groups):
        table = pf.read_row_group(i, columns=list(columns))
        yield from table.to_batches(max_chunksize=batch_size)
        del table


def iter_keyed_batches(docs: str | Path, columns: Sequence[str] = ()) -> Iterator[tuple[np.ndarray, object]]:
    """(uint64 keys, record batch with ``columns``) per batch of a docs store, one row group in memory."""
    cols = ["hash", *[c for c in columns if c != "hash"]]
    for batch in iter_doc_batches(docs, cols):
        yield hash_keys(batch.column(0)), batch


def iter_key_range(docs: str | Path, columns: Sequence[str] = (), *, lo: int | None = None,
                   hi: int | None = None) -> Iterator[tuple[np.ndarray, object]]:
    """:func:`iter_keyed_batches` restricted to documents whose key lies in [lo, hi] (either bound open):
    the split regions of a store (validation, tokenizer sample, training) are key ranges."""
    import pyarrow as pa

    if lo is not None and lo >= 1 << 64:  # above the largest key: nothing
        return
    for keys, batch in iter_keyed_batches(docs, columns):
        m = np.ones(len(keys), dtype=bool)
        if lo is not None:
            m &= keys >= np.uint64(lo)
        if hi is not None:
            m &= keys <= np.uint64(hi)
        if m.all():
            yield keys, batch
        elif m.any():
            yield keys[m], batch.filter(pa.array(m))


class KeyPrefix:
    """A run of documents that is a prefix of the key (hash) order: ``keys`` ascending."""

    keys: np.ndarray

    @property
    def boundary(self) -> int | None:
        """The last key of the prefix (inclusive bound of the selection), None when empty."""
        return int(self.keys[-1]) if len(self.keys) else None


@dataclass(frozen=True)
class Prefix(KeyPrefix):
    """The shortest key-ordered run of documents whose weight reaches ``target`` (all documents when the
    corpus is smaller). ``keys``/``weights`` are in the requested order; totals cover the whole store."""

    keys: np.ndarray
    weights: np.ndarray
    total_weight: int
    total_docs: int

    @property
    def weight(self) -> int:
        return int(self.weights.sum())


def _cut(keys: np.ndarray, weights: np.ndarray, target: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(keys, kind="stable")
    keys, weights = keys[order], weights[order]
    cum = np.cumsum(weights)
    if len(cum) and cum[-1] >= target:
        k = int(np.searchsorted(cum, target)) + 1  # first document at which the running sum reaches target
        keys, weights = keys[:k], weights[:k]
    return keys, weights


def hash_prefix(docs: str | Path, weight: str, target: int, *, descending: bool = False,
                exclude_upto: int | None = None, min_buffer: int = 1 << 16) -> Prefix:
    """Documents in ascending (or descending) key order until their ``weight`` column sums to >= ``target``.

    One pass over the store's ``hash`` and ``weight`` columns; candidates are kept in a buffer that is cut
    back to the current prefix whenever it doubles, so memory is O(prefix + one batch), not O(corpus).
    ``exclude_upto``: ignore documents whose key is <= this (the tokenizer sample skips the validation
    reserve). ``target <= 0`` gives an empty prefix (totals are still counted).
    """
    keep_k = np.empty(0, np.uint64)
    keep_w = np.empty(0, np.int64)
    pending_k: list[np.ndarray] = []
    pending_w: list[np.ndarray] = []
    pending = 0
    total_w = total_n = 0
    full = False  # the kept prefix already reaches the target: later keys beyond it cannot enter
    for keys, batch in iter_keyed_batches(docs, [weight]):
        w = batch.column(1).to_numpy().astype(np.int64, copy=False)
        total_w += int(w.sum())
        total_n += len(keys)
        if target <= 0:
            continue
        if exclude_upto is not None:
            m = keys > np.uint64(exclude_upto)
            keys, w = keys[m], w[m]
        if descending:
            keys = ~keys  # reverses the order of uint64 keys
        if full:  # cheap pre-filter: only keys inside the current prefix can still enter it
            m = keys < keep_k[-1]
            keys, w = keys[m], w[m]
        pending_k.append(keys)
        pending_w.append(w)
        pending += len(keys)
        if pending >= max(min_buffer, len(keep_k)):
            keep_k, keep_w = _cut(np.concatenate([keep_k, *pending_k]), np.concatenate([keep_w, *pending_w]), target)
            pending_k, pending_w, pending = [], [], 0
            full = bool(len(keep_w)) and int(keep_w.sum()) >= target
    if target > 0 and pending:
        keep_k, keep_w = _cut(np.concatenate([keep_k, *pending_k]), np.concatenate([keep_w, *pending_w]), target)
    if descending:
        keep_k = ~keep_k
    return Prefix(keep_k, keep_w, total_w, total_n)


class SeenKeys:
    """An exact set of 64-bit keys for de-duplication, at ~8-12 bytes per key.

    Keys live in a sorted ``uint64`` array (looked up with ``bisect`` on a memoryview, ~1.5 us) plus a
    set of recent keys (a Python int in a set costs ~70 B). When the set reaches 1/32 of the array (at
    least ``min_recent``) it is merged in place: the array grows by ``realloc`` (``ndarray.resize``: no
    second copy of the array) with 25 % headroom, the new keys go to its end, and a stable sort (timsort:
    two sorted runs) merges them. So memory is 8 B/key plus at most 25 % headroom plus ~2 B/key for the
    set, and merges copy O(32 N) keys in total.
    """

    def __init__(self, min_recent: int = 1 << 16) -> None:
        self._arr = np.empty(0, np.uint64)  # capacity; the first self._n entries are used and sorted
        self._n = 0
        self._view: memoryview = memoryview(self._arr)
        self._recent: set[int] = set()
        self._min_recent = min_recent

    def __len__(self) -> int:
        return self._n + len(self._recent)

    def add(self, key: int) -> bool:
        """Add ``key``; False if it was already present (a duplicate)."""
        if key in self._recent:
            return False
        v = self._view
        i = bisect.bisect_left(v, key)
        if i < len(v) and v[i] == key:
            return False
        self._recent.add(key)
        if len(self._recent) >= max(self._min_recent, self._n >> 5):
            self._merge()
        return True

    def _merge(self) -> None:
        new = np.fromiter(self._recent, dtype=np.uint64, count=len(self._recent))
        self._recent = set()
        new.sort()
        n, m = self._n, len(new)
        self._view.release()
        if len(self._arr) < n + m:
            self._arr.resize(max(n + m, len(self._arr) * 5 // 4), refcheck=False)
        self._arr[n: n + m] = new
        del new
        self._arr[: n + m].sort(kind="stable")  # two sorted runs: timsort merges them, m keys of scratch
        self._n = n + m
        self._view = memoryview(self._arr[: self._n])


#: glibc ``mallopt`` parameter number of M_MMAP_THRESHOLD
_M_MMAP_THRESHOLD = -3
#: blocks of at least this size are mmap'ed (and unmapped on free) instead of taken from the heap
MMAP_THRESHOLD = 256 << 10


def bound_heap_growth() -> None:
    """Fix glibc's mmap threshold so freed large buffers go back to the system.

    glibc raises the threshold (up to 32 MB) each time a large mmap'ed block is freed; afterwards the
    row-group-sized buffers of every pass over a docs store come from the heap and fragment it, so
    peak memory grew with the number of row groups read (measured over three passes of a 1M-document
    store: 30 -> 94 MB; with a fixed 256 KB threshold 30 -> 54 MB). No effect off glibc."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
