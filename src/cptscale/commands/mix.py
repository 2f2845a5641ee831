"""``cptscale mix`` (plan, report): the planned blends of a study and a run's realized blend."""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from typing import Any

from cptscale.errors import CLIError
from cptscale.mix import BlendError, format_plan_table, realize


def _plan_specs(config_path: str) -> list[dict[str, Any]]:
    """Data specs for every run of a study, as ``cptscale plan --run`` would write them.

    Needs the data stage's manifests for the token counts; without them shares and tokens are still
    planned and available tokens show as "?"."""
    from cptscale import plan as P
    from cptscale.validation import load_config

    cfg = load_config(config_path)
    manifests: dict[str, dict[str, Any]] = {}
    for lang in cfg.languages.all:
        with contextlib.suppress(FileNotFoundError):
            manifests[lang] = P._manifest(cfg, lang)
    missing = [lang for lang in cfg.languages.all if lang not in manifests]
    out = []
    for run in P.plan_study(cfg):
        base = {"run_id": run.run_id, "init": run.init, "lang": run.lang, "replay": run.replay, "steps": run.steps}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                data = P.blend_for_run(cfg, run, manifests)  # languages without a manifest: placeholders
        except BlendError as exc:
            out.append({**base, "data": {}, "error": str(exc)})
            continue
        for ph in data["phases"]:
            for s in ph["sources"]:
                if s["name"].split("/", 1)[0] in missing:
                    s["available_tokens"] = None
        out.append({**base, "data": data})
    if missing:
        out.append({"run_id": "(note)", "data": {"warnings": [
            f"no data manifest for {', '.join(missing)}: available tokens and epochs unknown until the data stage runs"
        ]}})
    return out


def _cmd_plan(args: argparse.Namespace) -> int:
    from cptscale.config.problems import ConfigError

    try:
        specs = _plan_specs(args.config)
    except ConfigError as exc:
        raise CLIError(str(exc)) from None
    print(format_plan_table(specs))
    return 1 if any(s.get("error") for s in specs) else 0


def _cmd_report(args: argparse.Namespace) -> int:
    from cptscale.util import read_json, write_json

    try:
        spec = read_json(args.spec)
    except (OSError, ValueError) as exc:
        raise CLIError(f"{args.spec}: {type(exc).__name__}: {exc}") from None
    if spec.get("simulate"):  # a simulated study (train.backend: simulate): the planned blend, no data to draw
        from cptscale.simulate.backend import planned_blend_report

        write_json(args.out, planned_blend_report(spec))
        return 0
    from cptscale.data.sources import SourceError
    from cptscale.data.tokenizer import MegatronTokenizerAdapter, load_tokenizer

    try:
        data = spec["data"]
        tok = MegatronTokenizerAdapter(load_tokenizer(spec["tokenizer"]))
        report = realize(data, tok, seq_length=spec["seq_length"], global_batch_size=spec["global_batch_size"],
                         steps=spec["steps"], seed=spec["seed"], cache_dir=data.get("cache_dir"))
    except (OSError, KeyError, ValueError) as exc:
        raise CLIError(f"{args.spec}: {type(exc).__name__}: {exc}") from None
    except SourceError as exc:  # the data stage's "cannot read this input" error
        raise CLIError(f"{args.spec}: {exc}") from None
    report["run_id"] = spec.get("run_id")
    write_json(args.out, report)
    for w in report["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("mix", help="corpus blends: plan table, realization report",
                       description="Plan and realize training blends (target + replay of the source language).")
    verbs = p.add_subparsers(dest="mix_command", metavar="VERB", required=True)
    q = verbs.add_parser("plan", help="print planned shares, tokens and repetition per run and phase")
    q.add_argument("config", help="study YAML")
    q.set_defaults(func=_cmd_plan)
    r = verbs.add_parser("report", help="build a run's blend and write its realization report (JSON)")
    r.add_argument("--spec", required=True, help="run.json (keys data, tokenizer, seq_length, ...)")
    r.add_argument("--out", required=True, help="where to write blend.json")
    r.set_defaults(func=_cmd_report)
