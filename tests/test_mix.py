"""Mixing stage: config validation, planning errors, token-exact blends, phase switches, reports.

Corpora are generated here: language "aa" uses token ids [1, 500), "bb" uses [500, 1000), and every
document ends in EOD (id 0), so each token read through the trainer's dataset tells its source.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from cptscale.mix import (
    BlendError,
    MixConfig,
    MixPhase,
    PhaseEnd,
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


def write_corpus(prefix: Path, lang: str, n_tokens: int, seed: int = 0) -> int:
    """Documents of 20-200 tokens in the language's id range, each ending in EOD; returns tokens written."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    lo, hi = RANGES[lang]
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
    tokenizers = pytest.importorskip("tokenizers")
    tok_mod = pytest.importorskip("cptscale.data.tokenizer")
    from tokenizers.models import WordLevel

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
    yaml = pytest.importorskip("yaml")
    pytest.importorskip("cptscale.plan")
    from cptscale.cli import main
    from cptscale.config import load_config
    from cptscale.plan import data_dir

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
