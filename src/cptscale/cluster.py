"""How a training run spreads over cluster nodes, and the launcher command lines for it.

A run of ``world = tp * pp * dp`` ranks that does not fit on one node (``slurm.gpus_per_node`` GPUs, or
``slurm.cpu_ranks_per_node`` ranks on a CPU-only cluster) gets ``nodes = ceil(world / per_node)``
nodes with the same number of ranks on each (torchrun starts ``--nproc-per-node`` ranks per agent, the
same on every node). Ranks are numbered node by node, and Megatron-Core builds tensor-parallel groups
from consecutive ranks, so a node's ranks must be a multiple of TP: a TP group never crosses a node
(its all-reduces run on every layer, too often for the network between nodes).

Launch, as Megatron-LM's and torchtitan's SLURM launchers do it: one ``srun`` step with one task per
node, each task a torchrun agent; the agents meet through c10d rendezvous at the first node of the
allocation (``--rdzv-backend c10d --rdzv-endpoint <head>:<port> --rdzv-id <SLURM job id>``) and
torchrun gives every rank its RANK/LOCAL_RANK/WORLD_SIZE. A single-node run keeps ``torchrun
--standalone``. This module only builds command lines and reads the allocation (pure functions and
``scontrol``); :mod:`cptscale.train.cli` runs them.
"""

from __future__ import annotations

import math
import subprocess
from dataclasses import dataclass

#: First port of the rendezvous endpoint; the job id picks one of PORT_SPAN ports above it, so two jobs
#: that share a head node (small multi-node jobs on a shared cluster) do not collide.
RDZV_PORT_BASE = 29500
RDZV_PORT_SPAN = 1000


class NodeLayoutError(ValueError):
    """A layout that cannot be spread evenly over nodes; the message names the fix."""


@dataclass(frozen=True)
class NodeLayout:
    nodes: int
    ranks_per_node: int

    @property
    def world(self) -> int:
        return self.nodes * self.ranks_per_node


def node_layout(world: int, per_node: int | None, tp: int = 1) -> NodeLayout:
    """Nodes for ``world`` ranks at most ``per_node`` per node (None: one node): ``ceil(world /
    per_node)`` nodes, the same number of ranks on each, each node's ranks a multiple of ``tp``."""
    if world < 1:
        raise NodeLayoutError(f"a run needs at least one rank (tp*pp*dp = {world})")
    if per_node is None or world <= per_node:
        return NodeLayout(1, world)
    nodes = math.ceil(world / per_node)
    if world % nodes:
        raise NodeLayoutError(
            f"tp*pp*dp = {world} ranks need {nodes} nodes of at most {per_node}, but {world} does not split "
            f"evenly over {nodes} nodes (torchrun starts the same number of ranks on every node); choose dp so "
            f"that tp*pp*dp is a multiple of {nodes}, or raise the ranks per node")
    per = world // nodes
    if per % tp:
        raise NodeLayoutError(
            f"tp = {tp} does not divide the {per} ranks per node of a {world}-rank run on {nodes} nodes: a "
            "tensor-parallel group would span two nodes; choose tp that divides the ranks per node (tp <= "
            f"{per_node}, usually a power of two)")
    return NodeLayout(nodes, per)


def rendezvous_port(job_id: str | int | None) -> int:
    """The c10d rendezvous port of a job: fixed per job, spread over a range across jobs."""
    try:
        return RDZV_PORT_BASE + int(job_id) % RDZV_PORT_SPAN  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return RDZV_PORT_BASE


def torchrun_command(torchrun: str, spec_path: str, nproc_per_node: int, *, nnodes: int = 1,
                     rdzv_endpoint: str | None = None, rdzv_id: str | None = None) -> list[str]:
    """The torchrun agent of one node: ``--standalone`` on one node; c10d rendezvous on several (every
    agent gets the same command; the first to reach the endpoint hosts the store)."""
    entry = ["-m", "cptscale.train.launch", "--spec", spec_path]
    if nnodes == 1:
        return [torchrun, "--standalone", f"--nproc-per-node={nproc_per_node}", *entry]
    if not rdzv_endpoint or not rdzv_id:
        raise ValueError("a multi-node torchrun needs a rendezvous endpoint and id")
    return [torchrun, f"--nnodes={nnodes}", f"--nproc-per-node={nproc_per_node}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={rdzv_id}", "--max-restarts=0", *entry]


def srun_command(agent: list[str], nodes: int, *, cpus_per_task: int | None = None,
                 gpus_per_node: int | None = None) -> list[str]:
    """One job step with one task (a torchrun agent) on each of ``nodes`` nodes. ``--kill-on-bad-exit``:
    a failed agent ends the step at once instead of leaving the others waiting in a collective;
    ``--export=ALL`` keeps the environment (PATH, PYTHONPATH, OMP_NUM_THREADS); ``--overlap``: the step
    shares the first node's cores with the step the command itself runs in (Snakemake's job-step
    executor starts it with ``srun -n1``), which only waits for it."""
    cmd = ["srun", f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
           "--export=ALL", "--overlap"]
    if cpus_per_task:
        cmd.append(f"--cpus-per-task={cpus_per_task}")
    if gpus_per_node:
        cmd.append(f"--gpus-per-node={gpus_per_node}")
    return [*cmd, *agent]


def _scontrol_fields(*args: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", *args], capture_output=True, text=True, check=True).stdout
    return dict(tok.split("=", 1) for tok in out.split() if "=" in tok)


def allocation_nodes(job_id: str) -> list[str]:
    """Node names of a SLURM job, in allocation order (the batch script runs on the first). Read through
    ``scontrol`` from the job id alone, not from SLURM_JOB_NODELIST: Snakemake's job-step executor removes
    the SLURM_* variables from the rule's command, and the ``srun -n1`` step it starts the command in
    sets them to that step's single node."""
    nodelist = _scontrol_fields("job", "-o", str(job_id)).get("NodeList", "")
    if not nodelist or nodelist == "(null)":
        raise RuntimeError(f"SLURM job {job_id} has no nodes yet (scontrol shows NodeList={nodelist!r})")
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                         check=True).stdout
    return out.split()


def node_address(node: str) -> str:
    """The address other nodes reach ``node`` at (its NodeAddr; the node name where SLURM gives none):
    node names need not resolve (several slurmd on one host, clusters that name nodes apart from hosts)."""
    addr = _scontrol_fields("node", "-o", node).get("NodeAddr", "")
    return addr or node
