"""The command line: `cptscale --help` lists every subcommand, and every subcommand (and verb) has --help."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from cptscale.cli import build_parser


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse keeps subcommands in its one _SubParsersAction
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _commands() -> list[tuple[str, ...]]:
    """Every command path: ("fit",), ("db", "status"), ..."""
    out: list[tuple[str, ...]] = []

    def walk(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> None:
        subs = _subparsers(parser)
        if path:
            out.append(path)
        for name, sub in subs.items():
            walk(sub, (*path, name))

    walk(build_parser(), ())
    return out


COMMANDS = _commands()


def test_top_level_help_lists_every_subcommand() -> None:
    out = subprocess.run([sys.executable, "-m", "cptscale.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    top = sorted({c[0] for c in COMMANDS})
    assert len(top) >= 15, top  # data, mix, train, evaluate, db, fit, report, ... (not an empty registry)
    for name in top:
        assert name in out.stdout, f"`cptscale --help` does not list {name!r}"


@pytest.mark.parametrize("path", COMMANDS, ids=[" ".join(c) for c in COMMANDS])
def test_every_subcommand_has_help(path: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([*path, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: cptscale " + " ".join(path)), text[:200]
    assert len(text.splitlines()) > 2  # a description or options, not just a usage line
