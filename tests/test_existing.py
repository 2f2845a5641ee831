"""CPT of an existing model: the data law at fixed N, the forgetting-vs-replay frontier and the answer,
checked against points drawn from known laws (cptscale.simulate.truth: the paper's extended CPT law
and forgetting law) with noise."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cptscale.existing import RunPoint, answer_text, fit_data_law, frontier, recommend
from cptscale.simulate import default_truth

N = 1.1e9  # one model, e.g. a 1B LLaMA
BUDGETS = np.geomspace(2e8, 2e10, 6)  # total CPT tokens per run
RATIOS = (0.0, 0.05, 0.1, 0.25, 0.5)


def _points(noise: float, seed: int = 0) -> tuple[list[RunPoint], float]:
    truth = default_truth()
    zh, en, cpt, forget = truth.scratch_law("zh"), truth.scratch_law("en"), truth.cpt_law("zh"), truth.forgetting
    rng = np.random.default_rng(seed)
    before = float(en.loss(N, 2e10))  # the model as given, trained on 20 B source tokens
    pts = []
    for r in RATIOS:
        for total in BUDGETS:
            d_t, d_r = (1 - r) * total, r * total
            tgt = float(cpt.loss(zh, N, d_t)) * math.exp(rng.normal(0, noise))
            src = before + float(forget.rise(N, d_t, d_r)) + rng.normal(0, noise)
            pts.append(RunPoint(r, d_t, tgt, src))
    return pts, before


def test_data_law_recovers_the_truth_at_fixed_n():
    truth = default_truth()
    zh, cpt = truth.scratch_law("zh"), truth.cpt_law("zh")
    pts, _ = _points(noise=0.0)
    p0 = [p for p in pts if p.replay == 0.0]
    law = fit_data_law([p.tokens for p in p0], [p.target_loss for p in p0])
    # with N fixed the CPT law is E + A/N^alpha + (B'/N^gamma) / D^beta'
    assert law.beta == pytest.approx(cpt.beta, rel=1e-3)
    floor = zh.E + zh.A / N**zh.alpha
    assert abs(law.E - floor) <= 1e-3 * floor
    assert law.rmse_log < 1e-6 and law.on_bound == ()
    # tokens_for inverts the law; a loss at or below the floor is never reached
    assert law.tokens_for(float(law.loss(3e9))) == pytest.approx(3e9, rel=1e-6)
    assert math.isinf(law.tokens_for(law.E))


def test_data_law_with_noise_and_held_out_largest_budget():
    """Fit on the five smaller budgets, predict the largest: the figure the study reports."""
    pts, _ = _points(noise=0.005, seed=3)
    p0 = sorted((p for p in pts if p.replay == 0.0), key=lambda p: p.tokens)
    law = fit_data_law([p.tokens for p in p0[:-1]], [p.target_loss for p in p0[:-1]])
    err = abs(float(law.loss(p0[-1].tokens)) - p0[-1].target_loss) / p0[-1].target_loss
    print(f"held-out largest budget: relative error {err:.3g}; beta {law.beta:.3f} (true "
          f"{default_truth().cpt_law('zh').beta:.3f}); on bound: {law.on_bound or 'none'}")
    assert err < 0.02


def test_frontier_and_recommendation_follow_the_forgetting_law():
    pts, before = _points(noise=0.0)
    rows = frontier(pts, before)
    assert [r["replay"] for r in rows] == list(RATIOS)
    forgetting = [r["forgetting"] for r in rows]
    assert forgetting == sorted(forgetting, reverse=True)  # more replay, less forgetting
    # more replay also means fewer target tokens, a higher target loss: a trade-off until forgetting is gone
    # (by r = 0.1 at this budget); past that a ratio only costs target loss and leaves the frontier
    assert [r["pareto"] for r in rows] == [True, True, True, False, False]
    limit = 0.05
    rec = recommend(pts, before, max_forgetting=limit)
    truth = default_truth().forgetting
    expect = min(r for r in RATIOS if truth.rise(N, (1 - r) * BUDGETS[-1], r * BUDGETS[-1]) <= limit)
    assert rec["replay"] == expect and rec["within_forgetting"]
    assert rec["tokens"] == pytest.approx(max(p.tokens for p in pts if p.replay == expect), rel=1e-3)
    assert "replay" in answer_text(rec, "zh", "en") and "zh tokens" in answer_text(rec, "zh", "en")
    # a limit nobody meets: the (smallest) ratio that forgets least, said so
    rec = recommend(pts, before, max_forgetting=-1.0)
    least = min(r["forgetting"] for r in rows)
    assert rec["replay"] == min(r["replay"] for r in rows if r["forgetting"] == least) and not rec["within_forgetting"]


def test_bad_points_are_refused():
    with pytest.raises(ValueError, match="3 distinct"):
        fit_data_law([1e6, 1e6, 2e6], [3.0, 3.0, 2.9])
    with pytest.raises(ValueError, match="> 0"):
        fit_data_law([1e6, 2e6, 0], [3.0, 2.9, 2.8])


def test_cli_recommend_from_a_points_csv(tmp_path, capsys):
    import json

    from cptscale.cli import main

    pts, before = _points(noise=0.0)
    csv_path = tmp_path / "points.csv"
    csv_path.write_text("replay,tokens,target_loss,source_loss\n" + "".join(
        f"{p.replay},{p.tokens},{p.target_loss},{p.source_loss}\n" for p in pts))
    out = tmp_path / "rec.json"
    assert main(["existing-model", "recommend", "--points", str(csv_path), "--source-loss-before", str(before),
                 "--max-forgetting", "0.05", "--lang", "zh", "--source-lang", "en", "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec == {**rec, "replay": recommend(pts, before, max_forgetting=0.05)["replay"], "within_forgetting": True}
    assert rec["answer"] in capsys.readouterr().out
    csv_path.write_text("replay,tokens,target_loss,source_loss\n0.1,abc,2.0,3.0\n")
    assert main(["existing-model", "recommend", "--points", str(csv_path), "--source-loss-before", "3"]) == 2
    assert "points.csv:2" in capsys.readouterr().err

