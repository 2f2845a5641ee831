"""Compute accounting and transfer metrics (hand-computed cases)."""

from __future__ import annotations

import json

import pytest

from cptscale.compute import flops_6nd, flops_exact
from cptscale.ladder import ModelShape, get_shape
from cptscale.transfer import forgetting, scratch_tokens_for_loss, transfer_curve

SHAPE = ModelShape("t", hidden=64, layers=2, heads=4, ffn=128)


def test_flops_exact_matches_hand_count():
    # per layer: QKV 64*(4+2*4)*16 = 12288, out-proj 64*64 = 4096, SwiGLU 3*64*128 = 24576 -> 40960
    # matmuls 2 FLOPs/MAC * 2 layers * 40960 = 163840; attention 2*2*2 layers*seq 32*d_attn 64 = 16384
    # logits 2*64*256 = 32768; forward 212992 per token; training x3 = 638976 per token
    assert flops_exact(SHAPE, vocab=256, seq_length=32, tokens=1000) == 638_976_000
    assert flops_exact(SHAPE, vocab=256, seq_length=32, tokens=1000, embeddings=False) == 3 * (163840 + 16384) * 1000
    assert flops_exact(SHAPE, 256, 32, 1, causal_half=True) == 3 * (163840 + 8192 + 32768)
    gqa = ModelShape("g", hidden=64, layers=2, heads=4, ffn=128, kv_heads=2)  # QKV 64*(4+2*2)*16 = 8192
    assert flops_exact(gqa, 256, 32, 1) == 3 * (2 * 2 * (8192 + 4096 + 24576) + 16384 + 32768)
    assert flops_exact(SHAPE, 250, 32, 1) == flops_exact(SHAPE, 256, 32, 1)  # padded vocabulary


def test_flops_exact_close_to_6nd_at_short_context():
    """With a short context the attention term vanishes and exact ≈ 6·N (norm weights aside)."""
    sh = get_shape("1393M")
    n = sh.params(32000)
    exact = flops_exact(sh, 32000, 1, 1e9)
    assert exact == pytest.approx(flops_6nd(n, 1e9) - 6 * 1e9 * 32000 * sh.hidden, rel=1e-3)  # input emb: gather
    assert flops_6nd(2, 3) == 36


def test_scratch_equivalent_tokens_hand_case():
    scratch = [(1e6, 4.0), (1e7, 3.0), (2e7, 3.1), (1e8, 2.5)]  # 2e7 is an eval bump: ignored
    # log-log: t = ln(4/3.5)/ln(4/3) = 0.464163; D = 1e6 * 10**t = 2.911810e6
    assert scratch_tokens_for_loss(scratch, 3.5) == pytest.approx(2.911810e6, rel=1e-6)
    assert scratch_tokens_for_loss(scratch, 3.0) == pytest.approx(1e7)
    assert scratch_tokens_for_loss(scratch, 4.5) is None  # worse than the first scratch eval
    assert scratch_tokens_for_loss(scratch, 2.4) is None  # better than scratch ever got


def test_transfer_curve_hand_case():
    scratch = [{"step": 0, "tokens": 0, "lang": "zh", "loss": 10.0}] + [
        {"step": s, "tokens": d, "lang": "zh", "loss": lo} for s, d, lo in ((1, 1e6, 4.0), (10, 1e7, 3.0), (100, 1e8, 2.5))]
    cpt = [{"step": 2, "tokens": 2e6, "lang": "zh", "loss": 3.5}, {"step": 2, "tokens": 2e6, "lang": "en", "loss": 2.0},
           {"step": 9, "tokens": 9e8, "lang": "zh", "loss": 2.0}]
    rows = transfer_curve(cpt, scratch, "zh", flops_per_token=100.0, source_flops=1e8, target_fraction=0.9)
    assert len(rows) == 2
    r = rows[0]
    assert r["scratch_tokens_equiv"] == pytest.approx(2.911810e6, rel=1e-6)
    assert r["tokens_saved"] == pytest.approx(0.911810e6, rel=1e-5)
    assert r["flops"] == 2e8 and r["flops_total"] == 3e8
    assert r["flops_saved"] == pytest.approx(100 * 0.911810e6, rel=1e-5)
    assert r["frac_saved"] == pytest.approx(0.313142, rel=1e-5)
    assert r["flops_saved_total"] == pytest.approx(100 * 0.911810e6 - 1e8, rel=1e-5)
    assert r["effective_data_transferred"] == pytest.approx(2.911810e6 - 1.8e6, rel=1e-6)  # D_T on target tokens
    assert not r["extrapolated"]
    assert rows[1]["extrapolated"] and rows[1]["flops_saved"] is None


def test_forgetting_sign_and_step0():
    ev = [{"step": s, "tokens": s * 10, "lang": "en", "loss": lo} for s, lo in ((0, 2.40), (5, 3.0), (10, 3.68))]
    ev.append({"step": 5, "tokens": 50, "lang": "zh", "loss": 5.0})
    rows = forgetting(ev, 2.40, "en")
    assert [r["step"] for r in rows] == [0, 5, 10]
    assert rows[0]["forgetting"] == 0.0
    assert rows[-1]["forgetting"] == pytest.approx(1.28)


def test_transfer_cli_on_generated_runs(tmp_path):
    from cptscale.cli import main
    from cptscale.store.synthetic import generate_study

    generate_study(tmp_path / "s", sizes=["d64l2"], replays=[0.0], steps_per_run=20, evals_per_run=6)
    runs = tmp_path / "s" / "runs"
    out = tmp_path / "t.json"
    rc = main(["transfer", "--cpt", str(runs / "d64l2-cpt-zh-r0"), "--scratch", str(runs / "d64l2-scratch-zh"),
               "--source", str(runs / "d64l2-scratch-en"), "--out", str(out)])
    assert rc == 0
    t = json.loads(out.read_text())
    assert [r["step"] for r in t["rows"]] == [0, 4, 8, 12, 16, 20]
    inside = [r for r in t["rows"] if not r["extrapolated"]]
    assert inside and all(r["frac_saved"] > 0 for r in inside)
    assert t["forgetting"][-1]["forgetting"] > 0.5 and abs(t["forgetting"][0]["forgetting"]) < 0.05
    assert t["source_flops"] > 0 and t["provenance"]["input_hashes"]


def test_transfer_cli_rejects_scratch_as_cpt(tmp_path):
    from cptscale.cli import main
    from cptscale.store.synthetic import generate_study

    generate_study(tmp_path / "s", sizes=["d32l2"], replays=[0.0], steps_per_run=4, evals_per_run=3)
    runs = tmp_path / "s" / "runs"
    assert main(["transfer", "--cpt", str(runs / "d32l2-scratch-zh"), "--scratch", str(runs / "d32l2-scratch-zh"),
                 "--out", str(tmp_path / "x.json")]) == 2
