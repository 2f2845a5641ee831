"""Closing the loop from fit to next run: train the run the scratch law predicts is best for
``fit.next_run_budget`` and compare its loss with the prediction.

``cptscale next-run spec`` plans the run from ONE fit, the target language's scratch Chinchilla fit, and
writes it as ``run.json`` (its ``suggestion`` block is what the summary and the report show):

* the shape is one of the study's own family (the ladder table its sizes come from: the paper's 42
  shapes, or the tiny ``d<h>l<n>`` table plus the ladder's own sizes), never a one-off shape;
* N is counted in the fit's own parameter convention (``fit-study --params``: non-embedding or total),
  and the tokens are the budget divided by 6·N, rounded down to whole steps, so the planned FLOPs
  (6·N·D in that convention) stay within the budget; the difference and the FLOPs counted with every
  parameter are recorded too;
* among the family's shapes the one with the lowest predicted loss wins, where the prediction charges
  for repeating data: tokens beyond the unique target tokens count as Muennighoff et al.'s effective
  data D' (repetition cost in nats recorded), and shapes that would repeat more than ``mix.max_epochs``
  are only used when no shape fits (then the suggestion says so in ``warnings``);
* the prediction's interval comes from the fit's own bootstrap samples at the planned (N, D), and the
  suggestion carries the fit's identifiability verdict (``reliable``).

``cptscale next-run check`` writes ``fits/next-<lang>.json`` with predicted vs observed loss at exactly
the planned N (fit convention) and the tokens trained, which the store and the report pick up.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from cptscale.errors import CLIError
from cptscale.runspec import RunSpec, load_spec
from cptscale.util import read_json

#: Muennighoff et al. 2023 (datablations README, "Parametric Fit"): fitted half-life of repeated data.
R_STAR_D = 15.387756


def _effective_data(D: float, U: float | None, r_star: float = R_STAR_D) -> float:
    """Muennighoff et al.'s effective data D' = U + U·R*·(1 − exp(−R_D/R*)), R_D = D/U − 1 repetitions."""
    if not U or D <= U:
        return D
    return U + U * r_star * (1.0 - math.exp(-(D / U - 1.0) / r_star))


def family_shapes(cfg: Any) -> tuple[str, list[Any]]:
    """The study's shape family: the paper's 42 shapes when every ladder size is one of them, else the
    tiny ``d<h>l<n>`` table plus the ladder's own sizes (and ``ladder.custom`` shapes)."""
    from cptscale.ladder import PAPER_SHAPES, TINY_SHAPES

    if all(size in PAPER_SHAPES for size in cfg.ladder.sizes):
        return "paper", list(PAPER_SHAPES.values())
    shapes = {s.name: s for s in TINY_SHAPES.values()}
    for size in cfg.ladder.sizes:
        shapes[size] = cfg.shape(size)
    for name, s in cfg.ladder.shapes().items():
        shapes[name] = s
    return "tiny", sorted(shapes.values(), key=lambda s: s.params(cfg.vocab_size))


def fit_convention(rec: dict[str, Any]) -> str:
    """How the fit counted N: ``nonembedding`` or ``total`` (``fit-study --params``)."""
    return str((rec.get("settings") or {}).get("params") or "total")


def _n_fit(shape: Any, vocab: int, convention: str) -> int:
    return int(shape.params(vocab, embeddings=convention != "nonembedding"))


def _interval(rec: dict[str, Any], n: float, d: float, level: float = 0.95) -> tuple[float | None, float | None]:
    """Bootstrap interval of the fit's prediction at (n, d), from the fit record's parameter samples."""
    import numpy as np

    from cptscale.fit.laws import LAWS, FitResult

    samples = rec.get("bootstrap") or {}
    names = LAWS.get(rec.get("law", ""), [])
    if not names or not all(k in samples or k in (rec.get("fixed") or {}) for k in names):
        return None, None
    n_b = max((len(v) for v in samples.values()), default=0)
    preds = []
    for b in range(n_b):
        p = {k: (samples[k][b] if k in samples else rec["fixed"][k]) for k in names}
        if all(isinstance(v, int | float) and math.isfinite(v) for v in p.values()):
            preds.append(float(FitResult(rec["law"], p).predict(n, d)))
    if len(preds) < 2:
        return None, None
    q = (1 - level) / 2
    lo, hi = np.quantile(preds, [q, 1 - q])
    return float(lo), float(hi)


def plan_candidates(cfg: Any, rec: dict[str, Any], budget: float, lang: str, unique_tokens: float | None,
                    max_epochs: float) -> list[dict[str, Any]]:
    """Every family shape at this budget: tokens = budget / (6 N_fit) in whole steps, predicted loss with
    repetition charged as effective data, epochs of the unique target tokens. Sorted best first."""
    from cptscale.fit.laws import FitResult
    from cptscale.runs import batch_layout

    fr = FitResult(rec["law"], rec["params"], rec.get("fixed") or {})
    conv = fit_convention(rec)
    fam, shapes = family_shapes(cfg)
    out = []
    for s in shapes:
        try:
            gbs, _ = batch_layout(cfg, s.name)
        except (KeyError, ValueError):
            continue
        step_tokens = gbs * cfg.train.seq_length
        n = _n_fit(s, cfg.vocab_size, conv)
        steps = math.floor(budget / (6.0 * n) / step_tokens)
        if steps < 20:  # too short to warm up, decay and evaluate: not a run
            continue
        d = steps * step_tokens
        epochs = d / unique_tokens if unique_tokens else None
        d_eff = _effective_data(d, unique_tokens)
        pred_unique = float(fr.predict(n, d))
        pred = float(fr.predict(n, d_eff))
        out.append({"shape": s.name, "family": fam, "N": n, "N_total": int(s.params(cfg.vocab_size)),
                    "N_nonemb": int(s.params(cfg.vocab_size, embeddings=False)), "D": d, "steps": steps,
                    "D_effective": d_eff, "epochs": epochs, "predicted_loss": pred,
                    "predicted_loss_unique_data": pred_unique, "repetition_cost": pred - pred_unique,
                    "flops_planned": 6.0 * n * d, "within_max_epochs": epochs is None or epochs <= max_epochs})
    # shapes that stay within mix.max_epochs first, then the lowest predicted loss
    out.sort(key=lambda c: (not c["within_max_epochs"], c["predicted_loss"]))
    return out


def suggest(cfg: Any, rec: dict[str, Any], fit_file: str, lang: str, unique_tokens: float | None,
            max_epochs: float) -> dict[str, Any]:
    """The next run of ``lang`` planned from one fit record (see the module docstring)."""
    budget = float(cfg.fit.next_run_budget)
    cands = plan_candidates(cfg, rec, budget, lang, unique_tokens, max_epochs)
    if not cands:
        raise CLIError(f"fit.next_run_budget = {budget:g} FLOPs is too small for any shape of the study's family "
                       "(fewer than 20 steps each); raise it")
    best = dict(cands[0])
    lo, hi = _interval(rec, best["N"], best["D_effective"])
    ident = rec.get("identifiability") or (rec.get("meta") or {}).get("identifiability") or {}
    warnings = []
    if best["epochs"] is not None and best["epochs"] > 1:
        warnings.append(f"the budget needs {best['D']:.4g} tokens but only {unique_tokens:.4g} unique {lang} tokens "
                        f"exist: {best['epochs']:.2f} epochs; repetition costs {best['repetition_cost']:.4f} nats "
                        f"(predicted {best['predicted_loss']:.4f} vs {best['predicted_loss_unique_data']:.4f} with "
                        f"unique data; effective data D' of Muennighoff et al. 2023, R*_D = {R_STAR_D:g})")
    if not best["within_max_epochs"]:
        warnings.append(f"no shape of the family stays within mix.max_epochs = {max_epochs:g} at this budget")
    if ident and not ident.get("identified", True):
        warnings.append(f"the fit {rec.get('fit_id')} is not identified ({ident.get('summary')}): its allocation "
                        "and this prediction are unreliable")
    nxt = rec.get("next_run") or {}
    best.update({
        "fit_id": rec.get("fit_id"), "fit_file": fit_file, "lang": lang, "C": budget, "budget": budget,
        "param_count": fit_convention(rec), "flops_vs_budget": best["flops_planned"] / budget - 1.0,
        "flops_all_params": 6.0 * best["N_total"] * best["D"], "predicted_loss_lo": lo, "predicted_loss_hi": hi,
        "unique_tokens": unique_tokens, "max_epochs": max_epochs, "valid": True,
        "reliable": bool(ident.get("identified", True)), "warnings": warnings,
        "law_optimum": {k: nxt.get(k) for k in ("N", "D", "predicted_loss")} if nxt.get("valid") else None,
        "alternatives": [{k: c[k] for k in ("shape", "N", "D", "epochs", "predicted_loss")} for c in cands[1:4]],
        "rule": "family shape with the lowest predicted loss at D = budget/(6 N) in whole steps (N in the fit's "
                "convention); repetition beyond the unique tokens charged as effective data; shapes within "
                "mix.max_epochs first",
    })
    return best


def scratch_fit(fits_dir: str | Path, lang: str) -> tuple[dict[str, Any], str] | None:
    """The one fit a next run is planned from: the target language's scratch Chinchilla fit."""
    for path in sorted(Path(fits_dir).glob("*.json")):
        rec = read_json(path)
        if (isinstance(rec, dict) and rec.get("law") == "chinchilla" and rec.get("kind") == "scratch"
                and rec.get("lang") == lang and rec.get("status") == "ok"):
            return rec, str(path)
    return None


def build_spec(config: str, fits_dir: str, lang: str) -> RunSpec:
    from cptscale.mix import MixConfig
    from cptscale.plan import _manifest, next_run_id, run_spec
    from cptscale.runs import plan_run
    from cptscale.validation import load_study

    cfg = load_study(config)
    if lang not in cfg.languages.targets:
        raise CLIError(f"--lang {lang!r} is not a target language of study {cfg.study!r} ({cfg.languages.targets})")
    if not cfg.fit.next_run_budget:
        raise CLIError(f"{config}: fit.next_run_budget is not set; nothing to plan")
    found = scratch_fit(fits_dir, lang)
    if found is None:
        raise CLIError(f"{fits_dir}: no successful scratch Chinchilla fit of {lang!r} (see fits/summary.json)")
    rec, path = found
    try:
        unique = float(_manifest(cfg, lang)["train"]["tokens"])
    except (FileNotFoundError, KeyError):
        unique = None
    sug = suggest(cfg, rec, path, lang, unique, MixConfig.model_validate(cfg.mix).max_epochs)
    planned = plan_run(cfg, sug["shape"], "scratch", lang, None, 0.0, tokens=sug["D"], rid=next_run_id(lang))
    try:
        spec = run_spec(cfg, planned.run_id, planned)
    except (KeyError, FileNotFoundError, ValueError) as exc:
        raise CLIError(str(exc).strip("'\"")) from None
    assert spec.tokens == sug["D"], (spec.tokens, sug["D"])  # whole steps: the plan is trained as is
    return spec.model_copy(update={"suggestion": sug})


def _fit_prediction(sug: dict[str, Any], d: float) -> float | None:
    from cptscale.fit.laws import load_fit

    try:
        fit = load_fit(sug["fit_file"])
        return float(fit.predict(float(sug["N"]), _effective_data(d, sug.get("unique_tokens"))))
    except Exception:  # a fit file from another version: fall back to the suggestion's number
        return None


def check(spec_path: str, done_path: str) -> dict[str, Any]:
    """Predicted vs observed target-language loss of the trained next run, at the planned N (the fit's
    convention) and the tokens trained."""
    spec = load_spec(spec_path)
    done = read_json(done_path)
    lang, sug = spec.lang, spec.suggestion
    if lang is None or sug is None:
        raise CLIError(f"{spec_path}: not a next run's spec (no lang or suggestion); write it with "
                       "`cptscale next-run spec`")
    observed = float(done["final_loss"][lang])
    n = float(sug.get("N", done["params"]))
    d = float(done["tokens"])
    at_trained = _fit_prediction(sug, d)
    predicted = at_trained if at_trained is not None else float(sug["predicted_loss"])
    lo, hi = sug.get("predicted_loss_lo"), sug.get("predicted_loss_hi")
    row = {"run_id": spec.run_id, "N": n, "D": d, "C": 6.0 * n * d, "predicted_loss": predicted,
           "observed_loss": observed, "predicted_loss_lo": lo, "predicted_loss_hi": hi,
           "planned_from": sug.get("fit_id"), "shape": sug.get("shape"), "budget": sug.get("C"),
           "flops_vs_budget": 6.0 * n * d / float(sug["C"]) - 1.0 if sug.get("C") else None,
           "reliable": sug.get("reliable")}
    return {
        "comparison": [row],  # the store loads this into `predictions` (fit_id next-<lang>)
        "kind": "next_run_check", "run_id": spec.run_id, "lang": lang, "fit_id": sug.get("fit_id"),
        "budget": sug.get("C"), "shape": sug.get("shape"), "param_count": sug.get("param_count"),
        "size": spec.size, "N": n, "N_total": float(done["params"]), "D": d, "C": 6.0 * n * d,
        "flops_vs_budget": 6.0 * n * d / float(sug["C"]) - 1.0 if sug.get("C") else None,
        "predicted_loss": predicted, "predicted_loss_at_plan": sug.get("predicted_loss"),
        "predicted_loss_lo": lo, "predicted_loss_hi": hi, "observed_loss": observed,
        "abs_err": abs(predicted - observed), "rel_err": abs(predicted - observed) / observed,
        "within_interval": (lo <= observed <= hi) if lo is not None and hi is not None else None,
        "reliable": sug.get("reliable"), "warnings": sug.get("warnings") or [],
    }


def describe(sug: dict[str, Any]) -> str:
    """One line about a planned next run (the summary prints the same line)."""
    iv = (f" [{sug['predicted_loss_lo']:.4f}, {sug['predicted_loss_hi']:.4f}]"
          if sug.get("predicted_loss_lo") is not None else "")
    ep = f", {sug['epochs']:.2f} epochs of the unique tokens" if sug.get("epochs") is not None else ""
    flag = "" if sug.get("reliable", True) else "  UNRELIABLE (fit not identified)"
    return (f"next run for C = {sug['C']:.3g} FLOPs ({sug['fit_id']}): {sug['shape']} with N = {sug['N']:.4g} "
            f"{sug['param_count']} params, D = {sug['D']:.4g} tokens{ep}; planned FLOPs {sug['flops_planned']:.4g} "
            f"({sug['flops_vs_budget']:+.1%} vs budget; {sug['flops_all_params']:.4g} counting every parameter); "
            f"predicted loss {sug['predicted_loss']:.4f}{iv}{flag}")
