"""Validation loss / perplexity / bits-per-byte over a held-out indexed dataset: :func:`evaluate_model`
(also behind ``cptscale evaluate``) and the trainer's :class:`Evaluator` (every language at the spec's
eval steps, rows of evals.jsonl).

Bits per byte = summed token cross-entropy (nats) / (ln 2 x UTF-8 bytes of the evaluated text). Over
the whole set the bytes are the data stage's count (``eval.languages.<lang>.bytes``). When
``eval.max_tokens`` caps the set, only the first ``max_tokens`` predictions are scored, so the bytes
are those of the predicted tokens, counted with the run's tokenizer (byte-level BPE: each token's
byte length; special tokens such as EOD stand for no text); without a usable tokenizer bpb is
reported as null rather than divided by the bytes of text that was never scored.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from cptscale.runspec import RunSpec


def token_byte_lengths(tokenizer: str | Path) -> np.ndarray | None:
    """UTF-8 bytes each token id stands for (0 for special tokens) for a byte-level BPE tokenizer;
    None if some token is not a byte-level string (then bytes are counted by decoding)."""
    from tokenizers import pre_tokenizers

    from cptscale.data.tokenizer import Tokenizer

    tok = Tokenizer(tokenizer)
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    special = set(tok.hf.get_added_tokens_decoder())
    out = np.zeros(tok.vocab_size, dtype=np.int64)
    for i in range(tok.vocab_size):
        if i in special:
            continue
        s = tok.hf.id_to_token(i)
        if s is None or not set(s) <= alphabet:
            return None
        out[i] = len(s)
    return out


def text_bytes(tokenizer: str | Path, ids: np.ndarray) -> int:
    """UTF-8 bytes of the text that the token ids ``ids`` encode (special tokens excluded)."""
    lens = token_byte_lengths(tokenizer)
    ids = np.asarray(ids, dtype=np.int64)
    if lens is not None:
        return int(lens[ids].sum())
    from cptscale.data.tokenizer import Tokenizer

    tok = Tokenizer(tokenizer)  # not byte-level: decode document by document (EOD separates them)
    cuts = np.flatnonzero(ids == tok.eod)
    total, a = 0, 0
    for b in [*cuts.tolist(), len(ids)]:
        if b > a:
            total += len(tok.hf.decode(ids[a:b].tolist(), skip_special_tokens=True).encode("utf-8"))
        a = b + 1
    return total


def _evaluated_bytes(tokenizer: str | Path | None, labels: np.ndarray) -> int | None:
    if not tokenizer or not Path(tokenizer).is_file():
        return None
    try:
        return text_bytes(tokenizer, labels)
    except Exception as exc:  # an unreadable tokenizer: no bpb, said once per evaluation set
        import sys

        print(f"cptscale evaluate: warning: cannot count bytes with tokenizer {tokenizer} ({exc}); bpb of the "
              "capped validation set is null", file=sys.stderr)
        return None


def _validation_set(prefix: str, seq_length: int, micro_batch_size: int, max_tokens: int | None,
                    cache: dict[str, Any], tokenizer: str | Path | None,
                    val_bytes: int | None) -> tuple[list[dict[str, Any]], int | None]:
    """The validation set's micro-batches (fixed order; the last may be smaller) and the bytes bpb divides
    by: the caller's ``val_bytes`` for the whole set, else those of the scored text, counted with the
    tokenizer. Both are cached per set in ``cache`` (the trainer evaluates the same sets many times)."""
    import torch

    from cptscale.train.data import validation_tokens, validation_windows
    from cptscale.train.step import collate

    key = f"{prefix}:{seq_length}:{max_tokens}"
    if key not in cache:
        toks, truncated = validation_tokens(prefix, max_tokens)
        cache[key] = (*validation_windows(toks, seq_length), toks[1:] if truncated else None)
    tokens, labels, mask, scored = cache[key]
    if scored is None:
        n_bytes = val_bytes
    else:
        bkey = f"{key}:bytes:{tokenizer}"
        if bkey not in cache:
            cache[bkey] = _evaluated_bytes(tokenizer, scored)
        n_bytes = cache[bkey]
    mb, batches_key = micro_batch_size, f"{key}:batches:{micro_batch_size}"
    if batches_key not in cache:
        pos = torch.arange(seq_length)
        cache[batches_key] = [collate([{"tokens": tokens[i], "labels": labels[i], "loss_mask": mask[i], "position_ids": pos}
                                for i in range(a, min(a + mb, len(tokens)))]) for a in range(0, len(tokens), mb)]
    return cache[batches_key], n_bytes


def evaluate_model(model, prefix: str, seq_length: int, micro_batch_size: int, *, val_bytes: int | None = None,
                   max_tokens: int | None = None, cache: dict[str, Any] | None = None,
                   tokenizer: str | Path | None = None) -> dict[str, Any]:
    """Mean token cross-entropy over the full validation set (or its first ``max_tokens``
    predictions), fixed order and batching; ``bytes`` is the byte count bpb divides by.

    Works under TP/PP/DP (every rank evaluates the whole set; Megatron's schedules handle PP)."""
    import torch

    from cptscale.train.step import run_microbatches

    batches, n_bytes = _validation_set(prefix, seq_length, micro_batch_size, max_tokens,
                                       {} if cache is None else cache, tokenizer, val_bytes)
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
            "bpb": (total / (math.log(2) * n_bytes)) if n_bytes else None, "bytes": n_bytes}


def find_spec(checkpoint: str | Path) -> Path:
    """The run.json of the run that wrote ``checkpoint``: ``<out_dir>/run.json`` recorded in its
    state.json, else the planner's layout ``<study>/checkpoints/<run_id>/<ckpt>`` ->
    ``<study>/runs/<run_id>/run.json``. Raises FileNotFoundError naming what was tried."""
    from cptscale.train.checkpoint import read_state

    ck = Path(checkpoint)
    state = read_state(ck)
    rid = state.get("run_id")
    tried = []
    if state.get("out_dir"):
        tried.append(Path(state["out_dir"]) / "run.json")
    if rid:
        root = ck.resolve().parent
        if root.name == rid:
            tried.append(root.parent.parent / "runs" / rid / "run.json")
    for p in tried:
        if p.is_file():
            return p
    raise FileNotFoundError(
        f"no run.json found for checkpoint {ck} (run {rid!r}); looked at "
        f"{', '.join(map(str, tried)) or 'nothing (state.json records neither out_dir nor run_id)'}; pass --spec run.json")


class Evaluator:
    """Every language of the spec's ``eval.languages`` on the current weights; one evals.jsonl row each
    (``branch`` set for a WSD branch's final evaluation). Validation windows are read once per set."""

    def __init__(self, spec: RunSpec, runlog, tokens_per_step: int) -> None:
        ev = spec.eval
        self.languages = ev.languages
        self.steps = set(ev.steps)
        self.seq = spec.seq_length
        # eval.micro_batch_size when given, else the training micro-batch
        self.micro_batch_size = ev.micro_batch_size if "micro_batch_size" in ev.model_fields_set else spec.micro_batch_size
        self.max_tokens = ev.max_tokens
        self.tokenizer = spec.tokenizer
        self.runlog, self.tokens_per_step = runlog, tokens_per_step
        self.cache: dict[str, Any] = {}

    def loss(self, model, lang: str) -> float:
        """Validation loss of one language (the init-sanity gate's check)."""
        return evaluate_model(model, self.languages[lang].prefix, self.seq, self.micro_batch_size,
                              max_tokens=self.max_tokens, cache=self.cache)["loss"]

    def __call__(self, model, step: int, totals: dict[str, Any], branch: int | None = None) -> dict[str, float]:
        """Evaluate after ``step`` steps; ``totals``: params and FLOPs spent so far (recorded per row)."""
        res = {}
        for lang, v in self.languages.items():
            r = evaluate_model(model, v.prefix, self.seq, self.micro_batch_size, val_bytes=v.bytes,
                               max_tokens=self.max_tokens, cache=self.cache, tokenizer=self.tokenizer)
            row = {"step": step, "tokens": step * self.tokens_per_step, "lang": lang, **r, **totals}
            if branch is not None:
                row["branch"] = branch
            self.runlog.append("evals.jsonl", row)
            res[lang] = r["loss"]
        return res
