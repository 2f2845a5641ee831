"""Compute accounting and transfer metrics for paired scratch / CPT runs.

Three things live here, all pure functions over rows (lists of dicts) so the store, the report and
the tests share one implementation:

* **FLOPs** per run (:func:`run_compute`, :func:`flops_at_step`), counted by :mod:`cptscale.compute`.
* **Forgetting** (:func:`forgetting`): source-language loss during CPT minus the source model's final
  loss, at every evaluated step.
* **Transfer** (:func:`transfer_curve`): at every evaluated CPT step, the tokens a same-size scratch
  run needs for the same target loss (log-log interpolation of the scratch curve), the tokens / FLOPs
  saved, and Hernandez et al.'s *effective data transferred* ``D_T = D_scratch_equiv - D_cpt_target``.

CPT compute excludes the source pre-training (the paper's "marginal" view); ``flops_total`` adds the
source run's FLOPs (the "amortised" view). The CLI ``cptscale transfer`` writes one ``transfer.json``
per CPT run; ``cptscale db ingest`` loads it into the ``transfer`` and ``forgetting`` tables.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cptscale.compute import flops_6nd, flops_exact, flops_per_token
from cptscale.errors import CLIError
from cptscale.ladder import ModelShape
from cptscale.runspec import load_spec

if TYPE_CHECKING:
    from cptscale.prune import PrunedShape


Row = Mapping[str, Any]


def shape_from_spec(spec: Mapping[str, Any]) -> ModelShape | PrunedShape:
    """The shape recorded in a ``run.json`` (``shape`` object): a :class:`ModelShape`, or a
    :class:`cptscale.prune.PrunedShape` when ``shape.head_dim`` differs from hidden / heads (a pruned
    shape keeps head_dim while heads shrink; both give the same FLOPs and parameter counts)."""
    from cptscale.prune import PrunedShape

    s = spec["shape"]
    hidden, heads = int(s["hidden"]), int(s["heads"])
    hd = s.get("head_dim")
    if hd is not None and (hidden % heads or int(hd) != hidden // heads):
        return PrunedShape(hidden, int(s["layers"]), heads, int(s["ffn"]), s.get("kv_heads"), int(hd))
    return ModelShape(
        name=str(s.get("name", spec.get("size", "?"))),
        hidden=hidden,
        layers=int(s["layers"]),
        heads=heads,
        ffn=int(s["ffn"]),
        kv_heads=s.get("kv_heads"),
    )


def _prune_segments(spec: Mapping[str, Any], steps: int) -> list[tuple[int, Any]] | None:
    """(steps, shape) pieces of a run spec with prune events (None without): each event prunes at the
    start of its step, as the trainer does."""
    events = (spec.get("prune") or {}).get("events") or []
    if not events:
        return None
    from cptscale.prune import PrunedShape, resolve_target

    out, cur, prev = [], PrunedShape.from_dict(dict(spec["shape"])), 0
    for ev in sorted(events, key=lambda e: int(e["step"])):
        st = min(int(ev["step"]), steps)
        out.append((st - prev, cur))
        cur, prev = resolve_target(cur, ev["shape"]), st
    out.append((steps - prev, cur))
    return [(n, sh) for n, sh in out if n > 0]


def flops_at_step(spec: Mapping[str, Any], step: int) -> dict[str, float]:
    """Cumulative training FLOPs after ``step`` optimizer steps of a run spec, exact and 6ND, with and
    without embeddings, shape by shape through its prune events (the trainer's count)."""
    seq = int(spec["seq_length"])
    tps = int(spec["global_batch_size"]) * seq
    vocab = int(spec["vocab_size"])
    pieces = _prune_segments(spec, step) or [(step, shape_from_spec(spec))]
    out = dict.fromkeys(("flops_exact", "flops_exact_nonemb", "flops_6nd", "flops_6nd_nonemb"), 0.0)
    for n, sh in pieces:
        toks = float(n * tps)
        out["flops_exact"] += flops_exact(sh, vocab, seq, toks)
        out["flops_exact_nonemb"] += flops_exact(sh, vocab, seq, toks, embeddings=False)
        out["flops_6nd"] += flops_6nd(sh.params(vocab), toks)
        out["flops_6nd_nonemb"] += flops_6nd(sh.params(vocab, embeddings=False), toks)
    return out


def run_compute(spec: Mapping[str, Any], tokens: float | None = None) -> dict[str, float]:
    """All four compute figures for one run spec (tokens default to the planned tokens, else
    steps x global batch x sequence length; params to the spec's, else counted from the shape).
    A spec with prune events is counted shape by shape (:func:`flops_at_step`); its per-token
    figures are then averages over the run."""
    shape = shape_from_spec(spec)
    vocab, seq = int(spec["vocab_size"]), int(spec["seq_length"])
    if tokens is None:
        tokens = spec.get("tokens") or int(spec["steps"]) * int(spec["global_batch_size"]) * seq
    toks = float(tokens)
    params = spec.get("params") or shape.params(vocab)
    params_ne = spec.get("params_nonemb") or shape.params(vocab, embeddings=False)
    tps = int(spec.get("global_batch_size") or 0) * seq
    if (spec.get("prune") or {}).get("events") and tps:
        f = flops_at_step(spec, round(toks / tps))
        return {"tokens": toks, "params": params, "params_nonemb": params_ne, **f,
                "flops_per_token": f["flops_exact"] / toks if toks else 0.0,
                "flops_per_token_nonemb": f["flops_exact_nonemb"] / toks if toks else 0.0}
    return {
        "tokens": toks, "params": params, "params_nonemb": params_ne,
        "flops_6nd": flops_6nd(params, toks),
        "flops_6nd_nonemb": flops_6nd(params_ne, toks),
        "flops_exact": flops_exact(shape, vocab, seq, toks),
        "flops_exact_nonemb": flops_exact(shape, vocab, seq, toks, embeddings=False),
        "flops_per_token": flops_per_token(shape, vocab, seq),
        "flops_per_token_nonemb": flops_per_token(shape, vocab, seq, embeddings=False),
    }


def main_trajectory(rows: Iterable[Row]) -> list[Row]:
    """The eval rows of a run's main trajectory: rows without a ``branch`` (or with ``branch: null``).

    A WSD decay branch (``"branch": <branch total steps>``) is a short run that shares the main run's
    warmup and stable phase and decays early; its evals are not points of the main loss curve, so
    curves, forgetting and transfer read the main trajectory only (the fit points add each branch's
    final eval, see :func:`cptscale.store.queries.write_points_table`)."""
    return [r for r in rows if r.get("branch") is None]


def latest_evals(rows: Iterable[Row]) -> list[Row]:
    """One row per (step, lang, branch): the last one logged. A run resumed from a checkpoint may log an
    evaluation again; the store keeps the last one, so transfer and forgetting must read the same rows."""
    out: dict[tuple[int, str, Any], Row] = {}
    for r in rows:
        out[(int(r["step"]), str(r["lang"]), r.get("branch"))] = r
    return list(out.values())


def forgetting(cpt_evals: Iterable[Row], source_final_loss: float, source_lang: str) -> list[dict[str, Any]]:
    """Source-language loss at every CPT eval step minus the source model's final loss.

    Positive = forgotten. Step 0 is the loaded source model, so its value is ~0 (a check that the
    CPT run really started from the source checkpoint and evaluates on the same validation set).
    """
    rows = [e for e in main_trajectory(cpt_evals) if e.get("lang") == source_lang and e.get("loss") is not None]
    rows.sort(key=lambda e: int(e["step"]))
    return [
        {
            "step": int(e["step"]),
            "tokens": int(e["tokens"]),
            "source_lang": source_lang,
            "source_loss": float(e["loss"]),
            "source_final_loss": float(source_final_loss),
            "forgetting": float(e["loss"]) - float(source_final_loss),
        }
        for e in rows
    ]


def scratch_tokens_for_loss(scratch: Sequence[tuple[float, float]], loss: float) -> float | None:
    """Tokens a scratch run needs to reach ``loss``: log-log interpolation of its (tokens, loss) curve.

    The curve is first made monotone (best loss so far, keeping the first tokens count that reaches
    each new best), because eval noise can make it bump up. Returns ``None`` outside the observed loss
    range (higher than the first evaluated point or lower than the best one): extrapolating a loss
    curve is exactly what the scaling-law fit is for, not this metric.
    """
    pts = sorted((float(d), float(lo)) for d, lo in scratch if d > 0 and lo is not None and lo > 0)
    env: list[tuple[float, float]] = []
    for d, lo in pts:
        if not env or lo < env[-1][1]:
            env.append((d, lo))
    if not env or not (env[-1][1] <= loss <= env[0][1]):
        return None
    if len(env) == 1:
        return env[0][0]
    # loss decreases along env; find the segment bracketing `loss`
    x = math.log(loss)
    for (d0, l0), (d1, l1) in itertools.pairwise(env):
        if l1 <= loss <= l0:
            x0, x1 = math.log(l0), math.log(l1)
            t = 0.0 if x0 == x1 else (x0 - x) / (x0 - x1)
            return math.exp(math.log(d0) + t * (math.log(d1) - math.log(d0)))
    return None  # pragma: no cover - unreachable given the range check


def transfer_curve(
    cpt_evals: Iterable[Row],
    scratch_evals: Iterable[Row],
    lang: str,
    *,
    flops_per_token: float,
    source_flops: float = 0.0,
    target_fraction: float = 1.0,
) -> list[dict[str, Any]]:
    """Transfer metrics at every CPT eval step on ``lang`` (both runs are the same size).

    ``flops_per_token`` converts tokens to compute for the shared shape (use :func:`flops_per_token`,
    or ``6·N`` for the 6ND convention). ``target_fraction`` is the share of CPT tokens in the target
    language (``1 - replay``): the effective data transferred compares target tokens, as Hernandez et
    al. do, while tokens/FLOPs saved compare everything the CPT run trained on. Rows whose loss falls
    outside the scratch curve's range get ``None`` for every derived number and ``extrapolated=True``.
    """
    scratch = [(float(e["tokens"]), float(e["loss"])) for e in main_trajectory(scratch_evals)
               if e.get("lang") == lang and e.get("loss") is not None and int(e["step"]) > 0]
    rows = sorted((e for e in main_trajectory(cpt_evals) if e.get("lang") == lang and e.get("loss") is not None),
                  key=lambda e: int(e["step"]))
    out = []
    for e in rows:
        toks, loss = float(e["tokens"]), float(e["loss"])
        flops = flops_per_token * toks
        equiv = scratch_tokens_for_loss(scratch, loss)
        row: dict[str, Any] = {
            "step": int(e["step"]),
            "tokens": int(toks),
            "target_tokens": toks * target_fraction,
            "loss": loss,
            "flops": flops,
            "flops_total": flops + source_flops,
            "scratch_tokens_equiv": equiv,
            "scratch_flops_equiv": None,
            "tokens_saved": None,
            "flops_saved": None,
            "frac_saved": None,
            "flops_saved_total": None,
            "frac_saved_total": None,
            "effective_data_transferred": None,
            "extrapolated": equiv is None,
        }
        if equiv is not None:
            s_flops = flops_per_token * equiv
            row.update(
                scratch_flops_equiv=s_flops,
                tokens_saved=equiv - toks,
                flops_saved=s_flops - flops,
                frac_saved=(s_flops - flops) / s_flops,
                flops_saved_total=s_flops - flops - source_flops,
                frac_saved_total=(s_flops - flops - source_flops) / s_flops,
                effective_data_transferred=equiv - toks * target_fraction,
            )
        out.append(row)
    return out


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file; a bad line is an error naming the file and line."""
    import json

    out = []
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise CLIError(f"{path}:{i}: malformed JSON ({exc.msg}); re-run the job that wrote it") from None
    return out


def source_final_loss(source_dir: Path, source_lang: str) -> float:
    """The source model's final loss on its language: done.json, else its last eval."""
    from cptscale.util import read_json

    done = source_dir / "done.json"
    if done.exists():
        fl = (read_json(done).get("final_loss") or {}).get(source_lang)
        if fl is not None:
            return float(fl)
    ev = [e for e in main_trajectory(latest_evals(read_jsonl(source_dir / "evals.jsonl")))
          if e.get("lang") == source_lang] \
        if (source_dir / "evals.jsonl").exists() else []
    if not ev:
        raise CLIError(f"{source_dir}: no final {source_lang!r} loss in done.json or evals.jsonl; "
                       "finish the source run first")
    return float(max(ev, key=lambda e: int(e["step"]))["loss"])


def _source_compute(source_dir: Path) -> tuple[float, str]:
    """The source run's training FLOPs (0 without its run.json) and its run id."""
    from cptscale.util import read_json

    if not (source_dir / "run.json").exists():
        return 0.0, source_dir.name
    src = load_spec(source_dir / "run.json")
    done = read_json(source_dir / "done.json") if (source_dir / "done.json").exists() else {}
    return run_compute(src.to_dict(), done.get("tokens"))["flops_exact"], src.run_id


def compute_transfer(cpt_dir: Path, scratch_dir: Path, source_dir: Path | None = None) -> dict[str, Any]:
    """Everything ``transfer.json`` holds for one CPT run (see the module docstring)."""
    from cptscale.util import file_hash, provenance

    for d in (cpt_dir, scratch_dir):
        for f in ("run.json", "evals.jsonl"):
            if not (d / f).exists():
                raise CLIError(f"{d / f} is missing; run the training job for {d.name} first")
    cpt, scratch = load_spec(cpt_dir / "run.json"), load_spec(scratch_dir / "run.json")
    if cpt.init != "cpt":
        raise CLIError(f"{cpt_dir}/run.json: init is {cpt.init!r}, expected 'cpt' (pass the CPT run as --cpt)")
    if (cpt.shape.hidden, cpt.shape.layers) != (scratch.shape.hidden, scratch.shape.layers):
        raise CLIError(f"{scratch_dir}: scratch shape differs from {cpt_dir}; pair runs of the same size")
    lang, slang = cpt.lang, cpt.source_lang
    # transfer_curve and forgetting keep the main trajectories (a WSD decay branch is no point of a curve)
    # a re-logged evaluation counts once, the last one logged (as in the store's evals table)
    cpt_ev, scr_ev = (latest_evals(read_jsonl(d / "evals.jsonl")) for d in (cpt_dir, scratch_dir))
    comp = run_compute(cpt.to_dict())
    src_flops, src_final, src_id = 0.0, None, None
    if source_dir is not None:
        src_flops, src_id = _source_compute(source_dir)
        if slang:
            src_final = source_final_loss(source_dir, slang)
    elif cpt.parent is not None and cpt.parent.final_loss is not None:
        src_final = float(cpt.parent.final_loss)
    replay = float(cpt.replay or 0.0)
    rows = transfer_curve(cpt_ev, scr_ev, lang, flops_per_token=comp["flops_per_token"],
                          source_flops=src_flops, target_fraction=1.0 - replay)
    forg = forgetting(cpt_ev, src_final, slang) if (slang and src_final is not None) else []
    inputs = {str(p): file_hash(p) for p in (cpt_dir / "evals.jsonl", scratch_dir / "evals.jsonl")}
    return {
        "run_id": cpt.run_id, "study": cpt.study, "size": cpt.size, "lang": lang,
        "source_lang": slang, "replay": replay, "scratch_run_id": scratch.run_id, "source_run_id": src_id,
        "params": comp["params"], "params_nonemb": comp["params_nonemb"],
        "flops_per_token": comp["flops_per_token"], "source_flops": src_flops,
        "source_final_loss": src_final, "config_hash": cpt.config_hash,
        "conventions": "flops = exact count (flops_exact, embeddings included) x tokens; CPT flops exclude "
                       "source pre-training, flops_total includes it; D_T = scratch_tokens_equiv - tokens*(1-replay)",
        "rows": rows, "forgetting": forg,
        "provenance": provenance(cpt.config_hash, inputs),
    }
