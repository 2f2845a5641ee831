"""How a training run stops early (a leaf module: the trainer's parts raise these, launch maps them to exit codes)."""

from __future__ import annotations


class TrainingError(RuntimeError):
    """A run that must stop (bad loss, failed gate, missing checkpoint): message says why."""


class Terminated(Exception):
    """SIGTERM received: checkpoint saved, exit non-zero so the scheduler retries."""
