"""``cptscale transfer``: argument parsing and printing around :mod:`cptscale.transfer`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cptscale.transfer import compute_transfer


def _cmd_transfer(args: Any) -> int:
    from cptscale.util import write_json

    out = compute_transfer(Path(args.cpt), Path(args.scratch), Path(args.source) if args.source else None)
    write_json(args.out or Path(args.cpt) / "transfer.json", out)
    ok = [r for r in out["rows"] if not r["extrapolated"]]
    last = ok[-1] if ok else None
    msg = f"{out['run_id']}: {len(out['rows'])} eval steps, {len(ok)} inside the scratch curve"
    if last:
        msg += f"; last: {100 * last['frac_saved']:.1f}% FLOPs saved, D_T={last['effective_data_transferred']:.3g}"
    print(msg)
    return 0


def add_commands(subparsers: Any) -> None:
    p = subparsers.add_parser("transfer", help="FLOPs/tokens saved, effective data transferred and forgetting "
                              "for one CPT run against its scratch pair and source run")
    p.add_argument("--cpt", required=True, help="CPT run directory (run.json, evals.jsonl)")
    p.add_argument("--scratch", required=True, help="same-size scratch run directory in the target language")
    p.add_argument("--source", help="source run directory (final source loss, source pre-training FLOPs)")
    p.add_argument("--out", help="output JSON (default: CPT_DIR/transfer.json)")
    p.set_defaults(func=_cmd_transfer)
