"""``cptscale summary``: argument parsing and printing around :mod:`cptscale.summary`."""

from __future__ import annotations

import argparse

from cptscale.summary import format_summary, summarize
from cptscale.util import write_json


def _cmd_summary(args: argparse.Namespace) -> int:
    from cptscale.validation import load_study

    cfg = load_study(args.config)
    s = summarize(cfg.study_dir, cfg.study)
    if args.out:
        write_json(args.out, s)
    print(format_summary(s))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("summary", help="print the study's answer: report path, fitted laws, CPT saving, held-out error",
                       description="Summarise a finished (or partly finished) study from its store and fits.")
    p.add_argument("--config", default="config.yaml", help="study YAML")
    p.add_argument("--out", help="also write the summary as JSON here")
    p.set_defaults(func=_cmd_summary)
