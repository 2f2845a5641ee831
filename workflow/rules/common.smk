# Helpers shared by the rules: everything is derived from CFG (the typed study config).


def run_resources(run_id, attempt):
    """SLURM/local resources of one training job, from the run's size and layout."""
    r = RUNS[run_id]
    res = {
        "mem_mb": r.mem_gb * 1024,
        "runtime": r.runtime_minutes * attempt,
        "tasks": 1,  # torchrun starts the ranks: one launcher task per node
        "cpus_per_task": max(1, r.gpus * CFG.slurm.cpus_per_gpu) if r.gpus > 1 else 1,
    }
    if CFG.slurm.partition:
        res["slurm_partition"] = CFG.slurm.partition
    if CFG.slurm.account:
        res["slurm_account"] = CFG.slurm.account
    return res


def train_gpus(run_id):
    return RUNS[run_id].gpus
