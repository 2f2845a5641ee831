"""``cptscale existing-model``: the subcommands of a "CPT of an existing model" study (``source_model:``),
one per workflow rule: ``import`` (the model into the study dir), ``evaluate`` (the model as given),
``fit`` (data law, frontier and answer from the store; :mod:`cptscale.existing_study`), and
``recommend`` (the answer from a CSV of runs' final evaluations, around :mod:`cptscale.existing`)."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

from cptscale.errors import CLIError

COLUMNS = ("replay", "tokens", "target_loss", "source_loss")


def read_points(path: str | Path) -> list[Any]:
    """CSV rows ``replay,tokens,target_loss,source_loss`` (one per CPT run of the model, its last
    evaluation); a missing column or a non-number is an error naming the file and line."""
    from cptscale.existing import RunPoint

    p = Path(path)
    if not p.is_file():
        raise CLIError(f"--points {p} does not exist")
    with open(p, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not set(COLUMNS) <= set(rows[0]):
        raise CLIError(f"{p}: needs a header with the columns {', '.join(COLUMNS)}")
    out = []
    for i, r in enumerate(rows, start=2):
        try:
            out.append(RunPoint(*(float(r[c]) for c in COLUMNS)))
        except (TypeError, ValueError):
            raise CLIError(f"{p}:{i}: {', '.join(COLUMNS)} must be numbers, got {[r.get(c) for c in COLUMNS]}") from None
    return out


def _cmd_recommend(args: argparse.Namespace) -> int:
    from cptscale.existing import answer_text, recommend
    from cptscale.util import atomic_write

    points = read_points(args.points)
    try:
        rec = recommend(points, args.source_loss_before, max_forgetting=args.max_forgetting,
                        target_loss=args.target_loss)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    rec["answer"] = answer_text(rec, args.lang, args.source_lang)
    print(rec["answer"])
    if args.out:
        atomic_write(args.out, json.dumps(rec, indent=1, default=float) + "\n")
    return 0


def _study(args: argparse.Namespace) -> tuple[Any, Path]:
    from cptscale.validation import load_study

    return load_study(args.config), Path(args.config).resolve().parent


def _cmd_import(args: argparse.Namespace) -> int:
    from cptscale.existing_study import import_model
    from cptscale.hf import HFError
    from cptscale.source_model import SourceModelError
    from cptscale.train.checkpoint import CheckpointError

    cfg, base = _study(args)
    if Path(args.out).exists():
        raise CLIError(f"--out {args.out} exists; remove it to import again")
    try:
        state = import_model(cfg, base, args.out)
    except (HFError, SourceModelError, CheckpointError) as exc:
        raise CLIError(str(exc)) from exc
    sh = state["shape"]
    print(f"imported {cfg.source_model.path} (hidden {sh['hidden']}, {sh['layers']} layers, vocab "
          f"{state['vocab_size']}) -> {args.out}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from cptscale.existing_study import evaluate_given
    from cptscale.source_model import SourceModelError
    from cptscale.train.checkpoint import CheckpointError
    from cptscale.util import write_json

    cfg, base = _study(args)
    try:
        res = evaluate_given(cfg, base, args.checkpoint)
    except (SourceModelError, CheckpointError, FileNotFoundError) as exc:
        raise CLIError(str(exc)) from exc
    write_json(args.out, res)
    ref = res["reference"]
    print("model as given: " + ", ".join(f"{k} loss {v['loss']:.4f}" for k, v in res["languages"].items())
          + f"; gate reference {ref['lang']} {ref['loss']:.4f} ({ref['by']})")
    return 0


def _cmd_fit(args: argparse.Namespace) -> int:
    from cptscale.existing_study import fit_existing
    from cptscale.util import write_json

    cfg, _ = _study(args)
    if not Path(args.db).is_file():
        raise CLIError(f"--db {args.db} does not exist; run the aggregate step (`cptscale db ingest`) first")
    res = fit_existing(cfg, args.db, args.model_eval, args.tokenizer_report)
    write_json(args.out, res)
    for lang, rec in res["recommendation"].items():
        print(f"{lang}: {rec.get('answer') or rec.get('reason')}")
    return 0


def add_commands(subparsers: Any) -> None:
    p = subparsers.add_parser("existing-model", help="CPT of an existing model: how many target tokens and how "
                              "much replay (data law at fixed N, forgetting-vs-replay frontier)")
    sub = p.add_subparsers(dest="existing_command", metavar="COMMAND", required=True)
    r = sub.add_parser("recommend", help="the replay ratio and target tokens from the runs' final evaluations")
    r.add_argument("--points", required=True, help=f"CSV with columns {','.join(COLUMNS)} (one row per run)")
    r.add_argument("--source-loss-before", type=float, required=True,
                   help="source-language validation loss of the model as given (forgetting is the rise over it)")
    r.add_argument("--max-forgetting", type=float, default=0.05, help="nats of source-loss rise allowed")
    r.add_argument("--target-loss", type=float, default=None,
                   help="target loss to reach (default: the best any run of the chosen ratio reached)")
    r.add_argument("--lang", default="target", help="target language (for the sentence)")
    r.add_argument("--source-lang", default="source", help="source language (for the sentence)")
    r.add_argument("--out", default=None, help="write the recommendation JSON here")
    r.set_defaults(func=_cmd_recommend)
    i = _study_command(sub, "import", _cmd_import, "the study's source_model into the study dir as a cptscale "
                       "checkpoint (Hugging Face: import-hf's mapping; a cptscale checkpoint: verified and copied)")
    i.add_argument("--out", required=True, help="checkpoint dir to write (must not exist)")
    e = _study_command(sub, "evaluate", _cmd_evaluate, "the imported model as given on every language's "
                       "validation set (the init gate's and forgetting's reference)")
    e.add_argument("--checkpoint", required=True, help="the imported checkpoint")
    e.add_argument("--out", required=True, help="eval JSON to write")
    f = _study_command(sub, "fit", _cmd_fit, "data law at fixed N per replay ratio, forgetting-vs-replay "
                       "frontier and the answer, from the study's store")
    f.add_argument("--db", required=True, help="the study's DuckDB store (runs and evals)")
    f.add_argument("--model-eval", required=True, help="the model as given (`existing-model evaluate` output)")
    f.add_argument("--tokenizer-report", default=None, help="the data stage's tokenizer report (fertility)")
    f.add_argument("--out", required=True, help="fit JSON to write (fits/existing.json)")


def _study_command(sub: Any, name: str, func: Any, help: str) -> Any:
    """A subcommand of one study config with source_model (the workflow's rules call these)."""
    p = sub.add_parser(name, help=help)
    p.add_argument("config", help="study config with source_model")
    p.set_defaults(func=func)
    return p
