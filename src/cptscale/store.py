"""The DuckDB results store: one aggregate step ingests every job's files; jobs never touch the DB.

Ingest is

* **atomic**: the new database is built in a private temp file (a copy of the previous database plus
  the changes), checkpointed and closed — so no ``.wal`` is left beside it — then ``os.replace``-d over
  the old file. A killed ingest leaves the previous database byte-for-byte intact (the stale temp file
  is removed by the next ingest). A lock file serialises concurrent ingests.
* **idempotent**: every run / study file set has a content fingerprint in ``ingest_log``; an unchanged
  run is skipped, a changed (re-run) one has all its rows deleted and re-inserted.
* **strict about bad input**: a malformed or truncated JSONL line is reported as ``path:line``; that
  run is skipped (its old rows stay) and the exit status is 1, unless ``allow_partial`` keeps the
  good lines.

* **published, not exposed**: the workflow ingests into a persistent store (``db/store.duckdb``) that is
  not a Snakemake output (Snakemake deletes outputs before a job runs and after it fails) and then
  copies it atomically to the declared output (``--publish``, :func:`publish`).

Every ``runs`` row carries config hash, git commit + dirty flag, package versions and input hashes (the
trainer's record from done.json where it wrote one, else the planner's from run.json; ``runs.provenance``
says which); every other run-level row carries ``study``, ``run_id`` and ``config_hash`` so it joins back
to them. ``evals.branch`` is NULL for the main trajectory and a WSD decay branch's total steps for that
branch's evals: queries of loss curves read ``WHERE branch IS NULL``. ``train_metrics.branch`` is the
same for the training steps (branch_metrics.jsonl) of those branches.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cptscale.transfer import flops_6nd, flops_at_step, forgetting, main_trajectory, run_compute
from cptscale.util import file_hash, file_lock, read_json, stable_hash

#: 2: runs gained the IPLT arm, the trainer's FLOPs and the prune events (cptscale.iplt, cptscale.prune)
#: 3: evals gained ``branch`` (WSD decay branches; NULL = the main trajectory), runs gained ``branches``
#:    (done.json) and ``provenance`` (the merged record), fits gained the fitting choices as columns
#: 4: train_metrics gained ``branch`` (the steps of WSD decay branches, from branch_metrics.jsonl)
SCHEMA_VERSION = 4

#: table -> column DDL. Names are a contract with the report and fit stages.
SCHEMA: dict[str, str] = {
    "studies": """study VARCHAR PRIMARY KEY, config_hash VARCHAR, config JSON, expected_runs JSON,
        n_expected_runs INTEGER, study_dir VARCHAR, git_commit VARCHAR, git_dirty BOOLEAN, packages JSON,
        input_hashes JSON, provenance JSON, tokenizer_report JSON, ingested_at TIMESTAMP""",
    "runs": """study VARCHAR, run_id VARCHAR, size VARCHAR, init VARCHAR, lang VARCHAR, source_lang VARCHAR,
        replay DOUBLE, variant VARCHAR, parent_run_id VARCHAR, parent_checkpoint VARCHAR, seed BIGINT,
        hidden INTEGER, layers INTEGER, heads INTEGER, ffn INTEGER, kv_heads INTEGER, vocab_size INTEGER,
        seq_length INTEGER, micro_batch_size INTEGER, global_batch_size INTEGER, steps BIGINT, params BIGINT,
        params_nonemb BIGINT, tokens BIGINT, steps_done BIGINT, tokens_done BIGINT, final_loss JSON,
        wall_s DOUBLE, status VARCHAR, flops_6nd DOUBLE, flops_6nd_nonemb DOUBLE, flops_exact DOUBLE,
        flops_exact_nonemb DOUBLE, out_dir VARCHAR, config_hash VARCHAR, git_commit VARCHAR, git_dirty BOOLEAN,
        packages JSON, input_hashes JSON, file_hashes JSON, config JSON, blend JSON, ingested_at TIMESTAMP,
        arm VARCHAR, arm_panel VARCHAR, iplt JSON, flops_spent DOUBLE, flops_spent_6nd DOUBLE,
        flops_inherited DOUBLE, final_params BIGINT, final_shape JSON, prune JSON, branches JSON, provenance JSON,
        PRIMARY KEY (study, run_id)""",
    "checkpoints": """study VARCHAR, run_id VARCHAR, kind VARCHAR, step BIGINT, path VARCHAR, config_hash VARCHAR""",
    "train_metrics": """study VARCHAR, run_id VARCHAR, step BIGINT, tokens BIGINT, loss DOUBLE, lr DOUBLE,
        grad_norm DOUBLE, tokens_per_s DOUBLE, mem_bytes DOUBLE, mfu DOUBLE, config_hash VARCHAR,
        branch BIGINT""",
    "evals": """study VARCHAR, run_id VARCHAR, step BIGINT, tokens BIGINT, lang VARCHAR, loss DOUBLE, ppl DOUBLE,
        bpb DOUBLE, n_tokens BIGINT, flops DOUBLE, flops_6nd DOUBLE, config_hash VARCHAR, branch BIGINT""",
    "data_manifests": """study VARCHAR, lang VARCHAR, train_docs BIGINT, train_tokens BIGINT, train_bytes BIGINT,
        train_chars BIGINT, valid_docs BIGINT, valid_tokens BIGINT, valid_bytes BIGINT, valid_chars BIGINT,
        tokens_per_byte DOUBLE, tokens_per_char DOUBLE, vocab_size INTEGER, tokenizer_hash VARCHAR,
        docs_hash VARCHAR, config_hash VARCHAR, git_commit VARCHAR, git_dirty BOOLEAN, input_hashes JSON,
        file_hash VARCHAR, raw JSON""",
    "blend_realizations": """study VARCHAR, run_id VARCHAR, phase VARCHAR, phase_index INTEGER,
        start_step BIGINT, end_step BIGINT, source VARCHAR, planned_share DOUBLE, realized_share DOUBLE,
        samples BIGINT, tokens BIGINT, available_tokens BIGINT, epochs DOUBLE, config_hash VARCHAR""",
    "transfer": """study VARCHAR, run_id VARCHAR, scratch_run_id VARCHAR, source_run_id VARCHAR, size VARCHAR,
        lang VARCHAR, source_lang VARCHAR, replay DOUBLE, step BIGINT, tokens BIGINT, target_tokens DOUBLE,
        loss DOUBLE, flops DOUBLE, flops_total DOUBLE, scratch_tokens_equiv DOUBLE, scratch_flops_equiv DOUBLE,
        tokens_saved DOUBLE, flops_saved DOUBLE, frac_saved DOUBLE, flops_saved_total DOUBLE,
        frac_saved_total DOUBLE, effective_data_transferred DOUBLE, extrapolated BOOLEAN, config_hash VARCHAR""",
    "forgetting": """study VARCHAR, run_id VARCHAR, size VARCHAR, replay DOUBLE, step BIGINT, tokens BIGINT,
        source_lang VARCHAR, source_loss DOUBLE, source_final_loss DOUBLE, forgetting DOUBLE,
        config_hash VARCHAR""",
    "fits": """study VARCHAR, fit_id VARCHAR, file VARCHAR, law VARCHAR, kind VARCHAR, params JSON, fixed JSON,
        meta JSON, intervals JSON, heldout JSON, raw JSON, file_hash VARCHAR, config_hash VARCHAR,
        git_commit VARCHAR, git_dirty BOOLEAN, loss VARCHAR, delta DOUBLE, reduction VARCHAR, optimizer VARCHAR,
        grid JSON, selection JSON, excluded JSON, input_hash VARCHAR""",
    "predictions": """study VARCHAR, fit_id VARCHAR, kind VARCHAR, row_kind VARCHAR, run_id VARCHAR, N DOUBLE,
        D DOUBLE, C DOUBLE, predicted_loss DOUBLE, observed_loss DOUBLE, extra JSON""",
    "ingest_log": """study VARCHAR, key VARCHAR, fingerprint VARCHAR, ingested_at TIMESTAMP,
        PRIMARY KEY (study, key)""",
    "meta": """key VARCHAR PRIMARY KEY, value VARCHAR""",
}
RUN_TABLES = ("runs", "checkpoints", "train_metrics", "evals", "blend_realizations", "transfer", "forgetting")
TABLES = tuple(t for t in SCHEMA if t not in ("ingest_log", "meta"))
RUN_FILES = ("run.json", "metrics.jsonl", "evals.jsonl", "done.json", "blend.json", "transfer.json", "prune.jsonl",
             "branch_metrics.jsonl")

#: Columns added after schema version 1, by table: an older database gains them on the next ingest
#: (and every run and fit file is re-ingested once, so the new columns are filled for old rows too).
ADDED_COLUMNS: dict[str, dict[str, str]] = {
    "runs": {"arm": "VARCHAR", "arm_panel": "VARCHAR", "iplt": "JSON", "flops_spent": "DOUBLE",
             "flops_spent_6nd": "DOUBLE", "flops_inherited": "DOUBLE", "final_params": "BIGINT",
             "final_shape": "JSON", "prune": "JSON", "branches": "JSON", "provenance": "JSON"},
    "evals": {"branch": "BIGINT"},
    "train_metrics": {"branch": "BIGINT"},
    "fits": {"loss": "VARCHAR", "delta": "DOUBLE", "reduction": "VARCHAR", "optimizer": "VARCHAR", "grid": "JSON",
             "selection": "JSON", "excluded": "JSON", "input_hash": "VARCHAR"},
}
#: The fits columns filled from a fit's ``meta`` (the choices every loss-law fit records).
FIT_CHOICES = ("loss", "delta", "reduction", "optimizer", "grid", "selection", "excluded", "input_hash")
#: Provenance fields the trainer's done.json may record at training time (preferred over run.json's,
#: which the planner wrote before the job ran, possibly from another checkout).
PROVENANCE_FIELDS = ("git_commit", "git_dirty", "packages", "config_hash", "input_hashes")


class BadInput(Exception):
    """A malformed input file; the message names the file and line."""


@dataclass
class IngestReport:
    db_path: str
    study: str
    runs_seen: int = 0
    runs_ingested: int = 0
    runs_unchanged: int = 0
    runs_skipped: int = 0
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)  #: rows inserted this time, per table
    totals: dict[str, int] = field(default_factory=dict)  #: rows in the database afterwards
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        ins = ", ".join(f"{k}+{v}" for k, v in self.rows.items() if v) or "nothing new"
        return (f"{self.db_path}: study {self.study}: {self.runs_seen} runs ({self.runs_ingested} ingested, "
                f"{self.runs_unchanged} unchanged, {self.runs_skipped} skipped) in {self.seconds:.2f}s; {ins}")


# -- small helpers -------------------------------------------------------------------------------
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


# -- per-run parsing -----------------------------------------------------------------------------
def _run_rows(run_dir: Path, study: str, *, allow_partial: bool, problems: list[str]) -> dict[str, Any]:
    """All table rows for one run directory (raises BadInput for a bad file): a DataFrame for the
    train metrics, lists of dicts for the small tables (framed once for all runs, which is faster)."""

    try:
        spec = read_json(run_dir / "run.json")
    except (OSError, ValueError) as exc:
        raise BadInput(f"{run_dir / 'run.json'}: unreadable run spec ({exc}); re-run `cptscale plan`") from None
    done = None
    if (run_dir / "done.json").exists():
        try:
            done = read_json(run_dir / "done.json")
        except ValueError as exc:
            raise BadInput(f"{run_dir / 'done.json'}: malformed JSON ({exc})") from None
    rid = spec.get("run_id") or run_dir.name
    chash = spec.get("config_hash")
    prov = merged_provenance(spec.get("provenance"), (done or {}).get("provenance"))
    branches = _branches(run_dir / "done.json", (done or {}).get("branches"))
    comp = run_compute(spec) if "shape" in spec else {}
    fpt = comp.get("flops_per_token")
    params = comp.get("params", spec.get("params"))
    pruned = bool((spec.get("prune") or {}).get("events"))
    tps = int(spec.get("global_batch_size") or 0) * int(spec.get("seq_length") or 0)

    def eval_flops(e: dict[str, Any]) -> tuple[float | None, float | None]:
        """FLOPs at an eval: the trainer's own count when it wrote one (exact after a prune), else the
        count from the spec's shape(s) at that step."""
        if e.get("flops") is not None:
            return float(e["flops"]), (float(e["flops_6nd"]) if e.get("flops_6nd") is not None else None)
        if e.get("tokens") is None:
            return None, None
        if pruned and tps:
            f = flops_at_step(spec, int(e["step"]))
            return f["flops_exact"], f["flops_6nd"]
        return (fpt * e["tokens"] if fpt is not None else None,
                flops_6nd(params, e["tokens"]) if params else None)
    key = {"study": study, "run_id": rid, "config_hash": chash}
    out: dict[str, Any] = {}

    # train metrics
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
        out["train_metrics"] = tm

    # evals
    ev_rows: list[dict[str, Any]] = []
    epath = run_dir / "evals.jsonl"
    if epath.exists():
        ev_rows = read_jsonl_rows(epath, ("step", "lang", "loss"), allow_partial=allow_partial, problems=problems,
                                  check=_check_branch)
        # a resumed run may re-log an eval: the last one of each (step, lang, branch) wins
        dedup: dict[tuple[int, str, int | None], dict[str, Any]] = {}
        for e in ev_rows:
            dedup[(int(e["step"]), str(e["lang"]), e.get("branch"))] = e
        ev_rows = list(dedup.values())
        out["evals"] = [
            {**key, "step": int(e["step"]), "tokens": e.get("tokens"), "lang": e["lang"], "loss": e["loss"],
             "ppl": e.get("ppl", math.exp(min(e["loss"], 700))), "bpb": e.get("bpb"),
             "n_tokens": e.get("n_tokens"), "flops": fl, "flops_6nd": f6, "branch": e.get("branch")}
            for e in ev_rows for fl, f6 in [eval_flops(e)]
        ]
        ev_rows = main_trajectory(ev_rows)  # forgetting is a main-trajectory curve

    # blend realization
    blend = None
    if (run_dir / "blend.json").exists():
        try:
            blend = read_json(run_dir / "blend.json")
        except ValueError as exc:
            raise BadInput(f"{run_dir / 'blend.json'}: malformed JSON ({exc})") from None
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
        out["blend_realizations"] = rows

    # transfer + forgetting
    tr = None
    if (run_dir / "transfer.json").exists():
        try:
            tr = read_json(run_dir / "transfer.json")
        except ValueError as exc:
            raise BadInput(f"{run_dir / 'transfer.json'}: malformed JSON ({exc}); re-run `cptscale transfer`") from None
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

    # checkpoints
    ck = []
    parent = spec.get("parent") or {}
    if parent.get("checkpoint"):
        ck.append({**key, "kind": "init", "step": None, "path": str(parent["checkpoint"])})
    if done and done.get("final_checkpoint"):
        ck.append({**key, "kind": "final", "step": done.get("steps"), "path": str(done["final_checkpoint"])})
    if done and done.get("resumed_from"):
        ck.append({**key, "kind": "resumed_from", "step": None, "path": str(done["resumed_from"])})
    ckdir = (spec.get("checkpoint") or {}).get("dir")
    if ckdir and Path(ckdir).is_dir():
        for p in sorted(Path(ckdir).glob("iter_*")):
            m = re.match(r"iter_0*(\d+)$", p.name)
            if m:
                ck.append({**key, "kind": "saved", "step": int(m.group(1)), "path": str(p)})
    out["checkpoints"] = ck

    # prune events as the trainer recorded them (prune.jsonl; the units kept are left in the file)
    prune_rows = None
    if (run_dir / "prune.jsonl").exists():
        prune_rows = [{k: v for k, v in r.items() if k != "kept"} for r in read_jsonl_rows(
            run_dir / "prune.jsonl", ("step", "shape"), allow_partial=allow_partial, problems=problems)]
    iplt = spec.get("iplt") or {}
    d = done or {}
    # the trainer's FLOPs (done.json) are the run's FLOPs; the spec's count stands in until it is done
    if d.get("flops_spent") is not None:
        comp = {**comp, "flops_exact": float(d["flops_spent"])}
        if d.get("flops_spent_6nd") is not None:
            comp["flops_6nd"] = float(d["flops_spent_6nd"])
    shape = spec.get("shape") or {}
    inputs = dict(prov.get("input_hashes") or {})
    out["runs"] = [{
        **key, "size": spec.get("size"), "init": spec.get("init"), "lang": spec.get("lang"),
        "source_lang": spec.get("source_lang"), "replay": spec.get("replay"), "variant": spec.get("variant"),
        "parent_run_id": parent.get("run_id"), "parent_checkpoint": parent.get("checkpoint"),
        "seed": spec.get("seed"), "hidden": shape.get("hidden"), "layers": shape.get("layers"),
        "heads": shape.get("heads"), "ffn": shape.get("ffn"), "kv_heads": shape.get("kv_heads"),
        "vocab_size": spec.get("vocab_size"), "seq_length": spec.get("seq_length"),
        "micro_batch_size": spec.get("micro_batch_size"), "global_batch_size": spec.get("global_batch_size"),
        "steps": spec.get("steps"), "params": params,
        "params_nonemb": comp.get("params_nonemb", spec.get("params_nonemb")),
        "tokens": comp.get("tokens", spec.get("tokens")), "steps_done": (done or {}).get("steps"),
        "tokens_done": (done or {}).get("tokens"), "final_loss": _j((done or {}).get("final_loss")),
        "wall_s": (done or {}).get("wall_s"), "status": "done" if done else "partial",
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
    }]
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


# -- study-level files -----------------------------------------------------------------------
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


# -- the database file -----------------------------------------------------------------------
@contextlib.contextmanager
def _lock(db: Path) -> Iterator[None]:
    db.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(db.with_name(db.name + ".lock")):
        yield


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create_schema(con: Any) -> None:
    """Create the tables; an older database gains the columns added since (ADDED_COLUMNS) and forgets
    its ingest log, so the next ingest re-reads every run and fills them."""
    old = None
    if con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'meta'").fetchone()[0]:
        row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        old = int(row[0]) if row else None
    for t, cols in SCHEMA.items():
        con.execute(f"CREATE TABLE IF NOT EXISTS {t} ({cols})")
    for t, cols in ADDED_COLUMNS.items():
        for name, typ in cols.items():
            con.execute(f"ALTER TABLE {t} ADD COLUMN IF NOT EXISTS {name} {typ}")
    if old is not None and old < SCHEMA_VERSION:
        con.execute("DELETE FROM ingest_log")
    con.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)])


def publish(store: str | os.PathLike[str], dest: str | os.PathLike[str]) -> Path:
    """Copy the persistent store to ``dest`` atomically (temp file beside it, fsync, rename).

    The workflow ingests into a store that is *not* a Snakemake output (Snakemake deletes a job's
    outputs before it runs and after it fails, which would lose the database) and publishes a copy as
    the declared output. The copy is taken under the store's ingest lock, so it is never half-updated.
    """
    from cptscale.util import atomic_path

    src, dst = Path(store), Path(dest)
    if src.resolve() == dst.resolve():
        raise ValueError(f"--publish {dest}: the published copy must differ from the store --db {store}")
    if not src.exists():
        raise FileNotFoundError(f"{src}: no store to publish; ingest into it first")
    with _lock(src), atomic_path(dst) as tmp, open(src, "rb") as fi, open(tmp, "wb") as fo:
        while block := fi.read(1 << 24):
            fo.write(block)
        fo.flush()
        os.fsync(fo.fileno())
    _fsync_dir(dst.parent)
    return dst


def _insert(con: Any, table: str, df: Any) -> int:
    if df is None or len(df) == 0:
        return 0
    con.register("_new_rows", df)
    try:
        con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM _new_rows")
    finally:
        con.unregister("_new_rows")
    return len(df)


def _fingerprint(files: Sequence[Path]) -> dict[str, str]:
    return {p.name: file_hash(p) for p in files if p.exists()}


def default_db(study_dir: str | os.PathLike[str]) -> Path:
    return Path(study_dir) / "cptscale.duckdb"


def ingest(study_dir: str | os.PathLike[str], db_path: str | os.PathLike[str] | None = None, *,
           allow_partial: bool = False, _pause_before_replace: float = 0.0) -> IngestReport:
    """Ingest one study directory into ``db_path`` atomically (see the module docstring)."""
    import duckdb

    t0 = time.perf_counter()
    sdir = Path(study_dir)
    db = Path(db_path) if db_path else default_db(sdir)
    sj = read_json(sdir / "study.json") if (sdir / "study.json").exists() else {}
    run_dirs = sorted(p for p in (sdir / "runs").glob("*") if (p / "run.json").exists())
    study = sj.get("study")
    if not study and run_dirs:
        study = read_json(run_dirs[0] / "run.json").get("study")
    study = study or sdir.name
    rep = IngestReport(str(db), study)
    with _lock(db):
        for stale in db.parent.glob(f".{db.name}.ingest-*"):
            stale.unlink(missing_ok=True)  # left by a killed ingest; we hold the lock
        tmp = db.with_name(f".{db.name}.ingest-{os.getpid()}.tmp")
        if db.exists():
            if db.with_name(db.name + ".wal").exists():  # someone wrote with a raw client: fold it in first
                duckdb.connect(str(db)).close()
            with open(db, "rb") as src, open(tmp, "wb") as dst:
                while block := src.read(1 << 24):
                    dst.write(block)
        try:
            con = duckdb.connect(str(tmp))
            try:
                create_schema(con)
                _ingest_into(con, sdir, study, sj, run_dirs, rep, allow_partial=allow_partial)
                rep.totals = {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES}
                con.execute("CHECKPOINT")
            finally:
                con.close()
            if tmp.with_name(tmp.name + ".wal").exists():
                raise RuntimeError(f"{tmp}.wal left after close; refusing to replace {db}")
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            if _pause_before_replace:  # test hook: widen the window a SIGKILL can hit
                print(f"ingest: {tmp} complete, pausing before replace", file=sys.stderr, flush=True)
                time.sleep(_pause_before_replace)
            os.replace(tmp, db)
            _fsync_dir(db.parent)
        finally:
            tmp.unlink(missing_ok=True)
            tmp.with_name(tmp.name + ".wal").unlink(missing_ok=True)
    rep.seconds = time.perf_counter() - t0
    return rep


def _ingest_into(con: Any, sdir: Path, study: str, sj: dict[str, Any], run_dirs: list[Path],
                 rep: IngestReport, *, allow_partial: bool) -> None:
    import pandas as pd

    log = dict(con.execute("SELECT key, fingerprint FROM ingest_log WHERE study = ?", [study]).fetchall())
    new_log: dict[str, str] = {}
    rep.rows = dict.fromkeys(TABLES, 0)

    # study row (+ tokenizer report)
    files = [sdir / "study.json", sdir / "tokenizer" / "report.json"]
    fp = stable_hash(_fingerprint(files))
    if log.get("study") != fp and any(f.exists() for f in files):
        prov = sj.get("provenance") or {}
        tok = read_json(files[1]) if files[1].exists() else None
        con.execute("DELETE FROM studies WHERE study = ?", [study])
        rep.rows["studies"] += _insert(con, "studies", pd.DataFrame.from_records([{
            "study": study, "config_hash": sj.get("config_hash"), "config": _j(sj.get("config")),
            "expected_runs": _j(sj.get("expected_runs")), "n_expected_runs": len(sj.get("expected_runs") or []),
            "study_dir": str(sdir.resolve()), "git_commit": prov.get("git_commit"),
            "git_dirty": prov.get("git_dirty"), "packages": _j(prov.get("packages")),
            "input_hashes": _j(prov.get("input_hashes")), "provenance": _j(prov), "tokenizer_report": _j(tok),
            "ingested_at": _now()}]))
        new_log["study"] = fp

    # data manifests
    for mpath in sorted((sdir / "data").glob("*/data.json")):
        lang, fh = mpath.parent.name, file_hash(mpath)
        if log.get(f"data/{lang}") == fh:
            continue
        try:
            row = _manifest_row(study, lang, read_json(mpath), fh)
        except ValueError as exc:
            rep.errors.append(f"{mpath}: malformed JSON ({exc}); re-run `cptscale data index --lang {lang}`")
            continue
        con.execute("DELETE FROM data_manifests WHERE study = ? AND lang = ?", [study, row["lang"]])
        rep.rows["data_manifests"] += _insert(con, "data_manifests", pd.DataFrame.from_records([row]))
        new_log[f"data/{lang}"] = fh

    # fits
    for fpath in sorted((sdir / "fits").glob("*.json")):
        fh = file_hash(fpath)
        if log.get(f"fit/{fpath.name}") == fh:
            continue
        try:
            fits, preds = _fit_rows(study, fpath, fh)
        except BadInput as exc:
            rep.errors.append(str(exc))
            continue
        con.execute("DELETE FROM predictions WHERE study = ? AND fit_id IN (SELECT fit_id FROM fits "
                    "WHERE study = ? AND file = ?)", [study, study, str(fpath)])
        con.execute("DELETE FROM fits WHERE study = ? AND file = ?", [study, str(fpath)])
        ids = sorted({f["fit_id"] for f in fits} | {p["fit_id"] for p in preds})
        if ids:
            con.execute("DELETE FROM predictions WHERE study = ? AND list_contains(?, fit_id)", [study, ids])
        rep.rows["fits"] += _insert(con, "fits", pd.DataFrame.from_records(fits) if fits else None)
        rep.rows["predictions"] += _insert(con, "predictions", pd.DataFrame.from_records(preds) if preds else None)
        new_log[f"fit/{fpath.name}"] = fh

    # runs: parse every changed run, then one delete + one insert per table
    batches: dict[str, list[Any]] = {t: [] for t in RUN_TABLES}
    changed: list[str] = []
    for rdir in run_dirs:
        rep.runs_seen += 1
        hashes = _fingerprint([rdir / f for f in RUN_FILES])
        fp = stable_hash(hashes)
        if log.get(f"run/{rdir.name}") == fp:
            rep.runs_unchanged += 1
            continue
        problems: list[str] = []
        try:
            rows = _run_rows(rdir, study, allow_partial=allow_partial, problems=problems)
        except BadInput as exc:
            rep.errors.append(str(exc))
            rep.runs_skipped += 1
            continue
        except (KeyError, TypeError, ValueError) as exc:
            rep.errors.append(f"{rdir}: unexpected content ({type(exc).__name__}: {exc}); check the run's files")
            rep.runs_skipped += 1
            continue
        rep.warnings.extend(problems)
        rows["runs"][0]["file_hashes"] = _j(hashes)
        changed.append(rows["runs"][0]["run_id"])
        for t in RUN_TABLES:
            v = rows.get(t)
            if v is None or not len(v):
                continue
            if isinstance(v, list):
                batches[t].extend(v)
            else:
                batches[t].append(v)
        # a partial (allow_partial) ingest must be retried once the files are fixed
        new_log[f"run/{rdir.name}"] = fp if not problems else f"partial:{fp}"
        rep.runs_ingested += 1
    if changed:
        ids = pd.DataFrame({"run_id": changed})
        con.register("_changed", ids)
        for t in RUN_TABLES:
            con.execute(f"DELETE FROM {t} WHERE study = ? AND run_id IN (SELECT run_id FROM _changed)", [study])
        con.unregister("_changed")
        for t in RUN_TABLES:
            b = batches[t]
            if not b:
                continue
            if isinstance(b[0], dict):
                df = pd.DataFrame.from_records(b)
                if "branch" in df.columns:  # NULL for the main trajectory: a nullable integer, not float NaN
                    df["branch"] = df["branch"].astype("Int64")
            else:
                df = b[0] if len(b) == 1 else pd.concat(b, ignore_index=True)
            rep.rows[t] += _insert(con, t, df)
    if new_log:
        now = _now()
        con.executemany("INSERT OR REPLACE INTO ingest_log VALUES (?, ?, ?, ?)",
                        [(study, k, v, now) for k, v in new_log.items()])


# -- queries ---------------------------------------------------------------------------------
def connect(db: str | os.PathLike[str], read_only: bool = True) -> Any:
    """Open the store; read-only by default so a query never leaves a WAL beside it."""
    import duckdb

    from cptscale.cli import CLIError

    if not Path(db).exists():
        raise CLIError(f"{db}: no such database; run `cptscale db ingest --study-dir S --db {db}` first")
    return duckdb.connect(str(db), read_only=read_only)


def write_points_table(db: str | os.PathLike[str] | Any, study: str, out_csv: str | os.PathLike[str], *,
                       min_step_fraction: float = 0.0, langs: Sequence[str] | None = None) -> int:
    """The fitting input: one row per eval step > 0 of each run's target-language loss, plus the final
    eval of each of its WSD decay branches (``branch`` = the branch's total steps; empty for the main
    trajectory): a branch is a completed short run, so its end is an extra (N, D, loss) point of that
    run (same ``run``, so the bootstrap resamples it with the run).

    Columns ``run, N, D, loss, init, lang, size, replay, C`` (+ ``step, D_target, params_nonemb, branch``).
    N = parameters **with** embeddings (``runs.params``), D = tokens seen by the run (for CPT: CPT tokens,
    source pre-training excluded, replay included; ``D_target = D·(1 - replay)``), C = 6·N·D.
    ``min_step_fraction`` drops the earliest evals (warm-up) of every run. Only runs in ``langs`` are
    written (default: the CPT target languages, so source-language scratch runs stay out of the fit;
    every run when the study has no CPT runs). IPLT arms (``runs.arm``) change shape mid-run and are left
    out: they are compared with each other (report figure ``iplt``), not fitted.
    """
    from cptscale.util import atomic_path

    con = connect(db) if isinstance(db, str | os.PathLike) else db
    if langs is None:  # the target languages of the study's CPT runs; the source runs are not fitted
        langs = [r[0] for r in con.execute(
            "SELECT DISTINCT lang FROM runs WHERE study = ? AND init = 'cpt' AND arm IS NULL", [study]).fetchall()]
    df = con.execute(
        """WITH ev AS (
               SELECT *, max(step) OVER (PARTITION BY run_id, lang, branch) AS branch_end
               FROM evals WHERE study = ?)
           SELECT e.run_id AS run, r.params::DOUBLE AS N, e.tokens::DOUBLE AS D, e.loss, r.init, r.lang, r.size,
                  coalesce(r.replay, 0.0) AS replay, 6.0 * r.params * e.tokens AS C, e.step,
                  e.tokens * (1 - coalesce(r.replay, 0.0)) AS D_target, r.params_nonemb AS params_nonemb,
                  e.branch
           FROM ev e JOIN runs r ON r.study = ? AND r.run_id = e.run_id
           WHERE e.lang = r.lang AND e.step > 0 AND r.arm IS NULL
             AND (e.branch IS NULL OR e.step = e.branch_end)
             AND e.step >= ? * coalesce(r.steps, 0)
             AND (list_contains(?::VARCHAR[], r.lang) OR ? IS NULL)
           ORDER BY r.init, r.params, r.replay, e.run_id, e.step, e.branch NULLS FIRST""",
        [study, study, float(min_step_fraction), list(langs), 1 if langs else None],
    ).df()
    df["branch"] = df["branch"].astype("Int64")
    with atomic_path(out_csv) as tmp:
        df.to_csv(tmp, index=False)
    return len(df)


def status_table(study_dir: str | os.PathLike[str], db: str | os.PathLike[str] | None = None) -> Any:
    """Expected vs present runs and eval rows per size x init x replay x variant (CPT recipe variants and
    IPLT arms are their own rows), from the files, plus the DB."""
    import pandas as pd

    from cptscale.cli import CLIError

    sdir = Path(study_dir)
    if (sdir / "study.json").exists():
        sj = read_json(sdir / "study.json")
        expected = sj.get("expected_runs") or []
    else:
        sj, expected = {}, []
    runs_dir = sdir / "runs"
    known = {e["run_id"] for e in expected}
    for p in sorted(runs_dir.glob("*/run.json")):  # runs on disk that the plan no longer lists
        if p.parent.name not in known:
            s = read_json(p)
            expected.append({"run_id": s["run_id"], "size": s.get("size"), "init": s.get("init"),
                             "replay": s.get("replay"), "variant": s.get("variant"), "params": s.get("params"),
                             "unplanned": True})
    if not expected:
        raise CLIError(f"{sdir}: no study.json and no runs; run `cptscale plan CONFIG --study-json "
                       f"{sdir}/study.json` first")
    in_db: set[str] = set()
    dbp = Path(db) if db else default_db(sdir)
    if dbp.exists():
        with contextlib.suppress(Exception):
            con = connect(dbp)
            in_db = {r[0] for r in con.execute("SELECT run_id FROM runs WHERE study = ?",
                                               [sj.get("study", sdir.name)]).fetchall()}
            con.close()
    recs = []
    for e in expected:
        d = runs_dir / e["run_id"]
        spec = read_json(d / "run.json") if (d / "run.json").exists() else {}
        ev_cfg = spec.get("eval") or {}
        n_exp = len(ev_cfg.get("steps") or []) * len(ev_cfg.get("languages") or {}) if ev_cfg else 0
        n_ev = n_br = 0
        if (d / "evals.jsonl").exists():
            with open(d / "evals.jsonl", "rb") as fh:
                for line in fh:
                    if b'"branch"' in line and _branch_of(line) is not None:
                        n_br += 1  # a WSD decay branch's eval: not one of the planned main-trajectory evals
                    elif line.strip():
                        n_ev += 1
        recs.append({
            "size": e.get("size"), "params": e.get("params") or spec.get("params") or 0, "init": e.get("init"),
            "replay": float(e.get("replay") or 0.0), "variant": e.get("variant") or "",
            "expected": 0 if e.get("unplanned") else 1,
            "done": int((d / "done.json").exists()),
            "partial": int((d / "run.json").exists() and not (d / "done.json").exists()
                           and (d / "metrics.jsonl").exists()),
            "evals": n_ev, "evals_expected": n_exp, "branch_evals": n_br,
            "transfer": int((d / "transfer.json").exists()) if e.get("init") == "cpt" and not e.get("arm") else None,
            "in_db": int(e["run_id"] in in_db),
        })
    df = pd.DataFrame.from_records(recs)
    g = (df.groupby(["params", "size", "init", "replay", "variant"], dropna=False)
         .agg(expected=("expected", "sum"), done=("done", "sum"), partial=("partial", "sum"),
              evals=("evals", "sum"), evals_expected=("evals_expected", "sum"),
              transfer=("transfer", "sum"), in_db=("in_db", "sum"), branch_evals=("branch_evals", "sum"))
         .reset_index().sort_values(["params", "init", "replay", "variant"]).drop(columns="params"))
    g["missing"] = (g["expected"] - g["done"] - g["partial"]).clip(lower=0)
    return g[["size", "init", "replay", "variant", "expected", "done", "partial", "missing", "evals", "evals_expected",
              "transfer", "in_db", "branch_evals"]]


def _branch_of(line: bytes) -> Any:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row.get("branch") if isinstance(row, dict) else None


# -- synthetic studies (tests, benchmarks, report development) ----------------------------------
_LAW = {"E": 1.55, "A": 420.0, "alpha": 0.40, "B": 719.5, "beta": 0.30}


def _law(n: float, d: float, e_shift: float = 0.0) -> float:
    return _LAW["E"] + e_shift + _LAW["A"] / n ** _LAW["alpha"] + _LAW["B"] / max(d, 1.0) ** _LAW["beta"]


def generate_study(study_dir: str | os.PathLike[str], sizes: Sequence[str] | int = ("d64l2", "d128l4"),
                   inits: Sequence[str] = ("scratch", "cpt"), replays: Sequence[float] = (0.0, 0.25),
                   steps_per_run: int = 50, seed: int = 0, *, lang: str = "zh", source_lang: str = "en",
                   evals_per_run: int = 10, study: str | None = None, token_multiplier: float = 20.0) -> list[str]:
    """Write a synthetic but realistic study tree; returns the run ids.

    Losses follow the paper's scratch Chinchilla fit (E=1.55, A=420, α=0.40, B=719.5, β=0.30) with N the
    parameter count and D the tokens; CPT runs see an effective-data bonus D_T = 0.5·D^0.8·N^0.25 on
    their target tokens D·(1-replay) (~40% saved, growing with N, shrinking with D, as in the paper); source-language loss during CPT rises by up
    to 1.3 nats without replay and recovers faster the more is replayed. ``sizes`` are ladder names or
    an int (the first n paper sizes). Every file follows the formats of the real stages.
    """
    import numpy as np

    from cptscale.ladder import PAPER_SHAPES, get_shape
    from cptscale.plan import run_id as make_run_id
    from cptscale.util import write_json

    rng = np.random.default_rng(seed)
    sdir = Path(study_dir)
    study = study or sdir.name
    names = list(PAPER_SHAPES)[: int(sizes)] if isinstance(sizes, int) else list(sizes)
    vocab, seq = 32000, 2048
    chash = stable_hash({"study": study, "seed": seed})
    prov = {"git_commit": "0" * 40, "git_dirty": False, "packages": {"cptscale": "0.1.0"}, "config_hash": chash,
            "input_hashes": {f"data/{lang}": "a" * 16, f"data/{source_lang}": "b" * 16}}
    expected, ids = [], []

    def spec_for(size: str, init: str, run_lang: str, rep: float, parent: dict[str, Any] | None) -> dict[str, Any]:
        sh = get_shape(size)
        n = sh.params(vocab)
        gbs = max(1, round(token_multiplier * n / steps_per_run / seq))
        rid = make_run_id(size, init, run_lang, rep if init == "cpt" else None)
        ev_steps = sorted({round(steps_per_run * i / (evals_per_run - 1)) for i in range(evals_per_run)})
        return {
            "run_id": rid, "study": study, "size": size, "init": init, "lang": run_lang,
            "source_lang": source_lang if init == "cpt" else None, "replay": rep if init == "cpt" else 0.0,
            "shape": {"name": size, "hidden": sh.hidden, "layers": sh.layers, "heads": sh.heads, "ffn": sh.ffn,
                      "kv_heads": sh.kv_heads},
            "vocab_size": vocab, "seq_length": seq, "micro_batch_size": 1, "global_batch_size": gbs,
            "steps": steps_per_run, "seed": seed,
            "schedule": {"kind": "cosine", "lr": 2e-4, "warmup_fraction": 0.05},
            "optimizer": {"name": "adamw"}, "layout": {"tp": 1, "pp": 1, "dp": 1},
            "data": {"blend": {run_lang: 1.0 - rep, source_lang: rep} if init == "cpt" else {run_lang: 1.0}},
            "eval": {"steps": ev_steps, "languages": {lang: {"prefix": f"data/{lang}/valid"},
                                                     source_lang: {"prefix": f"data/{source_lang}/valid"}}},
            "checkpoint": {"dir": f"/nonexistent/checkpoints/{rid}"}, "parent": parent,
            "out_dir": str(sdir / "runs" / rid), "config_hash": chash, "provenance": prov,
            "params": n, "params_nonemb": sh.params(vocab, embeddings=False), "tokens": gbs * seq * steps_per_run,
        }

    def write_run(spec: dict[str, Any], loss_fn: Any) -> dict[str, float]:
        d = sdir / "runs" / spec["run_id"]
        d.mkdir(parents=True, exist_ok=True)
        write_json(d / "run.json", spec)
        tps = spec["global_batch_size"] * seq
        steps = spec["steps"]
        lines = []
        noise = rng.normal(0, 0.02, steps)
        gn = rng.lognormal(0, 0.2, steps)
        for k in range(1, steps + 1):
            f = k / steps
            lr = 2e-4 * min(1.0, f / 0.05) * 0.5 * (1 + math.cos(math.pi * f))
            loss = loss_fn(spec["lang"], k * tps, f) + noise[k - 1]
            lines.append(f'{{"step": {k}, "tokens": {k * tps}, "loss": {loss:.5f}, "lr": {lr:.4e}, '
                         f'"grad_norm": {gn[k - 1]:.4f}, "tokens_per_s": 50000.0, "mem_bytes": 1000000000, '
                         f'"mfu": 0.4}}\n')
        with open(d / "metrics.jsonl", "w") as fh:
            fh.writelines(lines)
        ev, final = [], {}
        for s in spec["eval"]["steps"]:
            for el in spec["eval"]["languages"]:
                lo = loss_fn(el, s * tps, s / steps) + float(rng.normal(0, 0.003))
                ev.append({"step": s, "tokens": s * tps, "lang": el, "loss": round(lo, 5),
                           "ppl": math.exp(lo), "bpb": lo / math.log(2) * 0.3, "n_tokens": 65536})
                final[el] = round(lo, 5)
        with open(d / "evals.jsonl", "w") as fh:
            fh.writelines(json.dumps(e) + "\n" for e in ev)
        src = spec["data"]["blend"]
        total = steps * spec["global_batch_size"]
        write_json(d / "blend.json", {"phases": [{"index": 0, "start_step": 0, "end_step": steps, "sources": [
            {"name": k, "planned_share": v, "realized_share": round(v + float(rng.normal(0, 0.002)), 5),
             "samples": int(total * v), "tokens": int(total * v * seq), "available_tokens": 10**11, "epochs": 0.1}
            for k, v in src.items() if v > 0]}], "warnings": []})
        write_json(d / "done.json", {"run_id": spec["run_id"], "steps": steps, "tokens": steps * tps,
                                     "final_loss": final, "final_checkpoint": f"{spec['checkpoint']['dir']}/final",
                                     "wall_s": 1.0, "params": spec["params"],
                                     "params_nonemb": spec["params_nonemb"], "resumed_from": None})
        ids.append(spec["run_id"])
        return final

    for size in names:
        n = get_shape(size).params(vocab)
        if "scratch" in inits:
            sp = spec_for(size, "scratch", lang, 0.0, None)

            def scratch_loss(el: str, d: float, f: float, n: float = n) -> float:
                return math.log(vocab) if d == 0 else _law(n, d, 0.0 if el == lang else 2.0)

            write_run(sp, scratch_loss)
            expected.append(sp)
        if "cpt" in inits:
            src = spec_for(size, "scratch", source_lang, 0.0, None)

            def source_loss(el: str, d: float, f: float, n: float = n) -> float:
                return math.log(vocab) if d == 0 else _law(n, d, -0.15 if el == source_lang else 2.0)

            src_final = write_run(src, source_loss)
            expected.append(src)
            for rep in replays:
                parent = {"run_id": src["run_id"], "checkpoint": f"/nonexistent/checkpoints/{src['run_id']}/final",
                          "lang": source_lang, "final_loss": src_final[source_lang], "tolerance": 0.05}
                sp = spec_for(size, "cpt", lang, float(rep), parent)
                sfin = src_final[source_lang]

                def cpt_loss(el: str, d: float, f: float, n: float = n, rep: float = float(rep),
                             sfin: float = sfin) -> float:
                    if el == source_lang:
                        rise = 1.3 * (1 - math.exp(-8 * f)) * math.exp(-30 * rep * f)
                        return sfin + rise - 0.05 * rep * f
                    dt = d * (1 - rep)
                    return min(_law(n, dt + 0.5 * max(dt, 1e6) ** 0.8 * n**0.25), math.log(vocab) - 1.0)

                write_run(sp, cpt_loss)
                expected.append(sp)
    for el, tpb in ((lang, 0.45), (source_lang, 0.27)):
        write_json(sdir / "data" / el / "data.json", {
            "lang": el, "train": {"docs": 1000, "tokens": 10**9, "bytes": int(10**9 / tpb), "chars": int(4e9)},
            "valid": {"docs": 100, "tokens": 10**6, "bytes": int(10**6 / tpb)}, "vocab_size": vocab,
            "fertility": {"tokens_per_byte": tpb, "tokens_per_char": tpb * 3 if el == lang else tpb * 1.1},
            "tokenizer_hash": "c" * 16, "docs_hash": "d" * 16, "provenance": prov})
    write_json(sdir / "tokenizer" / "report.json", {"vocab_size": vocab, "fertility": {lang: {}, source_lang: {}}})
    write_json(sdir / "study.json", {
        "study": study, "config_hash": chash, "config": {"study": study, "generated": True, "seed": seed},
        "expected_runs": [{"run_id": s["run_id"], "size": s["size"], "init": s["init"], "lang": s["lang"],
                           "replay": s["replay"], "parent": (s["parent"] or {}).get("run_id"),
                           "params": s["params"], "tokens": s["tokens"], "steps": s["steps"]} for s in expected],
        "provenance": prov})
    return ids


def write_generated_transfers(study_dir: str | os.PathLike[str]) -> int:
    """Run :func:`cptscale.transfer.compute_transfer` for every CPT run of a (generated) study."""
    from cptscale.transfer import compute_transfer
    from cptscale.util import write_json

    n = 0
    runs = Path(study_dir) / "runs"
    for p in sorted(runs.glob("*/run.json")):
        spec = read_json(p)
        if spec.get("init") != "cpt":
            continue
        scratch = runs / f"{spec['size']}-scratch-{spec['lang']}"
        source = runs / spec["parent"]["run_id"]
        if scratch.exists():
            write_json(p.parent / "transfer.json", compute_transfer(p.parent, scratch, source))
            n += 1
    return n


# -- CLI ---------------------------------------------------------------------------------------
def _cmd_ingest(args: Any) -> int:
    from cptscale.cli import CLIError

    if not Path(args.study_dir).is_dir():
        raise CLIError(f"{args.study_dir}: not a directory (pass the study dir, results/<study>)")
    db = Path(args.db) if args.db else default_db(args.study_dir)
    if args.publish and Path(args.publish).resolve() == db.resolve():
        raise CLIError(f"--publish {args.publish} is the store itself (--db); publish to another path")
    rep = ingest(args.study_dir, db, allow_partial=args.allow_partial)
    for w in rep.warnings:
        print(f"warning: {w}", file=sys.stderr)
    for e in rep.errors:
        print(f"error: {e}", file=sys.stderr)
    print(rep.summary())
    if args.publish:  # the store is consistent even when some inputs were skipped: publish it either way
        publish(db, args.publish)
        print(f"published {db} -> {args.publish}")
    if rep.errors:
        print(f"{len(rep.errors)} input(s) skipped; their previous rows (if any) are unchanged. Fix them and "
              "ingest again, or pass --allow-partial to keep the good lines (in the workflow: "
              "`store: {allow_partial: true}` in the study config).", file=sys.stderr)
        return 1
    return 0


def _cmd_status(args: Any) -> int:
    df = status_table(args.study_dir, args.db)
    if args.json:
        print(df.to_json(orient="records"))
    else:
        print(df.to_string(index=False))
        tot = df[["expected", "done", "partial", "missing", "evals", "evals_expected"]].sum()
        print(f"total: {tot['done']}/{tot['expected']} runs done, {tot['partial']} partial, {tot['missing']} missing; "
              f"{tot['evals']}/{tot['evals_expected']} eval rows")
    return 0


def _cmd_sql(args: Any) -> int:
    import duckdb

    from cptscale.cli import CLIError

    con = connect(args.db)
    try:
        df = con.execute(args.query).df()
    except duckdb.Error as exc:
        raise CLIError(f"query failed: {exc}") from None
    finally:
        con.close()
    if args.format == "csv":
        print(df.to_csv(index=False), end="")
    elif args.format == "json":
        print(df.to_json(orient="records"))
    else:
        import pandas as pd

        with pd.option_context("display.max_rows", args.max_rows, "display.max_columns", None, "display.width", 200):
            print(df.to_string(index=False, max_rows=args.max_rows))
    return 0


def export(db: str | os.PathLike[str], out_dir: str | os.PathLike[str], fmt: str = "parquet",
           tables: Sequence[str] | None = None) -> list[Path]:
    """Write every table (or ``tables``) to ``out_dir/<table>.<fmt>``, each file atomically.

    Table names are checked against the schema before anything is written (they end up in SQL)."""
    from cptscale.cli import CLIError
    from cptscale.util import atomic_path

    if fmt not in ("parquet", "csv"):
        raise CLIError(f"export format must be parquet or csv, not {fmt!r}")
    chosen = list(tables) if tables else list(TABLES)
    unknown = [t for t in chosen if t not in TABLES]
    if unknown:
        raise CLIError(f"--tables: unknown table(s) {', '.join(map(repr, unknown))}; the store has "
                       f"{', '.join(TABLES)}")
    con = connect(db)
    out = []
    try:
        for t in dict.fromkeys(chosen):
            dest = Path(out_dir) / f"{t}.{fmt}"
            with atomic_path(dest) as tmp:
                opts = "(FORMAT parquet)" if fmt == "parquet" else "(FORMAT csv, HEADER)"
                path = str(tmp).replace("'", "''")
                con.execute(f"COPY (SELECT * FROM \"{t}\") TO '{path}' {opts}")
            out.append(dest)
    finally:
        con.close()
    return out


def _cmd_export(args: Any) -> int:
    for p in export(args.db, args.out, args.format, args.tables):
        print(p)
    return 0


def _cmd_points(args: Any) -> int:
    n = write_points_table(args.db, args.study, args.out, min_step_fraction=args.min_step_fraction,
                           langs=args.langs)
    print(f"{args.out}: {n} points")
    return 0


def _cmd_generate(args: Any) -> int:
    sizes: Any = int(args.sizes[0]) if len(args.sizes) == 1 and args.sizes[0].isdigit() else args.sizes
    ids = generate_study(args.study_dir, sizes, args.inits, args.replays, args.steps, args.seed,
                         evals_per_run=args.evals)
    n = write_generated_transfers(args.study_dir)
    print(f"{args.study_dir}: {len(ids)} synthetic runs, {n} transfer.json")
    return 0


def add_commands(subparsers: Any) -> None:
    p = subparsers.add_parser("db", help="DuckDB results store: ingest, status, sql, export, points")
    sub = p.add_subparsers(dest="db_command", metavar="DB_COMMAND", required=True)

    q = sub.add_parser("ingest", help="ingest a study directory's files (atomic, idempotent)")
    q.add_argument("--study-dir", required=True)
    q.add_argument("--db", help="database file, updated in place (default: STUDY_DIR/cptscale.duckdb)")
    q.add_argument("--publish", metavar="PATH",
                   help="then copy the database atomically to PATH (the workflow's declared output: the store "
                        "itself is not a Snakemake output, so a failed job cannot delete it)")
    q.add_argument("--allow-partial", action="store_true", help="keep the good lines of malformed files")
    q.set_defaults(func=_cmd_ingest)

    q = sub.add_parser("status", help="expected vs present runs and evals per size x init x replay")
    q.add_argument("--study-dir", required=True)
    q.add_argument("--db", help="also show which runs are in this database (default: STUDY_DIR/cptscale.duckdb)")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=_cmd_status)

    q = sub.add_parser("sql", help="run a query (read-only)")
    q.add_argument("--db", required=True)
    q.add_argument("query")
    q.add_argument("--format", choices=("table", "csv", "json"), default="table")
    q.add_argument("--max-rows", type=int, default=200)
    q.set_defaults(func=_cmd_sql)

    q = sub.add_parser("export", help="write every table as Parquet or CSV")
    q.add_argument("--db", required=True)
    q.add_argument("--out", required=True)
    q.add_argument("--format", choices=("parquet", "csv"), default="parquet")
    q.add_argument("--tables", nargs="*")
    q.set_defaults(func=_cmd_export)

    q = sub.add_parser("points", help="fitting input CSV (run, N, D, loss, init, lang, size, replay, C)")
    q.add_argument("--db", required=True)
    q.add_argument("--study", required=True)
    q.add_argument("--out", required=True)
    q.add_argument("--min-step-fraction", type=float, default=0.0)
    q.add_argument("--langs", nargs="+", help="languages to include (default: the CPT target languages)")
    q.set_defaults(func=_cmd_points)

    q = sub.add_parser("generate", help="write a synthetic study tree (tests, benchmarks, report work)")
    q.add_argument("--study-dir", required=True)
    q.add_argument("--sizes", nargs="+", default=["d64l2", "d128l4"], help="size names, or one integer n")
    q.add_argument("--inits", nargs="+", default=["scratch", "cpt"])
    q.add_argument("--replays", nargs="+", type=float, default=[0.0, 0.25])
    q.add_argument("--steps", type=int, default=50)
    q.add_argument("--evals", type=int, default=10)
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(func=_cmd_generate)
