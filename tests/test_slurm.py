"""Real SLURM tests: a one-node cluster on localhost (scripts/local-slurm.sh) + snakemake --executor slurm.

Toy workflow (tests/workflows/slurm): jobs get their own allocations, a failing job is reported
failed, a 2-rank job starts torchrun once. The study itself (the project's Snakefile and SLURM
profile): a tiny study's data, TP=2 training (2 ranks per job, one torchrun launch) and CPT transfer
metrics; and a training job killed at its time limit resumes, in the retry, from its checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "local-slurm.sh"
WORKFLOW = ROOT / "tests" / "workflows" / "slurm"
SNAKEMAKE = ROOT / ".venv" / "bin" / "snakemake"


def _run(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        pytest.fail(f"timed out after {timeout}s: {' '.join(cmd)}\n{out[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


@pytest.fixture(scope="module")
def slurm_cluster() -> Iterator[None]:
    if os.geteuid() != 0:
        pytest.skip("local SLURM needs root")
    if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        pytest.skip("no apt-get and no slurmctld: not Debian")
    was_running = subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True, text=True).stdout
    started_here = "slurmctld: running" not in was_running
    res = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        pytest.skip(f"could not start local SLURM: {res.stderr.strip()[-1000:]}")
    yield
    if started_here:
        subprocess.run(["bash", str(SCRIPT), "stop"], check=False)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    d = tmp_path / "wf"
    shutil.copytree(WORKFLOW, d)
    return d


def _snakemake(workdir: Path, *targets: str, timeout: float = 150) -> subprocess.CompletedProcess[str]:
    flags = subprocess.run(["bash", str(SCRIPT), "env"], capture_output=True, text=True, check=True).stdout.split()
    env = dict(os.environ, CPTSCALE_PYTHON=sys.executable)
    cmd = [str(SNAKEMAKE), "--snakefile", str(workdir / "Snakefile"), "--directory", str(workdir),
           *targets, "--jobs", "4", "--latency-wait", "5", *flags]
    return _run(cmd, timeout, env)


def test_jobs_run_on_slurm(slurm_cluster: None, workdir: Path) -> None:
    res = _snakemake(workdir, "agg.txt")
    assert res.returncode == 0, res.stdout[-4000:]
    lines = (workdir / "agg.txt").read_text().split("\n")
    ids = [ln.split()[1] for ln in lines if ln.strip()]
    assert len(ids) == 3 and all(i.isdigit() for i in ids), lines
    assert len(set(ids)) == 3  # each job its own SLURM allocation


def test_failing_job_reported(slurm_cluster: None, workdir: Path) -> None:
    res = _snakemake(workdir, "fail.txt")
    assert res.returncode != 0
    assert "fail_rule" in res.stdout
    assert not (workdir / "fail.txt").exists()


def test_torchrun_launched_once(slurm_cluster: None, workdir: Path) -> None:
    res = _snakemake(workdir, "ranks.txt", timeout=200)
    assert res.returncode == 0, res.stdout[-4000:]
    rows = [ln.split() for ln in (workdir / "ranks.txt").read_text().splitlines() if ln.strip()]
    assert sorted(r[0] for r in rows) == ["0", "1"], rows
    assert len({r[1] for r in rows}) == 1, f"more than one torchrun launcher: {rows}"
    assert len({r[2] for r in rows}) == 1, rows
    assert rows[0][3].isdigit(), rows


# -- the study itself -------------------------------------------------------------------------------
def _study_config(tmp_path: Path) -> Path:
    """The micro study at one tiny size trained with TP=2 (two gloo ranks per job), plus a size whose
    scratch run outlasts a 1-minute time limit. Time limits: 1 minute x attempt (no overhead)."""
    raw = yaml.safe_load((ROOT / "tests" / "configs" / "micro.yaml").read_text())
    raw.update(study="slurm-micro", results_dir=str(tmp_path / "results"))
    raw["ladder"] = {"sizes": ["d32l2", "d48l2"]}
    raw["replay"] = {"ratios": [0.25]}
    raw["budget"]["tokens"] = {"d32l2": 40_960, "d48l2": 3_000_000}
    raw["train"]["checkpoint_every"] = 20
    raw["parallel"] = {"default": {"tp": 2, "pp": 1, "dp": 1}, "per_size": {"d48l2": {"tp": 1, "pp": 1, "dp": 1}}}
    raw["slurm"] = {"gpus": False, "min_runtime_minutes": 1, "runtime_overhead_minutes": 0,
                    "cpu_flops_per_core": 1e15}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def study(slurm_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("slurm-study")
    cfg = _study_config(tmp)
    return cfg, tmp / "results" / "slurm-micro"


def _study_snakemake(cfg: Path, *targets: str, timeout: float) -> subprocess.CompletedProcess[str]:
    flags = subprocess.run(["bash", str(SCRIPT), "env"], capture_output=True, text=True, check=True).stdout.split()
    cmd = [str(SNAKEMAKE), *targets, "--profile", "workflow/profiles/slurm", "--configfile", str(cfg),
           "--jobs", "4", "--latency-wait", "5", *flags]
    return _run(cmd, timeout, dict(os.environ))


def test_study_on_slurm_tp2_one_torchrun_per_job(study: tuple[Path, Path]) -> None:
    cfg, sdir = study
    res = _study_snakemake(cfg, str(sdir / "runs" / "d32l2-cpt-zh-r0.25" / "transfer.json"), timeout=900)
    assert res.returncode == 0, res.stdout[-6000:]
    jobs = set()
    for run in ("d32l2-scratch-en", "d32l2-scratch-zh", "d32l2-cpt-zh-r0.25"):
        done = json.loads((sdir / "runs" / run / "done.json").read_text())
        assert done["world_size"] == 2, done
        assert done["launch"]["slurm_job_id"] and done["launch"]["torchrun_id"], done
        jobs.add(done["launch"]["slurm_job_id"])
        log = (sdir / "logs" / "train" / f"{run}.log").read_text()
        assert log.count("launching 2 ranks with torchrun") == 1, log[-3000:]
        evals = [json.loads(x) for x in (sdir / "runs" / run / "evals.jsonl").read_text().splitlines()]
        assert {e["lang"] for e in evals} == {"en", "zh"}
    assert len(jobs) == 3  # each training run its own SLURM allocation
    transfer = json.loads((sdir / "runs" / "d32l2-cpt-zh-r0.25" / "transfer.json").read_text())
    assert transfer["forgetting"], transfer.keys()


def test_time_limit_kill_resumes_from_checkpoint(study: tuple[Path, Path]) -> None:
    """d48l2's scratch run needs ~2 minutes but its first attempt gets a 1-minute limit: SLURM sends
    SIGTERM, the trainer checkpoints and exits, Snakemake resubmits with 2 minutes, and the retry
    continues from the checkpoint instead of step 0."""
    cfg, sdir = study
    run = "d48l2-scratch-en"
    res = _study_snakemake(cfg, str(sdir / "runs" / run / "done.json"), timeout=1200)
    assert res.returncode == 0, res.stdout[-6000:]
    done = json.loads((sdir / "runs" / run / "done.json").read_text())
    events = [json.loads(x) for x in (sdir / "runs" / run / "events.jsonl").read_text().splitlines()]
    stopped = [e for e in events if e["event"] == "stopped"]
    resumed = [e for e in events if e["event"] == "resumed"]
    assert stopped and resumed, events
    # the retry resumed from the checkpoint written on SIGTERM (not a periodic one), in another SLURM job
    assert done["resumed_from"] == stopped[-1]["step"] == resumed[-1]["step"] > 0, (done, events)
    assert stopped[-1]["slurm_job_id"] != resumed[-1]["slurm_job_id"] == done["launch"]["slurm_job_id"]
    steps = [json.loads(x)["step"] for x in (sdir / "runs" / run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(done["steps"]))
