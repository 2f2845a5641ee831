"""Before any compute is spent: can a study's planned points identify each law's parameters?

Counts, per loss law and point selection, what the fit will see: distinct model sizes N (in the fit's
parameter convention), distinct token budgets D per size (annealed points: each run's end plus its WSD
decay branches; ``all``: every evaluation) and points per free parameter, and says which runs would make
an unidentifiable design identifiable. ``cptscale plan`` prints it under the run table.
"""

from __future__ import annotations

from typing import Any

#: (fit id stem, free parameters, distinct sizes it needs: to fit, plus one to hold out)
DESIGN_LAWS = (
    ("scratch-chinchilla", ("E", "A", "B", "alpha", "beta"), 3),
    ("cpt-extended", ("B'", "beta'", "gamma"), 2),
)
#: Points per free parameter below which a fit is called under-determined.
MIN_POINTS_PER_PARAM = 2.0


def planned_points(cfg: Any, runs: list[Any], select: str) -> dict[str, dict[float, set[int]]]:
    """Per kind (scratch, cpt), the distinct D per N the fits will see (target languages; N in the fit's
    convention; CPT D = target tokens; CPT runs at the smallest replay ratio, as fit-study uses them)."""
    from cptscale.plan import eval_steps, schedule_for

    conv = "nonembedding" if cfg.budget.param_count == "nonembedding" else "total"
    targets = set(cfg.languages.targets)
    min_replay = min(cfg.replay.ratios) if cfg.replay.ratios else 0.0
    out: dict[str, dict[float, set[int]]] = {"scratch": {}, "cpt": {}}
    for r in runs:
        if r.lang not in targets or r.arm is not None or r.variant is not None:
            continue
        if r.init == "cpt" and r.replay != min_replay:
            continue
        n = float(cfg.params(r.size, conv))
        per_step = r.global_batch_size * r.seq_length * (1 - (r.replay if r.init == "cpt" else 0.0))
        sched = schedule_for(cfg, r)
        if select == "annealed":
            steps = {r.steps, *sched.branches}
        else:
            steps = {s for s in eval_steps(r.steps, cfg.evaluation.points) if s >= cfg.fit.min_step_fraction * r.steps
                     and s > 0} | set(sched.branches)
        out[r.init].setdefault(n, set()).update(int(s * per_step) for s in steps)
    return out


def design_check(cfg: Any, runs: list[Any], select: str | None = None) -> list[dict[str, Any]]:
    """One verdict per law: the counts, whether they identify it, and what to add when they do not."""
    from cptscale.ladder import PAPER_SHAPES, TINY_SHAPES

    select = select or cfg.fit.points
    pts = planned_points(cfg, runs, select)
    fam = PAPER_SHAPES if all(s in PAPER_SHAPES for s in cfg.ladder.sizes) else TINY_SHAPES
    conv = "nonembedding" if cfg.budget.param_count == "nonembedding" else "total"
    largest = max(cfg.params(s, conv) for s in cfg.ladder.sizes)
    bigger = [n for n, s in sorted(fam.items(), key=lambda kv: kv[1].params(cfg.vocab_size))
              if n not in cfg.ladder.sizes and cfg.params(n, conv) > largest][:2]
    out = []
    for stem, free, need in DESIGN_LAWS:
        kind = stem.split("-")[0]
        per_n = pts[kind]
        n_points = sum(len(v) for v in per_n.values())
        d_per_n = min((len(v) for v in per_n.values()), default=0)
        ratio = n_points / len(free)
        problems, add = [], []
        if len(per_n) < need + 1:
            problems.append(f"{len(per_n)} distinct N; the law needs {need} to fit and one more to hold out")
            add.append(f"add sizes to ladder.sizes (e.g. {', '.join(bigger) or 'larger family shapes'})")
        if d_per_n < 2:
            problems.append(f"{d_per_n} distinct D per N: D is collinear with N, so alpha and beta are not separable")
            add.append("set train.schedule: wsd and train.wsd_branches: [0.25, 0.5] (three annealed budgets per run)"
                       if select == "annealed" else "evaluate more points per run (evaluation.points)")
        if ratio < MIN_POINTS_PER_PARAM:
            problems.append(f"{n_points} points for {len(free)} free parameters ({ratio:.1f} per parameter; "
                            f"want >= {MIN_POINTS_PER_PARAM:g})")
            if not add:
                add.append("add WSD decay branches or sizes")
        out.append({"law": stem, "select": select, "free": list(free), "distinct_N": len(per_n),
                    "min_distinct_D_per_N": d_per_n, "n_points": n_points, "points_per_param": ratio,
                    "identifies": not problems, "problems": problems, "add": add})
    return out


def format_design(checks: list[dict[str, Any]]) -> str:
    lines = []
    for c in checks:
        head = (f"{c['law']:<20} {c['select']} points: {c['distinct_N']} distinct N, >= {c['min_distinct_D_per_N']} "
                f"distinct D per N, {c['n_points']} points for {len(c['free'])} free parameters "
                f"({c['points_per_param']:.1f} per parameter)")
        lines.append(head + (": identifies the law" if c["identifies"] else ": does NOT identify the law"))
        if c["select"] == "all":
            lines.append("    note: 'all' mixes un-annealed evaluations with annealed ones (biased; fit.points: annealed)")
        lines += [f"    {p}" for p in c["problems"]] + [f"    to fix: {a}" for a in c["add"]]
    return "\n".join(lines)
