"""Structured pruning at the run spec's prune events (see :mod:`cptscale.prune`): score units on
calibration batches, prune to the event's shape, new DDP wrapper and a fresh optimizer; one row of
prune.jsonl per event."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from cptscale.train.meter import FlopCounter
from cptscale.train.runlog import RunLog
from cptscale.train.step import collate, run_microbatches, wrap_ddp

if TYPE_CHECKING:
    from cptscale.runspec import RunSpec


class Pruner:
    def __init__(self, spec: RunSpec, runlog: RunLog, train_ds, distributed_optimizer: bool, tp: int) -> None:
        pr = spec.prune
        self.events: dict[int, dict[str, Any]] = {e.step: e.shape for e in pr.events} if pr else {}
        self.importance = pr.importance if pr else "activation"
        self.vocab, self.runlog, self.train_ds, self.dist_opt, self.tp = spec.vocab_size, runlog, train_ds, distributed_optimizer, tp
        self.mb, self.gb, self.seq = spec.micro_batch_size, spec.global_batch_size, spec.seq_length
        n_cal = pr.calib_batches if pr and pr.calib_batches is not None else 4
        self.calib_batches = max(1, min(n_cal, (spec.steps * self.gb) // self.mb))

    def _calibration(self, step: int) -> tuple[int, list[dict[str, Any]]]:
        """The micro-batches of samples consumed just before ``step`` (the run's first ones at step 0)."""
        first = max(0, step * self.gb - self.calib_batches * self.mb)
        return first, [collate([self.train_ds[first + m * self.mb + j] for j in range(self.mb)])
                       for m in range(self.calib_batches)]

    def _calib_loss(self, model, calib: list[dict[str, Any]]) -> float:
        import torch

        with torch.no_grad():
            s, c = run_microbatches(model, calib, self.seq, self.mb, forward_only=True)
        return s / max(c, 1.0)

    def __call__(self, step: int, model, make_optimizer: Callable[[Any], Any], counter: FlopCounter):
        """Prune at the start of ``step``; returns the new (model, optimizer), or None if the model already
        has the event's shape. ``counter`` moves to the new shape's cost."""
        import torch.distributed as dist

        from cptscale import prune as P
        from cptscale.train.parallel import device

        t0 = time.time()
        before = P.model_shape(model)
        target = P.resolve_target(before, self.events[step])
        if target == before:
            self.runlog.log(f"prune event at step {step}: model already has shape {target.as_dict()}")
            return None
        first, calib = self._calibration(step)
        loss_before = self._calib_loss(model, calib)
        scores = P.compute_importance(model, calib, self.importance)
        if dist.get_world_size() > 1:  # every DP rank must prune the same units
            for f in ("groups", "channels", "layers"):
                t = getattr(scores, f).to(device())
                dist.broadcast(t, src=0)
                setattr(scores, f, t.cpu())
        plan = P.plan_pruning(model, target, scores)
        p_before = counter.params
        model = wrap_ddp(P.apply_plan(model, plan), distributed_optimizer=self.dist_opt)
        opt = make_optimizer(model)
        counter.reshape(target.as_dict(), self.vocab, self.seq, self.tp)
        n_cal = self.calib_batches
        rec = {"step": step, "tokens": step * self.gb * self.seq, "importance": self.importance,
               "calib_batches": n_cal, "calib_samples": [first, first + n_cal * self.mb],
               "shape_before": before.as_dict(), "shape": counter.shape, "params_before": p_before,
               "params": counter.params, "calib_loss_before": loss_before,
               "calib_loss_after": self._calib_loss(model, calib), "flops": counter.flops,
               "flops_6nd": counter.flops_6nd, "wall_s": time.time() - t0,
               "kept": {"layers": plan.layers, "groups": plan.groups, "channels": plan.channels}}
        self.runlog.append("prune.jsonl", rec)
        self.runlog.log(f"pruned at step {step} ({self.importance}, {n_cal} calibration batches): {before.as_dict()} "
                        f"-> {counter.shape}, params {p_before:,} -> {counter.params:,}, calibration loss "
                        f"{rec['calib_loss_before']:.4f} -> {rec['calib_loss_after']:.4f}")
        return model, opt
