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


def test_cosine_middle_sits_above_the_law_and_wsd_branches_end_on_it():
    spec = _spec(kind="wsd", branches=(500, 1000))
    sim = simulate_run(spec, NOISELESS)
    law = NOISELESS.scratch["zh"]
    N, tps = spec["params"], spec["global_batch_size"] * spec["seq_length"]
    for b in (500, 1000):
        row = next(r for r in sim.evals if r.get("branch") == b and r["lang"] == "zh")
        # a branch is an annealed run of its own tokens: its end is the law's loss, although it shares the
        # main run's 100 warmup steps (20 % of a 500-step branch: uncorrected it ended ~1 % above the law)
        assert row["loss"] == pytest.approx(law.loss(N, b * tps), rel=1e-9)
        assert row["step"] == b and row["tokens"] == b * tps
        # where the branch leaves the main run (its first decay step) the two curves join
        rows = [r for r in sim.branch_metrics if r["branch"] == b]
        first = min(rows, key=lambda r: r["step"])
        main = next(r for r in sim.metrics if r["step"] == first["step"])
        assert abs(first["loss"] - main["loss"]) < 0.02 * main["loss"]
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


def test_a_run_that_repeats_its_data_ends_on_the_law_at_its_effective_data():
    """Beyond its language's unique tokens (the blend's available tokens) a run learns as from Muennighoff
    et al.'s effective data: it ends on the law at D' (repetition costs loss), its WSD branches too; a run
    within its unique tokens is unchanged. The truth's R_D round-trips through the law file, and the
    simulated data stage caps unique tokens only where data.max_chars caps the text."""
    from cptscale.fit.laws import effective_data
    from cptscale.simulate.backend import SIM_TRAIN_TOKENS, simulated_manifest

    spec = _spec(kind="wsd", branches=(500, 1000))
    law = NOISELESS.scratch["zh"]
    N, D, tps = spec["params"], spec["tokens"], spec["global_batch_size"] * spec["seq_length"]
    U = D / 8  # eight epochs
    spec["data"] = {"totals": {"zh": {"available_tokens": U}}}
    sim = simulate_run(spec, NOISELESS)
    assert _final(sim, "zh") == pytest.approx(law.loss(N, float(effective_data(D, U, 15.39))), rel=1e-9)
    assert _final(sim, "zh") > law.loss(N, D) + 0.01
    for b in (500, 1000):
        row = next(r for r in sim.evals if r.get("branch") == b and r["lang"] == "zh")
        assert row["loss"] == pytest.approx(law.loss(N, float(effective_data(b * tps, U, 15.39))), rel=1e-9)
    harsh = replace(NOISELESS, repetition=replace(NOISELESS.repetition, R_D=2.0))
    assert _final(simulate_run(spec, harsh), "zh") > _final(sim, "zh")
    spec["data"]["totals"]["zh"]["available_tokens"] = 2 * D  # within its unique tokens: the plain law
    assert _final(simulate_run(spec, NOISELESS), "zh") == pytest.approx(law.loss(N, D), rel=1e-9)
    d = harsh.as_dict()
    assert Truth.from_dict(d).repetition.R_D == 2.0
    with pytest.raises(TruthError, match=r"repetition\.R_D must be > 0"):
        Truth.from_dict({**d, "repetition": {"R_D": 0}})
    assert simulated_manifest("es", 2048, 20000, "h", ["a", "b"], 560000)["train"]["tokens"] == 560000 // 3 - 20000
    assert simulated_manifest("es", 2048, 20000, "h", [], None)["train"]["tokens"] == SIM_TRAIN_TOKENS


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


# -- studies in one process: known-truth recovery, design ------------------------------------------
ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def _small_config(sizes=("49M", "86M", "137M", "259M", "512M", "1085M"), wsd=True, mixed=True, **fit):
    """The simulated paper study, shrunk: a few sizes, no replay sweep, WSD branches and (mixed) every other
    size at 80 instead of 20 tokens/param, so that N and D are not collinear."""
    import yaml

    from cptscale.validation import parse_config

    raw = yaml.safe_load((ROOT / "workflow/studies/paper-simulated.yaml").read_text())
    raw["ladder"]["sizes"] = list(sizes)
    raw["replay"]["ratios"] = [0.0]
    raw["parallel"]["per_size"] = {}
    raw["fit"].update(fit)
    if wsd:
        raw["train"].update(schedule="wsd", wsd_branches=[0.25, 0.5])
    cfg = parse_config(raw)
    if mixed:
        raw["budget"]["tokens"] = {s: int(80 * cfg.params(s)) for s in sizes[1::2]}
        cfg = parse_config(raw)
    return cfg


def test_known_truth_recovery_on_a_small_ladder():
    """Fitted like fit-study fits (Huber, grid, L-BFGS) on the fully annealed points (final evaluations and
    WSD branch ends) of 6 simulated sizes: without noise the truth comes back (every annealed point lies
    on the law; < 0.01 on each exponent); with the measured
    noise every exponent lies within 4 standard deviations (+ the point-selection bias) of the truth, the
    standard deviation being the design's linearised one (an independent computation: cptscale design)."""
    from cptscale.fit.estimate import exponents, fit_law
    from cptscale.simulate.design import examine, law_data
    from cptscale.simulate.study import points_frame, simulate_study

    cfg = _small_config()
    truth = default_truth()
    law = truth.scratch["zh"]
    sims0 = simulate_study(cfg, truth.with_noise(0.0), 0)
    d = next(x for x in law_data(cfg, truth, sims0, "annealed") if x.law == "chinchilla")
    expect = examine(d, truth, [1e21], cfg.fit.huber_delta, cfg.fit.reduction)

    def fit(sims):
        df = points_frame(sims, cfg.fit.min_step_fraction)
        df = df[(df["init"] == "scratch") & ((df["step"] == df.groupby("run")["step"].transform("max"))
                                             | df["branch"].notna())]
        return fit_law(df, "chinchilla", grid="coarse")

    exact = fit(sims0)
    # without noise the grid fit lands where the design's warm-started fit does: the truth (annealed points,
    # branch ends included, lie on the law)
    for k in ("alpha", "beta"):
        assert exact.params[k] == pytest.approx(expect["noiseless_fit"][k], abs=1e-3), k
        assert abs(expect["bias"][k]) < 0.01, k
    for seed in (1, 2):
        fr = fit(simulate_study(cfg, truth, seed))
        for k in ("alpha", "beta"):
            tol = 4 * expect["sd"][k] + abs(expect["bias"][k])
            assert abs(fr.params[k] - getattr(law, k)) <= tol, (k, fr.params[k], tol)
        a = exponents(fr)["a"]
        assert abs(a - law.allocation()["a"]) <= 4 * expect["a"]["sd"] + abs(expect["a"]["bias"])


def test_points_match_what_the_store_selects(tmp_path):
    """The in-process points table equals `cptscale db points` on the same simulated runs written to disk
    and ingested (same rows, losses and D): the coverage bench and `cptscale design` fit what the
    pipeline fits."""
    from cptscale.simulate.study import points_frame, simulate_study

    cfg = _small_config(sizes=("49M", "86M", "137M"), mixed=False)
    sims = simulate_study(cfg, default_truth(), 3)
    df = points_frame(sims, cfg.fit.min_step_fraction)
    assert set(df["run"]) == {r for r, (s, _) in sims.items() if s["lang"] == "zh"}
    assert df["branch"].notna().sum() == 2 * 3 * 2  # two branches per zh run (3 scratch + 3 CPT)
    assert (df["step"] > 0).all() and (df["lang"] == "zh").all()


def test_design_ranks_the_better_identified_design_first(tmp_path):
    """Two designs of the same study, both fitted on annealed points: 3 sizes at one token budget each (N and
    D collinear) vs 6 sizes, WSD branches and two token budgets per parameter. `cptscale design A B` puts
    the second first."""
    import yaml

    from cptscale.cli import main

    bad = _small_config(sizes=("49M", "86M", "137M"), wsd=False, mixed=False, points="annealed")
    good = _small_config(points="annealed")
    paths = []
    for name, cfg in (("bad", bad), ("good", good)):
        d = cfg.model_dump(mode="json", exclude_none=True)
        d["study"], d["results_dir"] = f"design-{name}", str(tmp_path / "results")
        p = tmp_path / f"{name}.yaml"
        p.write_text(yaml.safe_dump(d))
        paths.append(str(p))
    assert main(["design", *paths, "--studies", "0", "--no-alternatives"]) == 0
    ranking = json.loads((tmp_path / "results" / "design-ranking.json").read_text())
    assert [r["study"] for r in ranking["ranking"]] == ["design-good", "design-bad"]
    assert ranking["ranking"][0]["precision"] > 10 * ranking["ranking"][1]["precision"]
    # the scratch law also shows the fixed-E remedy at its best (E known): never less precise than all free
    for name in ("good", "bad"):
        rep = json.loads((tmp_path / "results" / f"design-{name}" / "design" / "design.json").read_text())
        sc = next(law for law in rep["designs"][0]["laws"] if law["kind"] == "scratch")
        assert sc["fixed_E"]["E"] == sc["truth"]["E"]
        assert sc["fixed_E"]["heldout"]["status"] == sc["heldout"]["status"]  # skipped for 3 sizes, as the free fit's
        assert sc["fixed_E"]["a"]["width95"] <= sc["a"]["width95"] * (1 + 1e-9)


def test_annealing_momentum_matches_the_recurrence():
    from cptscale.simulate.curve import ewm

    rng = np.random.default_rng(0)
    x = rng.random(5000)
    for lam in (0.0, 0.5, 0.99, 0.9999):
        ref, acc = np.empty_like(x), 0.0
        for i, v in enumerate(x):
            acc = lam * acc + v
            ref[i] = acc
        assert np.allclose(ewm(x, lam), ref, rtol=1e-9, atol=1e-12), lam


def test_simulated_points_see_the_unique_tokens_of_a_capped_study():
    """simulated_points' run specs carry each language's unique tokens as the simulated data stage counts them
    (data.max_chars / 3 less the validation split), so the repeat study's runs repeat data there too: its
    largest scratch run ends above the unique-data law, and by the effective-data law's amount."""
    from cptscale.fit.laws import effective_data
    from cptscale.fit.simstudy import _spec
    from cptscale.plan import plan_study
    from cptscale.simulate.truth import CPTLaw, ScratchLaw, Truth
    from cptscale.validation import load_config

    cfg = load_config(ROOT / "workflow/studies/en-es-repeat.yaml")
    run = next(r for r in plan_study(cfg) if r.run_id == "d64l3-scratch-es")
    spec = _spec(cfg, run)
    U = 560000 // 3 - cfg.data.validation_tokens
    assert spec["data"]["totals"]["es"]["available_tokens"] == U and run.tokens > 10 * U
    law = ScratchLaw(E=2.0, A=150.0, alpha=0.4, B=300.0, beta=0.45)
    truth = Truth(scratch={"en": law, "es": law}, cpt={"es": CPTLaw(B=60.0, beta=0.35, gamma=0.08)},
                  param_count="nonembedding").with_noise(0.0)
    final = simulate_run(spec, truth).done["final_loss"]["es"]
    N = run.params_nonemb
    assert final == pytest.approx(law.loss(N, float(effective_data(run.tokens, U, 15.39))), rel=1e-9)
