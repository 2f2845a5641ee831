"""``cptscale simulate data|tokenizer|truth``: the data stage of a simulated study and the law file.

The training step of a simulated study is ``cptscale train`` itself (it dispatches on the spec's
``simulate`` section); these verbs stand in for the data stage, which a simulated study does not run.
"""

from __future__ import annotations

import argparse
from typing import Any


def _cmd_data(args: argparse.Namespace) -> int:
    from cptscale.errors import CLIError
    from cptscale.plan import config_hash
    from cptscale.simulate.backend import simulated_manifest
    from cptscale.util import write_json
    from cptscale.validation import load_study

    cfg = load_study(args.config)
    _require_simulated(cfg, args.config)
    if args.lang not in cfg.languages.all:
        raise CLIError(f"--lang {args.lang}: not a language of study {cfg.study!r} ({', '.join(cfg.languages.all)})")
    corpora = cfg.blend_corpora(args.lang)  # the per-corpus splits a blend weights separately
    write_json(args.out, simulated_manifest(args.lang, cfg.vocab_size, cfg.data.validation_tokens, config_hash(cfg),
                                            corpora, cfg.data.max_chars))
    return 0


def _cmd_tokenizer(args: argparse.Namespace) -> int:
    from cptscale.simulate.backend import simulated_tokenizer
    from cptscale.util import write_json
    from cptscale.validation import load_study

    cfg = load_study(args.config)
    _require_simulated(cfg, args.config)
    tok = simulated_tokenizer(cfg.vocab_size)
    write_json(args.out, tok)
    if args.report:
        write_json(args.report, {**tok, "fertility": {lang: {} for lang in cfg.languages.all}})
    return 0


def _cmd_truth(args: argparse.Namespace) -> int:
    import sys

    from cptscale.errors import CLIError
    from cptscale.simulate.truth import Truth, TruthError, default_truth, truth_from_fits

    if args.check and args.from_fits:
        raise CLIError("--check and --from-fits: give one (a law file to check, or a study's fits to build one from)")
    try:
        if args.from_fits:
            truth, notes = truth_from_fits(args.from_fits, args.source)
            for note in notes:
                print(f"note: {note}", file=sys.stderr)
        else:
            truth = Truth.load(args.check) if args.check else default_truth()
    except TruthError as exc:
        raise CLIError(str(exc)) from None
    if args.out:
        truth.dump(args.out)
    else:
        import json

        print(json.dumps(truth.as_dict(), indent=2))
    return 0


def _cmd_design(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cptscale.errors import CLIError
    from cptscale.simulate.design import design_report, format_design
    from cptscale.simulate.truth import Truth, TruthError, default_truth, truth_for
    from cptscale.util import write_json
    from cptscale.validation import load_study

    if args.studies < 0:
        raise CLIError(f"--studies {args.studies}: must be >= 0")
    if args.out and len(args.config) > 1:
        raise CLIError("--out names one design.json; with several configs each goes to its own study dir")
    try:
        base = Truth.load(args.truth) if args.truth else default_truth()
    except TruthError as exc:
        raise CLIError(str(exc)) from None
    reports = []
    for path in args.config:
        cfg = load_study(path)
        if cfg.budget.param_count == "nonembedding" and not args.truth:
            raise CLIError(f"{path}: budget.param_count is nonembedding but the default law counts N with "
                           "embeddings (paper scale); give a law file for this study's scale with --truth")
        truth = truth_for(cfg.languages.all, cfg.languages.source, list(cfg.languages.targets), base)
        rep = design_report(cfg, truth, studies=args.studies, seed=args.seed,
                            compare=not args.no_alternatives and len(args.config) == 1)
        out = Path(args.out) if args.out else cfg.study_dir / "design" / "design.json"
        write_json(out, rep)
        print(format_design(rep))
        print(f"wrote {out} (the report shows it as its study-design section)")
        reports.append((path, cfg, rep))
    if len(reports) > 1:  # several designs: ranked by the precision of a (1 / mean squared error, all laws)
        rows = sorted(({"config": p, "study": c.study, "precision": r["designs"][0]["precision"],
                        "identifiable": r["designs"][0]["identifiable"], "flops": r["designs"][0]["flops"]}
                       for p, c, r in reports), key=lambda x: -x["precision"])
        print("designs ranked by precision of the allocation exponent a (1 / mean squared error):")
        for i, row in enumerate(rows, 1):
            print(f"  {i}. {row['study']} ({row['config']}): precision {row['precision']:.4g}, "
                  f"{'every law identifiable' if row['identifiable'] else 'not every law identifiable'}, "
                  f"{row['flops']:.3g} FLOPs")
        dest = Path(reports[0][1].results_dir) / "design-ranking.json"
        write_json(dest, {"ranking": rows})
        print(f"wrote {dest}")
    return 0


def _require_simulated(cfg: Any, path: str) -> None:
    from cptscale.errors import CLIError

    if getattr(cfg.train, "backend", None) != "simulate":
        raise CLIError(f"{path}: train.backend is {getattr(cfg.train, 'backend', None)!r}; the simulated data stage "
                       "is for studies with train.backend: simulate (a trained study runs `cptscale data`)")


def add_commands(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("design", help="expected precision of a planned study (and alternatives) before compute "
                       "is spent, from simulated runs with a known truth",
                       description="For the study's design and alternatives (one more size, WSD branches, other "
                       "replay ratios, fewer tokens/param): expected 95 %% interval width of a and N_opt per "
                       "fit.budgets budget, expected held-out error of the largest size, identifiability of each "
                       "law, and which change buys the most precision per FLOP.")
    g.add_argument("config", nargs="+", help="study YAML; several: each is examined and they are ranked")
    g.add_argument("--truth", help="law file (cptscale simulate truth writes the default, the paper's exponents)")
    g.add_argument("--studies", type=int, default=50, help="simulated noisy studies of the planned design (Monte "
                   "Carlo check of the linearised widths); 0: linearised only")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-alternatives", action="store_true", help="only the planned design")
    g.add_argument("--out", help="design.json (default: <results_dir>/<study>/design/design.json)")
    g.set_defaults(func=_cmd_design)
    p = sub.add_parser("simulate", help="simulated studies (known truth): data stage stand-ins and the law file",
                       description="Simulated runs validate the statistics and plan studies; they never replace "
                       "training. With train.backend: simulate, `cptscale train` writes a run's outputs from the "
                       "law file instead of training.")
    verbs = p.add_subparsers(dest="simulate_command", metavar="VERB", required=True)
    d = verbs.add_parser("data", help="write a simulated data manifest (data/<lang>/data.json) for one language")
    d.add_argument("config", help="study YAML (train.backend: simulate)")
    d.add_argument("--lang", required=True)
    d.add_argument("--out", required=True)
    d.set_defaults(func=_cmd_data)
    t = verbs.add_parser("tokenizer", help="write the simulated study's tokenizer marker (no tokenizer is trained)")
    t.add_argument("config", help="study YAML (train.backend: simulate)")
    t.add_argument("--out", required=True)
    t.add_argument("--report", help="also write tokenizer/report.json here")
    t.set_defaults(func=_cmd_tokenizer)
    w = verbs.add_parser("truth", help="print (or write) the default law file, build one from a study's fits, or "
                         "check one")
    w.add_argument("--out", help="write the law file here")
    w.add_argument("--from-fits", metavar="DIR", help="a finished study's fits (results/<study>/fits): its scratch "
                   "and extended CPT laws, at its scale, to plan the next study with `cptscale design --truth`")
    w.add_argument("--source", help="with --from-fits: the source language (its law copies a target's; "
                   "only the forgetting curves use it)")
    w.add_argument("--check", help="load and check this law file (then print or write it)")
    w.set_defaults(func=_cmd_truth)
