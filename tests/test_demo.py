"""The README's demo command, end to end on the micro study: killed mid-training (SIGKILL of the whole
process group, the harshest interruption), then run again: it resumes from the last checkpoint and
finishes with the report and the summary. The finished study then answers the report, `snakemake
--report` and partial re-run checks."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

# The module's study is built once (fixture `demo`: up to 600 s to a checkpoint, then up to 1200 s to
# finish); the timeout of each test covers it, as whichever test runs first builds it. It wins over
# pyproject's default.
pytestmark = [
    pytest.mark.skipif(not (ROOT / ".venv" / "bin" / "snakemake").exists(),
                       reason="needs the project's environment (./run.sh setup)"),
    pytest.mark.timeout(2400),
]


def _config(tmp_path: Path) -> Path:
    raw = yaml.safe_load((ROOT / "tests" / "configs" / "micro.yaml").read_text())
    raw["results_dir"] = str(tmp_path / "results")
    path = tmp_path / "micro.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _interrupted_run(study: Path) -> tuple[str, int] | None:
    """A training run that has a periodic checkpoint but is not finished."""
    for ck in sorted((study / "checkpoints").glob("*/step_*/state.json")):
        run = ck.parent.parent.name
        if not (study / "runs" / run / "done.json").exists():
            return run, int(ck.parent.name.removeprefix("step_"))
    return None


@dataclass
class Demo:
    cfg: Path
    study: Path
    victim: str
    ck_step: int
    stdout: str
    resume_wall_s: float


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    tmp_path = tmp_path_factory.mktemp("demo")
    cfg = _config(tmp_path)
    study = tmp_path / "results" / "micro"
    env = dict(os.environ, CPTSCALE_CONFIG=str(cfg))
    proc = subprocess.Popen(["./run.sh", "demo"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    victim = None
    deadline = time.time() + 600
    try:
        while victim is None and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
            victim = _interrupted_run(study)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # snakemake, its jobs and their torch processes
        proc.wait()
    assert victim is not None, "no training run reached a checkpoint before the demo ended"
    run, ck_step = victim
    assert not (study / "runs" / run / "done.json").exists()
    t0 = time.perf_counter()
    out = subprocess.run(["./run.sh", "demo"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return Demo(cfg, study, run, ck_step, out.stdout, time.perf_counter() - t0)


def test_demo_killed_mid_training_resumes_and_finishes(demo: Demo) -> None:
    study, run = demo.study, demo.victim
    print(f"resumed demo finished in {demo.resume_wall_s:.0f} s\n{demo.stdout[-3000:]}")
    done = json.loads((study / "runs" / run / "done.json").read_text())
    assert done["resumed_from"] is not None and done["resumed_from"] >= demo.ck_step, done
    steps = [json.loads(line)["step"] for line in (study / "runs" / run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(done["steps"])), "the resumed run's metrics must hold every step exactly once"
    assert "resumed from" in (study / "logs" / "train" / f"{run}.log").read_text()
    assert (study / "report" / "index.html").stat().st_size > 10_000
    summary = json.loads((study / "summary.json").read_text())
    assert summary["fits"], summary


def test_demo_prints_the_answer(demo: Demo) -> None:
    """The printed summary: the report path, the fitted laws, the CPT compute saving and the
    held-out-largest-size prediction error (3 sizes: the envelope and transfer fits hold one out)."""
    out = demo.stdout
    assert f"report: {demo.study / 'report' / 'index.html'}" in out, out[-3000:]
    assert re.search(r"^  fit \S+: L = ", out, re.M), out[-3000:]
    # two replay ratios: the headline is replay 0's median (the others and the pooled one follow)
    assert re.search(r"^  CPT compute saving at replay 0 \(median over \d+ CPT runs, last evaluation\): -?\d+\.\d% "
                     r"\[-?\d+\.\d%, -?\d+\.\d%\]$", out, re.M), out[-3000:]
    assert re.search(r"^        replay 0: -?\d+\.\d% \[-?\d+\.\d%, -?\d+\.\d%\] \(\d runs.*\) \| -?\d+\.\d% "
                     r"\[-?\d+\.\d%, -?\d+\.\d%\]$", out, re.M), out[-3000:]  # curve | scratch law, per replay
    assert re.search(r"^      held-out largest size \([0-9.e+-]+ params\): \w+ -?\d", out, re.M), out[-3000:]


def test_demo_logs_and_benchmarks_per_training_job(demo: Demo) -> None:
    """Every training job has its log under results/<study>/logs/train/ and its Snakemake benchmark."""
    from cptscale.plan import plan_study
    from cptscale.validation import load_config

    runs = [r.run_id for r in plan_study(load_config(demo.cfg))]
    assert len(runs) == 12
    for run in runs:
        log = demo.study / "logs" / "train" / f"{run}.log"
        assert log.stat().st_size > 0, log
        bench = (demo.study / "benchmarks" / "train" / f"{run}.tsv").read_text().splitlines()
        head, *rows = [ln.split("\t") for ln in bench]
        assert head[:2] == ["s", "h:m:s"] and len(rows) == 1, bench
        assert float(rows[0][0]) > 0, bench


def test_demo_report_renders_offline(demo: Demo) -> None:
    """The report of real runs, opened offline in headless Chromium: no console error or warning, no
    request, every core figure the data supports drawn with the marks its data calls for; a screenshot
    is kept in test-artifacts/."""
    from test_report import ARTIFACTS, CHROMIUM, CORE, check_rendered, render

    if not os.path.exists(CHROMIUM):
        pytest.skip(f"Debian chromium not installed ({CHROMIUM}): the report's browser check needs it")
    study = demo.study
    info = json.loads((study / "report" / "report.json").read_text())
    # what the finished study supports: runs, evals, transfer, blends and manifests always; the IsoLoss
    # map when a Chinchilla or extended-CPT fit succeeded; fit quality when any loss fit did
    fits = [json.loads(p.read_text()) for p in (study / "fits").glob("*.json")]
    ok = {f.get("law") for f in fits if isinstance(f, dict) and f.get("status") == "ok"}
    supported = CORE - {"isoloss", "fit_quality"}
    if ok & {"chinchilla", "cpt"}:
        supported.add("isoloss")
    if ok & {"chinchilla", "cpt", "envelope"}:
        supported.add("fit_quality")
    assert supported <= set(info["drawn"]), {n: info["missing"].get(n) for n in supported - set(info["drawn"])}
    assert "saving-zh" in info["drawn"], info["drawn"]  # the CPT compute saving by the scratch law, per replay
    assert set(info["drawn"]) <= CORE | {"next_run", "saving-zh"}, info["drawn"]
    html = study / "report" / "index.html"
    res = render(html, ARTIFACTS / "report-demo-micro.png")
    check_rendered(res, html, info["drawn"])


def test_demo_snakemake_report_bundles(demo: Demo, tmp_path: Path) -> None:
    """`snakemake --report report.zip`: the HTML report and every drawn figure, each with its caption."""
    import zipfile

    out = tmp_path / "report.zip"
    res = subprocess.run([str(ROOT / ".venv" / "bin" / "snakemake"), "--report", str(out), "--profile",
                          "workflow/profiles/local", "--configfile", str(demo.cfg)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    drawn = json.loads((demo.study / "report" / "report.json").read_text())["drawn"]
    with zipfile.ZipFile(out) as z:
        names = z.namelist()
        page = z.read(next(n for n in names if n.endswith("report.html"))).decode()
    assert any(n.endswith("index.html") for n in names)
    for fig in drawn:
        assert any(n.endswith(f"{fig}.svg") for n in names), (fig, names)
    assert "Validation loss on the target language vs training compute" in page  # a figure's caption


def test_demo_partial_reruns(demo: Demo) -> None:
    """The finished study answers edits from the config alone (dry runs, counting jobs): execution and
    presentation settings retrain nothing; a new size or one size's hyper-parameter retrains only that."""
    cfg = demo.cfg
    raw = yaml.safe_load(cfg.read_text())
    # a YAML comment: nothing at all
    edited = cfg.with_name("edited.yaml")
    edited.write_text("# a comment changes nothing\n" + cfg.read_text().replace("\n", "  # trailing comment\n", 1))
    assert _counts(edited) == {}
    # job resources and runtime estimates, torch threads, checkpoint cadence: nothing at all
    slurm = dict(raw, slurm={**raw["slurm"], "min_runtime_minutes": 240, "runtime_overhead_minutes": 2,
                             "threads_per_rank": 2, "cpu_flops_per_core": 1e9, "partition": "other"})
    assert _dry_run(cfg, slurm) == {}
    ckpt = dict(raw, train={**raw["train"], "checkpoint_every": 7, "keep_checkpoints": 3})
    assert _dry_run(cfg, ckpt) == {}
    # a report option redoes the report (and the summary that reads it) only
    assert _dry_run(cfg, dict(raw, report={"title": "retitled"})) == {"report": 1, "summary": 1}
    # a new size trains only its own runs (2 scratch + 2 CPT) and redoes what aggregates over runs
    grown = dict(raw, ladder={"sizes": [*raw["ladder"]["sizes"], "d64l2"]})
    counts = _dry_run(cfg, grown)
    assert counts["train"] == 4 and counts["transfer"] == 2 and "ingest" not in counts and "index" not in counts
    # a training hyper-parameter of one size retrains that size and its dependants only
    changed = dict(raw, budget={**raw["budget"], "tokens": {"d48l2": 60_000}})
    counts = _dry_run(cfg, changed)
    assert counts["train"] == 4 and counts["transfer"] == 2 and "ingest" not in counts


def test_demo_data_workers_retrain_nothing(demo: Demo) -> None:
    """data.workers (tokenizer worker processes) is an I/O knob: no job reruns (needs the ingest rule's
    rerun trigger to leave it out: cptscale.plan.data_identity)."""
    raw = yaml.safe_load(demo.cfg.read_text())
    workers = dict(raw, data={**raw["data"], "workers": 2})
    assert _dry_run(demo.cfg, workers) == {}


def _counts(path: Path) -> dict[str, int]:
    from test_workflow import _dry_run as dry_run

    counts = dry_run(path, timeout=300)
    counts.pop("total", None)
    counts.pop("all", None)
    return counts


def _dry_run(cfg: Path, raw: dict) -> dict[str, int]:
    """Jobs `snakemake -n` would run for an edited copy of the study config (without the totals)."""
    edited = cfg.with_name("edited.yaml")
    edited.write_text(yaml.safe_dump(raw))
    return _counts(edited)
