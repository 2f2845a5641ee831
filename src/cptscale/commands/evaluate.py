"""``cptscale evaluate``: validation loss of a checkpoint on the run's validation sets."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cptscale.errors import CLIError

if TYPE_CHECKING:
    from cptscale.runspec import RunSpec


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("evaluate", help="validation loss/ppl/bpb of a checkpoint on languages' held-out sets")
    p.add_argument("checkpoint", help="checkpoint dir (e.g. <checkpoint.dir>/final or step_N)")
    p.add_argument("--spec", default=None,
                   help="run.json (seq length, validation sets); default: the run.json of the run that wrote the "
                   "checkpoint (its out_dir, or <study>/runs/<run_id>/run.json beside <study>/checkpoints/)")
    p.add_argument("--lang", default=None, help="comma-separated languages (default: all in eval.languages)")
    p.add_argument("--out", default=None, help="write results JSON here (default: print)")
    p.set_defaults(func=_cmd)


def _load(args: argparse.Namespace) -> tuple[dict[str, Any], RunSpec, list[str]]:
    """The checkpoint's state.json, its run.json and the languages to evaluate; CLIError naming what is wrong."""
    from cptscale.runspec import RunSpec, SpecError
    from cptscale.train.checkpoint import CheckpointError, read_state
    from cptscale.train.evaluate import find_spec

    if not Path(args.checkpoint).is_dir():
        raise CLIError(f"checkpoint {args.checkpoint} does not exist")
    try:
        state = read_state(args.checkpoint)
        spec_path = args.spec or find_spec(args.checkpoint)
        spec = RunSpec.load(spec_path)
    except (SpecError, CheckpointError, FileNotFoundError) as exc:
        raise CLIError(str(exc)) from exc
    known = spec.eval.languages
    langs = args.lang.split(",") if args.lang else list(known)
    for lang in langs:
        if lang not in known:
            raise CLIError(f"--lang {lang}: not in the spec's eval.languages of {spec_path} "
                           f"({', '.join(known) or 'none'})")
    return state, spec, langs


def _evaluate_checkpoint(checkpoint: str, state: dict[str, Any], spec: RunSpec, langs: list[str]) -> dict[str, Any]:
    """Build the model at the checkpoint's own shape (a pruned run's final model is smaller than its
    spec's shape), load it and evaluate each language."""
    import os

    from cptscale.train.checkpoint import CheckpointError, load_weights
    from cptscale.train.evaluate import evaluate_model
    from cptscale.train.model import build_model
    from cptscale.train.parallel import setup_parallel, teardown_parallel

    shape = state.get("shape") or spec.shape.model_dump(exclude_unset=True)
    vocab = int(state.get("vocab_size") or spec.vocab_size)
    tp, pp = (spec.layout.tp, spec.layout.pp) if "RANK" in os.environ else (1, 1)
    try:
        setup_parallel(tp, pp, spec.seed)
        model = build_model(shape, vocab, spec.seq_length, tp=tp, pp=pp, arch=state.get("arch") or spec.arch)
        try:
            state = load_weights(checkpoint, model)
        except CheckpointError as exc:
            raise CLIError(str(exc)) from exc
        ev = spec.eval
        return {lang: {"step": state.get("step"), **evaluate_model(
            model, ev.languages[lang].prefix, spec.seq_length, ev.micro_batch_size, val_bytes=ev.languages[lang].bytes,
            max_tokens=ev.max_tokens, tokenizer=spec.tokenizer)} for lang in langs}
    finally:
        teardown_parallel()


def _cmd(args: argparse.Namespace) -> int:
    import json

    state, spec, langs = _load(args)
    text = json.dumps(_evaluate_checkpoint(args.checkpoint, state, spec, langs), indent=1)
    if args.out:
        from cptscale.util import atomic_write

        atomic_write(args.out, text + "\n")
    else:
        print(text)
    return 0
