"""Errors any layer may raise; a leaf module (imports nothing from cptscale) so that domain modules never
import the CLI to report a user-facing problem."""

from __future__ import annotations


class CLIError(Exception):
    """A user-facing error: the CLI prints it without a traceback and exits with status 2."""
