"""Real SLURM tests: a one-node cluster on localhost (scripts/local-slurm.sh) + snakemake --executor slurm.

Toy workflow (tests/workflows/slurm): jobs get their own allocations, a failing job is reported
failed (by Snakemake and by SLURM), a job that requests 2 tasks starts torchrun once. The study itself
(the project's Snakefile and SLURM profile): a tiny study's data, TP=2 training whose jobs request 2
tasks (one torchrun launch with 2 ranks per job), CPT transfer metrics, every job in the partition the
study config names and the index job with data.workers cores; and a training job killed at its time
limit resumes, in the retry, from its checkpoint."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "local-slurm.sh"
WORKFLOW = ROOT / "tests" / "workflows" / "slurm"
SNAKEMAKE = ROOT / ".venv" / "bin" / "snakemake"
#: the non-default partition of the local cluster (scripts/local-slurm.sh) the study config names
PARTITION = "cpt"


def _run(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        pytest.fail(f"timed out after {timeout}s: {' '.join(cmd)}\n{out[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def _job(jid: str) -> dict[str, str]:
    """`scontrol show job` as a dict (finished jobs stay visible: MinJobAge=3600; there is no sacct)."""
    out = subprocess.run(["scontrol", "show", "job", jid], capture_output=True, text=True, check=True).stdout
    return dict(re.findall(r"(\S+?)=(\S*)", out))


def _submitted(stdout: str) -> dict[str, list[str]]:
    """SLURM job ids per rule, from the executor plugin's 'has been submitted' lines (log path rule_<name>/)."""
    jobs: dict[str, list[str]] = {}
    for jid, log in re.findall(r"has been submitted with SLURM jobid (\d+) \(log: (\S+?)\)", stdout):
        rule = re.search(r"/rule_([A-Za-z0-9_]+)/", log)
        jobs.setdefault(rule.group(1) if rule else "?", []).append(jid)
    return jobs


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


def _flags() -> list[str]:
    return subprocess.run(["bash", str(SCRIPT), "env"], capture_output=True, text=True, check=True).stdout.split()


def _snakemake(workdir: Path, *targets: str, timeout: float = 150) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, CPTSCALE_PYTHON=sys.executable)
    cmd = [str(SNAKEMAKE), "--snakefile", str(workdir / "Snakefile"), "--directory", str(workdir),
           *targets, "--jobs", "4", "--latency-wait", "5", *_flags()]
    return _run(cmd, timeout, env)


def test_jobs_run_on_slurm(slurm_cluster: None, workdir: Path) -> None:
    res = _snakemake(workdir, "agg.txt")
    assert res.returncode == 0, res.stdout[-4000:]
    lines = (workdir / "agg.txt").read_text().split("\n")
    ids = [ln.split()[1] for ln in lines if ln.strip()]
    assert len(ids) == 3 and all(i.isdigit() for i in ids), lines
    assert len(set(ids)) == 3  # each job its own SLURM allocation
    for jid in ids:  # no partition named anywhere: the cluster's default
        assert _job(jid)["Partition"] == "main"


def test_failing_job_reported(slurm_cluster: None, workdir: Path) -> None:
    """A rule exiting 1: SLURM records the job FAILED with exit code 1, the executor plugin reports that
    status, Snakemake reports the rule's error and exits non-zero, and the output does not exist."""
    res = _snakemake(workdir, "fail.txt")
    assert res.returncode != 0, res.stdout[-4000:]
    jobs = _submitted(res.stdout)
    assert list(jobs) == ["fail_rule"] and len(jobs["fail_rule"]) == 1, res.stdout[-4000:]
    jid = jobs["fail_rule"][0]
    assert re.search(r"Error in rule fail_rule:", res.stdout), res.stdout[-4000:]
    assert f"SLURM-job '{jid}' failed, SLURM status is: 'FAILED'" in res.stdout, res.stdout[-4000:]
    job = _job(jid)
    assert job["JobState"] == "FAILED" and job["ExitCode"] == "1:0", job
    assert not (workdir / "fail.txt").exists()


def test_two_task_job_launches_torchrun_once(slurm_cluster: None, workdir: Path) -> None:
    """The toy rule asks the plugin for 2 tasks: SLURM allocates 2 tasks, the plugin still runs the rule's
    command once (srun -n1), so one torchrun starts both ranks."""
    res = _snakemake(workdir, "ranks.txt", timeout=200)
    assert res.returncode == 0, res.stdout[-4000:]
    rows = [ln.split() for ln in (workdir / "ranks.txt").read_text().splitlines() if ln.strip()]
    assert sorted(r[0] for r in rows) == ["0", "1"], rows
    assert len({r[1] for r in rows}) == 1, f"more than one torchrun launcher: {rows}"
    assert len({r[2] for r in rows}) == 1, rows
    assert rows[0][3].isdigit(), rows
    assert _job(rows[0][3])["NumTasks"] == "2"


# -- the study itself -------------------------------------------------------------------------------
def _study_raw(tmp_path: Path) -> dict:
    """The micro study at one tiny size trained with TP=2 (two gloo ranks per job), plus a size for the
    time-limit test (its token budget is set there, from a measured step time). Time limits: 1 minute x
    attempt (no overhead). Jobs go to the partition named in the config; `index` runs 2 workers."""
    raw = yaml.safe_load((ROOT / "tests" / "configs" / "micro.yaml").read_text())
    raw.update(study="slurm-micro", results_dir=str(tmp_path / "results"))
    raw["ladder"] = {"sizes": ["d32l2", "d48l2"]}
    raw["replay"] = {"ratios": [0.25]}
    raw["budget"]["tokens"] = {"d32l2": 40_960, "d48l2": 1_024_000}
    raw["data"]["workers"] = 2
    raw["train"]["checkpoint_every"] = 20
    raw["parallel"] = {"default": {"tp": 2, "pp": 1, "dp": 1}, "per_size": {"d48l2": {"tp": 1, "pp": 1, "dp": 1}}}
    raw["slurm"] = {"gpus": False, "min_runtime_minutes": 1, "runtime_overhead_minutes": 0,
                    "cpu_flops_per_core": 1e15, "partition": PARTITION}
    return raw


@pytest.fixture(scope="module")
def study(slurm_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("slurm-study")
    path = tmp / "study.yaml"
    path.write_text(yaml.safe_dump(_study_raw(tmp)))
    return path, tmp / "results" / "slurm-micro"


def _study_snakemake(cfg: Path, *targets: str, timeout: float, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    cmd = [str(SNAKEMAKE), *targets, "--profile", "workflow/profiles/slurm", "--configfile", str(cfg),
           "--jobs", "4", "--latency-wait", "5", *_flags(), *extra]
    return _run(cmd, timeout, dict(os.environ))


@pytest.mark.timeout(1500)
def test_study_on_slurm_two_tasks_one_torchrun_per_job(study: tuple[Path, Path]) -> None:
    """Data stage, 3 TP=2 training jobs and the CPT transfer metrics through SLURM. Each training job
    requests 2 tasks (set through the executor plugin's resources) and still launches torchrun exactly
    once, with 2 ranks; every job runs in the config's partition; `index` gets data.workers cores. (A
    15-minute limit: the config's 1-minute limits are for the time-limit test, and on a loaded machine
    a retry would add a second launch to the log.)"""
    cfg, sdir = study
    res = _study_snakemake(cfg, str(sdir / "runs" / "d32l2-cpt-zh-r0.25" / "transfer.json"), timeout=1200,
                           extra=("--set-resources", "train:tasks=2", "train:cpus_per_task=1", "train:runtime=15"))
    assert res.returncode == 0, res.stdout[-6000:]
    print(res.stdout[-3000:])
    jobs = _submitted(res.stdout)
    assert len(jobs["train"]) == 3 and len(jobs["index"]) == 2 and len(jobs["ingest"]) == 2, jobs
    for rule, ids in jobs.items():
        for jid in ids:
            assert _job(jid)["Partition"] == PARTITION, (rule, _job(jid))
    for jid in jobs["index"]:  # threads: data.workers, not a profile default of 1 core
        assert _job(jid)["NumCPUs"] == "2", _job(jid)
    train_jobs = set()
    for run in ("d32l2-scratch-en", "d32l2-scratch-zh", "d32l2-cpt-zh-r0.25"):
        done = json.loads((sdir / "runs" / run / "done.json").read_text())
        assert done["world_size"] == 2, done
        launch = done["launch"]
        assert launch["slurm_job_id"] in jobs["train"] and launch["torchrun_id"], done
        job = _job(launch["slurm_job_id"])
        assert job["NumTasks"] == "2" and job["JobState"] == "COMPLETED", job
        train_jobs.add(launch["slurm_job_id"])
        log = (sdir / "logs" / "train" / f"{run}.log").read_text()
        # one launcher per job: the command ran once although the allocation has 2 tasks
        assert log.count("launching 2 ranks with torchrun") == 1, log[-3000:]
        assert log.count(f"SLURM job {launch['slurm_job_id']}") == 1, log[-3000:]
        evals = [json.loads(x) for x in (sdir / "runs" / run / "evals.jsonl").read_text().splitlines()]
        assert {e["lang"] for e in evals} == {"en", "zh"}
    assert len(train_jobs) == 3  # each training run its own SLURM allocation
    transfer = json.loads((sdir / "runs" / "d32l2-cpt-zh-r0.25" / "transfer.json").read_text())
    assert transfer["forgetting"], transfer.keys()


#: seconds of training steps the time-limit run is sized to, at the measured step time: more than its
#: first attempt can do under a 1-minute limit (20-30 s of it go to start-up; SLURM enforces the limit
#: up to 30 s late), less than what the 2- and 3-minute retries leave after their start-up, with room
#: for the machine running 1.6x slower than measured (seen on 2 loaded cores: 1:00 + 2:25 + 1:17).
TIME_LIMIT_WORK_S = 110


def _measured_step_s(cfg: Path, sdir: Path, tmp: Path) -> float:
    """Median seconds per optimizer step of d48l2's scratch run on this machine now: a short local run of
    the same spec (150 steps, one rank, one thread as the job has), in its own directories."""
    from cptscale.plan import run_spec
    from cptscale.util import write_json
    from cptscale.validation import load_config

    raw = yaml.safe_load(cfg.read_text())
    raw["budget"]["tokens"]["d48l2"] = 150 * raw["train"]["batch_tokens"]
    cal_cfg = tmp / "calibration.yaml"
    cal_cfg.write_text(yaml.safe_dump(raw))
    spec = run_spec(load_config(cal_cfg), "d48l2-scratch-en").to_dict()
    spec["out_dir"], spec["checkpoint"]["dir"] = str(tmp / "cal-run"), str(tmp / "cal-ckpt")
    write_json(tmp / "cal-run.json", spec)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([str(ROOT / ".venv" / "bin" / "cptscale"), "train", "--spec", str(tmp / "cal-run.json")],
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp / "cal-run" / "metrics.jsonl").read_text().splitlines()]
    per_step = raw["train"]["batch_tokens"]
    return statistics.median(per_step / r["tokens_per_s"] for r in rows[10:])


@pytest.mark.timeout(2700)  # data stage (900, when alone) + calibration (600) + the run (1200)
def test_time_limit_kill_resumes_from_checkpoint(study: tuple[Path, Path], tmp_path: Path) -> None:
    """d48l2's scratch run is sized from a measured step time to ~2 minutes of steps, but its first
    attempt gets a 1-minute limit: SLURM sends SIGTERM, the trainer checkpoints and exits, Snakemake
    resubmits with 2 minutes (then 3), and the retry continues from the checkpoint instead of step 0."""
    cfg, sdir = study
    run = "d48l2-scratch-en"
    data = [str(sdir / "data" / lang / "data.json") for lang in ("en", "zh")]
    if not all(Path(p).exists() for p in data):  # this test alone: the data stage first
        res = _study_snakemake(cfg, *data, timeout=900)
        assert res.returncode == 0, res.stdout[-6000:]
    step_s = _measured_step_s(cfg, sdir, tmp_path)
    raw = yaml.safe_load(cfg.read_text())
    steps = max(200, round(TIME_LIMIT_WORK_S / step_s))
    raw["budget"]["tokens"]["d48l2"] = steps * raw["train"]["batch_tokens"]
    cfg.write_text(yaml.safe_dump(raw))  # only d48l2's runs change (their training hash)
    print(f"measured {step_s * 1000:.1f} ms per step: {steps} steps (~{steps * step_s:.0f} s of steps)")

    res = _study_snakemake(cfg, str(sdir / "runs" / run / "done.json"), timeout=1200)
    assert res.returncode == 0, res.stdout[-6000:]
    done = json.loads((sdir / "runs" / run / "done.json").read_text())
    assert done["steps"] == steps
    events = [json.loads(x) for x in (sdir / "runs" / run / "events.jsonl").read_text().splitlines()]
    stopped = [e for e in events if e["event"] == "stopped"]
    resumed = [e for e in events if e["event"] == "resumed"]
    assert stopped and resumed, events
    # SLURM itself ended the first attempt at its time limit
    first = _job(stopped[0]["slurm_job_id"])
    assert first["JobState"] == "TIMEOUT" and first["TimeLimit"] == "00:01:00", first
    # the retry resumed from the checkpoint written on SIGTERM (not a periodic one), in another SLURM job
    assert done["resumed_from"] == stopped[-1]["step"] == resumed[-1]["step"] > 0, (done, events)
    assert stopped[-1]["slurm_job_id"] != resumed[-1]["slurm_job_id"] == done["launch"]["slurm_job_id"]
    assert _job(done["launch"]["slurm_job_id"])["JobState"] == "COMPLETED"
    steps_seen = [json.loads(x)["step"] for x in (sdir / "runs" / run / "metrics.jsonl").read_text().splitlines()]
    assert steps_seen == list(range(done["steps"]))
