"""``cptscale next-run`` (spec, check): the fit's suggested run and its check."""

from __future__ import annotations

import argparse

from cptscale.nextrun import build_spec, check, describe
from cptscale.util import write_json


def _cmd_spec(args: argparse.Namespace) -> int:
    spec = build_spec(args.config, args.fits, args.lang)
    spec.write(args.out)
    sug = spec.suggestion or {}
    print(describe(sug))
    for w in sug["warnings"]:
        print(f"  warning: {w}")
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
