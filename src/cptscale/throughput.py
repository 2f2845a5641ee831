"""The planner's throughput model: job times calibrated from the study's own finished runs.

Before any run has finished, a job's time is FLOPs over an assumed rate (``slurm.cpu_flops_per_core``
per core, or ``slurm.gpu_peak_flops`` x ``slurm.assumed_mfu`` per GPU) plus a fixed overhead. Once the
store holds finished runs, the planner uses what they measured instead:

* the **step rate**: 6ND FLOPs of a run over the time its optimizer steps took (the sum over its
  training steps of tokens per step / tokens_per_s from ``train_metrics``), per core (CPU runs) or per
  GPU (GPU runs). Small models use a core far less well than large ones, so on CPUs the rate per core is
  a power law in the parameter count fitted by least squares in log space (a single median when the runs
  have one size); on GPUs it is the peak times the median measured MFU (``train_metrics.mfu``);
* the **overhead**: the median over runs of wall time (``done.json`` ``wall_s``) minus step time:
  start-up, evaluations, checkpoints.

A planned job then takes ``overhead + FLOPs / (rate(N) x cores or GPUs)``; the time limit adds a 1.5x
margin (retries get longer limits and resume from a checkpoint), so limits follow what the study needs
instead of a fixed overhead and floor per job.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: time limits are this multiple of the estimated time (a job killed at its limit resumes in its retry)
MARGIN = 1.5


@dataclass(frozen=True)
class RunThroughput:
    """What one finished run measured."""

    run_id: str
    params: int
    flops: float  #: 6ND FLOPs of the steps it trained (WSD branches included)
    step_s: float  #: seconds its optimizer steps took
    wall_s: float  #: seconds of the whole training job (start-up, evaluations, checkpoints included)
    units: int  #: cores (CPU runs) or GPUs
    gpu: bool
    mfu: float | None  #: median measured MFU (GPU runs)

    @property
    def rate(self) -> float:
        """FLOP/s per core or per GPU while stepping."""
        return self.flops / self.step_s / self.units


@dataclass(frozen=True)
class Calibration:
    """A throughput model fitted to a study's finished runs (see the module docstring)."""

    gpu: bool
    runs: int
    coef: float  #: rate per core/GPU = coef * params ** exponent
    exponent: float
    overhead_s: float
    mfu: float | None = None  #: GPU: the median measured MFU the rate comes from
    params_range: tuple[int, int] = (0, 0)

    def rate(self, params: int) -> float:
        """FLOP/s per core (per GPU) for a model of ``params`` parameters; outside the measured sizes,
        the rate of the nearest measured size (a power law fitted on a few small models is no guide to
        much larger or smaller ones)."""
        lo, hi = self.params_range
        n = min(max(float(params), lo), hi) if hi else float(params)
        return self.coef * n ** self.exponent

    def seconds(self, flops: float, params: int, units: int) -> float:
        """Estimated time of a job: overhead plus FLOPs at the calibrated rate of ``units`` cores/GPUs."""
        return self.overhead_s + flops / (self.rate(params) * units)

    def describe(self) -> str:
        unit = "GPU" if self.gpu else "core"
        lo, hi = self.params_range
        if self.gpu:
            what = f"measured MFU {self.mfu:.1%}"
        elif self.exponent:
            what = (f"{self.rate(lo):.3g}-{self.rate(hi):.3g} FLOP/s per {unit} "
                    f"(~ N^{self.exponent:.2f}, N {lo:.3g}-{hi:.3g})")
        else:
            what = f"{self.coef:.3g} FLOP/s per {unit}"
        return f"calibrated on {self.runs} finished runs: {what}, overhead {self.overhead_s:.0f} s per job"


def fit(measured: list[RunThroughput], gpu: bool, peak_flops: float | None = None) -> Calibration | None:
    """The model for GPU (``gpu``) or CPU jobs from the runs measured on that kind of device; None when
    there are none."""
    runs = [m for m in measured if m.gpu == gpu and m.step_s > 0 and m.flops > 0 and m.units > 0]
    if not runs:
        return None
    overhead = statistics.median(max(0.0, m.wall_s - m.step_s) for m in runs)
    prange = (min(m.params for m in runs), max(m.params for m in runs))
    mfus = [m.mfu for m in runs if m.mfu]
    if gpu and mfus and peak_flops:
        mfu = statistics.median(mfus)
        return Calibration(True, len(runs), peak_flops * mfu, 0.0, overhead, mfu, prange)
    sizes = {m.params for m in runs}
    if len(sizes) < 2:
        return Calibration(gpu, len(runs), statistics.median(m.rate for m in runs), 0.0, overhead, None, prange)
    xs = [math.log(m.params) for m in runs]
    ys = [math.log(m.rate) for m in runs]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    b = min(max(b, 0.0), 1.0)  # a core never gets slower per FLOP on larger models; at most linear gains
    a = my - b * mx
    return Calibration(gpu, len(runs), math.exp(a), b, overhead, None, prange)


def store_path(study_dir: str | Path) -> Path | None:
    """The study's published store (``db/runs.duckdb``), else its live store; None before any ingest."""
    for name in ("runs.duckdb", "store.duckdb"):
        p = Path(study_dir) / "db" / name
        if p.is_file():
            return p
    return None


_QUERY = """
select r.run_id, r.params, r.wall_s, coalesce(r.flops_spent_6nd, r.flops_6nd) as flops, r.config,
       sum(r.global_batch_size * r.seq_length / m.tokens_per_s) as step_s, median(m.mfu) as mfu
from runs r join train_metrics m on m.study = r.study and m.run_id = r.run_id
where r.status = 'done' and m.tokens_per_s > 0 and r.wall_s > 0
group by all
"""


def measure(db: str | Path) -> list[RunThroughput]:
    """Each finished run's measured throughput, read from a results store (read-only)."""
    import duckdb

    con = duckdb.connect(str(db), read_only=True)
    try:
        rows = con.execute(_QUERY).fetchall()
    finally:
        con.close()
    out = []
    for run_id, params, wall_s, flops, config, step_s, mfu in rows:
        spec: dict[str, Any] = json.loads(config) if isinstance(config, str) else (config or {})
        res = spec.get("resources") or {}
        lay = spec.get("layout") or {}
        world = int(lay.get("tp", 1)) * int(lay.get("pp", 1)) * int(lay.get("dp", 1))
        gpus = int(res.get("gpus") or 0)
        gpu = gpus > 0 and mfu is not None
        units = gpus if gpu else int(res.get("cpus") or world)
        if params and flops and step_s:
            out.append(RunThroughput(run_id, int(params), float(flops), float(step_s), float(wall_s), units, gpu,
                                     float(mfu) if mfu is not None else None))
    return out


_CACHE: dict[tuple[str, float, bool, float | None], Calibration | None] = {}


def study_calibration(study_dir: str | Path, gpu: bool, peak_flops: float | None = None) -> Calibration | None:
    """The calibration of a study from its store (cached per store file and modification time); None
    when the study has no finished run of that kind yet, or its store cannot be read now."""
    db = store_path(study_dir)
    if db is None:
        return None
    key = (str(db), db.stat().st_mtime, gpu, peak_flops)
    if key not in _CACHE:
        try:
            _CACHE[key] = fit(measure(db), gpu, peak_flops)
        except Exception:  # a store being rewritten, an older schema: plan with the assumed rates
            _CACHE[key] = None
    return _CACHE[key]


def time_limit_minutes(seconds: float, floor: int) -> int:
    """A job's time limit (attempt 1) for an estimated ``seconds``: the margin, whole minutes, a floor."""
    return max(floor, math.ceil(seconds * MARGIN / 60))
