"""run.json: load and validate the spec the planner hands the trainer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cptscale.util import read_json

REQUIRED = ("run_id", "size", "init", "shape", "vocab_size", "seq_length", "micro_batch_size",
            "global_batch_size", "steps", "seed", "schedule", "optimizer", "layout", "data", "eval",
            "checkpoint", "out_dir")


class SpecError(ValueError):
    """A bad run.json field (message names the field and the fix)."""


def load_spec(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.exists():
        raise SpecError(f"spec file {p} does not exist")
    try:
        spec = read_json(p)
    except ValueError as exc:
        raise SpecError(f"spec file {p} is not valid JSON: {exc}") from exc
    validate_spec(spec, str(p))
    return spec


def _int(spec: dict, key: str, where: str, lo: int = 1) -> int:
    v = spec.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise SpecError(f"{where}: field {key!r} must be an integer >= {lo}, got {v!r}")
    return v


def validate_spec(spec: dict[str, Any], where: str = "run.json") -> None:
    """Raise SpecError naming the first bad field."""
    if not isinstance(spec, dict):
        raise SpecError(f"{where}: top level must be a JSON object")
    missing = [k for k in REQUIRED if k not in spec]
    if missing:
        raise SpecError(f"{where}: missing field(s) {', '.join(missing)}")
    if spec["init"] not in ("scratch", "cpt"):
        raise SpecError(f"{where}: field 'init' must be 'scratch' or 'cpt', got {spec['init']!r}")
    for k in ("vocab_size", "seq_length", "micro_batch_size", "global_batch_size", "steps"):
        _int(spec, k, where)
    _int(spec, "seed", where, lo=0)
    sh = spec["shape"]
    if not isinstance(sh, dict):
        raise SpecError(f"{where}: field 'shape' must be an object")
    for k in ("hidden", "layers", "heads", "ffn"):
        _int(sh, k, f"{where} shape")
    if sh.get("head_dim") is not None:  # a pruned shape: head_dim stays, hidden / heads need not hold
        _int(sh, "head_dim", f"{where} shape")
    elif sh["hidden"] % sh["heads"]:
        raise SpecError(f"{where}: shape.hidden {sh['hidden']} not divisible by shape.heads {sh['heads']}")
    lay = spec["layout"]
    for k in ("tp", "pp", "dp"):
        _int(lay, k, f"{where} layout")
    if sh["heads"] % lay["tp"]:
        raise SpecError(f"{where}: shape.heads {sh['heads']} not divisible by layout.tp {lay['tp']}")
    if sh["layers"] % lay["pp"]:
        raise SpecError(f"{where}: shape.layers {sh['layers']} not divisible by layout.pp {lay['pp']}")
    mb, gb, dp = spec["micro_batch_size"], spec["global_batch_size"], lay["dp"]
    if gb % (mb * dp):
        raise SpecError(
            f"{where}: global_batch_size {gb} is not a multiple of micro_batch_size {mb} x layout.dp {dp}; "
            "fix the batch sizes"
        )
    sched = spec["schedule"]
    try:
        make_schedule(sched)
    except (TypeError, ValueError) as exc:
        raise SpecError(f"{where}: bad field 'schedule': {exc}") from exc
    data = spec["data"]
    if not isinstance(data, dict) or data.get("kind") not in ("single", "blend"):
        raise SpecError(f"{where}: data.kind must be 'single' or 'blend'")
    if data["kind"] == "single" and "prefix" not in data:
        raise SpecError(f"{where}: data.kind 'single' needs data.prefix")
    ev = spec["eval"]
    if not isinstance(ev.get("steps", []), list) or not isinstance(ev.get("languages", {}), dict):
        raise SpecError(f"{where}: eval.steps must be a list and eval.languages an object")
    for lang, v in ev.get("languages", {}).items():
        if "prefix" not in v:
            raise SpecError(f"{where}: eval.languages.{lang} needs a prefix")
    ck = spec["checkpoint"]
    if "dir" not in ck:
        raise SpecError(f"{where}: checkpoint.dir is required")
    if spec["init"] == "cpt":
        par = spec.get("parent")
        if not isinstance(par, dict) or "checkpoint" not in par:
            raise SpecError(f"{where}: init 'cpt' needs parent.checkpoint (the source run's final checkpoint)")
        _check_parent_loss(spec, where)
    if spec.get("arch") is not None:  # an imported model's architecture (see cptscale.train.model)
        from cptscale.train.model import resolve_arch

        try:
            resolve_arch(spec["arch"])
        except (TypeError, ValueError) as exc:
            raise SpecError(f"{where}: bad field 'arch': {exc}") from exc
    if spec.get("precision", "auto") not in ("auto", "fp32", "bf16"):
        raise SpecError(f"{where}: precision must be auto, fp32 or bf16")
    if spec.get("prune") is not None:
        validate_prune(spec, where)
        if sched.get("branches"):
            raise SpecError(f"{where}: schedule.branches (WSD decay branches) cannot be combined with prune; "
                            "drop one of them (train.wsd_branches in the study config)")


def parent_done_path(spec: dict[str, Any]) -> Path:
    """Where the source run's done.json is in the planner's layout (run dirs side by side:
    ``<out_dir>/../<parent.run_id>/done.json``)."""
    par = spec.get("parent") or {}
    return Path(spec["out_dir"]).parent / str(par.get("run_id")) / "done.json"


def _check_parent_loss(spec: dict[str, Any], where: str) -> None:
    """The init-sanity gate compares against ``parent.final_loss``: without it the gate would pass
    silently, so a CPT spec without a finite number there is refused."""
    import math

    par = spec["parent"]
    v = par.get("final_loss")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        lang = par.get("lang") or spec.get("source_lang")
        raise SpecError(
            f"{where}: parent.final_loss is {v!r}, so the init-sanity gate has nothing to compare with: the source "
            f"run {par.get('run_id')!r} must have recorded its final {lang} validation loss in "
            f"{parent_done_path(spec)} (final_loss.{lang}); finish (or re-run) that run, then regenerate this "
            "run.json with `cptscale plan CONFIG --run RUN_ID --out run.json` (or set parent.final_loss by hand)")


PRUNE_KEYS = ("importance", "calib_batches", "events")


def validate_prune(spec: dict[str, Any], where: str = "run.json") -> None:
    """The optional ``prune`` key: ``{"importance": "activation"|"weight", "calib_batches": int,
    "events": [{"step": s, "shape": {hidden, layers, heads, ffn, kv_heads}}, ...]}``; each event
    prunes at the start of step s to its shape (see cptscale.prune for what may change)."""
    from cptscale.prune import IMPORTANCE_KINDS, PrunedShape, PruneError, resolve_target

    pr = spec["prune"]
    if not isinstance(pr, dict):
        raise SpecError(f"{where}: field 'prune' must be an object with {', '.join(PRUNE_KEYS)}")
    unknown = sorted(set(pr) - set(PRUNE_KEYS))
    if unknown:
        raise SpecError(f"{where}: unknown field(s) prune.{', prune.'.join(unknown)}; allowed: {', '.join(PRUNE_KEYS)}")
    if pr.get("importance", "activation") not in IMPORTANCE_KINDS:
        raise SpecError(f"{where}: prune.importance must be one of {', '.join(IMPORTANCE_KINDS)}, "
                        f"got {pr.get('importance')!r}")
    if "calib_batches" in pr:
        _int(pr, "calib_batches", f"{where} prune")
    lay = spec["layout"]
    if lay["tp"] != 1 or lay["pp"] != 1:
        raise SpecError(f"{where}: prune needs layout.tp = layout.pp = 1 (got tp={lay['tp']}, pp={lay['pp']}); "
                        "structured pruning is implemented for unsharded models (data parallelism is fine)")
    events = pr.get("events")
    if not isinstance(events, list) or not events:
        raise SpecError(f"{where}: prune.events must be a non-empty list of {{step, shape}} objects")
    try:
        cur = PrunedShape.from_dict(spec["shape"])
    except (PruneError, KeyError, TypeError, ValueError) as exc:
        raise SpecError(f"{where}: shape: {exc}") from exc
    last = -1
    for i, ev in enumerate(events):
        at = f"prune.events[{i}]"
        if not isinstance(ev, dict) or set(ev) != {"step", "shape"}:
            raise SpecError(f"{where}: {at} must be an object with exactly 'step' and 'shape', got {ev!r}")
        st = ev["step"]
        if not isinstance(st, int) or isinstance(st, bool) or not last < st < spec["steps"]:
            raise SpecError(f"{where}: {at}.step must be an integer in [{last + 1}, steps={spec['steps']}) "
                            f"(events in increasing step order), got {st!r}")
        last = st
        if not isinstance(ev["shape"], dict):
            raise SpecError(f"{where}: {at}.shape must be an object (hidden, layers, heads, ffn, kv_heads)")
        try:
            cur = resolve_target(cur, ev["shape"])
        except (PruneError, TypeError, ValueError) as exc:
            raise SpecError(f"{where}: {at}.shape: {exc}") from exc


def make_schedule(d: dict[str, Any]):
    from cptscale.schedule import Schedule

    return Schedule(
        kind=d["kind"], max_lr=float(d["max_lr"]), min_lr=float(d.get("min_lr", 0.0)),
        warmup_steps=int(d.get("warmup_steps", 0)), total_steps=int(d["total_steps"]),
        start_lr=float(d.get("start_lr", 0.0)), decay_steps=int(d.get("decay_steps", 0) or 0),
        decay_shape=d.get("decay_shape", "linear"), branches=tuple(int(b) for b in d.get("branches") or ()),
    )
