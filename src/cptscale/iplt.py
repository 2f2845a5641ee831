"""The IPLT study: prune after a little training, not after all of it, at equal total training FLOPs.

Li, Zhao & Shang (2019, "Incremental Pruning based on Less Training") found that a CNN's pruning
decisions need only a few epochs of training, and that pruning incrementally from there makes the
rest of training cheaper. This module turns the study config's ``iplt:`` section
(:class:`cptscale.config.schema.IPLTConfig`) into **arms**: ordinary runs of the study (run ids the
``RUN_ID`` regex and the Snakemake wildcards accept, via the ``variant`` suffix ``iplt*``), each with
the trainer's ``prune`` spec key (:func:`cptscale.prune.prune_events`), so the ``train`` rule, the
store, the evaluations and the report handle them like any other run.

Arms of a pretraining language L (dense model S = ``iplt.size``, target shape T = ``iplt.target``):

========================  ===============================  =========================================
arm                       run id                           what trains
========================  ===============================  =========================================
``dense``                 ``S-scratch-L-ipltdense``        S from scratch, no pruning
``small``                 ``T-scratch-L-ipltsmall``        T from scratch
``f<percent>`` (f < 1)    ``S-scratch-L-ipltf5`` (5 %)     S, first prune at f x D_L, k prunes, then T
``classic`` (f = 1)       ``S-cpt-L-r0-ipltclassic``       from ``S-scratch-L``'s final checkpoint: k
                                                           prunes, then retraining
========================  ===============================  =========================================

CPT arms (``iplt.cpt``; target t, source s, replay r; parent ``S-scratch-s``): ``cpt-dense``
(``S-cpt-t-r<r>-ipltdense``), ``cpt-start`` (``...-ipltstart``: one prune at step 0) and
``cpt-incremental`` (``...-ipltincr``: k prunes from step 0 to span x D_L).

Budget rule (equal total training FLOPs; also in :class:`cptscale.config.schema.IPLTConfig`): F_dense is the
exact training FLOPs of S on its study token budget D_L (the ordinary run ``S-scratch-L``, whole
steps); every arm spends B = ``budget_factor`` x F_dense. FLOPs are counted as the trainer counts
them: per step, the current shape's :func:`cptscale.compute.flops_per_token` x batch tokens. An arm
with prunes at steps e_1 < ... < e_k spends ``sum_i (e_{i+1} - e_i) x fpt(shape_i) x batch`` up to
its last prune; its total steps are solved so that the remainder, trained at the final shape, brings
it to B (rounded to the nearest whole step: |F - B| <= 1/2 x fpt(T) x batch tokens). The classic
arm's full training (``S-scratch-L``, F_dense) is counted as inherited FLOPs and its own run spends
B - F_dense; CPT arms do not count the shared source pretraining. Every arm uses the batch of S.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from cptscale.compute import flops_6nd
from cptscale.prune import PrunedShape, PruneError, flops_per_token, prune_events, resolve_target

if TYPE_CHECKING:
    from cptscale.config.schema import IPLTConfig, StudyConfig
    from cptscale.runs import PlannedRun

PRETRAIN, CPT = "pretrain", "cpt"


@dataclass(frozen=True)
class Arm:
    """One arm of the IPLT study: the planned run plus what makes it an arm."""

    arm: str  #: dense | small | classic | f<percent> | cpt-dense | cpt-start | cpt-incremental
    panel: str  #: "pretrain-<lang>" or "cpt-<source>-<target>": arms compared with each other
    run: PlannedRun
    shape: dict[str, Any]  #: the run's starting shape (head_dim explicit for a pruned target)
    events: list[dict[str, Any]]  #: the trainer's prune events {step, shape}
    start_fraction: float | None
    budget_flops: float  #: B
    inherited_flops: float  #: FLOPs of the parent run counted toward the arm (classic: F_dense)
    inherited_from: str | None
    planned_flops: float  #: the run's own exact training FLOPs, as the trainer will count them
    final_shape: dict[str, Any] = field(default_factory=dict)

    @property
    def total_flops(self) -> float:
        return self.planned_flops + self.inherited_flops

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("run")
        d["run_id"] = self.run.run_id
        return d


def arm_sort_key(arm: str) -> tuple[int, float, str]:
    """Display order: dense, small, the start fractions in increasing order, classic; then the CPT arms."""
    fixed = {"dense": 0, "small": 1, "classic": 3, "cpt-dense": 4, "cpt-start": 5, "cpt-incremental": 6}
    if arm in fixed:
        return (fixed[arm], 0.0, arm)
    if arm.startswith("f") and arm[1:].replace("p", "").isdigit():
        return (2, float(arm[1:].replace("p", ".")), arm)
    return (9, 0.0, arm)


def panel_sort_key(panel: str) -> tuple[bool, str]:
    """Pretraining panels before CPT panels."""
    return (not str(panel).startswith(PRETRAIN), str(panel))


def fraction_tag(f: float) -> str:
    """Arm name of a start fraction: 0.05 -> "f5", 0.005 -> "f0p5" (percent; a run-id-safe variant)."""
    return "f" + f"{100 * f:.6g}".replace(".", "p")


def _cfg(cfg: StudyConfig) -> IPLTConfig:
    if cfg.iplt is None:
        raise ValueError(f"study {cfg.study!r} has no `iplt` section")
    return cfg.iplt


def dense_shape(cfg: StudyConfig) -> PrunedShape:
    s = cfg.shape(_cfg(cfg).size)
    return PrunedShape(s.hidden, s.layers, s.heads, s.ffn, s.kv_heads)


def target_shape(cfg: StudyConfig) -> PrunedShape:
    """The pruned shape T: a ladder size with the dense model's hidden size and head_dim, or per-unit
    targets (resolved against the dense shape; raises :class:`PruneError` naming the problem)."""
    ic = _cfg(cfg)
    big = dense_shape(cfg)
    if isinstance(ic.target, str):
        try:
            t = cfg.shape(ic.target)
        except (KeyError, ValueError):
            raise PruneError(f"{ic.target!r} is not a ladder size (give a size name or per-unit targets)") from None
        want: dict[str, Any] = {"hidden": t.hidden, "layers": t.layers, "heads": t.heads, "ffn": t.ffn,
                                "kv_heads": t.kv_heads, "head_dim": t.head_dim}
    else:
        want = dict(ic.target)
    out = resolve_target(big, want)
    if out == big:
        raise PruneError(f"target {ic.target!r} equals the dense shape of {ic.size!r}: nothing to prune")
    return out


def target_name(cfg: StudyConfig) -> str:
    """The size label of the small arm: the target's ladder name, else ``<size>p`` (pruned shape)."""
    ic = _cfg(cfg)
    return ic.target if isinstance(ic.target, str) else f"{ic.size}p"


def _shape_dict(shape: PrunedShape, name: str) -> dict[str, Any]:
    return {"name": name, **shape.as_dict()}


def segments(start: PrunedShape, events: list[dict[str, Any]], steps: int) -> list[tuple[int, PrunedShape]]:
    """(steps, shape) pieces of a run whose prune ``events`` ({step, shape}) happen at the start of their step."""
    out, cur, prev = [], start, 0
    for ev in events:
        out.append((int(ev["step"]) - prev, cur))
        cur, prev = resolve_target(cur, ev["shape"]), int(ev["step"])
    out.append((steps - prev, cur))
    return [(n, sh) for n, sh in out if n > 0]


def run_flops(start: PrunedShape, events: list[dict[str, Any]], steps: int, vocab: int, seq: int,
              tokens_per_step: int) -> float:
    """Exact training FLOPs of a (possibly pruned) run, counted as the trainer counts them."""
    return sum(n * flops_per_token(sh, vocab, seq) * tokens_per_step for n, sh in segments(start, events, steps))


def solve_steps(start: PrunedShape, events: list[dict[str, Any]], budget: float, vocab: int, seq: int,
                tokens_per_step: int, what: str) -> int:
    """Total steps of a run with these prune events whose FLOPs come closest to ``budget``: the steps up
    to the last prune are fixed; the final shape trains the rest (at least one step)."""
    last = int(events[-1]["step"]) if events else 0
    spent = run_flops(start, events, last, vocab, seq, tokens_per_step)
    final = segments(start, events, last + 1)[-1][1]
    per_step = flops_per_token(final, vocab, seq) * tokens_per_step
    after = round((budget - spent) / per_step)
    if after < 1:
        raise ValueError(
            f"iplt: arm {what} spends {spent:.4g} FLOPs up to its last prune (step {last}), leaving "
            f"{budget - spent:.3g} of the budget B = {budget:.4g} (less than one step of the pruned model, "
            f"{per_step:.3g}); raise iplt.budget_factor or lower the start fraction / iplt.span")
    return last + after


def _events(start: PrunedShape, target: PrunedShape, k: int, first: int, last: int, what: str) -> list[dict[str, Any]]:
    try:
        return prune_events(start, target, k, first, last)
    except PruneError as exc:
        raise ValueError(f"iplt: arm {what}: {exc}; raise iplt.span or lower iplt.increments") from None


def parent_runs(cfg: StudyConfig) -> list[PlannedRun]:
    """The ordinary dense runs the arms need (``S-scratch-L`` for every pretraining language and the
    source language of the CPT arms), planned as the study plans any scratch run."""
    from cptscale.runs import plan_run

    ic = _cfg(cfg)
    langs = list(pretrain_langs(cfg))
    if ic.cpt is not None and cfg.languages.source not in langs:
        langs.append(cfg.languages.source)
    return [plan_run(cfg, ic.size, "scratch", lang, None, 0.0) for lang in langs]


def pretrain_langs(cfg: StudyConfig) -> list[str]:
    ic = _cfg(cfg)
    return [cfg.languages.source] if ic.langs is None else list(ic.langs)


class _ArmPlanner:
    """Plans IPLT arms one panel at a time: what every arm shares (the dense and target shapes, batch,
    sequence and vocabulary) and the arms planned so far."""

    def __init__(self, cfg: StudyConfig) -> None:
        from cptscale.runs import batch_layout

        self.cfg, self.ic = cfg, _cfg(cfg)
        self.big, self.small = dense_shape(cfg), target_shape(cfg)
        self.vocab, self.seq = cfg.vocab_size, cfg.train.seq_length
        self.gbs, _ = batch_layout(cfg, self.ic.size)
        self.tps = self.gbs * self.seq
        self.small_d = _shape_dict(self.small, target_name(cfg))
        self.big_d = cfg.shape(self.ic.size).as_dict()  # the ladder's own dict: the run spec of any dense run
        self.arms: list[Arm] = []

    def add(self, arm: str, panel: str, rid: str, size: str, init: str, lang: str, source: str | None,
            replay: float, variant: str, start: PrunedShape, start_dict: dict[str, Any], events: list[dict[str, Any]],
            budget: float, frac: float | None, parent: str | None = None, inherited: float = 0.0) -> None:
        vocab, seq, tps = self.vocab, self.seq, self.tps
        steps = solve_steps(start, events, budget - inherited, vocab, seq, tps, f"{arm} ({panel})")
        run = _arm_run(self.cfg, rid, size, init, lang, source, replay, variant, arm, parent, start, events, steps,
                       self.gbs)
        final = segments(start, events, steps)[-1][1]
        self.arms.append(Arm(arm, panel, run, start_dict, events, frac, budget, inherited, parent,
                             run_flops(start, events, steps, vocab, seq, tps), _shape_dict(final, size)))

    def budget(self, par: PlannedRun) -> tuple[float, float]:
        """The dense parent run's FLOPs and the budget B every arm of its panels spends."""
        f_dense = run_flops(self.big, [], par.steps, self.vocab, self.seq, self.tps)
        return f_dense, self.ic.budget_factor * f_dense

    def pretrain_panel(self, lang: str, par: PlannedRun) -> None:
        """dense, small, one arm per start fraction (classic for 1.0, pruning the trained parent)."""
        from cptscale.runs import run_id

        ic, big, small, k = self.ic, self.big, self.small, self.ic.increments
        f_dense, budget = self.budget(par)
        panel = f"{PRETRAIN}-{lang}"
        self.add("dense", panel, run_id(ic.size, "scratch", lang, variant="ipltdense"), ic.size, "scratch", lang,
                 None, 0.0, "ipltdense", big, self.big_d, [], budget, None)
        self.add("small", panel, run_id(target_name(self.cfg), "scratch", lang, variant="ipltsmall"),
                 target_name(self.cfg), "scratch", lang, None, 0.0, "ipltsmall", small, self.small_d, [], budget, None)
        for f in sorted(ic.start_fractions):
            span_steps = round(ic.span * par.steps)
            if f < 1.0:
                name = fraction_tag(f)
                first = max(1, round(f * par.steps))
                ev = _events(big, small, k, first, first + span_steps if k > 1 else first, f"{name} ({panel})")
                self.add(name, panel, run_id(ic.size, "scratch", lang, variant=f"iplt{name}"), ic.size, "scratch",
                         lang, None, 0.0, f"iplt{name}", big, self.big_d, ev, budget, f)
            else:
                ev = _events(big, small, k, 0, span_steps if k > 1 else 0, f"classic ({panel})")
                self.add("classic", panel, run_id(ic.size, "cpt", lang, 0.0, "ipltclassic"), ic.size, "cpt", lang,
                         lang, 0.0, "ipltclassic", big, self.big_d, ev, budget, 1.0, parent=par.run_id,
                         inherited=f_dense)

    def cpt_panels(self, src: str, par: PlannedRun) -> None:
        """Per CPT target: dense, prune at the start, prune incrementally over the span."""
        from cptscale.runs import run_id

        ic, big, small, k = self.ic, self.big, self.small, self.ic.increments
        assert ic.cpt is not None
        _, budget = self.budget(par)
        span_steps = round(ic.span * par.steps)
        for tgt in ic.cpt.targets:
            panel = f"{CPT}-{src}-{tgt}"
            r = ic.cpt.replay
            self.add("cpt-dense", panel, run_id(ic.size, "cpt", tgt, r, "ipltdense"), ic.size, "cpt", tgt, src, r,
                     "ipltdense", big, self.big_d, [], budget, None)
            ev = _events(big, small, 1, 0, 0, f"cpt-start ({panel})")
            self.add("cpt-start", panel, run_id(ic.size, "cpt", tgt, r, "ipltstart"), ic.size, "cpt", tgt, src, r,
                     "ipltstart", big, self.big_d, ev, budget, 0.0)
            ev = _events(big, small, k, 0, span_steps if k > 1 else 0, f"cpt-incremental ({panel})")
            self.add("cpt-incremental", panel, run_id(ic.size, "cpt", tgt, r, "ipltincr"), ic.size, "cpt", tgt, src,
                     r, "ipltincr", big, self.big_d, ev, budget, 0.0)


def plan_arms(cfg: StudyConfig) -> list[Arm]:
    """Every arm of the IPLT study, in a stable order (per panel: dense, small, start fractions, classic;
    then the CPT panels). Raises ``ValueError`` (naming the arm and the field to change) for an arm
    that cannot fit its budget, and :class:`PruneError` for a target that is not a pruning of ``size``."""
    planner = _ArmPlanner(cfg)
    parents = {r.lang: r for r in parent_runs(cfg)}
    for lang in pretrain_langs(cfg):
        planner.pretrain_panel(lang, parents[lang])
    if planner.ic.cpt is not None:
        src = cfg.languages.source
        planner.cpt_panels(src, parents[src])
    arms = planner.arms
    ids = [a.run.run_id for a in arms]
    if len(set(ids)) != len(ids):  # e.g. a target named like the dense size
        raise ValueError(f"iplt: arms share run ids: {sorted({i for i in ids if ids.count(i) > 1})}")
    return arms


def _arm_run(cfg: StudyConfig, rid: str, size: str, init: str, lang: str, source: str | None, replay: float,
             variant: str, arm: str, parent: str | None, start: PrunedShape, events: list[dict[str, Any]],
             steps: int, gbs: int) -> PlannedRun:
    from cptscale.runs import PlannedRun, batch_layout, job_resources

    ic = _cfg(cfg)
    layout = cfg.layout(ic.size)
    _, accum = batch_layout(cfg, ic.size)
    seq, vocab = cfg.train.seq_length, cfg.vocab_size
    tokens = steps * gbs * seq
    flops = sum(flops_6nd(sh.params(vocab), n * gbs * seq) for n, sh in segments(start, events, steps))
    params = start.params(vocab, tp=layout.tp)
    if init == "cpt" and parent is None:
        from cptscale.runs import run_id

        parent = run_id(ic.size, "scratch", source or lang)
    return PlannedRun(
        run_id=rid, size=size, init=init, lang=lang, source_lang=source, replay=replay, variant=variant,
        parent=parent, params=params, params_nonemb=start.params(vocab, embeddings=False), tokens=tokens,
        seq_length=seq, global_batch_size=gbs, micro_batch_size=cfg.train.micro_batch_size, grad_accum=accum,
        steps=steps, tp=layout.tp, pp=layout.pp, dp=layout.dp, flops_6nd=flops,
        **job_resources(cfg, layout.world, params, flops), arm=arm,
    )


def arm_for(cfg: StudyConfig, rid: str) -> Arm:
    for a in plan_arms(cfg):
        if a.run.run_id == rid:
            return a
    raise KeyError(f"{rid!r} is not an IPLT arm of study {cfg.study!r}")


def eval_steps_for(arm: Arm, points: int) -> list[int]:
    """The study's log-spaced evaluations plus evenly spaced ones (the loss-vs-FLOPs curves compare
    arms late in training too) and the steps of every prune and the step after it (before/after)."""
    import numpy as np

    from cptscale.runs import eval_steps

    steps = arm.run.steps
    lin = np.round(np.linspace(0, steps, points + 1)).astype(int).tolist()
    ev = [int(e["step"]) for e in arm.events]
    return sorted({*eval_steps(steps, points), *lin, *ev, *(min(steps, s + 1) for s in ev)})


def iplt_block(cfg: StudyConfig, arm: Arm) -> dict[str, Any]:
    """The ``iplt`` block of an arm's run.json: arm, panel, budget and the FLOPs it inherits from its parent
    (the parent's own count from its done.json when it has finished)."""
    from cptscale.runs import run_dir
    from cptscale.util import read_json

    ic = _cfg(cfg)
    inherited = arm.inherited_flops
    if arm.inherited_from:
        done = run_dir(cfg, arm.inherited_from) / "done.json"
        if done.is_file() and read_json(done).get("flops_spent") is not None:
            inherited = float(read_json(done)["flops_spent"])
    return {
        "arm": arm.arm, "panel": arm.panel, "size": ic.size, "target": ic.target,
        "target_shape": _shape_dict(target_shape(cfg), target_name(cfg)), "final_shape": arm.final_shape,
        "start_fraction": arm.start_fraction, "increments": ic.increments, "span": ic.span,
        "importance": ic.importance, "budget_factor": ic.budget_factor, "budget_flops": arm.budget_flops,
        "flops_inherited": inherited, "inherited_from": arm.inherited_from, "planned_flops": arm.planned_flops,
        "prune_steps": [int(e["step"]) for e in arm.events],
        "rule": "every arm spends budget_factor x the exact training FLOPs of the dense model on its study token "
                "budget; classic counts its parent's full training (flops_inherited); CPT arms exclude the source "
                "pretraining",
    }


def hash_part(cfg: StudyConfig, run: PlannedRun) -> dict[str, Any]:
    """What of the IPLT config changes this arm's training (its ``training_hash`` part)."""
    ic = _cfg(cfg)
    a = arm_for(cfg, run.run_id).as_dict()
    return {"arm": a, "importance": ic.importance, "calib_batches": ic.calib_batches}


def format_arms(cfg: StudyConfig) -> str:
    """The IPLT section of ``cptscale plan``: per arm its prune steps and FLOPs against the budget."""
    from cptscale.util import fmt_num as _fmt_num

    rows = [("arm", "panel", "run", "prune steps", "steps", "FLOPs", "+inherited", "/ budget")]
    for a in plan_arms(cfg):
        rows.append((a.arm, a.panel, a.run.run_id, ",".join(str(e["step"]) for e in a.events) or "-",
                     str(a.run.steps), _fmt_num(a.planned_flops), _fmt_num(a.inherited_flops) if a.inherited_flops else "-",
                     f"{a.total_flops / a.budget_flops:.4f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    ic, t = _cfg(cfg), target_shape(cfg)
    budgets = sorted({f"{a.panel}: {_fmt_num(a.budget_flops)}" for a in plan_arms(cfg)})
    head = (f"IPLT arms: {ic.size} -> {target_name(cfg)} ({t.heads} heads, ffn {t.ffn}, {t.layers} layers; "
            f"head_dim {t.head_dim}), k = {ic.increments} prunes, budget B = {ic.budget_factor:g} x F_dense "
            f"({'; '.join(budgets)} FLOPs)")
    return head + "\n" + "\n".join(lines)
