"""Tiny gloo job: each rank appends 'rank launcher_pid run_id slurm_job_id' to argv[1]."""
import os
import sys

import torch
import torch.distributed as dist

dist.init_process_group("gloo")
t = torch.ones(1)
dist.all_reduce(t)
assert int(t.item()) == dist.get_world_size()
with open(sys.argv[1], "a") as f:
    f.write(f"{dist.get_rank()} {os.getppid()} {os.environ.get('TORCHELASTIC_RUN_ID')} "
            f"{os.environ.get('SLURM_JOB_ID')}\n")
dist.barrier()
dist.destroy_process_group()
