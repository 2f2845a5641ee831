"""Experiment tracking as a trainer callback: every row the run log writes (training steps, WSD branch
steps, evaluations per language, prune events) is mirrored to TensorBoard event files under
``<out_dir>/tensorboard/`` (on unless run.json's ``logging.tensorboard`` is false) and, when
``logging.wandb`` is set, to a W&B run (``mode: offline`` writes under ``<out_dir>/wandb/``).

The run's jsonl files, ingested into the DuckDB store, stay the source of truth; trackers only mirror
them, with the same step numbers (``step`` of metrics.jsonl: the 0-based step index; of evals.jsonl:
steps done). A resumed run purges what it recomputes (see :class:`TensorBoardTracker`); a fresh start
removes the old event files with the other rows."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cptscale.runspec import RunSpec

#: metrics.jsonl fields mirrored under ``train/`` (a WSD branch: the same tags in its own directory)
TRAIN_FIELDS = ("loss", "lr", "grad_norm", "tokens_per_s", "mfu")
#: evals.jsonl fields mirrored under ``eval/<lang>/``
EVAL_FIELDS = ("loss", "bpb", "ppl")
TENSORBOARD_DIR = "tensorboard"


def scalars(file: str, row: dict[str, Any]) -> Iterator[tuple[str, float]]:
    """(tag, value) pairs of one run-log row; fields that are null (MFU on CPU, bpb without bytes) are left out."""
    if file in ("metrics.jsonl", "branch_metrics.jsonl"):
        pairs = [(f"train/{k}", row.get(k)) for k in TRAIN_FIELDS]
    elif file == "evals.jsonl":
        pairs = [(f"eval/{row['lang']}/{k}", row.get(k)) for k in EVAL_FIELDS]
    elif file == "prune.jsonl":
        pairs = [("prune/params", row.get("params")), ("prune/calib_loss_after", row.get("calib_loss_after"))]
    else:
        pairs = []
    for tag, v in pairs:
        if v is not None:
            yield tag, float(v)


class TensorBoardTracker:
    """The main run's events in ``log_dir``, each WSD branch's in ``log_dir/branch_<total>`` (a run of its
    own in TensorBoard, with the same tags: the branch curves overlay the main ones).

    A resumed run (``resume_step``) starts its event files with TensorBoard's purge marker at the resume
    step, so the reader drops what the interrupted attempt wrote from there on (the run recomputes it;
    the caller hands the kept rows at the resume step in again); a branch that is redone purges from its
    own first step."""

    def __init__(self, log_dir: Path, resume_step: int | None = None) -> None:
        self.log_dir, self.resume_step = log_dir, resume_step
        self.writers: dict[int | None, Any] = {}
        self._writer(None, resume_step)

    def _writer(self, branch: int | None, step: int | None):
        if branch not in self.writers:
            from torch.utils.tensorboard import SummaryWriter

            d = self.log_dir if branch is None else self.log_dir / f"branch_{branch}"
            purge = step if self.resume_step is not None else None
            self.writers[branch] = SummaryWriter(log_dir=str(d), purge_step=purge)
        return self.writers[branch]

    def record(self, file: str, row: dict[str, Any]) -> None:
        w = self._writer(row.get("branch"), int(row["step"]))
        for tag, v in scalars(file, row):
            w.add_scalar(tag, v, int(row["step"]))
        if file == "evals.jsonl":  # evaluations are rare: make them visible at once
            w.flush()

    def close(self) -> None:
        for w in self.writers.values():
            w.close()


def check_logging(spec: RunSpec) -> None:
    """W&B asked for (run.json ``logging.wandb``, whose fields RunSpec checks) without the wandb package
    stops the run before any model is built (a SpecError: a retry cannot change it)."""
    import importlib.util

    from cptscale.runspec import SpecError

    if spec.logging is not None and spec.logging.wandb is not None and importlib.util.find_spec("wandb") is None:
        raise SpecError("run.json logging.wandb is set but the wandb package is not installed: "
                        "pip install wandb, or remove logging.wandb from the study config")


class WandbTracker:
    """A W&B run named after the run id; every logged dict carries its ``step`` as the x-axis (WSD
    branches go back to their decay start, which W&B's own monotonic step would drop)."""

    def __init__(self, project: str, mode: str, out_dir: Path, run_id: str, config: dict[str, Any]) -> None:
        import wandb

        (out_dir / "wandb").mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=project, mode=mode, dir=str(out_dir), name=run_id, config=config,
                              reinit="create_new")
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def record(self, file: str, row: dict[str, Any]) -> None:
        prefix = f"branch_{row['branch']}/" if "branch" in row else ""
        data = {prefix + tag: v for tag, v in scalars(file, row)}
        if data:
            self.run.log({"step": int(row["step"]), **data})

    def close(self) -> None:
        self.run.finish()


def trackers_for(spec: RunSpec, out_dir: Path, resume_step: int | None) -> list[Any]:
    """The trackers run.json's ``logging`` asks for (rank 0 only; absent: TensorBoard). ``resume_step``:
    where a resumed run goes on (None: a fresh start, whose old event files go with its other rows)."""
    import shutil

    from cptscale.runspec import LoggingSpec

    cfg = spec.logging or LoggingSpec()
    out: list[Any] = []
    if cfg.tensorboard:
        tb = out_dir / TENSORBOARD_DIR
        if resume_step is None and tb.exists():
            shutil.rmtree(tb)
        out.append(TensorBoardTracker(tb, resume_step))
    if cfg.wandb is not None:
        config = spec.model_dump(mode="json", include={"run_id", "study", "size", "init", "lang", "replay", "shape",
                                                       "steps", "global_batch_size", "seq_length", "schedule",
                                                       "optimizer", "config_hash"})
        out.append(WandbTracker(cfg.wandb.project, cfg.wandb.mode, out_dir, spec.run_id, config))
    return out
