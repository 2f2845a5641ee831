"""Mixing stage: config validation, planning errors, token-exact blends, phase switches, reports.

Corpora are generated here: language "aa" uses token ids [1, 500), "bb" uses [500, 1000), and every
document ends in EOD (id 0), so each token read through the trainer's dataset tells its source.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from cptscale.mix import (
    CACHE_COMPLETE,
    CACHE_LOCK,
    BlendError,
    MixConfig,
    MixPhase,
    PhaseEnd,
    _source_cache_dir,
    build_training_dataset,
    format_plan_table,
    plan_blend,
    realize,
)
from cptscale.schedule import Schedule, first_step_at_or_below, lr_at

EOD = 0
RANGES = {"aa": (1, 500), "bb": (500, 1000)}
SEQ = 32


class StubTokenizer:
    """Just what GPTDatasetConfig reads from a Megatron tokenizer."""

    def __init__(self) -> None:
        self.eod = self.pad = self.eos = EOD
        self.vocab_size = 1000
        self.unique_identifiers = OrderedDict([("class", "StubTokenizer"), ("vocab_size", 1000)])
        self.unique_description = json.dumps(self.unique_identifiers)


def write_corpus(prefix: Path, lang: str, n_tokens: int, seed: int = 0, ids: tuple[int, int] | None = None) -> int:
    """Documents of 20-200 tokens in the language's id range (or ``ids``), each ending in EOD; returns
    tokens written."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    lo, hi = ids or RANGES[lang]
    b = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.uint16)
    total = 0
    while total < n_tokens:
        n = int(rng.integers(20, 200))
        doc = np.append(rng.integers(lo, hi, n - 1), EOD).astype(np.int64)
        b.add_item(torch.from_numpy(doc))
        b.end_document()
        total += n
    b.finalize(str(prefix) + ".idx")
    return total


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    d = tmp_path_factory.mktemp("mixdata")
    prefixes, tokens = {}, {}
    for i, lang in enumerate(RANGES):
        prefixes[lang] = str(d / lang / "train")
        Path(prefixes[lang]).parent.mkdir()
        tokens[lang] = write_corpus(Path(prefixes[lang]), lang, 100_000, seed=i)
    return {"prefixes": prefixes, "tokens": tokens, "dir": d}


def cosine(steps: int, warmup: int = 10) -> Schedule:
    return Schedule("cosine", max_lr=1e-3, min_lr=1e-5, warmup_steps=warmup, total_steps=steps)


def plan(corpora, mix: MixConfig | None = None, *, replay: float = 0.3, steps: int = 100, gbs: int = 100,
         tokens: dict[str, int] | None = None, cache: str | None = None) -> dict:
    return plan_blend(
        mix or MixConfig(), replay=replay, target="bb", source="aa", train_prefixes=corpora["prefixes"],
        train_tokens=tokens or corpora["tokens"], schedule=cosine(steps), steps=steps, global_batch_size=gbs,
        seq_length=SEQ, seed=1234, cache_dir=cache or str(corpora["dir"] / "cache"),
    )


def build(spec: dict):
    return build_training_dataset(spec, StubTokenizer(), spec["seq_length"], spec["global_batch_size"],
                                  spec["steps"], spec["seed"], spec["cache_dir"])


def lang_tokens(tokens: np.ndarray) -> tuple[int, int]:
    """(aa tokens, bb tokens) in a sample, EOD excluded."""
    t = np.asarray(tokens)
    return int(((t >= 1) & (t < 500)).sum()), int((t >= 500).sum())


# -- config ----------------------------------------------------------------------------------------
def test_config_validation():
    assert MixConfig().phases == []
    with pytest.raises(ValidationError, match="exactly one"):
        PhaseEnd(step=10, lr_fraction=0.2)
    with pytest.raises(ValidationError, match="exactly one"):
        PhaseEnd()
    with pytest.raises(ValidationError):
        PhaseEnd(run_fraction=1.0)
    with pytest.raises(ValidationError, match="sum to 1"):
        MixPhase(weights={"target": 0.5, "source": 0.4})
    with pytest.raises(ValidationError, match=">= 0"):
        MixPhase(weights={"target": 1.5, "source": -0.5})
    with pytest.raises(ValidationError, match="needs an `end`"):
        MixConfig(phases=[{"weights": {"target": 1.0}}, {}])
    with pytest.raises(ValidationError, match="last phase"):
        MixConfig(phases=[{"end": {"step": 5}}])
    with pytest.raises(ValidationError, match="Extra inputs"):
        MixConfig.model_validate({"phases": [], "replay": 0.1})
    MixPhase(weights={"target": 0.7, "source": 0.2, "aa": 0.1})  # 0.7+0.2+0.1 is not exactly 1.0


# -- planning errors -------------------------------------------------------------------------------
def test_plan_errors(corpora):
    with pytest.raises(BlendError, match="unknown blend key 'zz'"):
        plan(corpora, MixConfig(phases=[{"weights": {"zz": 1.0}}]))
    # a target language with no data fails at planning time, not in training
    with pytest.raises(BlendError, match="target language 'bb' has no training tokens"):
        plan(corpora, tokens={"aa": 10_000, "bb": 0})
    with pytest.raises(BlendError, match="'cc' has no training data"):
        plan_blend(MixConfig(), replay=0.1, target="cc", source="aa", train_prefixes=corpora["prefixes"],
                   train_tokens=corpora["tokens"], schedule=cosine(10), steps=10, global_batch_size=4,
                   seq_length=SEQ, seed=0, cache_dir="x")
    # 50 % replay of a small source without repetition: refuse, naming the numbers
    small = {"aa": 1_000, "bb": 10**9}
    with pytest.raises(BlendError, match=r"needs 160,000 tokens of 'aa' but only 1,000 exist.*allow_repetition"):
        plan(corpora, MixConfig(allow_repetition=False), replay=0.5, tokens=small)
    with pytest.warns(UserWarning, match="'aa' is repeated 160.00 epochs"):
        spec = plan(corpora, replay=0.5, tokens=small)
    assert spec["warnings"] and spec["totals"]["aa"]["epochs"] == pytest.approx(160.0)
    # a switch the LR never reaches (cosine to min_lr = 1 % of max) and an out-of-order switch
    with pytest.raises(BlendError, match="never reached"):
        plan(corpora, MixConfig(phases=[{"end": {"lr_fraction": 0.005}}, {}]))
    with pytest.raises(BlendError, match="strictly between"):
        plan(corpora, MixConfig(phases=[{"end": {"step": 50}}, {"end": {"run_fraction": 0.3}}, {}]))
    with pytest.raises(BlendError, match="strictly between"):
        plan(corpora, MixConfig(phases=[{"end": {"step": 100}}, {}]))


def test_plan_spec_shape(corpora):
    spec = plan(corpora, replay=0.3)
    assert spec["kind"] == "blend" and len(spec["phases"]) == 1
    ph = spec["phases"][0]
    assert (ph["start_step"], ph["end_step"]) == (0, 100)
    assert [(s["name"], s["weight"]) for s in ph["sources"]] == [("bb", pytest.approx(0.7)), ("aa", pytest.approx(0.3))]
    assert ph["sources"][1]["planned_tokens"] == round(0.3 * 100 * 100 * SEQ)
    json.dumps(spec)  # JSON-able
    # scratch run: one language, one source
    scratch = plan_blend(MixConfig(), replay=0.0, target="aa", source="aa", train_prefixes=corpora["prefixes"],
                         train_tokens=corpora["tokens"], schedule=cosine(10), steps=10, global_batch_size=4,
                         seq_length=SEQ, seed=0, cache_dir="x")
    assert [s["name"] for s in scratch["phases"][0]["sources"]] == ["aa"]
    table = format_plan_table([{"run_id": "r1", "data": spec}])
    assert "r1" in table and "0.3000" in table and "aa" in table


# -- realization through the trainer's dataset -----------------------------------------------------
@pytest.mark.parametrize("replay", [0.05, 0.3, 0.8])
def test_realized_shares(corpora, replay):
    """10,000 sequences: the source's token share, read item by item, within +-0.5 % of planned."""
    spec = plan(corpora, replay=replay)
    ds = build(spec)
    assert len(ds) == 10_000
    a = b = 0
    for i in range(len(ds)):
        item = ds[i]
        assert item["tokens"].shape == (SEQ,)
        ta, tb = lang_tokens(item["tokens"])
        a, b = a + ta, b + tb
    share = a / (a + b)
    print(f"replay {replay}: realized token share {share:.5f} over {len(ds)} sequences")
    assert abs(share - replay) <= 0.005, share
    rep = realize(spec, StubTokenizer(), dataset=ds)
    rows = {s["name"]: s for s in rep["phases"][0]["sources"]}
    assert abs(rows["aa"]["realized_share"] - replay) <= 0.005
    assert rows["aa"]["samples"] + rows["bb"]["samples"] == 10_000
    assert rows["aa"]["tokens"] == rows["aa"]["samples"] * SEQ
    assert rows["aa"]["available_tokens"] == corpora["tokens"]["aa"]
    assert rows["aa"]["epochs"] == pytest.approx(rows["aa"]["tokens"] / corpora["tokens"]["aa"])


def test_replay_zero_has_no_source_tokens(corpora):
    spec = plan(corpora, replay=0.0, steps=20, gbs=50)
    assert [s["name"] for s in spec["phases"][0]["sources"]] == ["bb"]
    ds = build(spec)
    assert sum(lang_tokens(ds[i]["tokens"])[0] for i in range(len(ds))) == 0
    assert set(np.asarray(ds.blends[0].dataset_index).tolist()) == {0}


def test_two_phase_switch_at_step(corpora):
    mix = MixConfig(phases=[{"weights": {"target": 1.0}, "end": {"step": 30}}, {"weights": {"source": 1.0}}])
    spec = plan(corpora, mix, steps=60, gbs=8)
    assert spec["switch_steps"] == [30]
    ds = build(spec)
    for i in range(len(ds)):
        a, b = lang_tokens(ds[i]["tokens"])
        if i // 8 < 30:
            assert a == 0 and b > 0, i
        else:
            assert b == 0 and a > 0, i
    assert realize(spec, StubTokenizer(), dataset=ds)["switch_steps"] == [30]


def test_lr_threshold_switch_on_cosine(corpora):
    """Reuse, Don't Retrain: switch to the second blend when LR has decayed to max/5."""
    steps, gbs = 80, 4
    mix = MixConfig(phases=[{"weights": {"target": 0.5, "source": 0.5}, "end": {"lr_fraction": 0.2}},
                            {"weights": {"target": 1.0}}])
    spec = plan(corpora, mix, steps=steps, gbs=gbs)
    sched = cosine(steps)
    switch = spec["switch_steps"][0]
    assert switch == first_step_at_or_below(sched, 0.2 * sched.max_lr)
    assert lr_at(sched, switch) <= 0.2e-3 < lr_at(sched, switch - 1)
    ds = build(spec)
    assert [ds.phase_of(i) for i in (switch * gbs - 1, switch * gbs)] == [0, 1]
    # phase 1 is pure target: not one source token from the switch step on
    assert all(lang_tokens(ds[i]["tokens"])[0] == 0 for i in range(switch * gbs, steps * gbs))
    assert sum(lang_tokens(ds[i]["tokens"])[0] for i in range(switch * gbs)) > 0
    rep = realize(spec, StubTokenizer(), dataset=ds)
    assert rep["switch_steps"] == [switch]
    assert [(p["start_step"], p["end_step"]) for p in rep["phases"]] == [(0, switch), (switch, steps)]


def test_phases_continue_through_a_source(corpora):
    """A second phase reads on where the first stopped instead of re-serving the same documents."""
    mix = MixConfig(phases=[{"weights": {"target": 1.0}, "end": {"step": 5}}, {"weights": {"target": 1.0}}])
    spec = plan(corpora, mix, steps=10, gbs=4)
    ds = build(spec)
    seen = [tuple(ds[i]["tokens"].tolist()) for i in range(len(ds))]
    assert len(set(seen)) == len(seen)


def test_deterministic_and_cache_reused(corpora, tmp_path):
    spec = plan(corpora, replay=0.2, steps=10, gbs=8, cache=str(tmp_path / "cache"))
    first = [build(spec)[i]["tokens"].tolist() for i in range(80)]
    files = sorted(str(p) for p in (tmp_path / "cache").rglob("*") if p.is_file())
    mtimes = [os.stat(f).st_mtime_ns for f in files]
    assert any(f.endswith(".npy") for f in files)
    again = build(spec)
    assert [again[i]["tokens"].tolist() for i in range(80)] == first
    assert sorted(str(p) for p in (tmp_path / "cache").rglob("*") if p.is_file()) == files
    assert [os.stat(f).st_mtime_ns for f in files] == mtimes  # loaded, not rebuilt
    other = build({**plan(corpora, replay=0.2, steps=10, gbs=8, cache=str(tmp_path / "c2")), "seed": 1234})
    assert [other[i]["tokens"].tolist() for i in range(80)] == first  # cache location does not matter
    with pytest.raises(BlendError, match="planned with seed"):
        build_training_dataset(spec, StubTokenizer(), SEQ, 8, 10, 99, spec["cache_dir"])


def test_report_cli(corpora, tmp_path):
    import tokenizers
    from tokenizers.models import WordLevel

    import cptscale.data.tokenizer as tok_mod

    vocab = {tok_mod.EOD: 0, **{f"t{i}": i for i in range(1, 1000)}}
    tk = tokenizers.Tokenizer(WordLevel(vocab, unk_token="t1"))
    tk.add_special_tokens([tok_mod.EOD])
    tk.save(str(tmp_path / "tokenizer.json"))
    spec = plan(corpora, replay=0.3, steps=10, gbs=8, cache=str(tmp_path / "cache"))
    run = {"run_id": "r1", "data": spec, "tokenizer": str(tmp_path / "tokenizer.json"), "seq_length": SEQ,
           "global_batch_size": 8, "steps": 10, "seed": 1234}
    (tmp_path / "run.json").write_text(json.dumps(run))
    from cptscale.cli import main

    assert main(["mix", "report", "--spec", str(tmp_path / "run.json"), "--out", str(tmp_path / "blend.json")]) == 0
    rep = json.loads((tmp_path / "blend.json").read_text())
    assert rep["run_id"] == "r1"
    rows = {s["name"]: s for s in rep["phases"][0]["sources"]}
    assert rows["aa"]["planned_share"] == pytest.approx(0.3)
    assert abs(rows["aa"]["realized_share"] - 0.3) < 0.02
    assert set(rows["aa"]) >= {"planned_share", "realized_share", "samples", "tokens", "available_tokens", "epochs"}
    # the trainer passes the plain tokenizer from load_tokenizer: it is wrapped for Megatron
    ds = build_training_dataset(spec, tok_mod.load_tokenizer(tmp_path / "tokenizer.json"), SEQ, 8, 10, 1234,
                                str(tmp_path / "unused"))
    assert len(ds) == 80 and tuple(ds[79]["tokens"].shape) == (SEQ,)
    (tmp_path / "bad.json").write_text(json.dumps({**run, "tokenizer": str(tmp_path / "missing.json")}))
    assert main(["mix", "report", "--spec", str(tmp_path / "bad.json"), "--out", str(tmp_path / "x.json")]) == 2


def test_mix_plan_cli(tmp_path, capsys):
    """`cptscale mix plan` against the lead's config and planner: Reuse-style two-phase blend."""
    import yaml

    from cptscale.cli import main
    from cptscale.runs import data_dir
    from cptscale.validation import load_config

    cfg = yaml.safe_load((Path(__file__).parent / "configs" / "micro.yaml").read_text())
    cfg["results_dir"] = str(tmp_path / "results")
    cfg["mix"] = {"phases": [{"end": {"lr_fraction": 0.2}}, {"weights": {"target": 1.0}}], "max_epochs": 2.0}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["mix", "plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert "d32l2-cpt-zh-r0.3" in out and "no data manifest" in out
    ddir = data_dir(load_config(path))
    for lang, n in (("en", 20_000), ("zh", 10**7)):
        (ddir / lang).mkdir(parents=True)
        (ddir / lang / "data.json").write_text(json.dumps({"train": {"tokens": n}, "valid": {"tokens": 1, "bytes": 1}}))
    assert main(["mix", "plan", str(path)]) == 0
    out = capsys.readouterr().out
    lines = [ln.split() for ln in out.splitlines() if ln.split()[:1] == ["d48l2-cpt-zh-r0.3"]]
    assert [ln[1] for ln in lines] == ["0", "0", "1"]  # phase 0: zh + en replay; phase 1: zh only
    assert lines[0][3] == "zh" and lines[1][3] == "en" and lines[1][4] == "0.3000"
    assert lines[1][7] == "2.657"  # 0.3 * 173 steps * 16 seqs * 64 tokens / 20k
    assert "d48l2-cpt-zh-r0.3: 'en' is repeated 2.66 epochs (> mix.max_epochs = 2)" in out


def test_run_fraction_switch(corpora):
    """A phase that ends at a fraction of the run switches at round(fraction * steps), exactly."""
    mix = MixConfig(phases=[{"weights": {"source": 1.0}, "end": {"run_fraction": 0.3}}, {"weights": {"target": 1.0}}])
    spec = plan(corpora, mix, steps=70, gbs=4)
    assert spec["switch_steps"] == [21]
    ds = build(spec)
    assert [ds.phase_of(i) for i in (21 * 4 - 1, 21 * 4)] == [0, 1]
    for i in range(len(ds)):
        a, b = lang_tokens(ds[i]["tokens"])
        assert (b == 0 and a > 0) if i // 4 < 21 else (a == 0 and b > 0), i
    assert realize(spec, StubTokenizer(), dataset=ds)["switch_steps"] == [21]


# -- lang/corpus sources ---------------------------------------------------------------------------
#: token ids of the per-corpus test splits: each sample tells which source it came from
CORPUS_IDS = {"zh/a": (1, 300), "zh/b": (300, 600), "en": (600, 1000)}


def _source_of(tokens) -> str:
    t = np.asarray(tokens)
    t = t[t != EOD]
    names = {name for name, (lo, hi) in CORPUS_IDS.items() if ((t >= lo) & (t < hi)).any()}
    assert len(names) == 1, names  # a sample never mixes sources
    return names.pop()


def _write_split(prefix: Path, name: str, n_tokens: int, seed: int) -> dict:
    from cptscale.util import file_hash

    prefix.parent.mkdir(parents=True, exist_ok=True)
    tokens = write_corpus(prefix, "aa", n_tokens, seed=seed, ids=CORPUS_IDS[name])
    return {"tokens": tokens, "bin_hash": file_hash(f"{prefix}.bin"), "idx_hash": file_hash(f"{prefix}.idx"),
            "bytes": tokens, "docs": 1}


def test_lang_corpus_blend_realized_through_run_spec(tmp_path):
    """{"zh/a": 0.5, "zh/b": 0.3, "en": 0.2}: per-corpus splits (train.<corpus>.bin/.idx, manifest
    train_corpora) planned by run_spec and read through the trainer's dataset, within +-0.5 % over
    10,000 sequences."""
    import yaml

    from cptscale import plan as P
    from cptscale import runs as R
    from cptscale.util import file_hash, write_json
    from cptscale.validation import load_config

    for name in ("a.txt", "b.txt", "en.txt"):
        (tmp_path / name).write_text("text\n")
    raw = yaml.safe_load((Path(__file__).parent / "configs" / "micro.yaml").read_text())
    raw.update(results_dir=str(tmp_path / "results"), budget={"tokens": {"d32l2": 640_000, "d48l2": 640_000}},
               corpora={"en": [{"name": "web", "kind": "local", "paths": ["en.txt"]}],
                        "zh": [{"name": "a", "kind": "local", "paths": ["a.txt"]},
                               {"name": "b", "kind": "local", "paths": ["b.txt"]}]},
               mix={"phases": [{"weights": {"zh/a": 0.5, "zh/b": 0.3, "en": 0.2}}]})
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(tmp_path / "study.yaml")
    assert cfg.blend_corpora("zh") == ["a", "b"]
    ddir = R.data_dir(cfg)
    split = {"en": _write_split(ddir / "en" / "train", "en", 60_000, 1),
             "zh/a": _write_split(ddir / "zh" / "train.a", "zh/a", 80_000, 2),
             "zh/b": _write_split(ddir / "zh" / "train.b", "zh/b", 50_000, 3)}
    for lang, train, per_corpus in (("en", split["en"], {}),
                                    ("zh", _write_split(ddir / "zh" / "train", "zh/a", 5_000, 4),
                                     {"a": split["zh/a"], "b": split["zh/b"]})):
        valid = _write_split(ddir / lang / "valid", "en" if lang == "en" else "zh/a", 2_000, 5)
        write_json(ddir / lang / "data.json", {
            "lang": lang, "train": train, "valid": valid, "train_corpora": per_corpus,
            "docs_hash": file_hash(tmp_path / "en.txt"), "tokenizer_hash": file_hash(tmp_path / "a.txt")})
    write_json(R.run_dir(cfg, "d32l2-scratch-en") / "done.json", {"final_loss": {"en": 5.0}})

    spec = P.run_spec(cfg, "d32l2-cpt-zh-r0.3").to_dict()
    assert spec["steps"] * spec["global_batch_size"] == 10_000
    sources = {s["name"]: s for s in spec["data"]["phases"][0]["sources"]}
    assert set(sources) == {"zh/a", "zh/b", "en"}
    assert sources["zh/a"]["prefix"] == str(ddir / "zh" / "train.a")
    assert sources["zh/b"]["available_tokens"] == split["zh/b"]["tokens"]
    assert sources["zh/a"]["bin_hash"] == split["zh/a"]["bin_hash"]  # the index cache is keyed by content

    ds = build_training_dataset(spec["data"], StubTokenizer(), spec["seq_length"], spec["global_batch_size"],
                                spec["steps"], spec["seed"], str(tmp_path / "unused"))
    counts = dict.fromkeys(CORPUS_IDS, 0)
    for i in range(len(ds)):
        counts[_source_of(ds[i]["tokens"])] += 1
    shares = {k: v / len(ds) for k, v in counts.items()}
    print(f"lang/corpus blend over {len(ds)} sequences: {shares}")
    for name, planned in (("zh/a", 0.5), ("zh/b", 0.3), ("en", 0.2)):
        assert abs(shares[name] - planned) <= 0.005, (name, shares)
    rows = {s["name"]: s for s in realize(spec["data"], StubTokenizer(), dataset=ds)["phases"][0]["sources"]}
    assert rows["zh/b"]["samples"] == counts["zh/b"] and rows["zh/b"]["available_tokens"] == split["zh/b"]["tokens"]

    # a blend corpus the manifest has no split for: planning names the fix
    m = json.loads((ddir / "zh" / "data.json").read_text())
    del m["train_corpora"]["b"]
    write_json(ddir / "zh" / "data.json", m)
    with pytest.raises(BlendError, match=r"'zh/b' has no training tokens.*--split-corpora b"):
        P.run_spec(cfg, "d32l2-cpt-zh-r0.3")


def test_lang_corpus_key_errors(corpora):
    prefixes = {**corpora["prefixes"], "bb/x": corpora["prefixes"]["bb"], "bb/y": corpora["prefixes"]["bb"]}
    tokens = {**corpora["tokens"], "bb/x": 1000, "bb/y": 1000}
    kw = dict(replay=0.3, target="bb", source="aa", train_prefixes=prefixes, train_tokens=tokens,
              schedule=cosine(10), steps=10, global_batch_size=4, seq_length=SEQ, seed=0, cache_dir="x",
              where="variants.v.mix")
    with pytest.raises(BlendError) as info:
        plan_blend(MixConfig(phases=[{"weights": {"bb/z": 0.5, "cc/x": 0.5}, "end": {"step": 20}}, {}]), **kw)
    err = info.value
    assert err.problems == [
        ("variants.v.mix.phases.0.weights.bb/z",
         "'z' is not a corpus of 'bb'; allowed: x, y (the names under corpora.bb), as bb/<name>"),
        ("variants.v.mix.phases.0.weights.cc/x", "unknown blend key 'cc/x'; allowed: target, source, aa, bb, "
                                                  "<lang>/<corpus>"),
        ("variants.v.mix.phases.0.end", err.problems[2][1]),
    ]
    assert "the switch is at step 20" in err.problems[2][1]
    spec = plan_blend(MixConfig(phases=[{"weights": {"bb/x": 0.6, "target": 0.4}}]), **kw)
    assert [(s["name"], s["weight"]) for s in spec["phases"][0]["sources"]] == [("bb", 0.4), ("bb/x", 0.6)]


# -- the index cache -------------------------------------------------------------------------------
def _copy_corpus(corpora, lang: str, dest: Path) -> str:
    dest.mkdir(parents=True, exist_ok=True)
    for ext in (".bin", ".idx"):
        shutil.copy(corpora["prefixes"][lang] + ext, dest / f"train{ext}")
    return str(dest / "train")


def test_index_cache_keyed_by_content_hashes(corpora, tmp_path):
    """With the manifest's content hashes a byte-identical rewrite (new mtime) keeps its cache; without
    them size + mtime decide; other content never meets an old index."""
    from cptscale.util import file_hash

    prefix = _copy_corpus(corpora, "bb", tmp_path / "bb")
    hashes = {"bin_hash": file_hash(prefix + ".bin"), "idx_hash": file_hash(prefix + ".idx")}
    cache = str(tmp_path / "cache")
    by_content, by_mtime = _source_cache_dir(cache, prefix, hashes), _source_cache_dir(cache, prefix)
    spec = plan_blend(MixConfig(), replay=0.0, target="bb", source="aa", train_prefixes={"aa": "-", "bb": prefix},
                      train_tokens={"aa": 1, "bb": corpora["tokens"]["bb"]}, train_hashes={"bb": hashes},
                      schedule=cosine(10), steps=10, global_batch_size=8, seq_length=SEQ, seed=1, cache_dir=cache)
    assert spec["phases"][0]["sources"][0]["bin_hash"] == hashes["bin_hash"]
    first = [build(spec)[i]["tokens"].tolist() for i in range(80)]
    assert [p.name for p in Path(cache).iterdir()] == [Path(by_content).name]
    npy = sorted(Path(by_content).glob("*.npy"))
    mtimes = [p.stat().st_mtime_ns for p in npy]

    st = os.stat(prefix + ".bin")  # rewrite the same bytes: only the modification time changes
    os.utime(prefix + ".bin", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert _source_cache_dir(cache, prefix, hashes) == by_content
    assert _source_cache_dir(cache, prefix) != by_mtime
    assert [build(spec)[i]["tokens"].tolist() for i in range(80)] == first
    assert [p.name for p in Path(cache).iterdir()] == [Path(by_content).name]
    assert [p.stat().st_mtime_ns for p in npy] == mtimes  # loaded, not rebuilt
    assert _source_cache_dir(cache, prefix, {**hashes, "bin_hash": "0" * 16}) != by_content


def test_index_cache_lock_excludes_concurrent_builders(corpora, tmp_path):
    """A second builder of the same index waits for the writer's lock instead of reading its half-written
    files (Megatron saves in place); once the lock is free it loads a complete, listed cache."""
    spec = plan(corpora, replay=0.2, steps=10, gbs=8, cache=str(tmp_path / "cache"))
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    src_dir = Path(_source_cache_dir(spec["cache_dir"], corpora["prefixes"]["bb"]))  # built first (the target)
    src_dir.mkdir(parents=True)
    script = """
import json, sys
from collections import OrderedDict
import torch  # heavy imports first: once "ready" is printed the build reaches the lock in milliseconds
import megatron.core.datasets.blended_megatron_dataset_builder, megatron.core.datasets.gpt_dataset
from cptscale.mix import build_training_dataset

class Tok:
    eod = pad = eos = 0
    vocab_size = 1000
    unique_identifiers = OrderedDict([("class", "StubTokenizer"), ("vocab_size", 1000)])
    unique_description = json.dumps(unique_identifiers)

spec = json.load(open(sys.argv[1]))
print("ready", flush=True)
ds = build_training_dataset(spec, Tok(), spec["seq_length"], spec["global_batch_size"], spec["steps"], spec["seed"],
                            spec["cache_dir"])
print("built", len(ds), flush=True)
"""
    with open(src_dir / CACHE_LOCK, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "spec.json")], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "ready"
            time.sleep(1.5)
            assert proc.poll() is None, proc.communicate()
            assert not list(src_dir.glob("*.npy"))  # nothing written while another writer holds the lock
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "built 80" in out
    files = sorted(p.name for p in src_dir.iterdir() if not p.name.startswith("."))
    assert len(files) == 4 and json.loads((src_dir / CACHE_COMPLETE).read_text()) == files


def test_killed_index_build_is_rebuilt(corpora, tmp_path):
    """Files a killed writer left (not listed as complete; one truncated) are rebuilt, never trusted."""
    spec = plan(corpora, replay=0.2, steps=10, gbs=8, cache=str(tmp_path / "cache"))
    first = [build(spec)[i]["tokens"].tolist() for i in range(80)]
    src_dir = Path(_source_cache_dir(spec["cache_dir"], corpora["prefixes"]["bb"]))
    listed = json.loads((src_dir / CACHE_COMPLETE).read_text())
    assert listed == sorted(p.name for p in src_dir.iterdir() if not p.name.startswith("."))
    (src_dir / CACHE_COMPLETE).unlink()
    shuffle = next(src_dir.glob("*shuffle_index.npy"))
    with open(shuffle, "r+b") as fh:
        fh.truncate(64)
    assert [build(spec)[i]["tokens"].tolist() for i in range(80)] == first
    assert shuffle.stat().st_size > 64
    assert json.loads((src_dir / CACHE_COMPLETE).read_text()) == listed
