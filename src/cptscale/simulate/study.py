"""A whole simulated study in one process: every planned run of a config, and the fitting points.

The workflow's simulated backend writes files and runs every stage (:mod:`cptscale.simulate.backend`);
this module skips the files for the statistics that need many studies (interval coverage in
``bench/sim_coverage.py``, ``cptscale design``). Its points are selected as ``cptscale db points``
selects them (every evaluation after step 0 and after ``fit.min_step_fraction`` of the run, on the
run's own language, plus each WSD branch's final evaluation; ``D_target = D (1 - replay)``), and a test
checks that both give the same table for the same study.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict
from typing import Any

from cptscale.simulate.run import SimulatedRun, simulate_run
from cptscale.simulate.truth import Truth


def light_spec(cfg: Any, run: Any) -> dict[str, Any]:
    """What the simulator reads of a run's run.json, from the config alone (no data stage, no parent)."""
    from cptscale import plan as P

    sched = P.schedule_for(cfg, run)
    spec: dict[str, Any] = {
        "run_id": run.run_id, "size": run.size, "init": run.init, "lang": run.lang, "source_lang": run.source_lang,
        "replay": run.replay, "shape": cfg.shape(run.size).as_dict(), "vocab_size": cfg.vocab_size,
        "params": run.params, "params_nonemb": run.params_nonemb, "tokens": run.tokens,
        "seq_length": run.seq_length, "global_batch_size": run.global_batch_size, "steps": run.steps,
        "seed": cfg.seed, "schedule": asdict(sched),
        "eval": {"steps": P.eval_steps(run.steps, cfg.evaluation.points),
                 "languages": {lang: {} for lang in cfg.languages.all}},
        "parent": {"run_id": run.parent} if run.parent else None,
    }
    if run.init == "cpt" and P.mix_for_run(cfg, run):  # a configured blend (phases): its shares per step
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            spec["data"] = P.blend_for_run(cfg, run, {}, sched)
    return spec


def simulate_study(cfg: Any, truth: Truth, seed: int = 0, runs: list[Any] | None = None
                   ) -> dict[str, tuple[dict[str, Any], SimulatedRun]]:
    """Every run of the study (or ``runs``), parents first: run id -> (spec, simulated run)."""
    from cptscale import plan as P

    planned = runs if runs is not None else [r for r in P.plan_study(cfg) if r.arm is None]
    out: dict[str, tuple[dict[str, Any], SimulatedRun]] = {}
    for run in sorted(planned, key=lambda r: r.init != "scratch"):
        spec = light_spec(cfg, run)
        parent = None
        if run.parent:
            if run.parent not in out:
                raise ValueError(f"run {run.run_id}: its source run {run.parent} is not part of the simulated runs")
            done = out[run.parent][1].done
            parent = {"final_loss": done["final_loss"], "tokens": done["tokens"]}
            spec["parent"]["final_loss"] = done["final_loss"][run.source_lang]
        out[run.run_id] = (spec, simulate_run(spec, truth, seed, parent, metrics=False))
    return out


def points_frame(sims: dict[str, tuple[dict[str, Any], SimulatedRun]], min_step_fraction: float = 0.0,
                 langs: list[str] | None = None) -> Any:
    """The points table ``cptscale db points`` would write for these runs (same columns and selection)."""
    import pandas as pd

    if langs is None:
        langs = sorted({s["lang"] for s, _ in sims.values() if s["init"] == "cpt"}) or None
    rows = []
    for rid, (spec, sim) in sims.items():
        if langs is not None and spec["lang"] not in langs:
            continue
        rep = float(spec.get("replay") or 0.0)
        N = float(spec["params"])
        for e in sim.evals:
            if e["lang"] != spec["lang"] or e["step"] <= 0 or e["step"] < min_step_fraction * spec["steps"]:
                continue
            rows.append({"run": rid, "N": N, "D": float(e["tokens"]), "loss": e["loss"], "init": spec["init"],
                         "lang": spec["lang"], "size": spec["size"], "replay": rep, "C": 6.0 * N * e["tokens"],
                         "step": e["step"], "D_target": e["tokens"] * (1 - rep),
                         "params_nonemb": spec["params_nonemb"], "branch": e.get("branch")})
    df = pd.DataFrame.from_records(rows)
    if len(df):
        df["branch"] = df["branch"].astype("Int64")
    return df
