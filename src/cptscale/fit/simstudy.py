"""A study's planned design with losses drawn from a known law (:mod:`cptscale.simulate`): the points table
``cptscale db points`` would write, so fits can be checked against the truth (tests, ``bench/fit_quality.py``).

The runs, schedules, WSD branches and evaluation steps are the config's own (:func:`cptscale.plan.plan_study`);
only the losses are simulated. No generator of its own: every loss comes from ``simulate_run``.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

#: A tiny-scale truth near what the demo's real runs show (N without embeddings, ~3e4-2e5; D ~1e5-3e6):
#: final losses of 4.5-6.5 nats falling ~1.5 nats from a quarter of the run to its end as the real WSD
#: branches do, the stable phase of WSD above the annealed curve (the simulator's default anneal gain),
#: the simulator's measured noise; the CPT law saves compute (B' term below the scratch data term).
TINY_TRUTH: dict[str, Any] = {
    "format": "cptscale-truth/1", "name": "tiny-demo", "param_count": "nonembedding",
    "scratch": {"en": {"E": 1.5, "A": 150.0, "alpha": 0.4, "B": 300.0, "beta": 0.45},
                "zh": {"E": 1.8, "A": 150.0, "alpha": 0.4, "B": 300.0, "beta": 0.45}},
    "cpt": {"zh": {"B": 60.0, "beta": 0.35, "gamma": 0.08}},
}


def tiny_truth(noise: float = 1.0) -> Any:
    from cptscale.simulate import Truth

    t = Truth.from_dict(TINY_TRUTH)
    return t.with_noise(noise) if noise != 1.0 else t


def _spec(cfg: Any, run: Any) -> dict[str, Any]:
    """The run.json of a planned run as a RunSpec accepts it (no data files behind it: the simulator only reads
    the shape, schedule, batch, evaluation steps, blend shares and each language's unique tokens, which
    follow ``data.max_chars`` as the simulated data stage's do, so runs beyond them repeat data)."""
    from cptscale.plan import config_hash, eval_steps, schedule_for
    from cptscale.runspec import SPEC_VERSION
    from cptscale.simulate.backend import simulated_train_tokens

    t = cfg.train
    shares = ({run.lang: 1.0 - run.replay, run.source_lang: run.replay} if run.init == "cpt" else {run.lang: 1.0})
    samples = run.global_batch_size * run.steps
    unique = simulated_train_tokens(cfg.data.max_chars, cfg.data.validation_tokens)
    sources = [{"name": k, "prefix": f"data/{k}/train", "weight": v, "planned_samples": round(v * samples),
                "available_tokens": unique} for k, v in shares.items() if v > 0]
    return {"spec_version": SPEC_VERSION, "run_id": run.run_id, "study": cfg.study, "size": run.size,
            "init": run.init, "lang": run.lang, "source_lang": run.source_lang,
            "replay": run.replay if run.init == "cpt" else 0.0, "variant": run.variant,
            "shape": cfg.shape(run.size).as_dict(), "vocab_size": cfg.vocab_size, "params": run.params,
            "params_nonemb": run.params_nonemb, "tokens": run.tokens, "seq_length": run.seq_length,
            "micro_batch_size": run.micro_batch_size, "global_batch_size": run.global_batch_size, "steps": run.steps,
            "seed": cfg.seed, "schedule": asdict(schedule_for(cfg, run)),
            "optimizer": {"weight_decay": t.weight_decay, "beta1": t.beta1, "beta2": t.beta2, "eps": t.eps,
                          "grad_clip": t.grad_clip},
            "layout": {"tp": run.tp, "pp": run.pp, "dp": run.dp},
            "data": {"kind": "blend", "target": run.lang, "source": run.source_lang or run.lang,
                     "replay": run.replay if run.init == "cpt" else 0.0, "switch_steps": [],
                     "totals": {k: {"available_tokens": unique} for k, v in shares.items() if v > 0},
                     "phases": [{"index": 0, "start_step": 0, "end_step": run.steps, "samples": samples,
                                 "sources": sources}]},
            "eval": {"steps": eval_steps(run.steps, cfg.evaluation.points),
                     "languages": {lang: {"prefix": f"data/{lang}/valid", "bytes": 1_000_000}
                                   for lang in cfg.languages.all}},
            "checkpoint": {"dir": f"/nonexistent/checkpoints/{run.run_id}"}, "parent": None,
            "out_dir": str(cfg.study_dir / "runs" / run.run_id), "config_hash": config_hash(cfg),
            "provenance": {"simulated": True}}


def simulated_points(cfg: Any, truth: Any, seed: int = 0) -> Any:
    """The points table of ``cfg``'s planned study with losses from ``truth`` (target languages, evaluations
    after ``fit.min_step_fraction`` of each run, every WSD branch's final evaluation), columns as
    ``cptscale db points`` writes them (``run, N, D, loss, init, lang, size, replay, C, step, D_target,
    params_nonemb, branch``)."""
    import pandas as pd

    from cptscale.plan import plan_study
    from cptscale.simulate import simulate_run

    done: dict[str, dict[str, Any]] = {}
    rows = []
    for run in plan_study(cfg):  # sources first: a CPT run starts from its parent's final losses
        spec = _spec(cfg, run)
        parent = done.get(run.parent) if run.parent else None
        if parent is not None:
            spec["parent"] = {"run_id": run.parent, "final_loss": parent["final_loss"][run.source_lang]}
        sim = simulate_run(spec, truth, seed=seed, parent=parent)
        done[run.run_id] = sim.done
        if run.lang not in cfg.languages.targets:
            continue
        ends = {}
        for e in sim.evals:
            if e["lang"] == run.lang and e.get("branch") is not None:
                ends[e["branch"]] = max(ends.get(e["branch"], 0), int(e["step"]))
        share = 1 - (run.replay if run.init == "cpt" else 0.0)
        for e in sim.evals:
            br = e.get("branch")
            if e["lang"] != run.lang or e["step"] == 0 or (br is not None and e["step"] != ends[br]):
                continue
            if br is None and e["step"] < cfg.fit.min_step_fraction * run.steps:
                continue
            rows.append({"run": run.run_id, "N": float(run.params), "D": float(e["tokens"]), "loss": e["loss"],
                         "init": run.init, "lang": run.lang, "size": run.size, "replay": run.replay,
                         "C": 6.0 * run.params * e["tokens"], "step": int(e["step"]),
                         "D_target": float(e["tokens"]) * share, "params_nonemb": run.params_nonemb,
                         "branch": br})
    df = pd.DataFrame(rows)
    df["branch"] = df["branch"].astype("Int64")
    return df
