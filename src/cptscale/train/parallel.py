"""Process groups and RNG: torch.distributed (gloo on CPU, NCCL on GPU) and Megatron's parallel state."""

from __future__ import annotations

import os
import tempfile

import numpy as np

from cptscale.train.errors import TrainingError


def setup_parallel(tp: int, pp: int, seed: int) -> None:
    """Initialise torch.distributed (gloo on CPU, NCCL on GPU) and Megatron's parallel state."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from cptscale.train.model import use_gpu

    gpu = use_gpu()
    if not gpu:
        from cptscale.train import cpu_compat

        cpu_compat.apply()
    if not dist.is_initialized():
        backend = "nccl" if gpu else "gloo"
        if gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend)
        else:  # one process without torchrun: a private file store, same backend as a launched run
            fd, path = tempfile.mkstemp(prefix="cptscale-pg-")
            os.close(fd)
            os.unlink(path)
            dist.init_process_group(backend, init_method=f"file://{path}", world_size=1, rank=0)
    world = dist.get_world_size()
    if world % (tp * pp):
        raise TrainingError(f"world size {world} is not a multiple of tp*pp = {tp * pp}")
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    seed_all(seed)


def seed_all(seed: int) -> None:
    import random

    import torch
    from megatron.core import parallel_state as ps

    from cptscale.train.model import use_gpu

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tp_rank = ps.get_tensor_model_parallel_rank()
    if use_gpu():
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)
    else:
        from cptscale.train import cpu_compat

        cpu_compat.seed_rng_tracker(seed, tp_rank)


def teardown_parallel() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def device():
    import torch

    from cptscale.train.model import use_gpu

    return torch.device("cuda", torch.cuda.current_device()) if use_gpu() else torch.device("cpu")


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank()
