"""Reading one study's result files (run.json, metrics, evals, done.json, blends, transfer, fits) into table
rows; a malformed file is a :class:`BadInput` naming the file and line."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from cptscale.compute import flops_6nd
from cptscale.runspec import RunSpec, SpecError
from cptscale.store.schema import FIT_CHOICES, PROVENANCE_FIELDS
from cptscale.transfer import flops_at_step, forgetting, latest_evals, main_trajectory, run_compute
from cptscale.util import read_json


class BadInput(Exception):
    """A malformed input file; the message names the file and line."""


def _j(obj: Any) -> str | None:
    return None if obj is None else json.dumps(obj, sort_keys=True, default=str)


def _now() -> Any:
    import datetime as dt

    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def read_jsonl_rows(path: Path, required: Sequence[str], *, allow_partial: bool,
                    problems: list[str], check: Callable[[dict[str, Any]], str | None] | None = None,
                    ) -> list[dict[str, Any]]:
    """Rows of a JSONL file, validated line by line.

    A bad line (not JSON, not an object, missing a required key: typically the truncated last line of
    a killed job; or refused by ``check``, which returns what is wrong) raises :class:`BadInput` naming
    ``path:line`` — or, with ``allow_partial``, is recorded in ``problems`` and skipped.
    """
    rows: list[dict[str, Any]] = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("not a JSON object")
                missing = [k for k in required if row.get(k) is None]
                if missing:
                    raise ValueError(f"missing {', '.join(missing)}")
                wrong = check(row) if check else None
                if wrong:
                    raise ValueError(wrong)
            except ValueError as exc:  # JSONDecodeError is a ValueError
                msg = f"{path}:{i}: malformed line ({exc})"
                if not allow_partial:
                    raise BadInput(f"{msg}; run skipped. Re-run the job that wrote it, or ingest with "
                                   "--allow-partial to keep the good lines") from None
                problems.append(f"{msg}; line skipped (--allow-partial)")
                continue
            rows.append(row)
    return rows


def _metrics_frame(path: Path, *, allow_partial: bool, problems: list[str], branches: bool = False) -> Any:
    """metrics.jsonl (or, with ``branches``, branch_metrics.jsonl: every row keyed by its WSD decay
    branch's total steps) as a DataFrame: pyarrow's reader when the file is clean, line-by-line otherwise."""
    import pandas as pd

    cols = ["step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "mem_bytes", "mfu", "branch"]
    required = ("step", "loss", "branch") if branches else ("step", "loss")
    df = None
    try:
        import pyarrow.json as pj

        tbl = pj.read_json(path)
        if set(required) <= set(tbl.column_names) and tbl.num_rows:
            df = tbl.to_pandas()
            missing = any(df[c].isna().any() for c in required)
            if missing or (branches and (df["branch"].dtype.kind != "i" or (df["branch"] <= 0).any()
                                         or (df["step"] > df["branch"]).any())):
                df = None  # the slow path names the offending line
    except Exception:  # malformed somewhere: the slow path finds and reports the line
        df = None
    if df is None:
        rows = read_jsonl_rows(path, required, allow_partial=allow_partial, problems=problems,
                               check=_check_branch if branches else None)
        df = pd.DataFrame.from_records(rows)
    for c in cols:
        if c not in df.columns:
            df[c] = None
    df = df[cols]
    if not branches:
        df["branch"] = None
    df["branch"] = df["branch"].astype("Int64")  # NULL for the main trajectory: nullable integer, not float NaN
    # a resumed run may re-log steps after its checkpoint (and redo a branch): the last row wins
    keys = ["branch", "step"] if branches else ["step"]
    dup = df.duplicated(keys, keep="last")
    if dup.any():
        df = df[~dup]
    return df


def _optional_json(path: Path, fix: str = "") -> Any:
    """A run's optional JSON file: None when absent, BadInput (naming the file and ``fix``) when malformed."""
    if not path.exists():
        return None
    try:
        return read_json(path)
    except ValueError as exc:
        raise BadInput(f"{path}: malformed JSON ({exc}){fix}") from None


def _eval_flops(e: dict[str, Any], spec: dict[str, Any], comp: dict[str, Any]) -> tuple[float | None, float | None]:
    """FLOPs at an eval (exact, 6ND): the trainer's own count when it wrote one (exact after a prune), else
    the count from the spec's shape(s) at that step."""
    if e.get("flops") is not None:
        return float(e["flops"]), (float(e["flops_6nd"]) if e.get("flops_6nd") is not None else None)
    if e.get("tokens") is None:
        return None, None
    if bool((spec.get("prune") or {}).get("events")) and \
            int(spec.get("global_batch_size") or 0) * int(spec.get("seq_length") or 0):
        f = flops_at_step(spec, int(e["step"]))
        return f["flops_exact"], f["flops_6nd"]
    fpt = comp.get("flops_per_token")
    params = comp.get("params", spec.get("params"))
    return (fpt * e["tokens"] if fpt is not None else None,
            flops_6nd(params, e["tokens"]) if params else None)


def _train_metric_frame(run_dir: Path, key: dict[str, Any], *, allow_partial: bool, problems: list[str]) -> Any:
    """metrics.jsonl and the WSD decay branches' branch_metrics.jsonl as one frame keyed by the run (None
    when the run has logged no step)."""
    mpath = run_dir / "metrics.jsonl"
    tm = _metrics_frame(mpath, allow_partial=allow_partial, problems=problems) if mpath.exists() else None
    bpath = run_dir / "branch_metrics.jsonl"
    if bpath.exists():  # the training steps of WSD decay branches (keyed by branch, like their evals)
        bm = _metrics_frame(bpath, allow_partial=allow_partial, problems=problems, branches=True)
        if tm is None:
            tm = bm
        elif len(bm):
            import pandas as pd

            tm = pd.concat([tm, bm], ignore_index=True)
    if tm is not None:
        for k, v in key.items():
            tm.insert(0, k, v)
    return tm


def _eval_rows(run_dir: Path, key: dict[str, Any], spec: dict[str, Any], comp: dict[str, Any], *,
               allow_partial: bool, problems: list[str]) -> tuple[list[dict[str, Any]] | None, list[dict[str, Any]]]:
    """The evals table rows of evals.jsonl (None without the file; the last of each re-logged eval wins) and
    the main trajectory's evals as logged (what forgetting is computed from)."""
    epath = run_dir / "evals.jsonl"
    if not epath.exists():
        return None, []
    ev_rows = read_jsonl_rows(epath, ("step", "lang", "loss"), allow_partial=allow_partial, problems=problems,
                              check=_check_branch)
    ev_rows = latest_evals(ev_rows)  # a resumed run may re-log an eval: the last one of each (step, lang, branch) wins
    rows = [
        {**key, "step": int(e["step"]), "tokens": e.get("tokens"), "lang": e["lang"], "loss": e["loss"],
         "ppl": e.get("ppl", math.exp(min(e["loss"], 700))), "bpb": e.get("bpb"),
         "n_tokens": e.get("n_tokens"), "flops": fl, "flops_6nd": f6, "branch": e.get("branch")}
        for e in ev_rows for fl, f6 in [_eval_flops(e, spec, comp)]
    ]
    return rows, main_trajectory(ev_rows)  # forgetting is a main-trajectory curve


def _blend_rows(blend: Any, key: dict[str, Any]) -> list[dict[str, Any]]:
    """blend.json's planned and realized share of each source in each phase (a single-phase file too)."""
    rows = []
    phases = blend.get("phases") if isinstance(blend, dict) else None
    if phases is None and isinstance(blend, dict) and "sources" in blend:
        phases = [blend]
    for pi, ph in enumerate(phases or []):
        for s in ph.get("sources") or []:
            rows.append({**key, "phase": str(ph.get("name", ph.get("index", pi))),
                         "phase_index": ph.get("index", pi), "start_step": ph.get("start_step"),
                         "end_step": ph.get("end_step"), "source": s.get("name"),
                         "planned_share": s.get("planned_share"), "realized_share": s.get("realized_share"),
                         "samples": s.get("samples"), "tokens": s.get("tokens"),
                         "available_tokens": s.get("available_tokens"), "epochs": s.get("epochs")})
    return rows


def _transfer_rows(tr: Any, spec: dict[str, Any], key: dict[str, Any],
                   ev_rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The transfer rows of transfer.json and the forgetting rows (transfer.json's, else computed from a CPT
    run's source-language evals against its parent's final loss)."""
    out: dict[str, list[dict[str, Any]]] = {}
    if tr is not None:
        base = {**key, "scratch_run_id": tr.get("scratch_run_id"), "source_run_id": tr.get("source_run_id"),
                "size": spec.get("size"), "lang": tr.get("lang", spec.get("lang")),
                "source_lang": tr.get("source_lang"), "replay": spec.get("replay")}
        out["transfer"] = [{**base, **r} for r in tr.get("rows", [])]
    fg_rows = (tr or {}).get("forgetting")
    if not fg_rows and spec.get("init") == "cpt" and spec.get("source_lang") and ev_rows:
        final = (spec.get("parent") or {}).get("final_loss")
        if isinstance(final, dict):
            final = final.get(spec["source_lang"])
        if final is not None:
            fg_rows = forgetting(ev_rows, float(final), spec["source_lang"])
    if fg_rows:
        out["forgetting"] = [{**key, "size": spec.get("size"), "replay": spec.get("replay"), **r} for r in fg_rows]
    return out


def _checkpoint_rows(spec: dict[str, Any], done: dict[str, Any] | None, key: dict[str, Any]) -> list[dict[str, Any]]:
    """The run's checkpoints: the one it started from, its final one, the one it resumed from and every
    complete step_N the trainer saved."""
    ck = []
    parent = spec.get("parent") or {}
    if parent.get("checkpoint"):
        ck.append({**key, "kind": "init", "step": None, "path": str(parent["checkpoint"])})
    if done and done.get("final_checkpoint"):
        ck.append({**key, "kind": "final", "step": done.get("steps"), "path": str(done["final_checkpoint"])})
    ckdir = (spec.get("checkpoint") or {}).get("dir")
    if done and done.get("resumed_from") is not None:  # the step the trainer resumed from (step_N)
        step = int(done["resumed_from"])
        ck.append({**key, "kind": "resumed_from", "step": step,
                   "path": str(Path(ckdir) / f"step_{step}") if ckdir else None})
    if ckdir:
        from cptscale.train.checkpoint import list_checkpoints

        for step, p in list_checkpoints(ckdir):  # the trainer's complete step_N checkpoints
            ck.append({**key, "kind": "saved", "step": step, "path": str(p)})
    return ck


def _runs_row(spec: dict[str, Any], done: dict[str, Any] | None, key: dict[str, Any], comp: dict[str, Any],
              prov: dict[str, Any], blend: Any, prune_rows: Any, branches: Any) -> dict[str, Any]:
    """The run's row of the runs table: its spec, what done.json says it did, FLOPs and provenance."""
    params = comp.get("params", spec.get("params"))
    parent = spec.get("parent") or {}
    iplt = spec.get("iplt") or {}
    d = done or {}
    # the trainer's FLOPs (done.json) are the run's FLOPs; the spec's count stands in until it is done
    if d.get("flops_spent") is not None:
        comp = {**comp, "flops_exact": float(d["flops_spent"])}
        if d.get("flops_spent_6nd") is not None:
            comp["flops_6nd"] = float(d["flops_spent_6nd"])
    shape = spec.get("shape") or {}
    inputs = dict(prov.get("input_hashes") or {})
    return {
        **key, "size": spec.get("size"), "init": spec.get("init"), "lang": spec.get("lang"),
        "source_lang": spec.get("source_lang"), "replay": spec.get("replay"), "variant": spec.get("variant"),
        "parent_run_id": parent.get("run_id"), "parent_checkpoint": parent.get("checkpoint"),
        "seed": spec.get("seed"), "hidden": shape.get("hidden"), "layers": shape.get("layers"),
        "heads": shape.get("heads"), "ffn": shape.get("ffn"), "kv_heads": shape.get("kv_heads"),
        "vocab_size": spec.get("vocab_size"), "seq_length": spec.get("seq_length"),
        "micro_batch_size": spec.get("micro_batch_size"), "global_batch_size": spec.get("global_batch_size"),
        "steps": spec.get("steps"), "params": params,
        "params_nonemb": comp.get("params_nonemb", spec.get("params_nonemb")),
        "tokens": comp.get("tokens", spec.get("tokens")), "steps_done": d.get("steps"),
        "tokens_done": d.get("tokens"), "final_loss": _j(d.get("final_loss")),
        "wall_s": d.get("wall_s"), "status": "done" if done else "partial",
        "flops_6nd": comp.get("flops_6nd"), "flops_6nd_nonemb": comp.get("flops_6nd_nonemb"),
        "flops_exact": comp.get("flops_exact"), "flops_exact_nonemb": comp.get("flops_exact_nonemb"),
        "out_dir": spec.get("out_dir"), "git_commit": prov.get("git_commit"), "git_dirty": prov.get("git_dirty"),
        "packages": _j(prov.get("packages")), "input_hashes": _j(inputs), "file_hashes": None,
        "config": _j(spec), "blend": _j(blend), "ingested_at": _now(),
        "arm": iplt.get("arm"), "arm_panel": iplt.get("panel"), "iplt": _j(iplt or None),
        "flops_spent": d.get("flops_spent"), "flops_spent_6nd": d.get("flops_spent_6nd"),
        "flops_inherited": iplt.get("flops_inherited"), "final_params": d.get("final_params"),
        "final_shape": _j(d.get("final_shape")), "prune": _j(prune_rows), "branches": _j(branches),
        "provenance": _j(prov),
        # simulated (cptscale.simulate): done.json says so, and so does a run.json planned for the simulator
        "simulated": bool(d.get("simulated") or spec.get("simulate")),
    }


def _run_rows(run_dir: Path, study: str, *, allow_partial: bool, problems: list[str]) -> dict[str, Any]:
    """All table rows for one run directory (raises BadInput for a bad file): a DataFrame for the
    train metrics, lists of dicts for the small tables (framed once for all runs, which is faster)."""

    try:  # the typed spec (older versions migrated); below, its dump, as the trainer and transfer read it
        spec = RunSpec.load(run_dir / "run.json").to_dict()
    except SpecError as exc:
        raise BadInput(f"{exc}; re-run `cptscale plan` for this run") from None
    done = _optional_json(run_dir / "done.json")
    key = {"study": study, "run_id": spec.get("run_id") or run_dir.name, "config_hash": spec.get("config_hash")}
    prov = merged_provenance(spec.get("provenance"), (done or {}).get("provenance"))
    branches = _branches(run_dir / "done.json", (done or {}).get("branches"))
    comp = run_compute(spec) if "shape" in spec else {}
    partial = {"allow_partial": allow_partial, "problems": problems}
    out: dict[str, Any] = {}
    tm = _train_metric_frame(run_dir, key, **partial)
    if tm is not None:
        out["train_metrics"] = tm
    evals, ev_main = _eval_rows(run_dir, key, spec, comp, **partial)
    if evals is not None:
        out["evals"] = evals
    blend = _optional_json(run_dir / "blend.json")
    if blend is not None:
        out["blend_realizations"] = _blend_rows(blend, key)
    tr = _optional_json(run_dir / "transfer.json", "; re-run `cptscale transfer`")
    out.update(_transfer_rows(tr, spec, key, ev_main))
    out["checkpoints"] = _checkpoint_rows(spec, done, key)
    # prune events as the trainer recorded them (prune.jsonl; the units kept are left in the file)
    prune_rows = None
    if (run_dir / "prune.jsonl").exists():
        prune_rows = [{k: v for k, v in r.items() if k != "kept"} for r in read_jsonl_rows(
            run_dir / "prune.jsonl", ("step", "shape"), **partial)]
    out["runs"] = [_runs_row(spec, done, key, comp, prov, blend, prune_rows, branches)]
    return out


def _check_branch(row: dict[str, Any]) -> str | None:
    b = row.get("branch")
    if b is None:
        return None
    if isinstance(b, bool) or not isinstance(b, int) or b <= 0:
        return f"'branch' must be the branch's total steps (a positive integer), not {b!r}"
    if int(row["step"]) > b:
        return f"step {row['step']} lies past the end of its branch ({b} steps)"
    return None


def _branches(path: Path, branches: Any) -> list[dict[str, Any]] | None:
    """done.json's ``branches`` (one entry per WSD decay branch: steps, tokens, final_loss by language),
    validated so a malformed one is reported with the file, not stored."""
    if branches is None:
        return None
    if not isinstance(branches, list):
        raise BadInput(f"{path}: 'branches' must be a list of {{steps, tokens, final_loss}}, not "
                       f"{type(branches).__name__}; re-run the job that wrote it")
    for i, b in enumerate(branches):
        ok = (isinstance(b, dict) and isinstance(b.get("steps"), int) and not isinstance(b["steps"], bool)
              and b["steps"] > 0 and isinstance(b.get("final_loss", {}), dict))
        if not ok:
            raise BadInput(f"{path}: branches[{i}] = {b!r} is not {{steps: int > 0, tokens, final_loss: "
                           "{lang: loss}}; re-run the job that wrote it")
    return branches


def merged_provenance(plan: dict[str, Any] | None, train: dict[str, Any] | None) -> dict[str, Any]:
    """The provenance a run's rows carry: the trainer's (done.json, written when the run trained) where
    it has a field, else the planner's (run.json). ``from`` says which file each field came from;
    ``plan`` keeps the planner's record when the trainer's overrides any of it."""
    plan, train = dict(plan or {}), dict(train or {})
    out: dict[str, Any] = {**plan}
    src = dict.fromkeys(plan, "run.json")
    for k, v in train.items():
        if v is None or (isinstance(v, dict | list | str) and not v):
            continue
        if k == "input_hashes" and isinstance(plan.get(k), dict):
            v = {**plan[k], **v}  # the trainer may hash only what it read; keep the plan's other inputs
        out[k] = v
        src[k] = "done.json"
    out["from"] = {k: src[k] for k in sorted(src) if k in PROVENANCE_FIELDS or k in train}
    if any(v == "done.json" for v in src.values()) and plan:
        out["plan"] = plan
    return out


def _manifest_row(study: str, lang: str, m: dict[str, Any], fh: str) -> dict[str, Any]:
    """Key numbers of a data manifest; the layout is the data stage's, so look in the usual places."""

    def pick(*paths: str) -> Any:
        for p in paths:
            cur: Any = m
            for part in p.split("."):
                cur = cur.get(part) if isinstance(cur, dict) else None
            if cur is not None and not isinstance(cur, dict | list):
                return cur
        return None

    prov = m.get("provenance") or {}
    return {
        "study": study, "lang": m.get("lang", lang),
        "train_docs": pick("train.docs", "train_docs"), "train_tokens": pick("train.tokens", "train_tokens"),
        "train_bytes": pick("train.bytes", "train_bytes"), "train_chars": pick("train.chars", "train_chars"),
        "valid_docs": pick("valid.docs", "valid_docs"), "valid_tokens": pick("valid.tokens", "valid_tokens"),
        "valid_bytes": pick("valid.bytes", "valid_bytes"), "valid_chars": pick("valid.chars", "valid_chars"),
        "tokens_per_byte": pick("fertility.tokens_per_byte", "train.tokens_per_byte", "tokens_per_byte"),
        "tokens_per_char": pick("fertility.tokens_per_char", "train.tokens_per_char", "tokens_per_char"),
        "vocab_size": pick("vocab_size"), "tokenizer_hash": pick("tokenizer_hash"), "docs_hash": pick("docs_hash"),
        "config_hash": prov.get("config_hash"), "git_commit": prov.get("git_commit"),
        "git_dirty": prov.get("git_dirty"), "input_hashes": _j(prov.get("input_hashes")), "file_hash": fh,
        "raw": _j(m),
    }


_PRED_KEYS = {
    "N": ("N", "n", "params", "N_opt"), "D": ("D", "d", "tokens", "D_opt"), "C": ("C", "c", "flops", "compute"),
    "predicted_loss": ("predicted_loss", "predicted", "pred", "prediction", "loss_pred", "loss_opt", "L_opt"),
    "observed_loss": ("observed_loss", "observed", "obs", "loss", "loss_obs"),
    "run_id": ("run_id", "run"),
}


def _find_fits(obj: Any, prefix: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Dicts with ``law`` and ``params`` anywhere in a fit file (one file may hold several fits)."""
    if isinstance(obj, dict):
        if "law" in obj and "params" in obj:
            yield prefix, obj
            return
        for k, v in obj.items():
            yield from _find_fits(v, f"{prefix}/{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            name = v.get("fit_id") or v.get("name") if isinstance(v, dict) else None
            yield from _find_fits(v, f"{prefix}/{name or i}")


def _prediction_rows(study: str, fit_id: str, kind: str | None, obj: Any, path: str = "") -> Iterator[dict[str, Any]]:
    """Rows of every list of point-like dicts in a fit (predicted vs observed, allocation tables)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k not in ("params", "fixed"):
                yield from _prediction_rows(study, fit_id, kind, v, f"{path}.{k}" if path else k)
    elif isinstance(obj, list) and obj and all(isinstance(x, dict) for x in obj):
        keys = set().union(*(x.keys() for x in obj))
        if any(k in keys for ks in _PRED_KEYS.values() for k in ks if k != "run_id"):
            for x in obj:
                row: dict[str, Any] = {"study": study, "fit_id": fit_id, "kind": kind, "row_kind": path}
                for col, names in _PRED_KEYS.items():
                    v = next((x[n] for n in names if x.get(n) is not None), None)
                    row[col] = v if col == "run_id" else (float(v) if isinstance(v, int | float) else None)
                row["extra"] = _j(x)
                yield row
        else:
            for i, x in enumerate(obj):
                yield from _prediction_rows(study, fit_id, kind, x, f"{path}[{i}]")


def _fit_rows(study: str, path: Path, fh: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows of ``fits`` and ``predictions`` from one fit file.

    ``cptscale fit-study`` writes one ``cptscale-fit/1`` file per fit (``fit_id``, ``law``, ``kind``,
    ``params``, ``fixed``, ``intervals``, ``heldout``, ``meta``, ``provenance``, and point lists:
    ``points``, ``allocation``, ``heldout.points``, ...); a skipped fit has empty ``params`` and a
    ``reason`` and still gets a row. Its ``summary.json`` (``cptscale-fit-summary/1``) only lists the
    files and is skipped. Other files are searched for fits anywhere (one file may hold several).
    """
    try:
        obj = read_json(path)
    except ValueError as exc:
        raise BadInput(f"{path}: malformed fit JSON ({exc}); re-run `cptscale fit-study`") from None
    if isinstance(obj, dict) and str(obj.get("format", "")).startswith("cptscale-fit-summary"):
        return [], []
    fits, preds = [], []
    found = list(_find_fits(obj, path.stem))
    for fid, f in found:
        fid = f.get("fit_id") or fid
        meta = f.get("meta") or {}
        if f.get("status") and "status" not in meta:  # skipped fits keep their reason in the fits row
            meta = {**meta, "status": f["status"], "reason": f.get("reason")}
        prov = f.get("provenance") or meta.get("provenance") or {}
        kind = f.get("kind") or meta.get("kind") or ("cpt" if "cpt" in fid.lower() else
                                                      "scratch" if "scratch" in fid.lower() else None)
        choices = {k: meta.get(k) for k in FIT_CHOICES}
        if isinstance(meta.get("grid_spec"), dict):  # the grid's values and hash, not just its name
            choices["grid"] = meta["grid_spec"]
        if isinstance(meta.get("excluded_points"), dict):  # the excluded rows' values, not just their numbers
            choices["excluded"] = meta["excluded_points"]
        for k in ("grid", "selection", "excluded"):
            choices[k] = _j(choices[k])
        if choices["delta"] is not None:
            choices["delta"] = float(choices["delta"])
        if choices["optimizer"] is not None:
            choices["optimizer"] = str(choices["optimizer"])
        fits.append({**choices,
            "study": study, "fit_id": fid, "file": str(path), "law": f.get("law"), "kind": kind,
            "params": _j(f.get("params")), "fixed": _j(f.get("fixed")), "meta": _j(meta),
            "intervals": _j(f.get("intervals") or meta.get("intervals")),
            "heldout": _j(f.get("heldout") or meta.get("heldout")), "raw": _j(f), "file_hash": fh,
            "config_hash": prov.get("config_hash"), "git_commit": prov.get("git_commit"),
            "git_dirty": prov.get("git_dirty"),
        })
        preds.extend(_prediction_rows(study, fid, kind, f))
    if not found and isinstance(obj, dict):  # a file with only tables (e.g. allocation): predictions only
        preds.extend(_prediction_rows(study, path.stem, None, obj))
    return fits, preds
