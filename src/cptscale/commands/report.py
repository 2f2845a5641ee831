"""``cptscale report``: argument parsing around :func:`cptscale.report.page.build_report`."""

from __future__ import annotations

import argparse
from typing import Any

from cptscale.errors import CLIError
from cptscale.report.page import build_report


def _cmd_report(args: argparse.Namespace) -> int:
    if args.max_points < 10:
        raise CLIError(f"--max-points {args.max_points}: give at least 10 points per curve")
    sections = None
    if args.config:  # the figures this study has (no "missing" notes for kinds it does not run)
        from cptscale.report.page import sections_for
        from cptscale.validation import load_study

        sections = sections_for(load_study(args.config))
    # a database that does not exist yet gives the "what is missing" page (exit 0), like missing tables
    info = build_report(
        args.db, args.study, args.out_dir, title=args.title,
        max_points=args.max_points, images=not args.no_images, sections=sections,
    )
    print(
        f"report: {args.out_dir}/index.html ({info['page_bytes'] / 1e6:.1f} MB, "
        f"{len(info['drawn'])} figures, {len(info['missing'])} missing, {info['build_s']:.1f}s)"
    )
    for n, m in info["missing"].items():
        print(f"  missing {n}: {m}")
    return 0


def add_commands(subparsers: Any) -> None:
    """Register `cptscale report`."""
    p = subparsers.add_parser("report", help="write the study's self-contained HTML report")
    p.add_argument("--db", required=True, help="DuckDB store")
    p.add_argument("--study", required=True)
    p.add_argument("--out-dir", required=True, help="e.g. results/<study>/report")
    p.add_argument("--title", default=None)
    p.add_argument("--max-points", type=int, default=400, help="points kept per curve")
    p.add_argument("--no-images", action="store_true", help="skip SVG/PNG export")
    p.add_argument("--config", default=None, help="study config: show IPLT, variants and next-run sections only "
                   "when it asks for them (default: every section)")
    p.set_defaults(func=_cmd_report)
