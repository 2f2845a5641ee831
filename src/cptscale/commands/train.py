"""``cptscale train --spec run.json [--nproc N]`` (heavy imports inside the handler)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train one run (scratch or CPT) from a run.json spec")
    p.add_argument("--spec", required=True, help="run.json written by the planner")
    p.add_argument("--nproc", type=int, default=None,
                   help="processes on this node (default: layout tp*pp*dp); >1 re-launches under torchrun")
    p.add_argument("--attempt", type=int, default=1,
                   help="Snakemake's attempt number: a retry of a run whose attempt 1 failed permanently (exit 3: "
                   "bad spec, damaged checkpoint or dataset) exits 3 at once instead of running again")
    p.set_defaults(func=_cmd)


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def _cmd(args: argparse.Namespace) -> int:
    from cptscale.errors import CLIError
    from cptscale.runspec import RunSpec, SpecError

    try:
        typed = RunSpec.load(args.spec)
    except SpecError as exc:
        raise CLIError(str(exc)) from exc
    spec = typed.to_dict()
    from cptscale.train.launch import EXIT_PERMANENT, FAILED, refused_retry

    why = refused_retry(spec, args.attempt)
    if why:
        print(f"cptscale train: error: {why}", file=sys.stderr)
        return EXIT_PERMANENT
    world = typed.layout.world
    nproc = args.nproc or world
    if nproc != world and not under_torchrun():
        raise CLIError(f"--nproc {nproc} but the spec's layout needs tp*pp*dp = {world} processes on one node")
    if world > 1 and not under_torchrun():
        rc = _torchrun(args.spec, nproc)
        failed = os.path.join(spec.get("out_dir") or "", FAILED)
        return EXIT_PERMANENT if rc != 0 and spec.get("out_dir") and os.path.exists(failed) else rc
    from cptscale.train.launch import run_spec

    return run_spec(spec)


def _torchrun(spec_path: str, nproc: int) -> int:
    """Start the ranks with torchrun, once for this node, and pass SIGTERM/SIGINT on to it (a
    cluster time limit signals the job step; torchrun forwards to the ranks, which checkpoint and
    exit 143), then return its exit status."""
    import signal

    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun if os.path.exists(torchrun) else "torchrun", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "cptscale.train.launch", "--spec", spec_path]
    print(f"cptscale train: launching {nproc} ranks with torchrun (pid {os.getpid()}, "
          f"SLURM job {os.environ.get('SLURM_JOB_ID', '-')})", file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd)

    def forward(signum, frame):
        proc.send_signal(signum)

    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return proc.wait()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
