"""Validation loss / perplexity / bits-per-byte over a held-out indexed dataset, and the
``cptscale evaluate`` subcommand. The trainer calls :func:`evaluate_model` at log-spaced steps."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any


def evaluate_model(model, prefix: str, seq_length: int, micro_batch_size: int, *, val_bytes: int | None = None,
                   max_tokens: int | None = None, cache: dict[str, Any] | None = None) -> dict[str, Any]:
    """Mean token cross-entropy over the full validation set (fixed order and batching).

    Works under TP/PP/DP (every rank evaluates the whole set; Megatron's schedules handle PP)."""
    import torch

    from cptscale.train.data import validation_windows
    from cptscale.train.engine import collate, run_microbatches

    key = f"{prefix}:{seq_length}:{max_tokens}"
    if cache is not None and key in cache:
        tokens, labels, mask = cache[key]
    else:
        tokens, labels, mask = validation_windows(prefix, seq_length, max_tokens)
        if cache is not None:
            cache[key] = (tokens, labels, mask)
    mb = micro_batch_size
    pos = torch.arange(seq_length)
    batches = []
    for a in range(0, len(tokens), mb):
        items = [{"tokens": tokens[i], "labels": labels[i], "loss_mask": mask[i], "position_ids": pos}
                 for i in range(a, min(a + mb, len(tokens)))]
        batches.append(collate(items))
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    with torch.no_grad():
        # one micro-batch per schedule call: the last batch may be smaller than the others
        for b in batches:
            s, c = run_microbatches(model, [b], seq_length, b["tokens"].shape[0], forward_only=True)
            total += s
            count += c
    model.train(was_training)
    loss = total / max(count, 1.0)
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "n_tokens": int(count),
            "bpb": (total / (math.log(2) * val_bytes)) if val_bytes else None}


# ----------------------------------------------------------------------------------------------
def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("evaluate", help="validation loss/ppl/bpb of a checkpoint on languages' held-out sets")
    p.add_argument("checkpoint", help="checkpoint dir (e.g. <checkpoint.dir>/final or step_N)")
    p.add_argument("--spec", required=True, help="run.json (model shape, seq length, validation sets)")
    p.add_argument("--lang", default=None, help="comma-separated languages (default: all in eval.languages)")
    p.add_argument("--out", default=None, help="write results JSON here (default: print)")
    p.set_defaults(func=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    import json

    from cptscale.cli import CLIError
    from cptscale.train.spec import SpecError, load_spec

    try:
        spec = load_spec(args.spec)
    except SpecError as exc:
        raise CLIError(str(exc)) from exc
    langs = args.lang.split(",") if args.lang else list(spec["eval"].get("languages", {}))
    known = spec["eval"].get("languages", {})
    for lang in langs:
        if lang not in known:
            raise CLIError(f"--lang {lang}: not in the spec's eval.languages ({', '.join(known) or 'none'})")
    if not Path(args.checkpoint).is_dir():
        raise CLIError(f"checkpoint {args.checkpoint} does not exist")
    from cptscale.train.checkpoint import CheckpointError, load_weights
    from cptscale.train.engine import setup_parallel, teardown_parallel
    from cptscale.train.model import build_model

    lay = spec["layout"]
    try:
        setup_parallel(1, 1, int(spec["seed"])) if "RANK" not in __import__("os").environ else setup_parallel(
            int(lay["tp"]), int(lay["pp"]), int(spec["seed"]))
        model = build_model(spec["shape"], int(spec["vocab_size"]), int(spec["seq_length"]))
        try:
            state = load_weights(args.checkpoint, model)
        except CheckpointError as exc:
            raise CLIError(str(exc)) from exc
        out = {}
        for lang in langs:
            v = known[lang]
            out[lang] = {"step": state.get("step"), **evaluate_model(
                model, v["prefix"], int(spec["seq_length"]), int(spec["eval"].get("micro_batch_size", 8)),
                val_bytes=v.get("bytes"), max_tokens=spec["eval"].get("max_tokens"))}
    finally:
        teardown_parallel()
    text = json.dumps(out, indent=1)
    if args.out:
        from cptscale.util import atomic_write

        atomic_write(args.out, text + "\n")
    else:
        print(text)
    return 0
