"""A training run on two SLURM nodes: scripts/local-slurm.sh with LOCAL_SLURM_NODES=2 runs two slurmd on
this host (node names <host>n1, <host>n2), so the launch path of a multi-node run is real: Snakemake's
SLURM plugin submits the job with the planner's resources (sbatch --nodes=2 --ntasks=2), the rule's
`cptscale train` starts one srun step of one torchrun agent per node, the agents meet through c10d
rendezvous at the first node's address and train the run with gloo."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_slurm import SCRIPT, SNAKEMAKE, WORKFLOW, _flags, _job, _run, _submitted

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(900)]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def two_node_cluster() -> Iterator[None]:
    if os.geteuid() != 0:
        pytest.skip("local SLURM needs root")
    res = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, LOCAL_SLURM_NODES="2"))
    if res.returncode != 0:
        pytest.skip(f"could not start a two-node local SLURM: {res.stderr.strip()[-1000:]}")
    yield
    # back to the one-node cluster the other SLURM tests expect
    subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=300)


def test_planned_two_node_run_through_snakemake_slurm(two_node_cluster: None, tmp_path: Path) -> None:
    from types import SimpleNamespace

    from train_helpers import make_data, make_spec, read_jsonl, write_spec

    from cptscale.config.schema import SlurmConfig
    from cptscale.runs import job_resources

    # what the planner asks for a 2-rank CPU run with one rank per node (common.smk maps it to resources)
    cfg = SimpleNamespace(slurm=SlurmConfig(gpus=False, cpu_ranks_per_node=1, min_runtime_minutes=10),
                          study_dir=tmp_path / "no-study")
    res = job_resources(cfg, world=2, params=43168, flops=1e9)
    assert (res["nodes"], res["cpus"], res["gpus"]) == (2, 1, 0)

    wd = tmp_path / "wf"
    wd.mkdir()
    for f in WORKFLOW.iterdir():
        (wd / f.name).write_bytes(f.read_bytes())
    data = make_data(tmp_path / "data")
    spec = make_spec(tmp_path, data, run_id="mn", steps=6, dp=2, eval_steps=[0, 6], every=0,
                     resources={**res, "gpu_peak_flops": None})
    spec_path = write_spec(tmp_path, spec)
    env = dict(os.environ, CPTSCALE_PYTHON=sys.executable,
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    cmd = [str(SNAKEMAKE), "--snakefile", str(wd / "Snakefile"), "--directory", str(wd), "two_node_done.json",
           "--config", f"spec={spec_path}", "--jobs", "1", "--latency-wait", "5", *_flags(), "--slurm-keep-successful-logs",
           "--set-resources", f"two_node_train:nodes={res['nodes']}", f"two_node_train:tasks={res['nodes']}",
           f"two_node_train:cpus_per_task={res['cpus']}", f"two_node_train:mem_mb={res['mem_gb'] * 1024}",
           f"two_node_train:runtime={res['runtime_minutes']}"]
    out = _run(cmd, 600, env)
    assert out.returncode == 0, out.stdout[-6000:]
    jid = _submitted(out.stdout)["two_node_train"][0]
    job = _job(jid)
    assert job["NumNodes"] == "2" and job["NumTasks"] == "2" and job["JobState"] == "COMPLETED", job
    assert re.fullmatch(r".+n\[1-2\]", job["NodeList"]), job
    log = (wd / ".snakemake" / "slurm_logs" / "rule_two_node_train").rglob("*.log")
    text = "\n".join(p.read_text(errors="replace") for p in log)
    assert "launching 2 ranks on 2 nodes" in text, text[-4000:]
    srun = next(ln for ln in text.splitlines() if "cptscale train: srun " in ln)
    assert "--nodes=2 --ntasks=2 --ntasks-per-node=1" in srun and "--rdzv-backend=c10d" in srun, srun
    assert f"--rdzv-id=cptscale-{jid}" in srun and "--nproc-per-node=1" in srun, srun
    ranks = sorted(re.findall(r"group_rank=(\d)", text))
    assert ranks == ["0", "1"] and text.count("group_world_size=2") == 2, text[-4000:]  # one agent per node
    done = json.loads((wd / "two_node_done.json").read_text())
    assert done["world_size"] == 2 and done["launch"]["slurm_job_id"] == jid
    assert len(read_jsonl(Path(spec["out_dir"]) / "metrics.jsonl")) == 6
