"""``cptscale plan``: the study's runs as a table (or JSON), one run's run.json, the study manifest."""

from __future__ import annotations

import argparse
from typing import Any

from cptscale.config.schema import StudyConfig
from cptscale.errors import CLIError
from cptscale.plan import plan_study, run_spec, study_manifest
from cptscale.runs import PlannedRun, job_seconds, job_units
from cptscale.throughput import study_calibration
from cptscale.util import fmt_num

#: Columns of ``cptscale plan``: run, parameters with and without embeddings, tokens, 6ND FLOPs, optimizer
#: steps, batch (sequences x sequence length), micro-batch x gradient accumulation, parallel layout and the
#: job's resources (nodes, GPUs in all, cores and memory per node, time limit of attempt 1).
PLAN_COLUMNS = ("run", "N", "N_nonemb", "tokens", "FLOPs", "steps", "batch", "mbs x acc", "tp/pp/dp", "nodes", "gpus",
                "cpus", "time", "mem")


def plan_totals(cfg: StudyConfig, runs: list[PlannedRun]) -> dict[str, Any]:
    """Totals of a plan: runs, tokens, FLOPs and the compute estimate in the unit the study runs on
    (GPU-hours or CPU core-hours: calibrated on the study's finished runs when it has some, else at the
    assumed MFU or per-core throughput), plus the resource-hours the jobs' time limits request (attempt 1)
    and the calibration used (None: assumed rates)."""
    s = cfg.slurm
    flops = sum(r.flops_6nd for r in runs)
    out: dict[str, Any] = {"runs": len(runs), "tokens": sum(r.tokens for r in runs), "flops": flops}
    cal = study_calibration(cfg.study_dir, s.gpus, s.gpu_peak_flops if s.gpus else None)
    world = {r.run_id: r.tp * r.pp * r.dp for r in runs}
    if cal is not None:
        hours = sum(job_seconds(cfg, world[r.run_id], r.params, r.flops_6nd)[0] * job_units(cfg, world[r.run_id])
                    for r in runs) / 3600
    elif s.gpus:
        hours = flops / (s.gpu_peak_flops * s.assumed_mfu) / 3600
    else:
        hours = flops / s.cpu_flops_per_core / 3600
    requested = sum((r.gpus if s.gpus else r.cpus * r.nodes) * r.runtime_minutes for r in runs) / 60
    out.update(unit="GPU-hours" if s.gpus else "CPU core-hours", hours=hours, requested_hours=requested,
               calibration=cal)
    return out


def format_plan(cfg: StudyConfig, runs: list[PlannedRun]) -> str:
    rows = [PLAN_COLUMNS]
    for r in runs:
        rows.append((
            r.run_id, fmt_num(r.params), fmt_num(r.params_nonemb), fmt_num(r.tokens), fmt_num(r.flops_6nd),
            str(r.steps), f"{r.global_batch_size}x{r.seq_length}", f"{r.micro_batch_size}x{r.grad_accum}",
            f"{r.tp}/{r.pp}/{r.dp}", str(r.nodes), str(r.gpus), str(r.cpus), f"{r.runtime_minutes}m", f"{r.mem_gb}G",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(PLAN_COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    t = plan_totals(cfg, runs)
    s = cfg.slurm
    if t["calibration"] is not None:
        rate = t["calibration"].describe()
    else:
        rate = (f"{s.assumed_mfu:.0%} MFU of {fmt_num(s.gpu_peak_flops)}FLOP/s per GPU" if s.gpus
                else f"{fmt_num(s.cpu_flops_per_core)}FLOP/s per core") + " (assumed: no finished runs measured yet)"
    lines.append("")
    lines.append(
        f"study {cfg.study}: {t['runs']} runs, {fmt_num(t['tokens'])} tokens, {fmt_num(t['flops'])} FLOPs (6ND), "
        f"~{t['hours']:.3g} {t['unit']} at {rate}; time limits request {t['requested_hours']:.3g} {t['unit']}"
    )
    return "\n".join(lines)


def _cmd_plan(args: argparse.Namespace) -> int:
    from cptscale.util import write_json
    from cptscale.validation import WHOLE_STUDY_CHECKS, load_study

    # one run's run.json (a workflow job per run) checks that run's blend, not every run's
    cfg = load_study(args.config, skip=WHOLE_STUDY_CHECKS if args.run else ())
    if args.study_json:
        write_json(args.study_json, study_manifest(cfg))
        return 0
    if args.run:
        try:
            spec = run_spec(cfg, args.run)
        except (KeyError, FileNotFoundError, ValueError) as exc:
            raise CLIError(str(exc).strip("'\"")) from None
        if args.out:
            spec.write(args.out)
        else:
            import json

            print(json.dumps(spec.to_dict(), indent=2, sort_keys=True))
        return 0
    try:
        runs = plan_study(cfg)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    if args.json:
        import json

        print(json.dumps([r.as_dict() for r in runs], indent=2))
    else:
        print(format_plan(cfg, runs))
        if cfg.source_model is not None:  # one model: its laws are in D at fixed N, not the ladder's
            sm = cfg.source_model
            print(f"\nCPT of an existing model: the data law in D at fixed N per replay ratio from "
                  f"{len(sm.target_tokens)} target-token budgets (3 fit the law; with 4 or more the largest is also "
                  f"held out); the frontier over {len(cfg.replay.ratios)} replay ratios")
        else:
            from cptscale.fit.design import (
                constrained_check,
                design_check,
                format_constrained,
                format_design,
                unique_tokens,
            )

            print("\nCan the planned points identify each law? (before any compute is spent)")
            print(format_design(design_check(cfg, runs)))
            print(format_constrained(cfg, constrained_check(cfg, runs, unique_tokens(cfg))))
        if cfg.iplt is not None:
            from cptscale.iplt import format_arms

            print("\n" + format_arms(cfg))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan", help="print every run of a study: N, tokens, FLOPs, steps, batch, layout, resources",
        description="Derive the study's runs from the config (nothing is trained). With --run, write one "
        "run's run.json for the training engine (needs the data stage's manifests).",
    )
    p.add_argument("config", help="study YAML")
    p.add_argument("--json", action="store_true", help="machine-readable list of runs")
    p.add_argument("--run", help="one run id: write its full training spec")
    p.add_argument("--out", help="with --run: where to write run.json (default: stdout)")
    p.add_argument("--study-json", help="write the study manifest (resolved config + expected runs) here")
    p.set_defaults(func=_cmd_plan)
