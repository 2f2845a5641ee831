"""``cptscale data ingest | tokenizer | index``: one call per Snakemake job, atomic outputs, idempotent."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from cptscale.errors import CLIError


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("data", help="ingest corpora, train the tokenizer, split and index datasets")
    sub = p.add_subparsers(dest="data_command", metavar="VERB", required=True)

    q = sub.add_parser("ingest", help="clean + de-duplicate one language's corpora into DATA/LANG/docs.parquet")
    q.add_argument("--lang", required=True)
    q.add_argument("--sources-json", required=True, type=Path, help="JSON list of corpus source specs")
    q.add_argument("--out", required=True, type=Path, help="docs store (parquet); ingest.json goes beside it")
    q.add_argument("--cache-dir", type=Path, default=None,
                   help="package cache (default $CPTSCALE_CACHE or ~/.cache/cptscale)")
    q.add_argument("--min-chars", type=int, default=20, help="drop documents shorter than this")
    q.add_argument("--max-chars", type=int, default=None, help="stop after this many characters in total")
    q.add_argument("--valid-tokens", type=int, default=0,
                   help="fail early (before tokenizer and index) when the text cannot hold this many validation "
                        "tokens plus training data (data.validation_tokens)")
    q.add_argument("--no-progress", action="store_true")
    q.set_defaults(func=_ingest)

    t = sub.add_parser("tokenizer", help="train the shared byte-level BPE (or --from FILE) + report.json")
    t.add_argument("--docs", nargs="+", default=[],
                   help="docs stores, one per language: DATA/LANG/docs.parquet or LANG=PATH")
    t.add_argument("--vocab-size", type=int, default=None,
                   help="vocabulary to train (default 32000); with --from, the size the file must have")
    t.add_argument("--sample-chars-per-language", type=int, default=10_000_000)
    t.add_argument("--valid-tokens", type=int, default=0,
                   help="validation tokens per language: their low-hash region is kept out of the sample")
    t.add_argument("--from", dest="from_", type=Path, default=None, help="use this tokenizer.json instead")
    t.add_argument("--out", required=True, type=Path)
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=_tokenizer)

    i = sub.add_parser("index", help="split validation by doc hash; write train/valid .bin/.idx + data.json")
    i.add_argument("--lang", required=True)
    i.add_argument("--docs", required=True, type=Path)
    i.add_argument("--tokenizer", required=True, type=Path)
    i.add_argument("--valid-tokens", required=True, type=int)
    i.add_argument("--out-dir", required=True, type=Path)
    i.add_argument("--workers", type=int, default=1)
    i.add_argument("--split-corpora", nargs="+", default=[], metavar="NAME",
                   help="also write train.NAME.bin/.idx: the training documents of these corpora (blend keys lang/NAME)")
    i.add_argument("--no-progress", action="store_true")
    i.set_defaults(func=_index)


def _user_errors(fn):
    """Data-stage errors (missing files, bad specs) become CLIError: exit 2, message, no traceback."""

    def wrapped(args: argparse.Namespace) -> int:
        import pyarrow as pa
        from pydantic import ValidationError

        from cptscale.data.sources import SourceError

        # Arrow's default pool (jemalloc/mimalloc) keeps the buffers of row groups already streamed, so a
        # pass over a corpus peaks higher the larger the corpus; the system allocator gives them back
        # (measured: +33 MB vs +9 MB peak for 16x more text).
        pa.set_memory_pool(pa.system_memory_pool())
        from cptscale.data.keys import bound_heap_growth

        bound_heap_growth()  # and glibc's heap does not keep them either (see there)
        try:
            return fn(args)
        except SourceError as exc:
            raise CLIError(str(exc)) from exc
        except ValidationError as exc:
            raise CLIError(f"bad corpus source spec: {exc}") from exc

    return wrapped


@_user_errors
def _ingest(args: argparse.Namespace) -> int:
    from cptscale.data.ingest import ingest
    from cptscale.data.sources import parse_sources

    if not args.sources_json.exists():
        raise CLIError(f"--sources-json {args.sources_json} does not exist; write it from the config first")
    try:
        raw = json.loads(args.sources_json.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CLIError(f"--sources-json {args.sources_json}: invalid JSON ({exc})") from exc
    if not isinstance(raw, list):
        raise CLIError(f"--sources-json {args.sources_json}: expected a JSON list of source specs")
    specs = parse_sources(raw)
    if args.valid_tokens < 0:
        raise CLIError("--valid-tokens must be >= 0")
    report = ingest(args.lang, specs, args.out, cache_dir=args.cache_dir, min_chars=args.min_chars,
                    max_chars=args.max_chars, valid_tokens=args.valid_tokens, progress=not args.no_progress)
    print(json.dumps({k: report[k] for k in ("lang", "docs", "chars", "bytes", "dropped_duplicate",
                                             "dropped_short", "dropped_empty", "invalid_utf8_replaced")}))
    return 0


@_user_errors
def _tokenizer(args: argparse.Namespace) -> int:
    from cptscale.data.tokenizer import copy_tokenizer, train_tokenizer

    if args.from_ is not None:
        if not args.from_.exists():
            raise CLIError(f"--from {args.from_} does not exist; give a tokenizer.json")
        report = copy_tokenizer(args.from_, args.out, args.docs, vocab_size=args.vocab_size)
    else:
        if not args.docs:
            raise CLIError("--docs is required to train a tokenizer (or give --from FILE)")
        report = train_tokenizer(args.docs, args.out, vocab_size=args.vocab_size or 32000,
                                 sample_chars_per_language=args.sample_chars_per_language,
                                 valid_tokens=args.valid_tokens, progress=not args.no_progress)
    print(json.dumps({"vocab_size": report["vocab_size"], "fertility": report["fertility"]}))
    return 0


@_user_errors
def _index(args: argparse.Namespace) -> int:
    from cptscale.data.indexed import prepare

    if args.workers < 1:
        raise CLIError("--workers must be >= 1")
    # the tokenizer's thread pool (Rayon) takes its size from the environment when it first starts
    os.environ.setdefault("RAYON_NUM_THREADS", str(args.workers))
    m = prepare(args.lang, args.docs, args.tokenizer, args.valid_tokens, args.out_dir,
                workers=args.workers, split_corpora=args.split_corpora, progress=not args.no_progress)
    print(json.dumps({"lang": m["lang"], "train_tokens": m["train"]["tokens"], "valid_tokens": m["valid"]["tokens"],
                      "valid_bytes": m["valid_bytes"], "fertility": m["fertility"],
                      "train_corpora_tokens": {k: v["tokens"] for k, v in m["train_corpora"].items()}}))
    return 0
