"""Real SLURM test: a one-node cluster on localhost (scripts/local-slurm.sh) + snakemake --executor slurm."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

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
