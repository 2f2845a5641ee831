"""The training loop: scratch or CPT runs of a Megatron-Core GPTModel, TP/PP/DP, exact resume.

One code path for GPU (NCCL, bf16, Transformer Engine spec) and CPU (gloo, fp32, local spec,
``cpu_compat`` patches). Data position is the step counter: global sample i is consumed at step
i // global_batch_size, so resuming at step s reads exactly the samples an uninterrupted run would.

The trainer is made of parts it calls (state lives on them and on the trainer, not in closures):
:meth:`Trainer.train_step` (the one step of the main run and of WSD branches), :mod:`~cptscale.train.guards`
(loss and update checks), :mod:`~cptscale.train.checkpointer`, :mod:`~cptscale.train.evaluate` (the
evaluator), :mod:`~cptscale.train.pruner`, :mod:`~cptscale.train.branches` (WSD branch runner),
:mod:`~cptscale.train.meter` (FLOP counter, throughput/MFU), :mod:`~cptscale.train.runlog` (the run's
files) with :mod:`~cptscale.train.tracking` (TensorBoard/W&B mirrors); Megatron-Core primitives are in
:mod:`~cptscale.train.step` and :mod:`~cptscale.train.parallel`.

Pruning (run spec key ``prune``, see :class:`cptscale.runspec.PruneSpec`): at the start of an
event's step, before its forward, the trainer scores units on calibration batches (the
``calib_batches`` micro-batches of training samples consumed just before that step; the first ones
of the run at step 0), prunes to the event's shape with :mod:`cptscale.prune`, and rebuilds the DDP
wrapper and a **fresh optimizer**: Adam moments restart for the kept units (carrying them over would
mean slicing each optimizer variant's state: fp32, mixed-precision master weights, the distributed
optimizer's flat shards; IPLT-style retraining restarts it too), the LR schedule continues. An eval
at step s is the model after s steps, before any prune at s. FLOPs are counted per step at the
current shape: ``flops`` with the exact per-token count of :func:`cptscale.compute.flops_per_token`
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

import contextlib
import math
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cptscale.runspec import RunSpec
from cptscale.train.errors import Terminated, TrainingError
from cptscale.train.guards import update_problem
from cptscale.train.parallel import device, setup_parallel, teardown_parallel
from cptscale.train.runlog import RunLog, launch_info
from cptscale.train.step import build_optimizer, collate, run_microbatches, set_lr, wrap_ddp

__all__ = ["Terminated", "Trainer", "TrainingError", "teardown_parallel", "train"]


class Trainer:
    """One run described by a run.json dict, read through :class:`~cptscale.runspec.RunSpec`. The run's
    state (step, model, optimizer, FLOP counter, recent losses, pending checkpoint) lives on the trainer
    and its parts: the loss guard, the checkpointer, the evaluator, the pruner, the WSD branch runner,
    the throughput meter and the run log with its trackers. :meth:`train_step` is the one step of the
    main run and of the branches.

    Test hooks (fault injection only; None in production): ``on_step(done_steps)`` after every main
    step, ``on_branch_step(branch_total, done_steps)`` after every WSD branch step; ``schedule`` and
    ``model`` are attributes so such a hook can inject an LR jump or a gradient fault."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.raw = spec  # run.json as given (checkpoints and provenance record it); read through self.spec
        self.spec: RunSpec | None = None  # the typed spec (set in run())
        self._term = False
        self.on_step = None  # test hook: called with the number of completed steps
        self.on_branch_step = None  # test hook: called with (branch total steps, completed steps)
        self.schedule = None  # the main run's LR schedule (set in run())
        self.model = None  # the DDP-wrapped model (set in run(), replaced by a prune)
        self.opt = None  # its optimizer (replaced by a prune)

    @property
    def rank(self) -> int:
        import torch.distributed as dist

        return dist.get_rank()

    # -- the step -----------------------------------------------------------------------------
    def train_step(self, step: int, lr: float, *, pending: Path | None, where: str = "") -> dict[str, Any]:
        """Forward/backward on step ``step``'s batch at ``lr``, the loss guard, the optimizer update and
        its guard; counts the step's FLOPs and returns its metrics row. A failed guard stops the run
        (``pending``: the unverified checkpoint whose weights gave this loss, rejected; ``where``
        prefixes the reason)."""
        t0 = time.time()
        loss = self._forward_backward(step, lr)
        problem = self.guard.problem(step, loss)
        if problem:
            self.ckpt.fail(where + problem, step, pending)
        ok, gnorm, _ = self.opt.step()  # clip to optimizer.grad_clip on the global norm, then AdamW
        gnorm = float(gnorm) if gnorm is not None else None
        problem = update_problem(step, loss, ok, gnorm)
        if problem:  # the weights this update produced are never saved
            self.ckpt.fail(where + problem, step, pending)
        self.guard.record(loss)
        self.counter.add(self.tokens_per_step)
        return {"step": step, "tokens": (step + 1) * self.tokens_per_step, "loss": loss, "lr": lr, "grad_norm": gnorm,
                **self.meter.measure(time.time() - t0, self.counter.shape), **self.counter.totals()}

    def _forward_backward(self, step: int, lr: float) -> float:
        """Loss of the current weights on step ``step``'s batch (gradients left in the buffers). Global
        sample i is consumed at step i // global_batch_size, so a resumed run reads what an
        uninterrupted one would."""
        import torch
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        set_lr(self.opt, lr)
        base = step * self.gb + self.dp_rank * (self.gb // self.dp)
        batches = [collate([self.train_ds[base + m * self.mb + j] for j in range(self.mb)])
                   for m in range(self.n_micro)]
        self.model.zero_grad_buffer()
        self.opt.zero_grad()
        self.model.train()
        lsum, lcnt = run_microbatches(self.model, batches, self.seq, self.mb, forward_only=False)
        self.model.finish_grad_sync()
        t = torch.tensor([lsum, lcnt], dtype=torch.float64, device=device())
        if self.dp > 1:
            dist.all_reduce(t, group=ps.get_data_parallel_group())
        return float(t[0] / t[1])

    def evaluate(self, step: int, branch: int | None = None) -> dict[str, float]:
        return self.evaluator(self.model, step, self.counter.totals(), branch=branch)

    def check_final_eval(self, losses: dict[str, float], step: int, where: str, pending: Path | None) -> None:
        bad = {lang: v for lang, v in losses.items() if not math.isfinite(v)}
        if bad:
            self.ckpt.fail(f"{where}final validation loss is not finite ({bad})", step, pending)

    # -- the run ------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        self._validate()
        t_start = time.time()
        self._setup()
        try:
            self._build_model()
            self._build_parts()
            self._init_sanity_gate()
            self._init_unseen_tokens()
            if self.start_step == 0 and 0 in self.evaluator.steps:
                self.evaluate(0)
            # SIGTERM (cluster time limit, scancel) and a first Ctrl-C: finish the step, checkpoint, exit 143;
            # past the loop the handlers stay: a SIGTERM then (training is over) only sets a flag, so the
            # final evaluation, checkpoint and done.json are finished within SLURM's grace period
            with self._stop_handlers():
                final_eval = self._loop()
                return self._finish(final_eval, t_start)
        finally:
            self.runlog.close()

    def _validate(self) -> None:
        from cptscale.runspec import SpecError
        from cptscale.train.tracking import check_logging

        try:  # bad input (e.g. a CPT spec without the parent's final loss) before any expensive work
            self.spec = RunSpec.parse(self.raw, f"run.json of {self.raw.get('run_id')}")
        except SpecError as exc:
            raise TrainingError(str(exc)) from None
        check_logging(self.spec)  # a SpecError: the launcher records it as a failure a retry cannot change

    def _setup(self) -> None:
        """Process groups, deterministic kernels on CPU, the data-parallel layout, the run log and the
        checkpoint dir (stale checkpoints of another config set aside) before any checkpoint is read."""
        import torch
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        from cptscale.train.checkpointer import Checkpointer
        from cptscale.train.model import use_gpu

        spec = self.spec
        self.tp, self.pp = spec.layout.tp, spec.layout.pp
        self.out_dir = Path(spec.out_dir)
        self.steps, self.mb, self.gb, self.seq = spec.steps, spec.micro_batch_size, spec.global_batch_size, spec.seq_length
        self.tokens_per_step = self.gb * self.seq
        setup_parallel(self.tp, self.pp, spec.seed)
        self.gpu = use_gpu()
        if not self.gpu:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.dp = ps.get_data_parallel_world_size()
        want_dp = spec.layout.dp
        if self.dp != want_dp:
            raise TrainingError(f"layout.dp is {want_dp} but the launch gives data-parallel size {self.dp}")
        self.dp_rank = ps.get_data_parallel_rank()
        self.n_micro = self.gb // (self.mb * self.dp)
        self.bf16 = spec.precision == "bf16" or (spec.precision == "auto" and self.gpu)
        self.dist_opt = self.gpu and spec.distributed_optimizer
        self.runlog = RunLog(self.out_dir, spec.run_id, self.rank == 0)
        self.ckpt = Checkpointer(spec, self.raw, self.runlog)
        if self.rank == 0:
            self.ckpt.prepare()
        dist.barrier()

    def _build_model(self) -> None:
        """The model at the resume checkpoint's shape (pruned runs) or the spec's, its weights (the
        checkpoint's, the CPT parent's or fresh), the optimizer; ``start_step`` is where training goes on."""
        from cptscale.train import checkpoint as ck
        from cptscale.train.model import build_model

        spec = self.spec
        latest = self.ckpt.find_latest()
        shape = dict(self.ckpt.state.get("shape") or spec.shape.model_dump(exclude_unset=True))
        if latest is not None:
            self._check_resume_shape(shape, int(self.ckpt.state["step"]), latest)
        self.shape = shape
        self.model = wrap_ddp(build_model(shape, spec.vocab_size, self.seq, init_std=spec.init_std, tp=self.tp,
                                          pp=self.pp, bf16=self.bf16, arch=spec.arch),
                              distributed_optimizer=self.dist_opt)
        self.schedule = spec.schedule.make()
        self.start_step, self.resumed_from = 0, None
        if latest is not None:
            ck.load_weights(latest, self.model)
        else:
            self.runlog.drop_all()
            if self.ckpt.stale is not None:
                self.runlog.event("stale_checkpoints_moved", launch=False, to=str(self.ckpt.stale))
            if spec.init == "cpt":
                ck.load_weights(spec.parent.checkpoint, self.model)
                self.runlog.log(f"initialised from parent checkpoint {spec.parent.checkpoint}")
        self.opt = self._make_optimizer(self.model, 0)
        if latest is not None:
            self.start_step = self.resumed_from = ck.load_full(latest, self.model, self.opt)
            self.runlog.log(f"resumed from {latest} at step {self.start_step}")
            self.runlog.event("resumed", step=self.start_step, checkpoint=str(latest))

    def _make_optimizer(self, model, step: int):
        from cptscale.schedule import lr_at

        return build_optimizer(model, self.spec.optimizer.model_dump(), lr_at(self.schedule, step), bf16=self.bf16,
                               distributed_optimizer=self.dist_opt)

    def _build_parts(self) -> None:
        """What the loop calls: branch runner, data, evaluator, FLOP counter, pruner, loss guard, meter,
        and the trackers that mirror the run log (TensorBoard, W&B)."""
        import torch.distributed as dist

        from cptscale.train.branches import BranchRunner
        from cptscale.train.data import build_train_dataset
        from cptscale.train.evaluate import Evaluator
        from cptscale.train.guards import LossGuard
        from cptscale.train.meter import FlopCounter, ThroughputMeter
        from cptscale.train.pruner import Pruner
        from cptscale.train.tracking import trackers_for

        spec, start, tps = self.spec, self.start_step, self.tokens_per_step
        self.branches = BranchRunner(self, start)
        if self.resumed_from is not None:  # from the final checkpoint, the final evaluation is redone (_loop):
            # its rows go first, else evals.jsonl holds them twice (and transfer.json its rows twice)
            self.runlog.truncate(start, self.branches.starts(), redo_eval=start >= self.steps)
        self.train_ds = build_train_dataset(self.raw)
        self.evaluator = Evaluator(spec, self.runlog, tps)
        self.counter = FlopCounter.at(self.shape, spec.vocab_size, self.seq, self.tp)
        st = self.ckpt.state
        self.counter.flops = float(st.get("flops", start * tps * self.counter.flops_per_token))
        self.counter.flops_6nd = float(st.get("flops_6nd", 6.0 * self.counter.params * start * tps))
        self.pruner = Pruner(spec, self.runlog, self.train_ds, self.dist_opt, self.tp)
        self.guard = LossGuard(float(spec.loss_spike_factor or 0), self.runlog.recent_losses())
        self.meter = ThroughputMeter(spec, tps, self.tp, dist.get_world_size(), self.gpu)
        if self.rank == 0:
            self.runlog.trackers = trackers_for(spec, self.out_dir, self.resumed_from)
            if self.resumed_from is not None:  # the evaluations at the resume step are not recomputed
                self.runlog.replay("evals.jsonl", lambda r: r["step"] == start and "branch" not in r)

    def _init_sanity_gate(self) -> None:
        """CPT, fresh start only: the loaded parent must give the source language's validation loss the
        parent run recorded (RunSpec made sure parent.final_loss is a number)."""
        spec = self.spec
        if spec.init != "cpt" or self.resumed_from is not None:
            return
        par = spec.parent
        plang = par.lang or spec.source_lang
        if plang not in self.evaluator.languages:
            raise TrainingError(f"init-sanity gate: no validation set for source language {plang!r} in eval.languages")
        got = self.evaluator.loss(self.model, plang)
        exp = float(par.final_loss)
        tol = float(par.tolerance if par.tolerance is not None else 1e-3)
        if not abs(got - exp) <= tol:
            raise TrainingError(
                f"init-sanity gate failed: loaded checkpoint {par.checkpoint} gives {plang} validation loss "
                f"{got:.6f} but the source run {par.run_id} recorded {exp:.6f} "
                f"(|diff| {abs(got - exp):.3g} > tolerance {tol:g}); the checkpoint is corrupted or "
                "does not belong to that run"
            )
        self.runlog.log(f"init-sanity gate passed: {plang} loss {got:.6f} vs recorded {exp} (tol {tol:g})")

    def _init_unseen_tokens(self) -> None:
        """CPT, fresh start, ``parent.unseen_tokens == "mean"``: rows of token ids the source never trained on
        start at the mean of the seen rows (cptscale.train.vocab_init), after the gate checked the checkpoint
        as saved; then a fresh optimizer (mixed-precision and distributed optimizers copy the weights when
        they are built)."""
        spec = self.spec
        par = spec.parent
        if spec.init != "cpt" or self.resumed_from is not None or par is None or par.unseen_tokens == "keep":
            return
        from cptscale.train.vocab_init import reset_unseen_rows, seen_tokens

        try:
            seen = seen_tokens(par.source_data, spec.vocab_size)
        except (FileNotFoundError, ValueError) as exc:
            raise TrainingError(f"parent.unseen_tokens: {exc}") from None
        n = reset_unseen_rows(self.model, seen)
        self.opt = self._make_optimizer(self.model, 0)
        self.runlog.log(f"unseen tokens: {n} of {len(seen)} ids never occur in the source data; their embedding and "
                        "output rows start at the mean of the seen rows")
        self.runlog.event("unseen_tokens_reset", launch=False, step=0, ids=n, vocab=len(seen), source_data=list(par.source_data))

    def _loop(self) -> dict[str, float]:
        """Main steps from ``start_step``: prune events and WSD branches at their steps, then the step,
        its metrics row, evaluations, checkpoints and the stop signal. Returns the final evaluation."""
        from cptscale.schedule import lr_at

        steps, final_eval = self.steps, {}
        for step in range(self.start_step, steps):
            if step in self.pruner.events:
                self._prune(step)
            self.branches.run_due(step)
            row = self.train_step(step, lr_at(self.schedule, step), pending=self.ckpt.pending)
            self.ckpt.verify_pending({"step": step, "loss": row["loss"], "grad_norm": row["grad_norm"],
                                      "time": time.time()})
            self.runlog.append("metrics.jsonl", row)
            done = step + 1
            if self.on_step is not None:
                self.on_step(done)
            if done in self.evaluator.steps and done != steps:
                self.evaluate(done)
            if done == steps:
                final_eval = self.evaluate(done)
            stopping = self.terminated_anywhere()
            if self.ckpt.due(done, steps, stopping):
                self.ckpt.save(done, self.model, self.opt, self.counter.checkpoint_extra())
            if stopping and done != steps:
                self.runlog.log(f"stop signal: checkpoint saved at step {done}; a re-run resumes from it")
                self.runlog.event("stopped", step=done)
                raise Terminated(f"SIGTERM/SIGINT: checkpoint saved at step {done}")
        if self.start_step >= steps:
            final_eval = self.evaluate(steps)
        return final_eval

    def _prune(self, step: int) -> None:
        """Prune to the event's shape at the start of ``step``; new DDP wrapper, fresh optimizer (Adam
        moments restart, the LR schedule continues)."""
        new = self.pruner(step, self.model, lambda model: self._make_optimizer(model, step), self.counter)
        if new is not None:
            self.model, self.opt = new

    def _finish(self, final_eval: dict[str, float], t_start: float) -> dict[str, Any]:
        """The final checkpoint (verified by a finite final evaluation) and done.json."""
        import torch.distributed as dist

        from cptscale.prune import PrunedShape

        spec, steps = self.spec, self.steps
        self.check_final_eval(final_eval, steps, "", self.ckpt.pending)
        final = self.ckpt.save_end(steps, self.model, self.opt, self.counter.checkpoint_extra(), final_eval)
        shape = PrunedShape.from_dict(spec.shape.model_dump(exclude_unset=True))
        done = {"run_id": spec.run_id, "steps": steps, "tokens": steps * self.tokens_per_step,
                "final_loss": final_eval, "final_checkpoint": str(final), "wall_s": time.time() - t_start,
                "params": shape.params(spec.vocab_size, tp=self.tp),
                "params_nonemb": shape.params(spec.vocab_size, embeddings=False),
                "resumed_from": self.resumed_from, "flops_spent": self.counter.flops,
                "flops_spent_6nd": self.counter.flops_6nd, "final_shape": self.counter.shape,
                "final_params": self.counter.params, "world_size": dist.get_world_size(), "launch": launch_info()}
        if self.branches.schedules:
            done["branches"] = self.runlog.branch_results(sorted(self.branches.schedules), self.tokens_per_step)
        if self.rank == 0:
            from cptscale.util import provenance, stable_hash, write_json

            done["provenance"] = provenance(spec.config_hash, {"run.json": stable_hash(self.raw)})
            write_json(self.out_dir / "done.json", done)
        dist.barrier()
        return done

    # -- stop signals -------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        if self._term and signum == signal.SIGINT:  # a second Ctrl-C: stop now (periodic checkpoint kept)
            raise KeyboardInterrupt
        self._term = True

    @contextlib.contextmanager
    def _stop_handlers(self) -> Iterator[None]:
        import threading

        main_thread = threading.current_thread() is threading.main_thread()
        old = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)} if main_thread else {}
        try:
            yield
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)

    def terminated_anywhere(self) -> bool:
        """Whether any rank got SIGTERM: ranks see the signal at slightly different steps, and the
        checkpoint they then save together is a collective, so they agree at every step boundary."""
        import torch
        import torch.distributed as dist

        if dist.get_world_size() == 1:
            return self._term
        flag = torch.tensor([1.0 if self._term else 0.0], device=device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def _check_resume_shape(self, shape: dict[str, Any], step: int, path: Path) -> None:
        """The checkpoint's shape must be the spec's after the prune events before ``step``."""
        from cptscale.prune import PrunedShape, resolve_target
        from cptscale.train.checkpoint import CheckpointError

        events = {e.step: e.shape for e in (self.spec.prune.events if self.spec.prune else [])}
        want = PrunedShape.from_dict(self.spec.shape.model_dump(exclude_unset=True))
        for s in sorted(events):
            if s < step:
                want = resolve_target(want, events[s])
        got = PrunedShape.from_dict(shape)
        if got != want:
            raise CheckpointError(
                f"{path} holds a model of shape {got.as_dict()} but this spec's prune events give "
                f"{want.as_dict()} at step {step}: the spec changed since the checkpoint was written; "
                "restore it or start the run afresh (remove its checkpoint dir)")


def train(spec: dict[str, Any]) -> dict[str, Any]:
    try:
        return Trainer(spec).run()
    finally:
        teardown_parallel()
