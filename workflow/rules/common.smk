# Helpers shared by the rules: everything is derived from CFG (the typed study config).

from cptscale.util import read_json


def _slurm_common():
    res = {}
    if CFG.slurm.partition:
        res["slurm_partition"] = CFG.slurm.partition
    if CFG.slurm.account:
        res["slurm_account"] = CFG.slurm.account
    return res


def _from_spec(key, per_attempt=False, scale=1):
    """A training job's resource, read from its run.json (the plan wrote it there): the same code
    serves the study's grid and the fit's suggested next run, whose shape is known only after the fit.
    Snakemake evaluates it once run.json exists."""

    def resource(wildcards, input, attempt):
        value = read_json(input.spec)["resources"][key] * scale
        return value * attempt if per_attempt else value

    return resource


def train_resources():
    """Per-job resources of `train`, from each run's size and layout (cptscale.plan.job_resources).

    One node per run and one launcher task per node: `cptscale train` starts torchrun once, which
    starts tp*pp*dp ranks. GPU jobs therefore set no `tasks` (the SLURM executor plugin turns `tasks`
    on a GPU job into --ntasks-per-gpu, one launcher per GPU) but `gpu`, and give the single task
    every core (`cpus_per_task`, which the plugin prefers over `cpus_per_gpu`); CPU jobs set one task
    with all the ranks' cores. The time limit grows with the attempt, so a retry after a time-limit
    kill (which checkpointed on SIGTERM) gets longer."""
    res = {
        "mem_mb": _from_spec("mem_gb", scale=1024),
        "runtime": _from_spec("runtime_minutes", per_attempt=True),
        "cpus_per_task": _from_spec("cpus"),
        **_slurm_common(),
    }
    if CFG.slurm.gpus:
        res["gpu"] = _from_spec("gpus")
    else:
        res["tasks"] = 1
    return res


def run_world(wc):
    """Ranks of a run (local scheduling counts them as threads), from its planned layout (IPLT arms use
    the layout of the size they prune); the next run uses the default layout."""
    if wc.run in RUNS:
        r = RUNS[wc.run]
        return r.tp * r.pp * r.dp
    return CFG.parallel.default.world


#: torch threads per rank
TRAIN_OMP_THREADS = CFG.slurm.cpus_per_gpu if CFG.slurm.gpus else CFG.slurm.threads_per_rank
