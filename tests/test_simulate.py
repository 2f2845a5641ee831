"""The simulator's ground truth and curves (cptscale.simulate): the pure module, no workflow."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import numpy as np
import pytest

from cptscale.ladder import PAPER_SHAPES
from cptscale.schedule import Schedule
from cptscale.simulate import Truth, TruthError, default_truth, simulate_run


def _spec(size: str = "1393M", init: str = "scratch", lang: str = "zh", replay: float = 0.0, kind: str = "cosine",
          steps: int = 2000, tokens_per_step: int = 2048 * 512, branches: tuple[int, ...] = (),
          parent: dict | None = None) -> dict:
    """A run.json with what the simulator reads (the planner's spec has more; the workflow tests use it)."""
    shape = PAPER_SHAPES[size]
    vocab = 32000
    warm = round(0.05 * steps)
    decay = round(0.2 * (steps - warm)) if kind == "wsd" else 0
    sched = Schedule(kind, 2e-4, 2e-5, warm, steps, 0.0, decay, "linear", branches)
    spec = {"run_id": f"{size}-{init}-{lang}" + (f"-r{replay:g}" if init == "cpt" else ""), "init": init,
            "lang": lang, "source_lang": "en" if init == "cpt" else None, "replay": replay, "size": size,
            "shape": shape.as_dict(), "vocab_size": vocab, "params": shape.params(vocab),
            "params_nonemb": shape.params(vocab, embeddings=False), "seq_length": 2048,
            "global_batch_size": tokens_per_step // 2048, "steps": steps, "tokens": steps * tokens_per_step,
            "seed": 1234, "schedule": asdict(sched),
            "eval": {"steps": [0, 10, 100, steps // 2, steps], "languages": {"en": {"bytes": 4_000_000},
                                                                              "zh": {"bytes": 3_000_000}}},
            "parent": parent}
    return spec


NOISELESS = default_truth().with_noise(0.0)


def _final(sim, lang):
    return sim.done["final_loss"][lang]


@pytest.mark.parametrize("kind", ["cosine", "wsd", "constant"])
def test_noiseless_final_loss_is_the_law(kind):
    """The truth is "final loss of a fully annealed run of D tokens": every schedule ends on the law."""
    spec = _spec(kind=kind)
    sim = simulate_run(spec, NOISELESS)
    law = NOISELESS.scratch["zh"]
    assert _final(sim, "zh") == pytest.approx(law.loss(spec["params"], spec["tokens"]), rel=1e-9)
    assert sim.done["simulated"] is True


def test_cosine_middle_sits_above_the_law_and_wsd_branches_end_near_it():
    spec = _spec(kind="wsd", branches=(500, 1000))
    sim = simulate_run(spec, NOISELESS)
    law = NOISELESS.scratch["zh"]
    N, tps = spec["params"], spec["global_batch_size"] * spec["seq_length"]
    for b in (500, 1000):
        row = next(r for r in sim.evals if r.get("branch") == b and r["lang"] == "zh")
        # the branch shares the main run's 100 warmup steps, 20 % of a 500-step branch (5 % of the main run):
        # less LR area per token than a run of its own, so a little above the law (Tissue et al.'s S1)
        assert law.loss(N, b * tps) <= row["loss"] <= law.loss(N, b * tps) * 1.03
        assert row["step"] == b and row["tokens"] == b * tps
    main_mid = next(r for r in sim.evals if r["step"] == 1000 and r["lang"] == "zh" and "branch" not in r)
    branch = next(r for r in sim.evals if r.get("branch") == 1000 and r["lang"] == "zh")
    assert main_mid["loss"] > branch["loss"] + 0.03  # the stable phase has not annealed
    assert [b["steps"] for b in sim.done["branches"]] == [500, 1000]
    assert {r["branch"] for r in sim.branch_metrics} == {500, 1000}
    cos = simulate_run(_spec(kind="cosine"), NOISELESS)
    mid = next(r for r in cos.evals if r["step"] == 1000 and r["lang"] == "zh")
    assert mid["loss"] > law.loss(N, 1000 * tps)


def test_cpt_starts_at_the_parent_and_beats_scratch_as_the_paper_says():
    """Step 0 of a CPT run is its parent's final model (the trainer's init-sanity gate compares them);
    the default B' makes the 5.5B CPT model at 70B tokens equal scratch at 110B tokens (Section 4.4)."""
    t = NOISELESS
    zh, cpt = t.scratch["zh"], t.cpt["zh"]
    assert cpt.loss(zh, 4.3586e9, 70e9) == pytest.approx(zh.loss(4.3586e9, 110e9), rel=1e-12)
    assert zh.allocation()["a"] == pytest.approx(0.4286, abs=1e-4)
    assert cpt.allocation(zh)["a"] == pytest.approx(0.3846, abs=1e-4)
    parent = {"final_loss": {"en": 2.41, "zh": 11.2}, "tokens": 27.86e9}
    spec = _spec(init="cpt", replay=0.0, parent={"run_id": "1393M-scratch-en", "final_loss": 2.41})
    sim = simulate_run(spec, default_truth(), seed=3, parent=parent)
    first = {r["lang"]: r["loss"] for r in sim.evals if r["step"] == 0}
    assert first == {"en": 2.41, "zh": 11.2}
    assert _final(sim, "zh") < 11.2 - 5


def test_forgetting_without_replay_and_recovery_with_it():
    """Paper Section 5.2 at 1.4B, 20 tokens/param: English 2.40 -> 3.68 without replay; with 5 % replay
    the English loss rises early, then ends below its start."""
    steps, tps = 13300, 2048 * 1024
    parent = {"final_loss": {"en": 2.40, "zh": 11.0}, "tokens": 27.86e9}
    par = {"run_id": "1393M-scratch-en", "final_loss": 2.40}
    no = simulate_run(_spec(init="cpt", replay=0.0, steps=steps, tokens_per_step=tps, parent=par), NOISELESS,
                      parent=parent)
    assert _final(no, "en") == pytest.approx(3.68, abs=0.02)
    spec = _spec(init="cpt", replay=0.05, steps=steps, tokens_per_step=tps, parent=par)
    spec["eval"]["steps"] = [0, 50, 200, 1000, 5000, steps]
    rep = simulate_run(spec, NOISELESS, parent=parent)
    en = [r["loss"] for r in rep.evals if r["lang"] == "en"]
    assert max(en) > 2.40 + 0.1 and en[-1] < 2.40


def test_seeded_noise():
    spec = _spec()
    t = default_truth()
    a, b, c = simulate_run(spec, t, seed=1), simulate_run(spec, t, seed=1), simulate_run(spec, t, seed=2)
    assert a.evals == b.evals and a.metrics == b.metrics
    assert a.evals != c.evals
    # noise is relative: within a few standard deviations of the noiseless final loss
    sd = (t.noise.run**2 + t.noise.eval**2) ** 0.5
    assert abs(np.log(_final(a, "zh") / a.truth_final["zh"])) < 5 * sd


def test_truth_file_round_trip_and_errors(tmp_path):
    t = default_truth()
    p = tmp_path / "law.json"
    t.dump(p)
    assert Truth.load(p) == replace(t, name=t.name)
    d = json.loads(p.read_text())
    d["scratch"]["zh"]["alpha"] = -1
    p.write_text(json.dumps(d))
    with pytest.raises(TruthError, match=r"scratch\.zh\.alpha must be a finite number"):
        Truth.load(p)
    d = t.as_dict()
    d["cpt"]["zh"]["gamma"] = 0.5
    with pytest.raises(TruthError, match=r"beta .* must exceed gamma"):
        Truth.from_dict(d)
    with pytest.raises(TruthError, match="unknown field"):
        Truth.from_dict({**t.as_dict(), "extra": 1})
    with pytest.raises(TruthError, match="does not exist"):
        Truth.load(tmp_path / "missing.json")
