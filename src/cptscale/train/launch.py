"""Entry point per process (under torchrun or in-process): run one spec, map errors to exit codes."""

from __future__ import annotations

import argparse
import sys
from typing import Any

#: exit status after a SIGTERM checkpoint (the scheduler should retry; 143 = 128 + SIGTERM)
EXIT_TERMINATED = 143


def run_spec(spec: dict[str, Any]) -> int:
    from cptscale.integrity import IntegrityError, check_run_datasets
    from cptscale.train.checkpoint import CheckpointError
    from cptscale.train.engine import Terminated, TrainingError, train

    try:
        check_run_datasets(spec)  # size + sampled blocks of every .bin/.idx it reads, before any work
        train(spec)
    except Terminated as exc:
        print(f"cptscale train: {exc}", file=sys.stderr)
        return EXIT_TERMINATED
    except (TrainingError, CheckpointError, IntegrityError, FileNotFoundError) as exc:
        print(f"cptscale train: error: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    from cptscale.train.spec import SpecError, load_spec

    ap = argparse.ArgumentParser(prog="cptscale.train.launch")
    ap.add_argument("--spec", required=True)
    args = ap.parse_args(argv)
    try:
        spec = load_spec(args.spec)
    except SpecError as exc:
        print(f"cptscale train: error: {exc}", file=sys.stderr)
        return 2
    return run_spec(spec)


if __name__ == "__main__":
    sys.exit(main())
