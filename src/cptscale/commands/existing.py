"""``cptscale existing-model recommend``: the answer for CPT of an existing model from its runs' final
evaluations (a CSV), around :mod:`cptscale.existing`."""

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
