"""``cptscale train --spec run.json [--nproc N]`` (heavy imports inside the handler)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from cptscale.cluster import torchrun_command


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
    from cptscale.runspec import load_spec

    typed = load_spec(args.spec)
    spec = typed.to_dict()
    if spec.get("simulate"):  # train.backend: simulate: the run's outputs from the law file, nothing is trained
        from cptscale.simulate.backend import run_simulated
        from cptscale.simulate.truth import TruthError

        try:
            return run_simulated(spec)
        except TruthError as exc:
            raise CLIError(str(exc)) from exc
    from cptscale.train.launch import EXIT_PERMANENT, FAILED, refused_retry

    why = refused_retry(spec, args.attempt)
    if why:
        print(f"cptscale train: error: {why}", file=sys.stderr)
        return EXIT_PERMANENT
    world = typed.layout.world

    def exit_status(rc: int) -> int:
        failed = os.path.join(spec.get("out_dir") or "", FAILED)
        return EXIT_PERMANENT if rc != 0 and spec.get("out_dir") and os.path.exists(failed) else rc

    nodes = int((spec.get("resources") or {}).get("nodes") or 1)
    if nodes > 1 and not under_torchrun():
        if args.nproc:
            raise CLIError(f"--nproc: run {spec['run_id']} spans {nodes} nodes; its ranks per node come from "
                           "the plan (tp*pp*dp / nodes)")
        return exit_status(_multinode(args.spec, spec, world, nodes))
    nproc = args.nproc or world
    if nproc != world and not under_torchrun():
        raise CLIError(f"--nproc {nproc} but the spec's layout needs tp*pp*dp = {world} processes on one node")
    if world > 1 and not under_torchrun():
        return exit_status(_run_launcher(torchrun_command(_torchrun_path(), args.spec, nproc),
                                         f"launching {nproc} ranks with torchrun"))
    from cptscale.train.launch import run_spec

    return run_spec(spec)


def _torchrun_path() -> str:
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    return torchrun if os.path.exists(torchrun) else "torchrun"


def _multinode(spec_path: str, spec: dict, world: int, nodes: int) -> int:
    """A run planned on several nodes: inside its SLURM allocation, one srun step with one torchrun
    agent per node, meeting through c10d rendezvous on the allocation's first node."""
    from cptscale.cluster import allocation_nodes, node_address, rendezvous_port, srun_command
    from cptscale.errors import CLIError

    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        raise CLIError(f"run {spec['run_id']} is planned on {nodes} nodes (tp*pp*dp = {world} is more than one "
                       "node holds: slurm.gpus_per_node / slurm.cpu_ranks_per_node); run it inside a SLURM "
                       "allocation of that many nodes (the SLURM profile: snakemake --profile "
                       "workflow/profiles/slurm), or start `torchrun --nnodes` on each node yourself")
    hosts = allocation_nodes(job)
    if len(hosts) < nodes:
        raise CLIError(f"run {spec['run_id']} needs {nodes} nodes but SLURM job {job} has {len(hosts)} "
                       f"({', '.join(hosts)}); submit it with --nodes={nodes}")
    res = spec.get("resources") or {}
    per_node = world // nodes
    endpoint = f"{node_address(hosts[0])}:{rendezvous_port(job)}"
    agent = torchrun_command(_torchrun_path(), os.path.abspath(spec_path), per_node, nnodes=nodes,
                             rdzv_endpoint=endpoint, rdzv_id=f"cptscale-{job}")
    gpus = int(res.get("gpus") or 0)
    cmd = srun_command(agent, nodes, cpus_per_task=int(res["cpus"]) if res.get("cpus") else None,
                       gpus_per_node=gpus // nodes if gpus else None)
    # the srun step belongs to the whole allocation: without the SLURM_* variables of the one-node step
    # this command may run in (Snakemake's `srun -n1`), which would confine it to that node
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SRUN_", "SBATCH_")) or k in ("SLURM_JOB_ID", "SLURM_CLUSTER_NAME")}
    env.setdefault("LOGLEVEL", "INFO")  # torchrun logs each agent's rendezvous result (group_rank, world)
    cmd.insert(1, f"--jobid={job}")
    return _run_launcher(cmd, f"launching {world} ranks on {nodes} nodes ({', '.join(hosts[:nodes])}) with srun "
                              f"+ torchrun, rendezvous at {endpoint}", env)


def _run_launcher(cmd: list[str], what: str, env: dict[str, str] | None = None) -> int:
    """Start the launcher (torchrun, or srun of torchrun agents), once for this job, and pass
    SIGTERM/SIGINT on to it (a cluster time limit signals the job step; torchrun forwards to the ranks,
    which checkpoint and exit 143), then return its exit status."""
    import signal

    print(f"cptscale train: {what} (pid {os.getpid()}, SLURM job {os.environ.get('SLURM_JOB_ID', '-')})",
          file=sys.stderr, flush=True)
    print(f"cptscale train: {' '.join(cmd)}", file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd, env=env)

    def forward(signum, frame):
        proc.send_signal(signum)

    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return proc.wait()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
