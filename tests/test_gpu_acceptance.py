"""bench/gpu_acceptance.{sh,py}: the parts that run without a GPU (argument handling, check bookkeeping,
the JSON and the table, device detection saying "no GPU", the script's no-GPU exit), and a CPU dry run
of the checks' code (slow)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("gpu_acceptance", ROOT / "bench" / "gpu_acceptance.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules["gpu_acceptance"] = mod
    spec.loader.exec_module(mod)
    return mod


ga = _module()
HAS_GPU = shutil.which("nvidia-smi") is not None or Path("/dev/nvidia0").exists()


def test_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    a = ga.parse_args([])
    assert a.only == list(ga.CHECKS) and a.budget_s == ga.DEFAULT_BUDGET_S and a.size == "992M"
    assert ga.parse_args(["--only", "optimizer, workflow"]).only == ["optimizer", "workflow"]
    for bad, msg in ((["--only", "throughput,warp"], "unknown check(s) warp"), (["--only", ","], "no check named"),
                     (["--budget-s", "0"], "must be positive"), (["--worker", "optimizer"], "needs --result")):
        with pytest.raises(SystemExit) as exc:
            ga.parse_args(bad)
        assert exc.value.code == 2 and msg in capsys.readouterr().err, bad


def test_report_bookkeeping_json_and_table(tmp_path: Path) -> None:
    dev = {"gpus": 1, "name": "NVIDIA H200", "capability": "sm_90", "peak_flops": 989e12, "peak_source": "datasheet"}
    r = ga.Report(device=dev, te={"summary": "not available: local layer spec"})
    assert r.status == "fail"  # nothing passed yet
    r.add(ga.CheckResult("throughput", "pass", "992M bf16: 1 tokens/s", {"mfu": 0.5}, 12.3))
    r.add(ga.CheckResult("reshard_tp2", "skip", "needs 2 GPUs for TP=2, this machine has 1"))
    assert r.status == "pass" and r.counts() == {"pass": 1, "fail": 0, "skip": 1, "error": 0}
    r.add(ga.CheckResult("workflow", "error", "time limit of 300 s, no result"))
    assert r.status == "fail"
    with pytest.raises(ValueError, match="recorded twice"):
        r.add(ga.CheckResult("workflow", "pass", "x"))
    with pytest.raises(ValueError, match="not one of"):
        ga.CheckResult("x", "ok", "y")

    path = ga.write_report(r, tmp_path / "out")
    d = json.loads(path.read_text())
    assert d["status"] == "fail" and d["schema"] == ga.SCHEMA_VERSION and d["device"]["name"] == "NVIDIA H200"
    assert [c["name"] for c in d["checks"]] == ["throughput", "reshard_tp2", "workflow"]
    assert d["checks"][0]["detail"] == {"mfu": 0.5} and d["checks"][0]["seconds"] == 12.3
    assert "MFU = tokens/s" in d["mfu_formula"]
    assert not list((tmp_path / "out").glob("*.tmp"))  # written through a temp file, renamed

    table = r.table().splitlines()
    assert table[0].split() == ["check", "status", "seconds", "figure"]
    rows = {ln.split()[0]: ln for ln in table[2:] if ln.strip()}
    assert "1x NVIDIA H200" in rows["device"] and "peak 989 TFLOP/s" in rows["device"]
    assert "local layer spec" in rows["transformer_engine"]
    assert " pass " in rows["throughput"] and "992M bf16: 1 tokens/s" in rows["throughput"]
    assert " skip " in rows["reshard_tp2"] and " ERROR " in rows["workflow"]
    assert " FAIL " in rows["overall"] and "1 pass, 0 fail, 1 error, 1 skip" in rows["overall"]
    assert any(ln.startswith("MFU = tokens/s") for ln in table)  # the formula is printed


def test_dry_run_and_no_gpu_status() -> None:
    assert ga.Report(device={"gpus": 0, "reason": "r"}).status == "no_gpu"
    dry = ga.Report(device={"gpus": 0}, dry_run=True)
    dry.add(ga.CheckResult("optimizer", "pass", "f"))
    assert dry.status == "dry_run_pass"


def test_peak_flops() -> None:
    assert ga.peak_flops("NVIDIA H200") == (989e12, "datasheet H200 bf16 dense")
    assert ga.peak_flops("NVIDIA H100 PCIe")[0] == 756e12
    assert ga.peak_flops("NVIDIA GH200 480GB")[0] == 989e12
    assert ga.peak_flops("NVIDIA A100-SXM4-80GB")[0] == 312e12
    assert ga.peak_flops("NVIDIA H200", "1.5e15") == (1.5e15, "CPTSCALE_GPU_PEAK_FLOPS")
    value, source = ga.peak_flops("Some Future GPU")
    assert value == 989e12 and "unknown device" in source


def test_run_check_results_crashes_and_time_limits(tmp_path: Path) -> None:
    ok = [sys.executable, "-c", "import json, sys; open(sys.argv[2], 'w').write(json.dumps("
          "{'status': 'pass', 'figure': 'fine', 'detail': {'x': 1}}))"]
    r = ga.run_check("optimizer", ok, 60, tmp_path)
    assert (r.status, r.figure, r.detail) == ("pass", "fine", {"x": 1})
    crash = [sys.executable, "-c", "print('boom before any result'); raise SystemExit(4)"]
    r = ga.run_check("workflow", crash, 60, tmp_path)
    assert r.status == "error" and "exit status 4" in r.figure and "boom" in r.detail["log_tail"]
    slow = [sys.executable, "-c", "import time; time.sleep(60)"]
    r = ga.run_check("throughput", slow, 1, tmp_path)
    assert r.status == "error" and "time limit of 1 s" in r.figure and r.seconds < 30


def test_skip_reasons() -> None:
    a = ga.parse_args([])
    assert "needs 2 GPUs" in ga.skip_reason("reshard_tp2", a, {"gpus": 1})
    assert ga.skip_reason("reshard_tp2", a, {"gpus": 2}) is None
    assert ga.skip_reason("throughput", a, {"gpus": 1}) is None
    cmd = ga.check_command("throughput", a, {"gpus": 4, "peak_flops": 1e15})
    assert cmd[cmd.index("--worker") + 1] == "throughput" and cmd[cmd.index("--peak") + 1] == "1000000000000000.0"
    assert ga._torchrun_cmd(2, ["--spec", "x"], ["-m", "cptscale.train.launch"])[-4:] == [
        "-m", "cptscale.train.launch", "--spec", "x"]


@pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU")
def test_detection_says_no_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    dev = ga.detect_device()
    assert dev["gpus"] == 0 and dev["reason"]
    assert ga.main(["--detect"]) == 3
    assert "none:" in capsys.readouterr().out


@pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU")
def test_script_without_gpu_exits_3_with_json(tmp_path: Path) -> None:
    """The whole .sh on a machine without a GPU: nothing installed, the table and a no_gpu JSON, exit 3."""
    out = tmp_path / "acc"
    res = subprocess.run(["bash", str(ROOT / "bench" / "gpu_acceptance.sh")], capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, CPTSCALE_ACCEPT_OUT=str(out)), cwd=tmp_path)
    assert res.returncode == 3, res.stdout + res.stderr
    assert "no NVIDIA GPU" in res.stdout and "overall" in res.stdout
    d = json.loads((out / "gpu_acceptance.json").read_text())
    assert d["status"] == "no_gpu" and d["checks"] == [] and d["device"]["gpus"] == 0
    assert (out / "table.txt").read_text() == res.stdout


def test_workflow_study_is_a_valid_config(tmp_path: Path) -> None:
    """The study the workflow check trains: valid, 50 steps for its CPT run, GPU resources."""
    import yaml

    from cptscale.plan import find_run
    from cptscale.validation import load_config

    cfg_path = tmp_path / "study.yaml"
    cfg_path.write_text(yaml.safe_dump(ga.workflow_study(tmp_path, gpus=True)))
    cfg = load_config(cfg_path)
    run = find_run(cfg, "d64l2-cpt-zh-r0.25")
    assert run.steps == 50 and run.gpus == 1


@pytest.mark.slow
def test_cpu_dry_run_of_the_checks(tmp_path: Path) -> None:
    """The checks' code on the CPU (tiny shapes, fp32, gloo): throughput, clipping and the optimizer
    comparison, collectives and exact resume under torchrun (2 ranks), TP=1 -> TP=2 resharding."""
    out = tmp_path / "acc"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_acceptance.py"), "--cpu", "--out", str(out),
                          "--only", "throughput,optimizer,nccl_resume,reshard_tp2", "--budget-s", "1500"],
                         capture_output=True, text=True, timeout=1800, env=env)
    d = json.loads((out / "gpu_acceptance.json").read_text())
    print(res.stdout)
    assert res.returncode == 0 and d["status"] == "dry_run_pass", res.stdout + res.stderr[-3000:]
    by = {c["name"]: c for c in d["checks"]}
    assert by["nccl_resume"]["detail"]["max_loss_diff"] <= 1e-6
    assert by["reshard_tp2"]["detail"]["loss_diff"] <= 1e-5


def _requirements(*args: str) -> list[str]:
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_requirements.py"), *args], capture_output=True,
                         text=True, timeout=60, check=True)
    return res.stdout.split()


def test_gpu_requirements_evaluate_markers_per_python(tmp_path: Path) -> None:
    """The list pip gets on the GPU machine: one megatron-core pin per Python (the lock's environment
    markers evaluated, none passed on: pip's command line takes no markers), without torch or the
    packages the acceptance run never imports, and without what --have names."""
    py311, py312 = _requirements("--python-version", "3.11"), _requirements("--python-version", "3.12")
    assert [r for r in py311 if r.startswith("megatron-core")] == ["megatron-core==0.16.1"]
    assert [r for r in py312 if r.startswith("megatron-core")] == ["megatron-core==0.19.2"]
    for reqs in (py311, py312):
        assert reqs and all(";" not in r and r.count("==") == 1 for r in reqs)
        names = {r.split("==")[0].lower() for r in reqs}
        assert not names & {"torch", "wandb", "ruff", "pytest", "altair", "pulp"}
        assert {"snakemake", "duckdb", "pydantic"} <= names
    have = tmp_path / "have.txt"
    have.write_text("duckdb==9.9\nSnakeMake\n")
    names = {r.split("==")[0].lower() for r in _requirements("--python-version", "3.12", "--have", str(have))}
    assert "duckdb" not in names and "snakemake" not in names and "pydantic" in names


def test_gpu_requirements_refuses_bad_arguments(tmp_path: Path) -> None:
    for args, field in ((["--python-version", "3"], "--python-version"), (["--have", str(tmp_path / "no")], "--have")):
        res = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_requirements.py"), *args],
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 2 and field in res.stderr
