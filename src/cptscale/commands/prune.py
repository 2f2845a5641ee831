"""``cptscale prune``: argument parsing and printing around :mod:`cptscale.prune`."""

from __future__ import annotations

from typing import Any

from cptscale.errors import CLIError
from cptscale.prune import PrunedShape, PruneError, prune_events


def add_commands(subparsers: Any) -> None:
    p = subparsers.add_parser("prune", help="incremental prune schedule (the 'prune.events' of a run spec) "
                              "from a ladder size to a target shape, with parameter counts")
    p.add_argument("size", help="ladder size name, e.g. d128l4")
    p.add_argument("--to", required=True, help="target, e.g. heads=2,ffn=176[,layers=3][,kv_heads=1]")
    p.add_argument("--k", type=int, default=1, help="number of increments (default 1)")
    p.add_argument("--first-step", type=int, required=True, help="step of the first prune event")
    p.add_argument("--last-step", type=int, help="step of the last one (default: first step)")
    p.add_argument("--vocab", type=int, default=4096, help="vocabulary size for parameter counts")
    p.set_defaults(func=_cmd_prune)


def _cmd_prune(args: Any) -> int:
    import json

    from cptscale.ladder import get_shape

    try:
        ls = get_shape(args.size)
        start = PrunedShape(ls.hidden, ls.layers, ls.heads, ls.ffn, ls.kv_heads)
        target: dict[str, Any] = {}
        for item in filter(None, args.to.split(",")):
            key, _, val = item.partition("=")
            if not val.strip().isdigit():
                raise PruneError(f"--to: expected key=integer, got {item!r}")
            target[key.strip()] = int(val)
        events = prune_events(start, target, args.k, args.first_step,
                              args.first_step if args.last_step is None else args.last_step)
    except (KeyError, PruneError) as exc:
        raise CLIError(str(exc).strip('"')) from None
    params = [start.params(args.vocab)] + [PrunedShape.from_dict(e["shape"]).params(args.vocab) for e in events]
    print(json.dumps({"events": events, "params": params, "compression": params[0] / params[-1]}, indent=1))
    return 0
