"""The stages of a "CPT of an existing model" study (``source_model:``), each one workflow rule:

* :func:`import_model`: the model into the study dir once (a Hugging Face directory through
  :func:`cptscale.hf.import_hf`; a cptscale checkpoint verified against its manifest and copied);
* :func:`evaluate_given`: the model as given, on every language's validation set: the source-language
  loss is the reference of each CPT run's init-sanity gate (the ``transformers`` model's own loss for a
  Hugging Face source, so the gate also checks the import) and of forgetting (Megatron's loss, the same
  evaluator as the runs');
* :func:`fit_existing`: from the store's final evaluations, the data law in D at fixed N per replay ratio,
  the forgetting-vs-replay frontier and the recommendation (:mod:`cptscale.existing`), with the
  tokenizer's fertility per language.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

from cptscale.config.schema import StudyConfig
from cptscale.source_model import SourceModel, SourceModelError, describe
from cptscale.util import read_json

FORMAT = "cptscale-existing/1"
#: languages written without spaces between words: their fertility is per character, not per word
NO_WORD_SPACES = frozenset({"zh", "ja", "th", "lo", "km", "my"})


def model_of(cfg: StudyConfig, base: str | Path) -> SourceModel:
    sm = cfg.source_model
    if sm is None:
        raise SourceModelError("source_model", "the study has no source_model (it is not a CPT-of-an-existing-"
                               "model study)")
    return describe(sm.path, sm.tokenizer, base)


def import_model(cfg: StudyConfig, base: str | Path, out: str | Path) -> dict[str, Any]:
    """``out`` = the model as a cptscale checkpoint (written beside and renamed into place); its state.json."""
    from cptscale.train.checkpoint import read_state, verify_checkpoint

    model, out = model_of(cfg, base), Path(out)
    if model.kind == "huggingface":
        from cptscale.hf import import_hf

        return import_hf(model.path, out, seq_length=cfg.train.seq_length)
    verify_checkpoint(model.path)  # raises CheckpointError naming the damaged file
    tmp = out.parent / f".{out.name}.import.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(model.path, tmp)
    tmp.rename(out)
    return read_state(out)


def evaluate_given(cfg: StudyConfig, base: str | Path, checkpoint: str | Path) -> dict[str, Any]:
    """Validation loss of the imported model on every language of the study (Megatron-Core, the runs'
    evaluator), and for a Hugging Face source the ``transformers`` model's own source-language loss."""
    from cptscale.plan import manifest_numbers
    from cptscale.runs import data_dir, data_manifest, tokenizer_path
    from cptscale.train.checkpoint import load_weights, read_state
    from cptscale.train.evaluate import evaluate_model
    from cptscale.train.model import build_model
    from cptscale.train.parallel import setup_parallel, teardown_parallel

    model_info = model_of(cfg, base)
    state = read_state(checkpoint)
    seq, ev = cfg.train.seq_length, cfg.evaluation
    prefixes = {lang: str(data_dir(cfg) / lang / "valid") for lang in cfg.languages.all}
    nbytes = {lang: manifest_numbers(read_json(data_manifest(cfg, lang)))["valid_bytes"]
              for lang in cfg.languages.all}
    setup_parallel(1, 1, cfg.seed)
    try:
        model = build_model(state["shape"], int(state["vocab_size"]), seq, arch=state.get("arch"))
        load_weights(checkpoint, model)
        langs = {lang: evaluate_model(model, prefixes[lang], seq, ev.micro_batch_size, val_bytes=nbytes[lang],
                                      max_tokens=ev.max_tokens, tokenizer=str(tokenizer_path(cfg)))
                 for lang in cfg.languages.all}
    finally:
        teardown_parallel()
    src = cfg.languages.source
    ref: dict[str, Any] = {"lang": src, "loss": float(langs[src]["loss"]), "by": "megatron"}
    if model_info.kind == "huggingface":
        from cptscale.hf import hf_validation_loss

        hf = hf_validation_loss(model_info.path, prefixes[src], seq, max_tokens=ev.max_tokens,
                                micro_batch_size=ev.micro_batch_size)
        ref = {"lang": src, "loss": float(hf["loss"]), "by": "transformers",
               "megatron_minus_transformers": float(langs[src]["loss"]) - float(hf["loss"])}
    return {"format": FORMAT, "checkpoint": str(checkpoint), "model": str(model_info.path), "kind": model_info.kind,
            "family": model_info.family, "shape": state["shape"], "vocab_size": int(state["vocab_size"]),
            "languages": {k: {kk: v[kk] for kk in ("loss", "ppl", "bpb", "n_tokens") if kk in v}
                          for k, v in langs.items()},
            "reference": ref}


def final_points(db: str | Path, study: str, source: str, target: str) -> list[Any]:
    """One :class:`~cptscale.existing.RunPoint` per finished CPT run into ``target``: its replay ratio,
    the target tokens it saw ((1 - replay) x its tokens) and its last evaluation in both languages."""
    from cptscale.existing import RunPoint
    from cptscale.store.queries import connect  # a missing store is refused naming the command that builds it

    con = connect(db)
    try:
        rows = con.execute(
            """with last as (select run_id, max(step) as step from evals where study = ? and branch is null
                             group by run_id)
               select r.run_id, r.replay, r.tokens, t.loss, s.loss from runs r join last using (run_id)
               join evals t on t.study = r.study and t.run_id = r.run_id and t.step = last.step
                               and t.lang = ? and t.branch is null
               join evals s on s.study = r.study and s.run_id = r.run_id and s.step = last.step
                               and s.lang = ? and s.branch is null
               where r.study = ? and r.init = 'cpt' and r.lang = ? order by r.replay, r.tokens""",
            [study, target, source, study, target]).fetchall()
    finally:
        con.close()
    return [RunPoint(float(r), float(tok) * (1.0 - float(r)), float(lt), float(ls)) for _, r, tok, lt, ls in rows]


def fertility(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Tokens per word, per character and per byte of the model's tokenizer, per language (from the data
    stage's tokenizer report)."""
    out = {}
    for lang, f in (report.get("fertility") or {}).items():
        out[lang] = {k: f.get(k) for k in ("tokens_per_word", "tokens_per_char", "tokens_per_byte", "words",
                                             "chars", "tokens")}
        if lang in NO_WORD_SPACES:  # whitespace does not delimit words there: per character only
            out[lang]["tokens_per_word"] = None
    return out


def fit_existing(cfg: StudyConfig, db: str | Path, model_eval: str | Path,
                 tokenizer_report: str | Path | None = None) -> dict[str, Any]:
    """The study kind's fits and answer, per target language: a ``data_law`` fit record per replay ratio
    (stored in the ``fits`` table like every law), the frontier and the recommendation."""
    from cptscale.existing import answer_text, fit_data_law, frontier, recommend
    from cptscale.plan import config_hash
    from cptscale.util import provenance

    sm = cfg.source_model
    assert sm is not None
    ev = read_json(model_eval)
    src = cfg.languages.source
    before = float(ev["languages"][src]["loss"])
    fits: list[dict[str, Any]] = []
    answers: dict[str, Any] = {}
    for tgt in cfg.languages.targets:
        pts = final_points(db, cfg.study, src, tgt)
        for r in sorted({p.replay for p in pts}):
            mine = sorted((p for p in pts if p.replay == r), key=lambda p: p.tokens)
            rec: dict[str, Any] = {"fit_id": f"existing-data-law-{tgt}-r{r:g}", "law": "data_law", "kind": "existing",
                                   "lang": tgt, "replay": r, "meta": {"lang": tgt, "replay": r, "N": "fixed"},
                                   "points": [{"D": p.tokens, "observed_loss": p.target_loss} for p in mine]}
            try:
                law = fit_data_law([p.tokens for p in mine], [p.target_loss for p in mine])
            except ValueError as exc:
                fits.append({**rec, "status": "skipped", "reason": str(exc), "params": {}})
                continue
            heldout = None
            if len(mine) >= 4:  # fit the smaller budgets, predict the largest
                sub = fit_data_law([p.tokens for p in mine[:-1]], [p.target_loss for p in mine[:-1]])
                pred = float(sub.loss(mine[-1].tokens))
                heldout = {"D": mine[-1].tokens, "predicted_loss": pred, "observed_loss": mine[-1].target_loss,
                           "abs_err": abs(pred - mine[-1].target_loss)}
            for p in rec["points"]:
                p["predicted_loss"] = float(law.loss(p["D"]))
            fits.append({**rec, "status": "ok", "params": {"E": law.E, "B": law.B, "beta": law.beta},
                         "on_bound": list(law.on_bound), "rmse_log": law.rmse_log, "heldout": heldout})
        if not pts:
            answers[tgt] = {"status": "skipped", "reason": f"no finished CPT runs into {tgt} in the store"}
            continue
        try:
            rec = recommend(pts, before, max_forgetting=sm.max_forgetting, target_loss=sm.target_loss)
        except ValueError as exc:
            answers[tgt] = {"status": "skipped", "reason": str(exc), "frontier": frontier(pts, before)}
            continue
        rec["answer"] = answer_text(rec, tgt, src)
        rec["tokens"] = None if math.isinf(rec["tokens"]) else rec["tokens"]
        answers[tgt] = {"status": "ok", **rec}
        # the answer as a fit record too: the store keeps it (fits.raw) and the report reads it from there
        fits.append({"fit_id": f"existing-recommendation-{tgt}", "law": "existing_recommendation", "kind": "existing",
                     "lang": tgt, "status": "ok", "params": {"replay": rec["replay"], "tokens": rec["tokens"]},
                     "meta": {"lang": tgt, "source": src, "source_loss_before": before}, "recommendation": rec})
    tok_report = read_json(tokenizer_report) if tokenizer_report and Path(tokenizer_report).is_file() else {}
    return {"format": FORMAT, "study": cfg.study, "source": src, "source_loss_before": before,
            "reference": ev.get("reference"), "model": {k: ev.get(k) for k in ("model", "kind", "family", "shape",
                                                                                  "vocab_size")},
            "model_eval": ev["languages"], "fits": fits, "recommendation": answers,
            "fertility": fertility(tok_report), "provenance": provenance(config_hash(cfg))}

