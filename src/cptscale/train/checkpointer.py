"""The trainer's use of :mod:`cptscale.train.checkpoint`: which checkpoint a run resumes from, when it
saves, which saved checkpoint is still unverified (``pending``: its weights have not yet produced a
checked loss), and what a failure does to it (rejected, so a re-run resumes from a verified one)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from cptscale.train import checkpoint as ck
from cptscale.train.errors import TrainingError
from cptscale.train.runlog import RunLog

if TYPE_CHECKING:
    from cptscale.runspec import RunSpec


class Checkpointer:
    def __init__(self, spec: RunSpec, raw: dict[str, Any], runlog: RunLog) -> None:
        self.spec, self.raw, self.runlog = spec, raw, runlog  # checkpoints record run.json as given (raw)
        self.dir = Path(spec.checkpoint.dir)
        self.every = int(spec.checkpoint.every or 0)
        self.keep = int(spec.checkpoint.keep or 2)
        self.stale: Path | None = None  # where checkpoints of another config were moved (rank 0)
        self.latest: Path | None = None
        self.state: dict[str, Any] = {}
        self.pending: Path | None = None

    def prepare(self) -> None:
        """Rank 0, before anyone looks for a checkpoint: checkpoints written under another
        ``config_hash`` (the spec changed, so Snakemake re-runs the job) are moved aside, never
        resumed from and never deleted; leftover WSD branch snapshots of a killed run are removed; damaged
        checkpoints (manifest mismatch) are set aside."""
        if not self.dir.is_dir():
            return
        for p in self.dir.glob("branch_*"):
            shutil.rmtree(p, ignore_errors=True)
        moved = ck.set_aside_stale(self.dir, self.spec.config_hash)
        if moved is not None:
            self.stale = moved
            self.runlog.log(f"checkpoints in {self.dir} were written under another config (config_hash "
                            f"!= {self.spec.config_hash}): moved to {moved}; starting afresh")
        for msg in ck.set_aside_damaged(self.dir):  # resume only from an intact checkpoint
            self.runlog.log(msg)

    def find_latest(self) -> Path | None:
        """The checkpoint to resume from (and its state.json); an unverified one becomes ``pending``."""
        self.latest = ck.latest_checkpoint(self.dir)
        self.state = ck.read_state(self.latest) if self.latest is not None else {}
        self.pending = self.latest if self.latest is not None and not ck.is_verified(self.latest) else None
        return self.latest

    def due(self, done_steps: int, steps: int, stopping: bool) -> bool:
        return done_steps != steps and (bool(self.every and done_steps % self.every == 0) or stopping)

    def save(self, done_steps: int, model, opt, extra: dict[str, Any]) -> None:
        """A periodic (or stop-signal) checkpoint: unverified until the next step's loss is checked."""
        self.pending = ck.save_full(self.dir, done_steps, model, opt, self.raw, keep=self.keep, extra=extra)

    def verify_pending(self, info: dict[str, Any]) -> None:
        """The pending checkpoint's weights just gave a good loss and finite gradients."""
        if self.pending is not None:
            ck.mark_verified(self.pending, info)
            self.pending = None

    def fail(self, msg: str, step: int, pending: Path | None) -> NoReturn:
        """Stop the run (every rank reaches this together: losses and grad norms are global). The
        checkpoint whose weights gave the bad loss (``pending``: saved but not yet verified) is renamed
        ``rejected-step_N``, so a re-run resumes from the last verified one."""
        good = ck.latest_verified(self.dir)
        remaining = [p for _, p in ck.list_checkpoints(self.dir) if p != pending]
        parts = [msg]
        rejected = None
        if pending is not None:
            rejected = ck.reject(pending)
            parts.append(f"the checkpoint written after the bad update was moved to {rejected}")
        if good is not None:
            parts.append(f"last good checkpoint: {good} (its weights gave a finite, non-spike loss and finite gradients)")
        else:
            parts.append(f"no verified checkpoint in {self.dir}")
        parts.append(f"a re-run resumes from {remaining[-1]}" if remaining else "a re-run starts from the beginning")
        parts.append("lower the LR (or raise loss_spike_factor if the spike is expected)")
        self.runlog.event("failed", step=step, reason=msg, rejected=str(rejected) if rejected else None,
                          last_good=str(good) if good else None)
        raise TrainingError("; ".join(parts))

    def save_end(self, steps: int, model, opt, extra: dict[str, Any], final_eval: dict[str, float]) -> Path:
        """The last full checkpoint (verified by the final evaluation) and the weights-only ``final``."""
        end = ck.save_full(self.dir, steps, model, opt, self.raw, keep=self.keep, extra=extra)
        ck.mark_verified(end, {"step": steps, "eval_loss": final_eval, "time": time.time()})
        return ck.save_final(self.dir, steps, model, self.raw, extra={"shape": extra["shape"]})

    # -- WSD branch snapshots ---------------------------------------------------------------------
    def snapshot(self, step: int, model, opt, extra: dict[str, Any], name: str) -> Path:
        return ck.save_full(self.dir, step, model, opt, self.raw, keep=0, extra=extra, name=name)

    def restore(self, snap: Path, model, opt) -> None:
        ck.load_weights(snap, model)
        ck.load_full(snap, model, opt)

    def promote(self, snap: Path, step: int) -> Path:
        """A stop signal inside a WSD branch: its snapshot becomes the main run's ``step_<step>``."""
        return ck.promote(snap, step)
