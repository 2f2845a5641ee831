"""Runs larger than one node: the node layout (default suite), the launcher command lines, and two
torchrun agents meeting through c10d rendezvous (slow: real Megatron-Core on gloo)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cptscale.cluster import (
    NodeLayout,
    NodeLayoutError,
    node_layout,
    rendezvous_port,
    srun_command,
    torchrun_command,
)


@pytest.mark.parametrize(("world", "per_node", "tp", "want"), [
    (8, 8, 1, NodeLayout(1, 8)),
    (4, 8, 2, NodeLayout(1, 4)),
    (16, 8, 8, NodeLayout(2, 8)),
    (12, 8, 2, NodeLayout(2, 6)),  # ceil(12 / 8) = 2 nodes of 6
    (64, 8, 4, NodeLayout(8, 8)),
    (3, None, 1, NodeLayout(1, 3)),  # no per-node limit: one node
])
def test_node_layout(world: int, per_node: int | None, tp: int, want: NodeLayout) -> None:
    got = node_layout(world, per_node, tp)
    assert got == want and got.world == world


def test_node_layout_refuses_uneven_or_split_tp() -> None:
    with pytest.raises(NodeLayoutError, match=r"does not split evenly over 2 nodes"):
        node_layout(9, 8)
    with pytest.raises(NodeLayoutError, match=r"tp = 4 does not divide the 6 ranks per node"):
        node_layout(12, 8, tp=4)


def test_launcher_command_lines() -> None:
    one = torchrun_command("torchrun", "/r/run.json", 4)
    assert one == ["torchrun", "--standalone", "--nproc-per-node=4", "-m", "cptscale.train.launch", "--spec",
                   "/r/run.json"]
    agent = torchrun_command("torchrun", "/r/run.json", 8, nnodes=2, rdzv_endpoint="n1:29517", rdzv_id="cptscale-17")
    assert agent[:7] == ["torchrun", "--nnodes=2", "--nproc-per-node=8", "--rdzv-backend=c10d",
                         "--rdzv-endpoint=n1:29517", "--rdzv-id=cptscale-17", "--max-restarts=0"]
    step = srun_command(agent, 2, cpus_per_task=64, gpus_per_node=8)
    assert step[:9] == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
                        "--export=ALL", "--overlap", "--cpus-per-task=64", "--gpus-per-node=8"]
    assert step[9:] == agent
    assert rendezvous_port("1234") == 29500 + 234 and rendezvous_port(None) == 29500
    with pytest.raises(ValueError, match="rendezvous"):
        torchrun_command("torchrun", "x", 1, nnodes=2)


def test_train_outside_slurm_names_the_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A run planned on 2 nodes, started by hand without a SLURM allocation: a clear error, nothing started."""
    from train_helpers import make_data, make_spec, write_spec

    from cptscale.cli import main

    data = make_data(tmp_path / "data")
    spec = make_spec(tmp_path, data, run_id="two-nodes", dp=2, resources={"nodes": 2, "gpus": 0, "cpus": 1,
                                                                            "runtime_minutes": 5, "mem_gb": 4})
    env_job = os.environ.pop("SLURM_JOB_ID", None)
    try:
        assert main(["train", "--spec", str(write_spec(tmp_path, spec))]) == 2
    finally:
        if env_job is not None:
            os.environ["SLURM_JOB_ID"] = env_job
    err = capsys.readouterr().err
    assert "planned on 2 nodes" in err and "SLURM" in err
    assert not Path(spec["out_dir"]).exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun() -> str:
    path = Path(sys.executable).parent / "torchrun"
    return str(path) if path.exists() else "torchrun"


@pytest.mark.slow
def test_two_agents_c10d_rendezvous_match_one_agent(tmp_path: Path) -> None:
    """Two torchrun agents (--nnodes 2, one rank each) meeting through c10d rendezvous on localhost train
    the same DP=2 run as one agent with 2 ranks: the losses are the same (gloo, fp32, same world size and
    reduction order; 1e-6 is the engine's bound for exact resume)."""
    from train_helpers import make_data, make_spec, read_jsonl, write_spec

    pytest.importorskip("megatron.core")
    data = make_data(tmp_path / "data")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    one = make_spec(tmp_path, data, run_id="one-agent", steps=6, dp=2, eval_steps=[0, 6], every=0)
    res = subprocess.run(torchrun_command(_torchrun(), str(write_spec(tmp_path, one)), 2), env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]

    two = make_spec(tmp_path, data, run_id="two-agents", steps=6, dp=2, eval_steps=[0, 6], every=0)
    path = str(write_spec(tmp_path, two))
    endpoint = f"127.0.0.1:{_free_port()}"
    agents = [subprocess.Popen(torchrun_command(_torchrun(), path, 1, nnodes=2, rdzv_endpoint=endpoint,
                                                rdzv_id="two-agent-test"),
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for _ in range(2)]
    outs = []
    for proc in agents:
        out, _ = proc.communicate(timeout=600)
        outs.append(out)
    assert [p.returncode for p in agents] == [0, 0], "\n----\n".join(o[-3000:] for o in outs)

    done = json.loads((Path(two["out_dir"]) / "done.json").read_text())
    assert done["world_size"] == 2
    la = [m["loss"] for m in read_jsonl(Path(one["out_dir"]) / "metrics.jsonl")]
    lb = [m["loss"] for m in read_jsonl(Path(two["out_dir"]) / "metrics.jsonl")]
    assert len(la) == len(lb) == 6
    diff = max(abs(a - b) for a, b in zip(la, lb, strict=True))
    ea = {(e["step"], e["lang"]): e["loss"] for e in read_jsonl(Path(one["out_dir"]) / "evals.jsonl")}
    eb = {(e["step"], e["lang"]): e["loss"] for e in read_jsonl(Path(two["out_dir"]) / "evals.jsonl")}
    assert ea.keys() == eb.keys()
    ediff = max(abs(ea[k] - eb[k]) for k in ea)
    print(f"two agents vs one: max training-loss difference {diff:.3g}, max eval-loss difference {ediff:.3g}")
    assert diff <= 1e-6 and ediff <= 1e-6
