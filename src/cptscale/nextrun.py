"""Closing the loop from fit to next run: train the compute-optimal run the scratch law suggests for
``fit.next_run_budget`` and compare its loss with the prediction.

``cptscale next-run spec`` turns the target language's scratch Chinchilla fit (its ``next_run``: N, D,
predicted loss with bootstrap interval) into a ``run.json`` for the nearest shape of the study's
ladder family; the ordinary ``train`` rule trains it; ``cptscale next-run check`` writes
``fits/next-<lang>.json`` with predicted vs observed loss, which the store and the report pick up.
The shape is the nearest in parameters, not exact, so the prediction is re-evaluated at the N and D
actually trained.
"""

from __future__ import annotations

import argparse
from typing import Any

from cptscale.errors import CLIError
from cptscale.runspec import RunSpec, SpecError
from cptscale.util import read_json, write_json


def build_spec(config: str, fits_dir: str, lang: str) -> RunSpec:
    from cptscale.cli import load_study
    from cptscale.plan import plan_next_run, run_spec, suggested_run

    cfg = load_study(config)
    if lang not in cfg.languages.targets:
        raise CLIError(f"--lang {lang!r} is not a target language of study {cfg.study!r} ({cfg.languages.targets})")
    suggestion = suggested_run(fits_dir, lang)
    if suggestion is None:
        raise CLIError(f"{fits_dir}: no valid next_run in the scratch Chinchilla fit of {lang!r} (is "
                       "fit.next_run_budget set, and did that fit succeed? see fits/summary.json)")
    planned = plan_next_run(cfg, suggestion, lang)
    try:
        spec = run_spec(cfg, planned.run_id, planned)
    except (KeyError, FileNotFoundError, ValueError) as exc:
        raise CLIError(str(exc).strip("'\"")) from None
    return spec.model_copy(update={"suggestion": suggestion})


def _fit_prediction(fit_file: str, n: float, d: float) -> float | None:
    from cptscale.fit.laws import load_fit

    try:
        return float(load_fit(fit_file).predict(n, d))
    except Exception:  # a fit file from another version: fall back to the suggestion's number
        return None


def check(spec_path: str, done_path: str) -> dict[str, Any]:
    """Predicted vs observed target-language loss of the trained next run."""
    try:
        spec = RunSpec.load(spec_path)
    except SpecError as exc:
        raise CLIError(str(exc)) from None
    done = read_json(done_path)
    lang, sug = spec.lang, spec.suggestion
    if lang is None or sug is None:
        raise CLIError(f"{spec_path}: not a next run's spec (no lang or suggestion); write it with "
                       "`cptscale next-run spec`")
    observed = float(done["final_loss"][lang])
    n_trained, d_trained = float(done["params"]), float(done["tokens"])
    at_trained = _fit_prediction(sug["fit_file"], n_trained, d_trained)
    predicted = at_trained if at_trained is not None else float(sug["predicted_loss"])
    lo, hi = sug.get("predicted_loss_lo"), sug.get("predicted_loss_hi")
    row = {"run_id": spec.run_id, "N": n_trained, "D": d_trained, "C": 6.0 * n_trained * d_trained,
           "predicted_loss": predicted, "observed_loss": observed, "predicted_loss_lo": lo,
           "predicted_loss_hi": hi}
    return {
        "comparison": [row],  # the store loads this into `predictions` (fit_id next-<lang>)
        "kind": "next_run_check", "run_id": spec.run_id, "lang": lang, "fit_id": sug.get("fit_id"),
        "budget": sug.get("C"), "N_suggested": sug.get("N"), "D_suggested": sug.get("D"),
        "size": spec.size, "N": n_trained, "D": d_trained, "C": 6.0 * n_trained * d_trained,
        "predicted_loss": predicted, "predicted_loss_at_suggestion": sug.get("predicted_loss"),
        "predicted_loss_lo": lo, "predicted_loss_hi": hi, "observed_loss": observed,
        "abs_err": abs(predicted - observed), "rel_err": abs(predicted - observed) / observed,
        "within_interval": (lo <= observed <= hi) if lo is not None and hi is not None else None,
        "note": "interval is the bootstrap band at the suggested (N, D); the trained shape is the nearest "
                "ladder shape, so the point prediction is re-evaluated at the trained N and D",
    }


def _cmd_spec(args: argparse.Namespace) -> int:
    spec = build_spec(args.config, args.fits, args.lang)
    spec.write(args.out)
    s = spec.suggestion or {}
    print(f"next run {spec.run_id}: size {spec.size} ({spec.params:,} params; suggested {s['N']:.4g}), "
          f"{spec.tokens:,} tokens (suggested {s['D']:.4g}), predicted loss {s['predicted_loss']:.4f}")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    out = check(args.spec, args.done)
    write_json(args.out, out)
    print(f"{out['run_id']}: predicted {out['predicted_loss']:.4f}, observed {out['observed_loss']:.4f} "
          f"(relative error {out['rel_err']:.2%})")
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("next-run", help="the fit's suggested compute-optimal run: spec and check",
                              description=__doc__.split("\n\n")[0])
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    q = verbs.add_parser("spec", help="write run.json for the suggested run of a target language")
    q.add_argument("config", help="study YAML")
    q.add_argument("--fits", required=True, help="results/<study>/fits (after `cptscale fit-study`)")
    q.add_argument("--lang", required=True, help="target language")
    q.add_argument("--out", required=True, help="run.json to write")
    q.set_defaults(func=_cmd_spec)
    q = verbs.add_parser("check", help="compare the trained run's loss with the prediction")
    q.add_argument("--spec", required=True, help="the next run's run.json")
    q.add_argument("--done", required=True, help="its done.json")
    q.add_argument("--out", required=True, help="fits/next-<lang>.json")
    q.set_defaults(func=_cmd_check)

