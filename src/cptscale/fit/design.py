"""Before any compute is spent: can a study's planned points identify each law's parameters?

Counts, per loss law and point selection, what the fit will see: distinct model sizes N (in the fit's
parameter convention), distinct token budgets D per size (annealed points: each run's end plus its WSD
decay branches; ``all``: every evaluation) and points per free parameter, and says which runs would make
an unidentifiable design identifiable. ``cptscale plan`` prints it under the run table.

The data-constrained laws (fitted when scratch runs repeat their language's unique tokens U) get the same
check once U is known, i.e. after the data stage (:func:`constrained_check`): repeated points, repetition
levels, epochs reached and points per free parameter.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: (fit id stem, free parameters, distinct sizes it needs: to fit, plus one to hold out)
DESIGN_LAWS = (
    ("scratch-chinchilla", ("E", "A", "B", "alpha", "beta"), 3),
    ("cpt-extended", ("B'", "beta'", "gamma"), 2),
)
#: Points per free parameter below which a fit is called under-determined.
MIN_POINTS_PER_PARAM = 2.0


def planned_points(cfg: Any, runs: list[Any], select: str,
                   langs: set[str] | None = None) -> dict[str, dict[float, set[int]]]:
    """Per kind (scratch, cpt), the distinct D per N the fits will see (target languages, or ``langs``; N in
    the fit's convention; CPT D = target tokens; CPT runs at the smallest replay ratio, as fit-study uses
    them)."""
    from cptscale.plan import eval_steps, schedule_for

    conv = "nonembedding" if cfg.budget.param_count == "nonembedding" else "total"
    targets = set(cfg.languages.targets) if langs is None else langs
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


#: The data-constrained laws fit-study fits on a language's scratch runs when some of them repeat data:
#: (fit id stem, free parameters, repeated points and repetition levels below which the fit is refused)
CONSTRAINED_DESIGN = (
    ("scratch-constrained", ("E", "A", "B", "alpha", "beta", "R_D"), 1, 1),
    ("scratch-overfit", ("E", "A", "B", "alpha", "beta", "P", "delta", "kappa"), 4, 2),
)
#: Epochs the repeated points must reach before the data tell repetition constants apart. Measured: on EN->ES
#: (workflow/studies/en-es.yaml) three repeated points reach 1.81 epochs and R*_D's bootstrap interval spans
#: the whole profile grid [1, 100]; on the repeat study (en-es-repeat.yaml, 12 repeated points up to 12.5
#: epochs) it is [2.4, 6.2]. At two epochs the published R*_D = 15.4 makes D' 1.6 % less than D.
MIN_EPOCHS = 2.0


def unique_tokens(cfg: Any) -> dict[str, dict[str, float]]:
    """Per target language whose data stage has run: its unique training tokens U, and the characters of
    text behind them (to turn a token target into a data.max_chars). Empty before the data stage."""
    from cptscale.errors import CLIError
    from cptscale.runs import data_manifest
    from cptscale.util import load_json_file

    out = {}
    for lang in cfg.languages.targets:
        path = data_manifest(cfg, lang)
        if path.is_file():
            m = load_json_file(path, CLIError, "data manifest")
            tr = m.get("train") if isinstance(m, dict) else None
            if not isinstance(tr, dict) or not isinstance(tr.get("tokens"), (int, float)):
                raise CLIError(f"{path}: no train.tokens (not a data stage manifest); rerun the data stage for "
                               f"{lang!r} (`cptscale data`, or delete the file and rerun the workflow)")
            out[lang] = {"U": float(tr["tokens"]), "train_chars": float(tr.get("chars") or 0),
                         "ingest_chars": float((m.get("ingest") or {}).get("chars") or 0), "manifest": str(path)}
    return out


def constrained_check(cfg: Any, runs: list[Any], unique: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """One verdict per data-constrained law and target language whose U is known: what the fit will see of
    repeated data (annealed or all points as ``fit.points``), whether it is fitted at all (no run repeats
    data: skipped, the law is Chinchilla's), refused (the fit's own minimum of repeated points and levels),
    under-determined (points per free parameter) or unable to resolve the repetition constants (epochs
    below :data:`MIN_EPOCHS`), and what would change that."""
    out = []
    for lang, u in sorted(unique.items()):
        U = u["U"]
        planned = planned_points(cfg, runs, cfg.fit.points, {lang})
        pts = planned["scratch"]
        D = np.array(sorted(d for ds in pts.values() for d in ds), float)
        n_points = sum(len(v) for v in pts.values())
        rep = D[D > U]
        levels = len(set(np.round(rep / U - 1, 6)))
        max_ep = float(D.max() / U) if len(D) else 0.0
        # the unique tokens that would put the largest run at MIN_EPOCHS, as a cap on characters read
        u_need = float(D.max()) / MIN_EPOCHS if len(D) else U
        cap = None
        if u["train_chars"] and u["ingest_chars"]:
            cap = u["ingest_chars"] - u["train_chars"] + u["train_chars"] * u_need / U
        fewer = (f"set data.max_chars to about {cap:.3g} (U ~ {u_need:.3g} tokens)" if cap
                 else f"cap the text at about {u_need:.3g} unique tokens (data.max_chars)")
        for stem, free, min_rep, min_levels in CONSTRAINED_DESIGN:
            status, problems, add = "identifies", [], []
            if not len(rep):
                status = "not fitted"
                problems.append(f"no planned run repeats the {U:.4g} unique tokens (largest run {max_ep:.2f} epochs): "
                                "skipped, the law reduces to Chinchilla's")
                add.append(f"to study repetition: {fewer}")
            else:
                if len(rep) < min_rep or levels < min_levels:
                    status = "refused"
                    problems.append(f"{len(rep)} repeated points at {levels} repetition levels: the fit needs >= "
                                    f"{min_rep} at >= {min_levels}")
                if n_points / len(free) < MIN_POINTS_PER_PARAM:
                    problems.append(f"{n_points} points for {len(free)} free parameters ({n_points / len(free):.1f} "
                                    f"per parameter; want >= {MIN_POINTS_PER_PARAM:g})")
                if max_ep < MIN_EPOCHS:
                    problems.append(f"the repeated points reach {max_ep:.2f} epochs (< {MIN_EPOCHS:g}): too little "
                                    "repetition to tell the repetition constants apart (measured on EN->ES at 1.81 "
                                    "epochs: R*_D's interval spans its whole grid)")
                    add.append(f"more repetition: {fewer}, or add larger sizes (more tokens per run)")
                if problems and status == "identifies":
                    status = "does NOT identify"
                if status == "refused" or n_points / len(free) < MIN_POINTS_PER_PARAM:
                    add.append("more repeated points: WSD decay branches (train.wsd_branches), or sizes that repeat data")
            out.append({"law": f"{stem}-{lang}", "lang": lang, "unique_tokens": U, "manifest": u["manifest"],
                        "select": cfg.fit.points, "free": list(free), "n_points": n_points,
                        "repeated_points": len(rep), "repetition_levels": levels, "max_epochs": max_ep,
                        "points_per_param": n_points / len(free), "status": status,
                        "identifies": status == "identifies", "problems": problems, "add": add})
        dc = np.array([d for ds in planned["cpt"].values() for d in ds], float)
        if len(dc) and dc.max() > U:  # no data-constrained CPT law: say what repetition does to the CPT fits
            out.append({"law": f"cpt-extended-{lang}", "lang": lang, "unique_tokens": U, "manifest": u["manifest"],
                        "select": cfg.fit.points, "n_points": len(dc), "repeated_points": int((dc > U).sum()),
                        "max_epochs": float(dc.max() / U), "status": "unique-data law on repeated data",
                        "identifies": None, "add": [],
                        "problems": [f"CPT runs repeat the target text up to {dc.max() / U:.2f} epochs; the CPT laws "
                                     "assume unique tokens (there is no data-constrained CPT law here), so their "
                                     "B', beta' and gamma absorb the repetition cost: read the saving as that of "
                                     "CPT on this much text"]})
    return out


def format_constrained(cfg: Any, checks: list[dict[str, Any]]) -> str:
    """The data-constrained laws' lines of ``cptscale plan``; before the data stage, what is missing."""
    if not checks:
        return ("data-constrained laws (fitted when scratch runs repeat data): checked once the data stage has "
                f"written {cfg.study_dir / 'data'}/<lang>/data.json (the unique tokens); run `cptscale plan` again then")
    lines = []
    for c in checks:
        if c["identifies"] is None:  # a note on a law without a data-constrained form
            lines.append(f"{c['law']:<24} U = {c['unique_tokens']:.4g} tokens: {c['repeated_points']} of "
                         f"{c['n_points']} {c['select']} points repeat data: {c['status']}")
            lines += [f"    {p}" for p in c["problems"]]
            continue
        lines.append(f"{c['law']:<24} U = {c['unique_tokens']:.4g} tokens: {c['repeated_points']} of {c['n_points']} "
                     f"{c['select']} points repeat data ({c['repetition_levels']} levels, up to {c['max_epochs']:.2f} "
                     f"epochs), {c['points_per_param']:.1f} points per free parameter: {c['status']}"
                     + (" the law" if c["status"] in ("identifies", "does NOT identify") else ""))
        lines += [f"    {p}" for p in c["problems"]] + [f"    to fix: {a}" for a in c["add"]]
    return "\n".join(lines)
