"""The ``cptscale`` command: one subcommand per stage verb.

Each stage module owns its subcommands through ``add_commands(subparsers)``; heavy imports (torch,
Megatron-Core, DuckDB, Altair, SciPy) happen inside the handlers so that ``cptscale --help`` and
``cptscale validate`` answer in well under a second.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from cptscale.errors import CLIError

#: Modules that contribute subcommands, in the order they appear in ``--help``.
COMMAND_MODULES = (
    "cptscale.commands.config",
    "cptscale.commands.plan",
    "cptscale.commands.data",
    "cptscale.commands.mix",
    "cptscale.commands.train",
    "cptscale.commands.evaluate",
    "cptscale.commands.transfer",
    "cptscale.commands.store",
    "cptscale.commands.fit",
    "cptscale.commands.nextrun",
    "cptscale.commands.report",
    "cptscale.commands.summary",
    "cptscale.commands.prune",
    "cptscale.commands.existing",
    "cptscale.verify",
    "cptscale.hf",
    "cptscale.commands.simulate",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cptscale",
        description="Cross-lingual continual pre-training scaling studies: data, mixing, training, "
        "evaluation, results store, scaling-law fits and reports.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return parser


def _version() -> str:
    from cptscale import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CLIError as exc:
        print(f"cptscale {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cptscale {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        from cptscale.integrity import is_disk_full

        if not is_disk_full(exc):
            raise
        print(f"cptscale {args.command}: error: no space left on device ({type(exc).__name__}: {exc}); every "
              "output is written to a temp file and renamed into place, so the previous outputs are intact and "
              "the partial ones removed: free disk space and re-run", file=sys.stderr)
        return 1


if __name__ == "__main__":  # `python -m cptscale.cli`: run the installed module so CLIError is one class
    from cptscale.cli import main as _main

    sys.exit(_main())
