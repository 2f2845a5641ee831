# Helpers shared by the rules: everything is derived from CFG (the typed study config).

from cptscale.util import read_json


def slurm_common():
    """Partition and account from the study config (``slurm.partition``/``slurm.account``): the Snakefile
    gives them to every rule that does not set its own."""
    res = {}
    if CFG.slurm.partition:
        res["slurm_partition"] = CFG.slurm.partition
    if CFG.slurm.account:
        res["slurm_account"] = CFG.slurm.account
    return res


def _planned_resource(key, per_attempt=False, scale=1):
    """A training job's resource. Runs of the study's grid take it from the plan of the current config
    (so a new runtime estimate or thread count applies at once: resources are not part of run.json's
    rerun trigger, and a run.json written earlier may hold older values); the fit's suggested next run,
    whose shape is known only after the fit, from its run.json (Snakemake evaluates it once that exists)."""

    def resource(wildcards, input, attempt):
        if wildcards.run in RUNS:
            value = getattr(RUNS[wildcards.run], key) * scale
        else:
            value = read_json(input.spec)["resources"][key] * scale
        return value * attempt if per_attempt else value

    return resource


def train_resources():
    """Per-job resources of `train`, from each run's size and layout (cptscale.runs.job_resources).

    `nodes` nodes per run (more than one when tp*pp*dp exceeds a node) and one launcher task per node:
    `cptscale train` starts torchrun once on a single node, or one srun step of one torchrun agent per
    node (c10d rendezvous) on several. GPU jobs therefore set no `tasks` (the SLURM executor plugin
    turns `tasks` on a GPU job into --ntasks-per-gpu, one launcher per GPU; without it sbatch gives one
    task per node) but `gpu` (all the run's GPUs), and give each task its node's cores
    (`cpus_per_task`, which the plugin prefers over `cpus_per_gpu`); CPU jobs set one task per node.
    Memory is per node. (The plugin starts the rule's command once, with `srun -n1`.) The time limit
    grows with the attempt, so a retry after a time-limit kill (which checkpointed on SIGTERM) gets
    longer."""
    if CFG.train.backend == "simulate":  # a simulated run is one small process, whatever the model size
        return {"mem_mb": 1024, "runtime": 10, "cpus_per_task": 1, "tasks": 1}
    res = {
        "mem_mb": _planned_resource("mem_gb", scale=1024),
        "runtime": _planned_resource("runtime_minutes", per_attempt=True),
        "cpus_per_task": _planned_resource("cpus"),
        "nodes": _planned_resource("nodes"),
    }
    if CFG.slurm.gpus:
        res["gpu"] = _planned_resource("gpus")
    else:
        res["tasks"] = _planned_resource("nodes")
    return res


def run_world(wc):
    """Ranks of a run (local scheduling counts them as threads), from its planned layout (IPLT arms use
    the layout of the size they prune); the next run uses the default layout. A simulated run is one thread."""
    if CFG.train.backend == "simulate":
        return 1
    if wc.run in RUNS:
        r = RUNS[wc.run]
        return r.tp * r.pp * r.dp
    return CFG.parallel.default.world


#: torch threads per rank
TRAIN_OMP_THREADS = CFG.slurm.cpus_per_gpu if CFG.slurm.gpus else CFG.slurm.threads_per_rank
