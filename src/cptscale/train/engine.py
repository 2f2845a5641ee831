"""The training loop: scratch or CPT runs of a Megatron-Core GPTModel, TP/PP/DP, exact resume.

One code path for GPU (NCCL, bf16, Transformer Engine spec) and CPU (gloo, fp32, local spec,
``cpu_compat`` patches). Data position is the step counter: global sample i is consumed at step
i // global_batch_size, so resuming at step s reads exactly the samples an uninterrupted run would.

Pruning (run spec key ``prune``, see :class:`cptscale.runspec.PruneSpec`): at the start of an
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

Bad steps: a non-finite loss, a loss above ``loss_spike_factor`` x the mean of the last 20 losses
(once 10 are known), a failed optimizer update or a non-finite gradient norm stop the run with a
TrainingError. A checkpoint saved after update s-1 is *verified* only once step s's loss (computed
from its weights) and gradient norm passed these checks (or, for the last one, the final evaluation
was finite); the check that fails rejects the pending checkpoint (``rejected-step_N``) and rotation
never deletes the newest verified one, so a re-run resumes from weights known to be good (see
:mod:`cptscale.train.checkpoint`).

Config changes: checkpoints record the spec's ``config_hash`` (the planner's training hash); a run
whose spec carries another hash moves the old checkpoint dir aside (``<dir>.stale-<old hash>``,
logged in events.jsonl) and starts afresh instead of resuming another configuration's weights.

WSD decay branches (``schedule.branches``: total steps of shorter runs sharing this run's warmup and
stable phase): when the main run reaches a branch's decay start, the full state (weights, optimizer,
RNG, FLOP counters; the data position is the step) is saved with the checkpoint code as
``branch_<total>``, the branch's decay steps run on the same batches the main run would see, every
language is evaluated at the branch's end (evals.jsonl rows with ``"branch": <total>``; its training
steps go to branch_metrics.jsonl, also keyed ``branch``), and the snapshot is restored, so the main
trajectory is unchanged (main rows have no ``branch`` key). done.json lists ``branches``: steps,
tokens, FLOPs and final losses. No checkpoint is written inside a branch: a stop signal there keeps
the snapshot as the main run's ``step_<decay start>`` and a re-run redoes the branch.
"""

from __future__ import annotations

import json
import math
import os
import shutil
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
# model FLOPs utilisation
#: Peak dense bf16 FLOP/s of one GPU when the spec gives none (NVIDIA H100 SXM, without sparsity).
DEFAULT_PEAK_FLOPS = 989e12


def peak_flops(spec: dict[str, Any]) -> float:
    """Peak FLOP/s per GPU for MFU: ``resources.gpu_peak_flops`` of run.json (the planner copies the
    study's ``slurm.gpu_peak_flops``), else :data:`DEFAULT_PEAK_FLOPS`."""
    v = (spec.get("resources") or {}).get("gpu_peak_flops")
    return float(v) if v else DEFAULT_PEAK_FLOPS


def mfu_flops_per_token(shape: dict[str, Any], vocab: int, seq: int, tp: int = 1) -> float:
    """Training FLOPs per token in the standard MFU convention (Megatron-LM / PaLM appendix B):
    ``6 N + 12 L H Q S`` with N = the non-embedding parameters plus the output layer (the input
    embedding is a table lookup, no matmul, so it is excluded; the output projection is a real
    ``hidden x vocab`` matmul, so it counts), L layers, H heads of size Q, sequence length S (the
    attention score and value matmuls, forward + backward, without halving for the causal mask)."""
    from cptscale.ladder import padded_vocab
    from cptscale.prune import PrunedShape

    sh = PrunedShape.from_dict(shape)
    n = sh.params(vocab, embeddings=False, tp=tp) + padded_vocab(vocab, tp) * sh.hidden
    return 6.0 * n + 12.0 * sh.layers * sh.heads * int(sh.head_dim or 0) * seq


def mfu(shape: dict[str, Any], vocab: int, seq: int, tokens_per_s: float, n_gpus: int, peak: float,
        tp: int = 1) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s (global tokens/s x :func:`mfu_flops_per_token`)
    over the peak of all ``n_gpus`` GPUs."""
    return mfu_flops_per_token(shape, vocab, seq, tp) * tokens_per_s / (n_gpus * peak)


# ----------------------------------------------------------------------------------------------
class Trainer:
    """One run described by a validated run.json dict.

    Test hooks (fault injection only; None in production): ``on_step(done_steps)`` after every main
    step, ``on_branch_step(branch_total, done_steps)`` after every WSD branch step; ``schedule`` and
    ``model`` are attributes so such a hook can inject an LR jump or a gradient fault."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        lay = spec["layout"]
        self.tp, self.pp = int(lay["tp"]), int(lay["pp"])
        self.out_dir = Path(spec["out_dir"])
        self.ckpt_dir = Path(spec["checkpoint"]["dir"])
        self._term = False
        self.on_step = None  # test hook: called with the number of completed steps
        self.on_branch_step = None  # test hook: called with (branch total steps, completed steps)
        self.schedule = None  # the main run's LR schedule (set in run())
        self.model = None  # the DDP-wrapped model (set in run())

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

    def _fail(self, msg: str, step: int, pending: Path | None) -> None:
        """Stop the run (every rank reaches this together: losses and grad norms are global). The
        checkpoint whose weights gave the bad loss (``pending``: saved but not yet verified) is renamed
        ``rejected-step_N``, so a re-run resumes from the last verified one."""
        from cptscale.train import checkpoint as ck

        good = ck.latest_verified(self.ckpt_dir)
        remaining = [p for _, p in ck.list_checkpoints(self.ckpt_dir) if p != pending]
        parts = [msg]
        rejected = None
        if pending is not None:
            rejected = ck.reject(pending)
            parts.append(f"the checkpoint written after the bad update was moved to {rejected}")
        if good is not None:
            parts.append(f"last good checkpoint: {good} (its weights gave a finite, non-spike loss and finite gradients)")
        else:
            parts.append(f"no verified checkpoint in {self.ckpt_dir}")
        parts.append(f"a re-run resumes from {remaining[-1]}" if remaining else "a re-run starts from the beginning")
        parts.append("lower the LR (or raise loss_spike_factor if the spike is expected)")
        self._append("events.jsonl", {"event": "failed", "step": step, "reason": msg, "rejected": str(rejected)
                                      if rejected else None, "last_good": str(good) if good else None,
                                      "time": time.time(), **_launch_info()})
        raise TrainingError("; ".join(parts))

    # -- main ---------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        import torch
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        from cptscale.prune import PrunedShape
        from cptscale.runspec import RunSpec, SpecError
        from cptscale.schedule import lr_at
        from cptscale.train import checkpoint as ck
        from cptscale.train.data import build_train_dataset
        from cptscale.train.model import build_model, use_gpu

        spec = self.spec
        try:  # bad input (e.g. a CPT spec without the parent's final loss) before any expensive work
            typed = RunSpec.parse(spec, f"run.json of {spec.get('run_id')}")
        except SpecError as exc:
            raise TrainingError(str(exc)) from None
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
        if self.rank == 0:
            self._prepare_ckpt_dir()
        dist.barrier()
        latest = ck.latest_checkpoint(self.ckpt_dir)
        ck_state = ck.read_state(latest) if latest is not None else {}
        prune_events = {int(e["step"]): e["shape"] for e in (spec.get("prune") or {}).get("events", [])}
        # the model is built at the checkpoint's shape (pruned runs), else the spec's
        cur_shape = dict(ck_state.get("shape") or spec["shape"])
        if latest is not None:
            self._check_resume_shape(cur_shape, prune_events, int(ck_state["step"]), latest)
        self.cur_shape = cur_shape
        model = wrap_ddp(build_model(cur_shape, int(spec["vocab_size"]), seq,
                                     init_std=float(spec.get("init_std", 0.02)), tp=self.tp, pp=self.pp, bf16=bf16,
                                     arch=spec.get("arch")),
                         distributed_optimizer=dist_opt)
        self.model = model
        self.schedule = typed.schedule.make()
        start_step, resumed_from = 0, None
        if latest is not None:
            ck.load_weights(latest, model)
        else:
            # a fresh start: drop logs (and the marker) of a failed or superseded attempt
            for name in ("metrics.jsonl", "evals.jsonl", "prune.jsonl", "events.jsonl", "branch_metrics.jsonl",
                         "done.json"):
                if self.rank == 0 and (self.out_dir / name).exists():
                    (self.out_dir / name).unlink()
            if getattr(self, "_stale", None) is not None:
                self._append("events.jsonl", {"event": "stale_checkpoints_moved", "to": str(self._stale),
                                              "time": time.time()})
            if spec["init"] == "cpt":
                ck.load_weights(spec["parent"]["checkpoint"], model)
                self.log(f"initialised from parent checkpoint {spec['parent']['checkpoint']}")
        opt = build_optimizer(model, spec["optimizer"], lr_at(self.schedule, 0), bf16=bf16,
                              distributed_optimizer=dist_opt)
        if latest is not None:
            start_step = ck.load_full(latest, model, opt)
            resumed_from = start_step
            self.log(f"resumed from {latest} at step {start_step}")
            self._append("events.jsonl", {"event": "resumed", "step": start_step, "checkpoint": str(latest),
                                          "time": time.time(), **_launch_info()})
        # WSD decay branches still to run (those starting before the resume point are complete)
        branch_scheds = {b.total_steps: b for b in self.schedule.branch_schedules()}
        branches_at: dict[int, list[int]] = {}
        for total, sb in branch_scheds.items():
            if sb.decay_start >= start_step:
                branches_at.setdefault(sb.decay_start, []).append(total)
        if resumed_from is not None:
            self._truncate_logs(start_step, {t: b.decay_start for t, b in branch_scheds.items()})

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

        def do_eval(step: int, branch: int | None = None) -> dict[str, float]:
            from cptscale.evaluate import evaluate_model

            res = {}
            for lang, v in spec["eval"].get("languages", {}).items():
                r = evaluate_model(model, v["prefix"], seq, int(spec["eval"].get("micro_batch_size", mb)),
                                   val_bytes=v.get("bytes"), max_tokens=spec["eval"].get("max_tokens"),
                                   cache=val_cache, tokenizer=spec.get("tokenizer"))
                rec = {"step": step, "tokens": step * tokens_per_step, "lang": lang, **r, "params": n_params,
                       "flops": flops, "flops_6nd": flops_6nd}
                if branch is not None:
                    rec["branch"] = branch
                self._append("evals.jsonl", rec)
                res[lang] = r["loss"]
            return res

        def forward_backward(step: int, lr: float) -> float:
            """Loss of the current weights on step ``step``'s batch (gradients left in the buffers)."""
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
            return float(t[0] / t[1])

        def loss_problem(step: int, loss: float) -> str | None:
            if not math.isfinite(loss):
                return f"loss is {loss} at step {step}"
            if spike > 0 and len(recent) >= 10:
                mean = sum(recent[-20:]) / len(recent[-20:])
                if loss > spike * mean:
                    return (f"loss spike at step {step}: {loss:.4f} > loss_spike_factor {spike:g} x mean of the "
                            f"last {len(recent[-20:])} losses {mean:.4f}")
            return None

        def optimizer_step(step: int, loss: float, pending: Path | None, where: str = "") -> float | None:
            """Clip to optimizer.grad_clip on the global norm, then AdamW. A failed update (non-finite
            gradients found) or a non-finite gradient norm stops the run: the weights it produced are
            never saved, and ``pending`` (the unverified checkpoint of the weights whose gradients
            these were) is rejected."""
            ok, gnorm, _ = opt.step()
            gnorm = float(gnorm) if gnorm is not None else None
            if not ok:
                self._fail(f"{where}the optimizer step at step {step} failed (non-finite gradients)", step, pending)
            if gnorm is not None and not math.isfinite(gnorm):
                self._fail(f"{where}gradient norm is {gnorm} at step {step} (the loss was {loss:.4f})", step,
                           pending)
            return gnorm

        def step_metrics(step: int, loss: float, lr: float, gnorm: float | None, dt: float) -> dict[str, Any]:
            tps = tokens_per_step / max(dt, 1e-9)
            mem = (torch.cuda.max_memory_allocated() if use_gpu() else proc.memory_info().rss) if proc or use_gpu() else None
            return {"step": step, "tokens": (step + 1) * tokens_per_step, "loss": loss, "lr": lr, "grad_norm": gnorm,
                    "tokens_per_s": tps, "mem_bytes": mem, "mfu": self._mfu(tps) if use_gpu() else None,
                    "params": n_params, "flops": flops, "flops_6nd": flops_6nd}

        def run_branch(total: int, start: int) -> None:
            """WSD decay branch ending at ``total``: snapshot the full state at ``start`` (its decay
            start), train steps start..total-1 with the branch's LRs on the main run's data, evaluate
            every language, then restore the snapshot so the main run continues exactly as without
            the branch. No checkpoint is written inside a branch: on a stop signal the snapshot (the
            main run's state at ``start``) becomes ``step_<start>`` and a re-run redoes the branch."""
            nonlocal flops, flops_6nd
            sb = branch_scheds[total]
            self.log(f"WSD branch of {total} steps: snapshot at step {start}, decay over steps {start}..{total - 1}")
            snap = ck.save_full(self.ckpt_dir, start, model, opt, spec, keep=0, extra=ck_extra(),
                                name=f"branch_{total}")
            saved = (list(recent), flops, flops_6nd)
            try:
                for s in range(start, total):
                    t0 = time.time()
                    lr = lr_at(sb, s)
                    loss = forward_backward(s, lr)
                    problem = loss_problem(s, loss)
                    if problem:
                        self._fail(f"WSD branch of {total} steps: {problem}", s, None)
                    gnorm = optimizer_step(s, loss, None, f"WSD branch of {total} steps: ")
                    recent.append(loss)
                    flops += fpt * tokens_per_step
                    flops_6nd += 6.0 * n_params * tokens_per_step
                    self._append("branch_metrics.jsonl",
                                 {**step_metrics(s, loss, lr, gnorm, time.time() - t0), "branch": total})
                    if self.on_branch_step is not None:
                        self.on_branch_step(total, s + 1)
                    if s + 1 < total and self._terminated_anywhere():
                        ck.promote(snap, start)
                        self.log(f"stop signal inside WSD branch {total}: main-run checkpoint step_{start} kept; "
                                 "a re-run resumes there and redoes the branch")
                        self._append("events.jsonl", {"event": "stopped", "step": start, "branch": total,
                                                      "time": time.time(), **_launch_info()})
                        raise Terminated(f"SIGTERM/SIGINT inside WSD branch {total}: checkpoint step_{start} kept")
                res = do_eval(total, branch=total)
                bad = {lang: v for lang, v in res.items() if not math.isfinite(v)}
                if bad:
                    self._fail(f"WSD branch of {total} steps: final validation loss is not finite ({bad})", total, None)
                self.log(f"WSD branch of {total} steps done: validation loss "
                         + ", ".join(f"{k} {v:.4f}" for k, v in res.items()))
            except BaseException:  # every rank stops here together (global losses, collective stop flag)
                if self.rank == 0 and snap.exists():
                    shutil.rmtree(snap, ignore_errors=True)
                raise
            ck.load_weights(snap, model)
            ck.load_full(snap, model, opt)
            recent[:] = saved[0]
            flops, flops_6nd = saved[1], saved[2]
            dist.barrier()  # every rank has read the snapshot
            if self.rank == 0:
                shutil.rmtree(snap, ignore_errors=True)

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
            self.model = model
            opt = build_optimizer(model, spec["optimizer"], lr_at(self.schedule, step), bf16=bf16,
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

        # init-sanity gate (CPT, fresh start only); RunSpec made sure parent.final_loss is a number
        if spec["init"] == "cpt" and resumed_from is None:
            par = spec["parent"]
            plang = par.get("lang") or spec.get("source_lang")
            if plang not in spec["eval"].get("languages", {}):
                raise TrainingError(f"init-sanity gate: no validation set for source language {plang!r} in eval.languages")
            from cptscale.evaluate import evaluate_model

            got = evaluate_model(model, spec["eval"]["languages"][plang]["prefix"], seq,
                                 int(spec["eval"].get("micro_batch_size", mb)),
                                 max_tokens=spec["eval"].get("max_tokens"), cache=val_cache)["loss"]
            exp = float(par["final_loss"])
            tol = float(par.get("tolerance", 1e-3))
            if not abs(got - exp) <= tol:
                raise TrainingError(
                    f"init-sanity gate failed: loaded checkpoint {par['checkpoint']} gives {plang} validation loss "
                    f"{got:.6f} but the source run {par.get('run_id')} recorded {exp:.6f} "
                    f"(|diff| {abs(got - exp):.3g} > tolerance {tol:g}); the checkpoint is corrupted or "
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
        # the checkpoint whose weights have not yet produced a checked loss (verified at the next step)
        pending: Path | None = latest if latest is not None and not ck.is_verified(latest) else None
        step = start_step
        try:
            for step in range(start_step, steps):
                if step in prune_events:
                    do_prune(step)
                for total in branches_at.get(step, []):
                    run_branch(total, step)
                t0 = time.time()
                lr = lr_at(self.schedule, step)
                loss_now = forward_backward(step, lr)
                problem = loss_problem(step, loss_now)
                if problem:
                    self._fail(problem, step, pending)
                gnorm = optimizer_step(step, loss_now, pending)
                if pending is not None:  # its weights just gave a good loss and finite gradients
                    ck.mark_verified(pending, {"step": step, "loss": loss_now, "grad_norm": gnorm, "time": time.time()})
                    pending = None
                recent.append(loss_now)
                flops += fpt * tokens_per_step
                flops_6nd += 6.0 * n_params * tokens_per_step
                self._append("metrics.jsonl", step_metrics(step, loss_now, lr, gnorm, time.time() - t0))
                done_steps = step + 1
                if self.on_step is not None:
                    self.on_step(done_steps)
                if done_steps in eval_steps and done_steps != steps:
                    do_eval(done_steps)
                if done_steps == steps:
                    final_eval = do_eval(done_steps)
                term = self._terminated_anywhere()
                if (every and done_steps % every == 0 and done_steps != steps) or (term and done_steps != steps):
                    pending = ck.save_full(self.ckpt_dir, done_steps, model, opt, spec, keep=keep, extra=ck_extra())
                if term and done_steps != steps:
                    self.log(f"stop signal: checkpoint saved at step {done_steps}; a re-run resumes from it")
                    self._append("events.jsonl", {"event": "stopped", "step": done_steps, "time": time.time(),
                                                  **_launch_info()})
                    raise Terminated(f"SIGTERM/SIGINT: checkpoint saved at step {done_steps}")
            # past the loop the stop handlers stay: a SIGTERM now (training is over) only sets a flag, so the
            # final evaluation, checkpoint and done.json are finished within SLURM's grace period
            if start_step >= steps:
                final_eval = do_eval(steps)
            bad = {lang: v for lang, v in final_eval.items() if not math.isfinite(v)}
            if bad:
                self._fail(f"final validation loss is not finite ({bad})", steps, pending)
            end = ck.save_full(self.ckpt_dir, steps, model, opt, spec, keep=keep, extra=ck_extra())
            ck.mark_verified(end, {"step": steps, "eval_loss": final_eval, "time": time.time()})
            final = ck.save_final(self.ckpt_dir, steps, model, spec, extra={"shape": cur_shape})
            shape = PrunedShape.from_dict(spec["shape"])
            done = {"run_id": spec["run_id"], "steps": steps, "tokens": steps * tokens_per_step,
                    "final_loss": final_eval, "final_checkpoint": str(final), "wall_s": time.time() - t_start,
                    "params": shape.params(int(spec["vocab_size"]), tp=self.tp),
                    "params_nonemb": shape.params(int(spec["vocab_size"]), embeddings=False),
                    "resumed_from": resumed_from, "flops_spent": flops, "flops_spent_6nd": flops_6nd,
                    "final_shape": cur_shape, "final_params": n_params, "world_size": dist.get_world_size(),
                    "launch": _launch_info()}
            if branch_scheds:
                done["branches"] = self._branch_results(sorted(branch_scheds), tokens_per_step)
            if self.rank == 0:
                from cptscale.util import provenance, stable_hash, write_json

                done["provenance"] = provenance(spec.get("config_hash"), {"run.json": stable_hash(spec)})
                write_json(self.out_dir / "done.json", done)
            dist.barrier()
        finally:
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
        return done

    def _prepare_ckpt_dir(self) -> None:
        """Rank 0, before anyone looks for a checkpoint: checkpoints written under another
        ``config_hash`` (the spec changed, so Snakemake re-runs the job) are moved aside, never
        resumed from and never deleted; leftover WSD branch snapshots of a killed run are removed."""
        from cptscale.train import checkpoint as ck

        self._stale = None
        if not self.ckpt_dir.is_dir():
            return
        for p in self.ckpt_dir.glob("branch_*"):
            shutil.rmtree(p, ignore_errors=True)
        moved = ck.set_aside_stale(self.ckpt_dir, self.spec.get("config_hash"))
        if moved is not None:
            self._stale = moved
            self.log(f"checkpoints in {self.ckpt_dir} were written under another config (config_hash "
                     f"!= {self.spec.get('config_hash')}): moved to {moved}; starting afresh")
        for msg in ck.set_aside_damaged(self.ckpt_dir):  # resume only from an intact checkpoint
            self.log(msg)

    def _branch_results(self, totals: list[int], tokens_per_step: int) -> list[dict[str, Any]]:
        """done.json's ``branches``: per WSD branch its steps, tokens, FLOPs and final validation
        losses, read back from the ``branch`` rows of evals.jsonl (branches run before a resume
        are in the file only)."""
        rows: dict[int, dict[str, Any]] = {}
        p = self.out_dir / "evals.jsonl"
        if p.exists():
            for line in p.read_text().splitlines():
                if line.strip():
                    r = json.loads(line)
                    if "branch" in r:
                        d = rows.setdefault(int(r["branch"]), {"final_loss": {}})
                        d["final_loss"][r["lang"]] = r["loss"]
                        d["flops_spent"], d["flops_spent_6nd"] = r.get("flops"), r.get("flops_6nd")
        return [{"steps": t, "tokens": t * tokens_per_step, **rows.get(t, {"final_loss": {}})} for t in totals]

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

    def _mfu(self, tps: float) -> float:
        """MFU of the current (possibly pruned) shape at ``tps`` global tokens/s (see :func:`mfu`)."""
        import torch.distributed as dist

        shape = getattr(self, "cur_shape", None) or self.spec["shape"]
        return mfu(shape, int(self.spec["vocab_size"]), int(self.spec["seq_length"]), tps, dist.get_world_size(),
                   peak_flops(self.spec), tp=self.tp)

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

    def _truncate_logs(self, step: int, branch_starts: dict[int, int]) -> None:
        """Drop log lines written after the checkpoint we resume from (they will be recomputed). Rows
        of a WSD branch (key ``branch``) stay if the branch started before ``step`` (it completed
        before the main run went on), else they go (the branch is redone)."""
        if self.rank != 0:
            return

        def main_or_branch(keep_main):
            def keep(r: dict[str, Any]) -> bool:
                if "branch" in r:
                    start = branch_starts.get(int(r["branch"]))
                    return start is not None and start < step
                return keep_main(r)
            return keep

        for name, keep in (("metrics.jsonl", lambda r: r["step"] < step),
                           ("evals.jsonl", main_or_branch(lambda r: r["step"] <= step)),
                           ("prune.jsonl", lambda r: r["step"] < step),
                           ("branch_metrics.jsonl", main_or_branch(lambda r: False))):
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
