"""A run's own files under its ``out_dir`` (metrics.jsonl, evals.jsonl, prune.jsonl, events.jsonl,
branch_metrics.jsonl) and its console lines. Rank 0 writes; every row written is also handed to the
run's trackers (TensorBoard, W&B: :mod:`cptscale.train.tracking`), which mirror it. These files, not
the trackers, are what the store ingests."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

#: the row files a fresh start removes (with the done marker), so no row of a failed attempt survives
RUN_FILES = ("metrics.jsonl", "evals.jsonl", "prune.jsonl", "events.jsonl", "branch_metrics.jsonl", "done.json")


class Tracker(Protocol):
    """Something that mirrors the run's rows (a trainer callback): called on rank 0 only."""

    def record(self, file: str, row: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def launch_info() -> dict[str, str | None]:
    """Which launch this is: torchrun's run id, the SLURM job, the host (run provenance)."""
    import socket

    return {"torchrun_id": os.environ.get("TORCHELASTIC_RUN_ID"), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "host": socket.gethostname()}


class RunLog:
    def __init__(self, out_dir: Path, run_id: str, is_rank0: bool) -> None:
        self.out_dir, self.run_id, self.is_rank0 = out_dir, run_id, is_rank0
        self.trackers: list[Tracker] = []

    def log(self, msg: str) -> None:
        if self.is_rank0:
            print(f"[cptscale train {self.run_id}] {msg}", flush=True)

    def append(self, name: str, row: dict[str, Any]) -> None:
        if not self.is_rank0:
            return
        with open(self.out_dir / name, "a") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()
        for t in self.trackers:
            t.record(name, row)

    def event(self, event: str, launch: bool = True, **fields: Any) -> None:
        """A line of events.jsonl (resumed, stopped, failed, ...), with the launch's provenance."""
        self.append("events.jsonl", {"event": event, **fields, "time": time.time(), **(launch_info() if launch else {})})

    def rows(self, name: str) -> list[dict[str, Any]]:
        p = self.out_dir / name
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []

    def replay(self, name: str, keep: Callable[[dict[str, Any]], bool]) -> None:
        """Hand the kept rows of ``name`` to the trackers again (a resumed run's rows at its resume step)."""
        if self.is_rank0:
            for row in filter(keep, self.rows(name)):
                for t in self.trackers:
                    t.record(name, row)

    def close(self) -> None:
        for t in self.trackers:
            t.close()
        self.trackers = []

    def drop_all(self) -> None:
        """A fresh start: drop the rows (and the done marker) of a failed or superseded attempt."""
        for name in RUN_FILES:
            if self.is_rank0 and (self.out_dir / name).exists():
                (self.out_dir / name).unlink()

    def recent_losses(self, n: int = 20) -> list[float]:
        return [r["loss"] for r in self.rows("metrics.jsonl")][-n:]

    def truncate(self, step: int, branch_starts: dict[int, int], *, redo_eval: bool = False) -> None:
        """Drop rows written after the checkpoint we resume from (they will be recomputed). Rows of a
        WSD branch (key ``branch``) stay if the branch started before ``step`` (it completed before the
        main run went on), else they go (the branch is redone). ``redo_eval``: the main evaluations at
        ``step`` go too (a resume from the final checkpoint evaluates it again)."""
        if not self.is_rank0:
            return
        from cptscale.util import atomic_write

        def main_or_branch(keep_main: Callable[[dict[str, Any]], bool]) -> Callable[[dict[str, Any]], bool]:
            def keep(r: dict[str, Any]) -> bool:
                if "branch" in r:
                    start = branch_starts.get(int(r["branch"]))
                    return start is not None and start < step
                return keep_main(r)
            return keep

        for name, keep in (("metrics.jsonl", lambda r: r["step"] < step),
                           ("evals.jsonl", main_or_branch(lambda r: r["step"] < step + (0 if redo_eval else 1))),
                           ("prune.jsonl", lambda r: r["step"] < step),
                           ("branch_metrics.jsonl", main_or_branch(lambda r: False))):
            p = self.out_dir / name
            if p.exists():
                lines = [ln for ln in p.read_text().splitlines() if ln.strip() and keep(json.loads(ln))]
                atomic_write(p, "".join(ln + "\n" for ln in lines))

    def branch_results(self, totals: list[int], tokens_per_step: int) -> list[dict[str, Any]]:
        """done.json's ``branches``: per WSD branch its steps, tokens, FLOPs and final validation
        losses, read back from the ``branch`` rows of evals.jsonl (branches run before a resume
        are in the file only)."""
        rows: dict[int, dict[str, Any]] = {}
        for r in self.rows("evals.jsonl"):
            if "branch" in r:
                d = rows.setdefault(int(r["branch"]), {"final_loss": {}})
                d["final_loss"][r["lang"]] = r["loss"]
                d["flops_spent"], d["flops_spent_6nd"] = r.get("flops"), r.get("flops_6nd")
        return [{"steps": t, "tokens": t * tokens_per_step, **rows.get(t, {"final_loss": {}})} for t in totals]
