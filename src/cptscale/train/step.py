"""Megatron-Core step primitives: batches to tensors, forward/backward over micro-batches (Megatron's
schedules handle PP), the DDP wrapper and the optimizer. No run state: the trainer, the evaluator and
bench/train.py all call these."""

from __future__ import annotations

from functools import lru_cache, partial
from typing import Any

import numpy as np

from cptscale.train.parallel import device


def _to_tensor(x, dtype):
    import torch

    return x.to(dtype) if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x), dtype=dtype)


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    import torch

    dev = device()
    out = {}
    for key, dt in (("tokens", torch.long), ("labels", torch.long), ("loss_mask", torch.float32),
                    ("position_ids", torch.long)):
        out[key] = torch.stack([_to_tensor(it[key], dt) for it in items]).to(dev)
    return out


def _causal_mask(seq: int):
    return _mask_on(seq, str(device()))


@lru_cache(maxsize=8)
def _mask_on(seq: int, dev: str):
    """Built once per sequence length and device, not per micro-batch (attention only reads it)."""
    import torch

    return torch.triu(torch.ones(1, 1, seq, seq, dtype=torch.bool, device=dev), diagonal=1)


def _loss_func(loss_mask, output_tensor):
    losses = output_tensor.float()
    total = (losses * loss_mask).sum()
    count = loss_mask.sum()
    return total / count.clamp(min=1), {"sum": total.detach(), "count": count.detach()}


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    seq = batch["tokens"].shape[1]
    out = model(batch["tokens"], batch["position_ids"], _causal_mask(seq), labels=batch["labels"])
    return out, partial(_loss_func, batch["loss_mask"])


def run_microbatches(model, batches: list[dict[str, Any]], seq_length: int, micro_batch_size: int,
                     forward_only: bool) -> tuple[float, float]:
    """Forward (and backward) over the micro-batches; returns (sum of token losses, token count)
    summed over this data-parallel rank, identical on every rank of the model-parallel group."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    fb = get_forward_backward_func()
    reduced = fb(forward_step_func=_forward_step, data_iterator=iter(batches), model=model,
                 num_microbatches=len(batches), seq_length=seq_length, micro_batch_size=micro_batch_size,
                 forward_only=forward_only)
    t = torch.zeros(2, dtype=torch.float64, device=device())
    if ps.is_pipeline_last_stage():
        for r in reduced:
            t[0] += r["sum"].double()
            t[1] += r["count"].double()
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(t, group=ps.get_pipeline_model_parallel_group())
    return float(t[0]), float(t[1])


def wrap_ddp(model, *, distributed_optimizer: bool):
    """Megatron-Core's DistributedDataParallel: contiguous fp32 grad buffers, DP all-reduce (or
    reduce-scatter for the distributed optimizer) in ``finish_grad_sync``."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=distributed_optimizer)
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)


def build_optimizer(model, opt: dict[str, Any], lr: float, *, bf16: bool = False,
                    distributed_optimizer: bool = False):
    """AdamW through ``get_megatron_optimizer``: decoupled weight decay on matrices only (Megatron
    exempts 1-D parameters: norms), gradient clipping on the global norm across TP/PP shards.
    Build it after the weights are loaded: mixed-precision and distributed optimizers copy the
    model's parameters into their fp32 master weights when they are created."""
    import torch
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(
        optimizer="adam", lr=lr, weight_decay=float(opt.get("weight_decay", 0.0)),
        adam_beta1=float(opt.get("beta1", 0.9)), adam_beta2=float(opt.get("beta2", 0.95)),
        adam_eps=float(opt.get("eps", 1e-8)), clip_grad=float(opt.get("grad_clip", 0.0) or 0.0),
        bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=distributed_optimizer,
    )
    return get_megatron_optimizer(config, [model])


def set_lr(opt, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr
