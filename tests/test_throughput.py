"""The planner's throughput model (cptscale.throughput): the fit on measured runs, its use in `cptscale
plan`, and (slow) the calibrated estimate on a finished tiny study against the measured times."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cptscale.throughput import Calibration, RunThroughput, fit, time_limit_minutes


def _run(rid: str, params: int, rate: float, flops: float, overhead: float, units: int = 1,
         gpu: bool = False, mfu: float | None = None) -> RunThroughput:
    step_s = flops / (rate * units)
    return RunThroughput(rid, params, flops, step_s, step_s + overhead, units, gpu, mfu)


def test_cpu_fit_recovers_a_power_law_and_the_overhead() -> None:
    runs = [_run(f"r{i}", n, 1e6 * n**0.4, f, oh) for i, (n, f, oh) in
            enumerate([(1e5, 1e12, 20), (4e5, 5e12, 30), (2e6, 2e13, 25)])]
    cal = fit(runs, gpu=False)
    assert cal is not None and not cal.gpu and cal.runs == 3
    assert math.isclose(cal.exponent, 0.4, rel_tol=1e-9) and math.isclose(cal.coef, 1e6, rel_tol=1e-6)
    assert cal.overhead_s == 25
    assert math.isclose(cal.seconds(8e12, 1e6, 2), 25 + 8e12 / (2 * 1e6 * 1e6**0.4), rel_tol=1e-9)
    assert cal.rate(1e9) == cal.rate(2e6) and cal.rate(10) == cal.rate(1e5)  # no extrapolation
    assert "calibrated on 3 finished runs" in cal.describe() and "N^0.40" in cal.describe()
    assert fit(runs, gpu=True) is None  # no GPU run measured


def test_fit_bounds_and_single_size() -> None:
    falling = [_run("a", 1e5, 1e9, 1e12, 10), _run("b", 1e6, 1e8, 1e12, 10)]
    assert fit(falling, gpu=False).exponent == 0.0  # never slower per FLOP on larger models
    same = [_run("a", 1e5, 2e9, 1e12, 10), _run("b", 1e5, 4e9, 1e12, 30), _run("c", 1e5, 3e9, 1e12, 20)]
    cal = fit(same, gpu=False)
    assert cal.exponent == 0.0 and cal.coef == 3e9 and cal.overhead_s == 20


def test_gpu_fit_uses_the_measured_mfu() -> None:
    runs = [_run("g1", 1e9, 0.42 * 989e12, 1e18, 60, units=8, gpu=True, mfu=0.42),
            _run("g2", 2e9, 0.46 * 989e12, 4e18, 90, units=8, gpu=True, mfu=0.46)]
    cal = fit(runs, gpu=True, peak_flops=989e12)
    assert cal.gpu and math.isclose(cal.mfu, 0.44) and math.isclose(cal.rate(123), 0.44 * 989e12)
    assert cal.overhead_s == 75 and "measured MFU 44.0%" in cal.describe()


def test_time_limits() -> None:
    assert time_limit_minutes(600, floor=5) == 15  # 1.5 x 10 minutes
    assert time_limit_minutes(30, floor=5) == 5
    assert Calibration(False, 1, 1e9, 0.0, 60).seconds(6e11, 10, 2) == 60 + 300


@pytest.mark.slow
def test_calibrated_estimate_on_a_finished_tiny_study(tmp_path: Path) -> None:
    """Three tiny runs of different sizes, trained for real (one core each, as a CPU SLURM job would),
    ingested into the store: the study's calibration predicts each run's measured wall time, and their
    total, within 2x. (Fitted on the other two runs only, the figures are printed, not asserted: on a
    shared 2-core machine the load moves step times by more than 2x between runs.)"""
    from train_helpers import make_data, make_spec

    from cptscale.store.ingest import ingest
    from cptscale.throughput import measure, store_path, study_calibration

    pytest.importorskip("megatron.core")
    data = make_data(tmp_path / "data")
    study = tmp_path / "tiny"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for rid, hidden, heads, steps in (("d32l2-scratch-en", 32, 2, 40), ("d64l2-scratch-en", 64, 4, 30),
                                      ("d96l2-scratch-en", 96, 4, 20)):
        spec = make_spec(tmp_path, data, run_id=rid, steps=steps, hidden=hidden, heads=heads, eval_steps=[0, steps],
                         every=1000, resources={"gpus": 0, "cpus": 1, "nodes": 1, "runtime_minutes": 5, "mem_gb": 4})
        spec["out_dir"], spec["study"] = str(study / "runs" / rid), study.name
        Path(spec["out_dir"]).mkdir(parents=True)
        path = Path(spec["out_dir"]) / "run.json"
        path.write_text(json.dumps(spec))
        res = subprocess.run([sys.executable, "-m", "cptscale.cli", "train", "--spec", str(path)], env=env,
                             capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, res.stderr[-3000:]
    (study / "db").mkdir()
    rep = ingest(study, study / "db" / "store.duckdb")
    assert rep.ok, rep.errors
    measured = measure(store_path(study))
    assert len(measured) == 3 and all(m.units == 1 and not m.gpu for m in measured)
    ratios = {}
    for m in measured:
        cal = fit([o for o in measured if o.run_id != m.run_id], gpu=False)
        ratios[m.run_id] = cal.seconds(m.flops, m.params, m.units) / m.wall_s
    cal = study_calibration(study, gpu=False)
    each = {m.run_id: cal.seconds(m.flops, m.params, m.units) / m.wall_s for m in measured}
    total = sum(cal.seconds(m.flops, m.params, m.units) for m in measured) / sum(m.wall_s for m in measured)
    print(f"{cal.describe()}; predicted / measured wall time: {_r(each)}, all three {total:.2f}; "
          f"each fitted on the other two: {_r(ratios)}")
    assert all(0.5 <= r <= 2.0 for r in each.values()), each
    assert 0.5 <= total <= 2.0


def _r(d: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 2) for k, v in d.items()}
