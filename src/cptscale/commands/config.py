"""``cptscale validate`` and ``cptscale schema``."""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from cptscale.config.problems import ConfigError, ConfigWarning
from cptscale.config.schema import SCHEMA_PATH, json_schema
from cptscale.errors import CLIError
from cptscale.validation import load_config


def _cmd_validate(args: argparse.Namespace) -> int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConfigWarning)
        try:
            cfg = load_config(args.config)
        except ConfigError as exc:
            raise CLIError(str(exc)) from None
        finally:
            for w in caught:
                if issubclass(w.category, ConfigWarning):
                    print(f"warning: {w.message}", file=sys.stderr)
                else:
                    warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    from cptscale.plan import plan_study

    runs = len(plan_study(cfg))  # variants and IPLT arms included
    print(f"{args.config}: OK (study {cfg.study!r}, {len(cfg.ladder.sizes)} sizes, {runs} training runs)")
    return 0


def _cmd_schema(args: argparse.Namespace) -> int:
    from cptscale.util import atomic_write

    text = json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"
    if args.out == "-":
        print(text, end="")
    else:
        atomic_write(args.out, text)
        print(f"wrote {args.out}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="check a study config; exit non-zero naming each bad field",
                       description="Validate a study config against the typed schema, before any expensive step.")
    p.add_argument("config", help="study YAML (e.g. config.yaml)")
    p.set_defaults(func=_cmd_validate)
    p = sub.add_parser("schema", help="write the JSON schema of the study config",
                       description="Generate workflow/schemas/config.schema.json from the typed schema.")
    p.add_argument("--out", default=str(SCHEMA_PATH), help="output path, or - for stdout")
    p.set_defaults(func=_cmd_schema)
