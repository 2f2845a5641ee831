"""The ``simulate`` run backend (config ``train.backend: simulate``): the files a trained run writes.

``cptscale train --spec run.json`` hands a spec carrying a ``simulate`` section here instead of to
the training engine. The run directory then gets what the engine writes (evals.jsonl, metrics.jsonl,
branch_metrics.jsonl for WSD branches, done.json last, flagged ``"simulated": true``), the data stage
gets simulated manifests (``data/<lang>/data.json``, ``tokenizer/tokenizer.json``: no corpus is read)
and the blend step reports the planned blend as realized. Everything after that (transfer, the store,
fits, next run, summary, report) reads these files as it reads a trained study's; the store keeps the
flag and refuses to mix simulated with trained runs unless told to.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cptscale.simulate.run import BYTES_PER_TOKEN as SIM_BYTES_PER_TOKEN
from cptscale.simulate.run import simulate_run
from cptscale.simulate.truth import Truth, default_truth, truth_for
from cptscale.util import atomic_path, read_json, stable_hash, write_json

#: Training tokens of a simulated corpus: more than any run draws (no repetition is simulated).
SIM_TRAIN_TOKENS = 10**15


def load_truth(section: Mapping[str, Any] | None) -> Truth:
    """The truth a spec's ``simulate`` section names: its ``truth`` law file, else the paper defaults,
    completed for the spec's languages (``languages``: all, ``source``, ``targets``)."""
    sec = dict(section or {})
    base = Truth.load(sec["truth"]) if sec.get("truth") else default_truth()
    langs = list(sec.get("languages") or [])
    if langs:
        base = truth_for(langs, sec.get("source") or langs[0], list(sec.get("targets") or langs[1:]), base)
    if sec.get("param_count") and sec.get("truth") is None:
        from dataclasses import replace

        base = replace(base, param_count=sec["param_count"])
    return base


def truth_hash(path: str | None) -> str:
    """Content hash of a law file (part of a simulated run's rerun trigger); of the defaults without one."""
    if not path:
        return stable_hash(default_truth().as_dict())
    p = Path(path)
    if not p.is_file():
        from cptscale.simulate.truth import TruthError

        raise TruthError(f"law file {p} does not exist (simulate.truth in the study config)")
    return stable_hash(json.loads(p.read_text()))


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        fh.writelines(json.dumps(r, separators=(", ", ": ")) + "\n" for r in rows)


def run_simulated(spec: Mapping[str, Any]) -> int:
    """Write a simulated run's outputs into ``spec["out_dir"]`` (done.json last, every file atomically)."""
    from cptscale.util import provenance

    t0 = time.time()
    sec = spec["simulate"]
    truth = load_truth(sec)
    parent = None
    if spec.get("init") == "cpt":
        # the planner's layout: run dirs side by side (RunSpec.parent_done_path)
        pdone = Path(spec["out_dir"]).parent / str((spec.get("parent") or {}).get("run_id")) / "done.json"
        parent = read_json(pdone) if pdone.exists() else None
    sim = simulate_run(spec, truth, seed=int(sec.get("seed", 0)), parent=parent)
    out = Path(spec["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    for name in ("done.json", "branch_metrics.jsonl"):  # a re-run starts clean, like a fresh training run
        (out / name).unlink(missing_ok=True)
    _write_jsonl(out / "evals.jsonl", sim.evals)
    _write_jsonl(out / "metrics.jsonl", sim.metrics)
    if sim.branch_metrics:
        _write_jsonl(out / "branch_metrics.jsonl", sim.branch_metrics)
    done = dict(sim.done)
    done["wall_s"] = time.time() - t0
    done["launch"] = {"host": os.uname().nodename, "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                      "torchrun_id": None, "backend": "simulate"}
    done["simulation"]["truth_hash"] = sec.get("truth_hash")
    done["provenance"] = provenance(spec.get("config_hash"), {"run.json": stable_hash(dict(spec))})
    write_json(out / "done.json", done)
    print(f"cptscale train: SIMULATED run {spec['run_id']} (truth {truth.name}, seed {sec.get('seed', 0)}): "
          f"final loss {', '.join(f'{k} {v:.4f}' for k, v in done['final_loss'].items())}; nothing was trained",
          flush=True)
    return 0


def simulated_train_tokens(max_chars: int | None, validation_tokens: int) -> int:
    """A simulated language's unique training tokens: unlimited (:data:`SIM_TRAIN_TOKENS`) unless
    ``data.max_chars`` caps its text, then that many characters at :data:`SIM_BYTES_PER_TOKEN` per token
    (a character counted as a byte), less the validation split: a capped study's runs repeat data as a
    real one would (the EN->ES repeat study: 1.67e5 tokens here, 1.53e5 from its real text)."""
    if max_chars is None:
        return SIM_TRAIN_TOKENS
    return max(1, int(max_chars / SIM_BYTES_PER_TOKEN) - validation_tokens)


def simulated_manifest(lang: str, vocab_size: int, validation_tokens: int, config_hash: str,
                       corpora: list[str], max_chars: int | None = None) -> dict[str, Any]:
    """A data stage manifest for a simulated study: the counts the planner reads (training tokens:
    :func:`simulated_train_tokens`, split evenly over the language's corpora), content hashes of what was
    generated (the inputs of the simulation, not of any corpus), flagged ``simulated``."""
    from cptscale.util import provenance

    ident = {"lang": lang, "vocab_size": vocab_size, "validation_tokens": validation_tokens, "config": config_hash}
    h = {k: stable_hash({**ident, "part": k}) for k in ("docs", "tokenizer", "train.bin", "train.idx", "valid.bin",
                                                          "valid.idx")}
    vbytes = int(validation_tokens * SIM_BYTES_PER_TOKEN)
    tpb = 1 / SIM_BYTES_PER_TOKEN
    train = simulated_train_tokens(max_chars, validation_tokens)
    per_corpus = train if max_chars is None else max(1, train // max(1, len(corpora)))
    return {
        "simulated": True, "lang": lang, "vocab_size": vocab_size, "docs_hash": h["docs"],
        "tokenizer_hash": h["tokenizer"], "fertility": {"tokens_per_byte": tpb, "tokens_per_char": tpb},
        "train": {"tokens": train, "bytes": int(train * SIM_BYTES_PER_TOKEN), "docs": None,
                  "bin_hash": h["train.bin"], "idx_hash": h["train.idx"]},
        "valid": {"tokens": validation_tokens, "bytes": vbytes, "docs": None, "bin_hash": h["valid.bin"],
                  "idx_hash": h["valid.idx"]},
        "valid_bytes": vbytes, "train_corpora": {
            c: {"tokens": per_corpus, "bin_hash": stable_hash({**ident, "corpus": c, "part": "bin"}),
                "idx_hash": stable_hash({**ident, "corpus": c, "part": "idx"})} for c in corpora},
        "split": "simulated: no corpus was read", "provenance": provenance(config_hash, {}),
    }


def simulated_tokenizer(vocab_size: int) -> dict[str, Any]:
    """tokenizer.json of a simulated study: a marker, not a tokenizer (nothing reads text)."""
    return {"simulated": True, "vocab_size": vocab_size,
            "note": "simulated study (train.backend: simulate): no tokenizer was trained"}


def planned_blend_report(spec: Mapping[str, Any]) -> dict[str, Any]:
    """blend.json of a simulated run: the planned blend, reported as realized (shares exactly as planned)."""
    data = spec["data"]
    seq, gbs, steps = int(spec["seq_length"]), int(spec["global_batch_size"]), int(spec["steps"])
    phases, drawn, avail = [], {}, {}
    for k, ph in enumerate(data.get("phases") or []):
        n = (int(ph["end_step"]) - int(ph["start_step"])) * gbs
        rows = []
        for s in ph["sources"]:
            c = round(float(s["weight"]) * n)
            tokens = c * seq
            avail[s["name"]] = int(s.get("available_tokens") or SIM_TRAIN_TOKENS)
            drawn[s["name"]] = drawn.get(s["name"], 0) + tokens
            rows.append({"name": s["name"], "prefix": s.get("prefix"), "planned_share": float(s["weight"]),
                         "realized_share": float(s["weight"]), "samples": c, "tokens": tokens,
                         "planned_tokens": round(float(s["weight"]) * n * seq), "available_tokens": avail[s["name"]],
                         "epochs": tokens / avail[s["name"]], "cumulative_epochs": drawn[s["name"]] / avail[s["name"]]})
        phases.append({"index": k, "name": f"phase{k}", "start_step": ph["start_step"], "end_step": ph["end_step"],
                       "samples": n, "sources": rows})
    return {"kind": "blend_realization", "simulated": True, "seq_length": seq, "global_batch_size": gbs,
            "steps": steps, "seed": spec.get("seed"), "samples": steps * gbs,
            "switch_steps": [ph["start_step"] for ph in phases[1:]], "phases": phases,
            "sources": {n: {"tokens": t, "available_tokens": avail[n], "epochs": t / avail[n]} for n, t in drawn.items()},
            "max_epochs": float(data.get("max_epochs", 4.0)), "warnings": [], "run_id": spec.get("run_id")}

