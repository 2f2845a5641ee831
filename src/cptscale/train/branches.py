"""WSD decay branches inside one run: at a branch's decay start the full state is snapshotted, the
branch's decay steps run (the trainer's own ``train_step``, on the batches the main run would see),
every language is evaluated at its end, and the snapshot is restored so the main run is unchanged."""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable
from typing import Any, Protocol

from cptscale.train.errors import Terminated


class BranchHost(Protocol):
    """What a branch needs of the trainer that runs it (the Trainer is one): its step, state and parts.
    A protocol rather than an import of the engine, so the engine can own a runner without a cycle."""

    schedule: Any
    runlog: Any
    ckpt: Any
    model: Any
    opt: Any
    counter: Any
    guard: Any
    on_branch_step: Callable[[int, int], None] | None

    @property
    def rank(self) -> int: ...
    def train_step(self, step: int, lr: float, *, pending: Any, where: str = "") -> dict[str, Any]: ...
    def terminated_anywhere(self) -> bool: ...
    def evaluate(self, step: int, branch: int | None = None) -> dict[str, float]: ...
    def check_final_eval(self, losses: dict[str, float], step: int, where: str, pending: Any) -> None: ...


class BranchRunner:
    def __init__(self, trainer: BranchHost, start_step: int) -> None:
        self.trainer = trainer
        self.schedules = {b.total_steps: b for b in trainer.schedule.branch_schedules()}
        # branches still to run (those starting before the resume point are complete)
        self.due: dict[int, list[int]] = {}
        for total, sb in self.schedules.items():
            if sb.decay_start >= start_step:
                self.due.setdefault(sb.decay_start, []).append(total)

    def starts(self) -> dict[int, int]:
        """Decay start step of every branch (which rows of a resumed run's logs are complete)."""
        return {t: b.decay_start for t, b in self.schedules.items()}

    def run_due(self, step: int) -> None:
        for total in self.due.get(step, []):
            self.run(total, step)

    def run(self, total: int, start: int) -> None:
        """WSD decay branch ending at ``total``: snapshot the full state at ``start`` (its decay
        start), train steps start..total-1 with the branch's LRs on the main run's data, evaluate
        every language, then restore the snapshot so the main run continues exactly as without
        the branch. No checkpoint is written inside a branch: on a stop signal the snapshot (the
        main run's state at ``start``) becomes ``step_<start>`` and a re-run redoes the branch."""
        import torch.distributed as dist

        from cptscale.schedule import lr_at

        tr = self.trainer
        where = f"WSD branch of {total} steps: "
        tr.runlog.log(f"WSD branch of {total} steps: snapshot at step {start}, decay over steps {start}..{total - 1}")
        snap = tr.ckpt.snapshot(start, tr.model, tr.opt, tr.counter.checkpoint_extra(), name=f"branch_{total}")
        saved_recent, saved_counter = list(tr.guard.recent), copy.deepcopy(tr.counter)
        try:
            for s in range(start, total):
                row = tr.train_step(s, lr_at(self.schedules[total], s), pending=None, where=where)
                tr.runlog.append("branch_metrics.jsonl", {**row, "branch": total})
                if tr.on_branch_step is not None:
                    tr.on_branch_step(total, s + 1)
                if s + 1 < total and tr.terminated_anywhere():
                    tr.ckpt.promote(snap, start)
                    tr.runlog.log(f"stop signal inside WSD branch {total}: main-run checkpoint step_{start} kept; "
                                  "a re-run resumes there and redoes the branch")
                    tr.runlog.event("stopped", step=start, branch=total)
                    raise Terminated(f"SIGTERM/SIGINT inside WSD branch {total}: checkpoint step_{start} kept")
            res = tr.evaluate(total, branch=total)
            tr.check_final_eval(res, total, where, pending=None)
            tr.runlog.log(f"WSD branch of {total} steps done: validation loss "
                          + ", ".join(f"{k} {v:.4f}" for k, v in res.items()))
        except BaseException:  # every rank stops here together (global losses, collective stop flag)
            if tr.rank == 0 and snap.exists():
                shutil.rmtree(snap, ignore_errors=True)
            raise
        tr.ckpt.restore(snap, tr.model, tr.opt)
        tr.guard.recent, tr.counter = saved_recent, saved_counter
        dist.barrier()  # every rank has read the snapshot
        if tr.rank == 0:
            shutil.rmtree(snap, ignore_errors=True)
