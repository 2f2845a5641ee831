"""Entry point per process (under torchrun or in-process): run one spec, map errors to exit codes."""

from __future__ import annotations

import argparse
import sys
from typing import Any

#: exit status after a SIGTERM checkpoint (the scheduler should retry; 143 = 128 + SIGTERM)
EXIT_TERMINATED = 143
#: exit status of a failure that a retry cannot change (a bad spec, a damaged checkpoint or dataset): the
#: run records it in ``<out_dir>/failed.json`` and a retry of the same workflow exits at once (see
#: :func:`refused_retry`)
EXIT_PERMANENT = 3
FAILED = "failed.json"


def run_spec(spec: dict[str, Any]) -> int:
    from cptscale.integrity import IntegrityError, check_run_datasets
    from cptscale.runspec import RunSpec, SpecError
    from cptscale.train.checkpoint import CheckpointError, DiskFullError
    from cptscale.train.engine import Terminated, TrainingError, train

    try:
        RunSpec.parse(spec, f"run.json of {spec.get('run_id')}")
        check_run_datasets(spec)  # size + sampled blocks of every .bin/.idx it reads, before any work
        train(spec)
    except Terminated as exc:
        print(f"cptscale train: {exc}", file=sys.stderr)
        return EXIT_TERMINATED
    except (SpecError, IntegrityError, CheckpointError) as exc:
        if isinstance(exc, DiskFullError):  # free space, and a retry resumes
            print(f"cptscale train: error: {exc}", file=sys.stderr)
            return 1
        print(f"cptscale train: error: {exc}", file=sys.stderr)
        record_permanent(spec, str(exc))
        return EXIT_PERMANENT
    except (TrainingError, FileNotFoundError) as exc:
        print(f"cptscale train: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _spec_key(spec: dict[str, Any]) -> str:
    from cptscale.util import stable_hash

    return stable_hash(spec)


def record_permanent(spec: dict[str, Any], error: str) -> None:
    """Rank 0: write ``<out_dir>/failed.json`` (the error and the spec it belongs to)."""
    import os
    import time
    from pathlib import Path

    from cptscale.util import write_json

    if int(os.environ.get("RANK", "0")) == 0 and spec.get("out_dir") and Path(spec["out_dir"]).is_dir():
        write_json(Path(spec["out_dir"]) / FAILED, {"exit": EXIT_PERMANENT, "error": error, "spec": _spec_key(spec),
                                                    "time": time.time()})


def refused_retry(spec: dict[str, Any], attempt: int) -> str | None:
    """On a retry (``attempt`` > 1, Snakemake's attempt number) of a spec whose previous attempt failed
    permanently, the reason not to run it again; None otherwise. A first attempt (a new workflow run,
    after the cause was fixed) clears the record and runs."""
    import json
    from pathlib import Path

    if not spec.get("out_dir"):
        return None
    path = Path(spec["out_dir"]) / FAILED
    if attempt <= 1:
        path.unlink(missing_ok=True)
        return None
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if rec.get("exit") == EXIT_PERMANENT and rec.get("spec") == _spec_key(spec):
        return (f"not retried (attempt {attempt}): attempt 1 of this spec failed in a way a retry cannot change: "
                f"{rec.get('error')}; fix the cause, then run the workflow again ({path} records it)")
    return None


def main(argv: list[str] | None = None) -> int:
    from cptscale.runspec import RunSpec, SpecError

    ap = argparse.ArgumentParser(prog="cptscale.train.launch")
    ap.add_argument("--spec", required=True)
    args = ap.parse_args(argv)
    try:
        spec = RunSpec.load(args.spec)
    except SpecError as exc:
        print(f"cptscale train: error: {exc}", file=sys.stderr)
        return 2
    return run_spec(spec.to_dict())


if __name__ == "__main__":
    sys.exit(main())
