"""The training loop: scratch or CPT runs of a Megatron-Core GPTModel, TP/PP/DP, exact resume.

One code path for GPU (NCCL, bf16, Transformer Engine spec) and CPU (gloo, fp32, local spec,
``cpu_compat`` patches). Data position is the step counter: global sample i is consumed at step
i // global_batch_size, so resuming at step s reads exactly the samples an uninterrupted run would.

Pruning (run spec key ``prune``, see :func:`cptscale.train.spec.validate_prune`): at the start of an
event's step, before its forward, the trainer scores units on calibration batches (the
``calib_batches`` micro-batches of training samples consumed just before that step; the first ones
of the run at step 0), prunes to the event's shape with :mod:`cptscale.prune`, and rebuilds the DDP
wrapper and a **fresh optimizer**: Adam moments restart for the kept units (carrying them over would
mean slicing each optimizer variant's state: fp32, mixed-precision master weights, the distributed
optimizer's flat shards; IPLT-style retraining restarts it too), the LR schedule continues. An eval
at step s is the model after s steps, before any prune at s. FLOPs are counted per step at the
current shape: ``flops`` with the exact per-token count of :func:`cptscale.transfer.flops_per_token`
(the store's ``evals.flops`` convention), ``flops_6nd`` as 6 x params x tokens; both cumulative in
metrics.jsonl, evals.jsonl and checkpoints' state.json (with the current ``shape``, so a resume
rebuilds the pruned model), totals in done.json. Each prune writes a line to prune.jsonl.
"""

from __future__ import annotations

import json
import math
import os
import signal
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np


class TrainingError(RuntimeError):
    """A run that must stop (bad loss, failed gate, missing checkpoint): message says why."""


class Terminated(Exception):
    """SIGTERM received: checkpoint saved, exit non-zero so the scheduler retries."""


# ----------------------------------------------------------------------------------------------
# distributed setup
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
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            if gpu:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group("nccl" if gpu else "gloo")
        else:
            fd, path = tempfile.mkstemp(prefix="cptscale-pg-")
            os.close(fd)
            os.unlink(path)
            dist.init_process_group("gloo", init_method=f"file://{path}", world_size=1, rank=0)
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


# ----------------------------------------------------------------------------------------------
# forward/backward over micro-batches (Megatron's schedules handle PP)
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
    import torch

    return torch.triu(torch.ones(1, 1, seq, seq, dtype=torch.bool, device=device()), diagonal=1)


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


# ----------------------------------------------------------------------------------------------
# data-parallel wrapper and optimizer (Megatron-Core's, on GPU and CPU alike)
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


# ----------------------------------------------------------------------------------------------
class Trainer:
    """One run described by a validated run.json dict."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        lay = spec["layout"]
        self.tp, self.pp = int(lay["tp"]), int(lay["pp"])
        self.out_dir = Path(spec["out_dir"])
        self.ckpt_dir = Path(spec["checkpoint"]["dir"])
        self._term = False
        self.on_step = None  # test hook: called with the number of completed steps

    # -- helpers ------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        import torch.distributed as dist

        return dist.get_rank()

    def log(self, msg: str) -> None:
        if self.rank == 0:
            print(f"[cptscale train {self.spec['run_id']}] {msg}", flush=True)

    def _append(self, name: str, obj: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        with open(self.out_dir / name, "a") as fh:
            fh.write(json.dumps(obj) + "\n")
            fh.flush()

    def _sigterm(self, signum, frame) -> None:
        if self._term and signum == signal.SIGINT:  # a second Ctrl-C: stop now (periodic checkpoint kept)
            raise KeyboardInterrupt
        self._term = True

    # -- main ---------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        import torch
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        from cptscale.prune import PrunedShape
        from cptscale.schedule import lr_at
        from cptscale.train import checkpoint as ck
        from cptscale.train.data import build_train_dataset
        from cptscale.train.model import build_model, use_gpu
        from cptscale.train.spec import make_schedule

        spec = self.spec
        t_start = time.time()
        setup_parallel(self.tp, self.pp, int(spec["seed"]))
        if not use_gpu():
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        dp = ps.get_data_parallel_world_size()
        want_dp = int(spec["layout"]["dp"])
        if dp != want_dp:
            raise TrainingError(f"layout.dp is {want_dp} but the launch gives data-parallel size {dp}")
        mb, gb, seq = int(spec["micro_batch_size"]), int(spec["global_batch_size"]), int(spec["seq_length"])
        n_micro = gb // (mb * dp)
        bf16 = spec.get("precision", "auto") == "bf16" or (spec.get("precision", "auto") == "auto" and use_gpu())
        dist_opt = use_gpu() and bool(spec.get("distributed_optimizer", True))
        latest = ck.latest_checkpoint(self.ckpt_dir)
        ck_state = ck.read_state(latest) if latest is not None else {}
        prune_events = {int(e["step"]): e["shape"] for e in (spec.get("prune") or {}).get("events", [])}
        # the model is built at the checkpoint's shape (pruned runs), else the spec's
        cur_shape = dict(ck_state.get("shape") or spec["shape"])
        if latest is not None:
            self._check_resume_shape(cur_shape, prune_events, int(ck_state["step"]), latest)
        self.cur_shape = cur_shape
        model = wrap_ddp(build_model(cur_shape, int(spec["vocab_size"]), seq,
                                     init_std=float(spec.get("init_std", 0.02)), tp=self.tp, pp=self.pp, bf16=bf16),
                         distributed_optimizer=dist_opt)
        schedule = make_schedule(spec["schedule"])
        start_step, resumed_from = 0, None
        if latest is not None:
            ck.load_weights(latest, model)
        else:
            for name in ("metrics.jsonl", "evals.jsonl", "prune.jsonl", "events.jsonl"):  # a fresh start: drop logs of a failed attempt
                if self.rank == 0 and (self.out_dir / name).exists():
                    (self.out_dir / name).unlink()
            if spec["init"] == "cpt":
                ck.load_weights(spec["parent"]["checkpoint"], model)
                self.log(f"initialised from parent checkpoint {spec['parent']['checkpoint']}")
        opt = build_optimizer(model, spec["optimizer"], lr_at(schedule, 0), bf16=bf16, distributed_optimizer=dist_opt)
        if latest is not None:
            start_step = ck.load_full(latest, model, opt)
            resumed_from = start_step
            self.log(f"resumed from {latest} at step {start_step}")
            self._append("events.jsonl", {"event": "resumed", "step": start_step, "checkpoint": str(latest),
                                          "time": time.time(), **_launch_info()})
        if resumed_from is not None:
            self._truncate_logs(start_step)

        train_ds = build_train_dataset(spec)
        eval_steps = {int(s) for s in spec["eval"].get("steps", [])}
        steps = int(spec["steps"])
        tokens_per_step = gb * seq
        val_cache: dict[str, Any] = {}
        n_params, fpt = self._shape_cost(cur_shape)
        flops = float(ck_state.get("flops", start_step * tokens_per_step * fpt))
        flops_6nd = float(ck_state.get("flops_6nd", 6.0 * n_params * start_step * tokens_per_step))

        def ck_extra() -> dict[str, Any]:
            return {"shape": cur_shape, "flops": flops, "flops_6nd": flops_6nd}

        def do_eval(step: int) -> dict[str, float]:
            from cptscale.evaluate import evaluate_model

            res = {}
            for lang, v in spec["eval"].get("languages", {}).items():
                r = evaluate_model(model, v["prefix"], seq, int(spec["eval"].get("micro_batch_size", mb)),
                                   val_bytes=v.get("bytes"), max_tokens=spec["eval"].get("max_tokens"),
                                   cache=val_cache)
                rec = {"step": step, "tokens": step * tokens_per_step, "lang": lang, **r, "params": n_params,
                       "flops": flops, "flops_6nd": flops_6nd}
                self._append("evals.jsonl", rec)
                res[lang] = r["loss"]
            return res

        def do_prune(step: int) -> None:
            """Prune to the event's shape at the start of ``step``; new DDP wrapper, fresh optimizer."""
            nonlocal model, opt, cur_shape, n_params, fpt
            from cptscale import prune as P

            t0 = time.time()
            before = P.model_shape(model)
            target = P.resolve_target(before, prune_events[step])
            if target == before:
                self.log(f"prune event at step {step}: model already has shape {target.as_dict()}")
                return
            pr = spec["prune"]
            kind = pr.get("importance", "activation")
            n_cal = max(1, min(int(pr.get("calib_batches", 4)), (steps * gb) // mb))
            first = max(0, step * gb - n_cal * mb)  # the samples consumed just before this step
            calib = [collate([train_ds[first + m * mb + j] for j in range(mb)]) for m in range(n_cal)]
            with torch.no_grad():
                ls0, lc0 = run_microbatches(model, calib, seq, mb, forward_only=True)
            scores = P.compute_importance(model, calib, kind)
            if dist.get_world_size() > 1:  # every DP rank must prune the same units
                for f in ("groups", "channels", "layers"):
                    t = getattr(scores, f).to(device())
                    dist.broadcast(t, src=0)
                    setattr(scores, f, t.cpu())
            plan = P.plan_pruning(model, target, scores)
            p_before = n_params
            model = wrap_ddp(P.apply_plan(model, plan), distributed_optimizer=dist_opt)
            opt = build_optimizer(model, spec["optimizer"], lr_at(schedule, step), bf16=bf16,
                                  distributed_optimizer=dist_opt)
            cur_shape = target.as_dict()
            self.cur_shape = cur_shape
            n_params, fpt = self._shape_cost(cur_shape)
            with torch.no_grad():
                ls1, lc1 = run_microbatches(model, calib, seq, mb, forward_only=True)
            rec = {"step": step, "tokens": step * tokens_per_step, "importance": kind, "calib_batches": n_cal,
                   "calib_samples": [first, first + n_cal * mb], "shape_before": before.as_dict(),
                   "shape": cur_shape, "params_before": p_before, "params": n_params,
                   "calib_loss_before": ls0 / max(lc0, 1.0), "calib_loss_after": ls1 / max(lc1, 1.0),
                   "flops": flops, "flops_6nd": flops_6nd, "wall_s": time.time() - t0,
                   "kept": {"layers": plan.layers, "groups": plan.groups, "channels": plan.channels}}
            self._append("prune.jsonl", rec)
            self.log(f"pruned at step {step} ({kind}, {n_cal} calibration batches): {before.as_dict()} -> "
                     f"{cur_shape}, params {p_before:,} -> {n_params:,}, calibration loss "
                     f"{rec['calib_loss_before']:.4f} -> {rec['calib_loss_after']:.4f}")

        # init-sanity gate (CPT, fresh start only)
        if spec["init"] == "cpt" and resumed_from is None:
            par = spec["parent"]
            plang = par.get("lang") or spec.get("source_lang")
            if plang not in spec["eval"].get("languages", {}):
                raise TrainingError(f"init-sanity gate: no validation set for source language {plang!r} in eval.languages")
            from cptscale.evaluate import evaluate_model

            got = evaluate_model(model, spec["eval"]["languages"][plang]["prefix"], seq,
                                 int(spec["eval"].get("micro_batch_size", mb)),
                                 max_tokens=spec["eval"].get("max_tokens"), cache=val_cache)["loss"]
            exp = par.get("final_loss")
            tol = float(par.get("tolerance", 1e-3))
            if exp is not None and not abs(got - float(exp)) <= tol:
                raise TrainingError(
                    f"init-sanity gate failed: loaded checkpoint {par['checkpoint']} gives {plang} validation loss "
                    f"{got:.6f} but the source run {par.get('run_id')} recorded {float(exp):.6f} "
                    f"(|diff| {abs(got - float(exp)):.3g} > tolerance {tol:g}); the checkpoint is corrupted or "
                    "does not belong to that run"
                )
            self.log(f"init-sanity gate passed: {plang} loss {got:.6f} vs recorded {exp} (tol {tol:g})")

        if start_step == 0 and 0 in eval_steps:
            do_eval(0)

        # SIGTERM (cluster time limit, scancel) and a first Ctrl-C: finish the step, checkpoint, exit 143
        old_handlers = ({sig: signal.signal(sig, self._sigterm) for sig in (signal.SIGTERM, signal.SIGINT)}
                        if _main_thread() else {})
        every = int(spec["checkpoint"].get("every", 0) or 0)
        keep = int(spec["checkpoint"].get("keep", 2) or 2)
        spike = float(spec.get("loss_spike_factor", 0) or 0)
        recent: list[float] = self._recent_losses()
        dp_rank = ps.get_data_parallel_rank()
        proc = _proc()
        final_eval: dict[str, float] = {}
        step = start_step
        try:
            for step in range(start_step, steps):
                if step in prune_events:
                    do_prune(step)
                t0 = time.time()
                lr = lr_at(schedule, step)
                set_lr(opt, lr)
                base = step * gb + dp_rank * (gb // dp)
                batches = [collate([train_ds[base + m * mb + j] for j in range(mb)]) for m in range(n_micro)]
                model.zero_grad_buffer()
                opt.zero_grad()
                model.train()
                lsum, lcnt = run_microbatches(model, batches, seq, mb, forward_only=False)
                model.finish_grad_sync()
                t = torch.tensor([lsum, lcnt], dtype=torch.float64, device=device())
                if dp > 1:
                    dist.all_reduce(t, group=ps.get_data_parallel_group())
                loss = float(t[0] / t[1])
                if not math.isfinite(loss):
                    raise TrainingError(f"loss is {loss} at step {step}; stopping (last good checkpoint kept in {self.ckpt_dir})")
                if spike > 0 and len(recent) >= 10 and loss > spike * (sum(recent[-20:]) / len(recent[-20:])):
                    raise TrainingError(
                        f"loss spike at step {step}: {loss:.4f} > {spike:g} x recent mean "
                        f"{sum(recent[-20:]) / len(recent[-20:]):.4f}; stopping (last good checkpoint kept in {self.ckpt_dir})")
                _, gnorm, _ = opt.step()  # clips to optimizer.grad_clip on the global norm, then AdamW
                gnorm = float(gnorm) if gnorm is not None else None
                recent.append(loss)
                flops += fpt * tokens_per_step
                flops_6nd += 6.0 * n_params * tokens_per_step
                dt = time.time() - t0
                mem = (torch.cuda.max_memory_allocated() if use_gpu() else proc.memory_info().rss) if proc or use_gpu() else None
                self._append("metrics.jsonl", {
                    "step": step, "tokens": (step + 1) * tokens_per_step, "loss": loss, "lr": lr,
                    "grad_norm": gnorm, "tokens_per_s": tokens_per_step / max(dt, 1e-9), "mem_bytes": mem,
                    "mfu": self._mfu(tokens_per_step / max(dt, 1e-9)) if use_gpu() else None,
                    "params": n_params, "flops": flops, "flops_6nd": flops_6nd})
                done_steps = step + 1
                if self.on_step is not None:
                    self.on_step(done_steps)
                if done_steps in eval_steps and done_steps != steps:
                    do_eval(done_steps)
                if done_steps == steps:
                    final_eval = do_eval(done_steps)
                term = self._terminated_anywhere()
                if (every and done_steps % every == 0 and done_steps != steps) or (term and done_steps != steps):
                    ck.save_full(self.ckpt_dir, done_steps, model, opt, spec, keep=keep, extra=ck_extra())
                if term and done_steps != steps:
                    self.log(f"stop signal: checkpoint saved at step {done_steps}; a re-run resumes from it")
                    self._append("events.jsonl", {"event": "stopped", "step": done_steps, "time": time.time(),
                                                  **_launch_info()})
                    raise Terminated(f"SIGTERM/SIGINT: checkpoint saved at step {done_steps}")
        finally:
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
        if start_step >= steps:
            final_eval = do_eval(steps)
        ck.save_full(self.ckpt_dir, steps, model, opt, spec, keep=keep, extra=ck_extra())
        final = ck.save_final(self.ckpt_dir, steps, model, spec, extra={"shape": cur_shape})
        shape = PrunedShape.from_dict(spec["shape"])
        done = {"run_id": spec["run_id"], "steps": steps, "tokens": steps * tokens_per_step,
                "final_loss": final_eval, "final_checkpoint": str(final), "wall_s": time.time() - t_start,
                "params": shape.params(int(spec["vocab_size"]), tp=self.tp),
                "params_nonemb": shape.params(int(spec["vocab_size"]), embeddings=False),
                "resumed_from": resumed_from, "flops_spent": flops, "flops_spent_6nd": flops_6nd,
                "final_shape": cur_shape, "final_params": n_params, "world_size": dist.get_world_size(),
                "launch": _launch_info()}
        if self.rank == 0:
            from cptscale.util import write_json

            write_json(self.out_dir / "done.json", done)
        dist.barrier()
        return done

    def _terminated_anywhere(self) -> bool:
        """Whether any rank got SIGTERM: ranks see the signal at slightly different steps, and the
        checkpoint they then save together is a collective, so they agree at every step boundary."""
        import torch
        import torch.distributed as dist

        if dist.get_world_size() == 1:
            return self._term
        flag = torch.tensor([1.0 if self._term else 0.0], device=device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def _mfu(self, tps: float) -> float | None:
        """Model FLOPs utilisation against a nominal 989 TFLOP/s (H100 bf16 dense) per GPU."""
        import torch.distributed as dist

        from cptscale.prune import PrunedShape

        sh = PrunedShape.from_dict(getattr(self, "cur_shape", None) or self.spec["shape"])
        n = sh.params(int(self.spec["vocab_size"]))
        flops = 6 * n + 12 * sh.layers * sh.heads * int(sh.head_dim or 0) * int(self.spec["seq_length"])
        return flops * tps / (989e12 * dist.get_world_size())

    def _shape_cost(self, shape: dict[str, Any]) -> tuple[int, float]:
        """(parameters, exact training FLOPs per token) of a possibly pruned shape."""
        from cptscale.prune import PrunedShape, flops_per_token

        sh = PrunedShape.from_dict(shape)
        vocab, seq = int(self.spec["vocab_size"]), int(self.spec["seq_length"])
        return sh.params(vocab, tp=self.tp), flops_per_token(sh, vocab, seq)

    def _check_resume_shape(self, shape: dict[str, Any], events: dict[int, dict[str, Any]], step: int,
                            path: Path) -> None:
        """The checkpoint's shape must be the spec's after the prune events before ``step``."""
        from cptscale.prune import PrunedShape, resolve_target
        from cptscale.train.checkpoint import CheckpointError

        want = PrunedShape.from_dict(self.spec["shape"])
        for s in sorted(events):
            if s < step:
                want = resolve_target(want, events[s])
        got = PrunedShape.from_dict(shape)
        if got != want:
            raise CheckpointError(
                f"{path} holds a model of shape {got.as_dict()} but this spec's prune events give "
                f"{want.as_dict()} at step {step}: the spec changed since the checkpoint was written; "
                "restore it or start the run afresh (remove its checkpoint dir)")

    def _recent_losses(self) -> list[float]:
        p = self.out_dir / "metrics.jsonl"
        if not p.exists():
            return []
        return [json.loads(line)["loss"] for line in p.read_text().splitlines() if line.strip()][-20:]

    def _truncate_logs(self, step: int) -> None:
        """Drop log lines written after the checkpoint we resume from (they will be recomputed)."""
        if self.rank != 0:
            return
        for name, keep in (("metrics.jsonl", lambda r: r["step"] < step), ("evals.jsonl", lambda r: r["step"] <= step),
                           ("prune.jsonl", lambda r: r["step"] < step)):
            p = self.out_dir / name
            if p.exists():
                lines = [ln for ln in p.read_text().splitlines() if ln.strip() and keep(json.loads(ln))]
                from cptscale.util import atomic_write

                atomic_write(p, "".join(ln + "\n" for ln in lines))


def _launch_info() -> dict[str, str | None]:
    """Which launch this is: torchrun's run id, the SLURM job, the host (run provenance)."""
    import socket

    return {"torchrun_id": os.environ.get("TORCHELASTIC_RUN_ID"), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "host": socket.gethostname()}


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _proc():
    try:
        import psutil

        return psutil.Process()
    except Exception:
        return None


def train(spec: dict[str, Any]) -> dict[str, Any]:
    try:
        return Trainer(spec).run()
    finally:
        teardown_parallel()
