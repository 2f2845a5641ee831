"""The README's demo command, end to end on the micro study: killed mid-training (SIGKILL of the whole
process group, the harshest interruption), then run again: it resumes from the last checkpoint and
finishes with the report and the summary."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not (ROOT / ".venv" / "bin" / "snakemake").exists(),
                                reason="needs the project's environment (./run.sh setup)")


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


def test_demo_killed_mid_training_resumes_and_finishes(tmp_path: Path) -> None:
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

    out = subprocess.run(["./run.sh", "demo"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "report:" in out.stdout and "fit " in out.stdout, out.stdout
    done = json.loads((study / "runs" / run / "done.json").read_text())
    assert done["resumed_from"] is not None and done["resumed_from"] >= ck_step, done
    steps = [json.loads(line)["step"] for line in (study / "runs" / run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(done["steps"])), "the resumed run's metrics must hold every step exactly once"
    assert (study / "report" / "index.html").stat().st_size > 10_000
    summary = json.loads((study / "summary.json").read_text())
    assert summary["fits"], summary
    _renders_in_chromium(study)
    _snakemake_report_bundles(cfg, study, tmp_path / "report.zip")

    # The finished study answers partial re-runs from the config alone (dry runs, counting jobs):
    raw = yaml.safe_load(cfg.read_text())
    # a report option or a comment changes no training
    raw["report"] = {"title": "retitled"}
    assert _dry_run(cfg, raw) == {"report": 1, "summary": 1}
    # a new size trains only its own runs (2 scratch + 2 CPT) and redoes what aggregates over runs
    grown = dict(raw, ladder={"sizes": [*raw["ladder"]["sizes"], "d64l2"]})
    counts = _dry_run(cfg, grown)
    assert counts["train"] == 4 and counts["transfer"] == 2 and "ingest" not in counts and "index" not in counts
    # a training hyper-parameter of one size retrains that size and its dependants only
    changed = dict(raw, budget={**raw["budget"], "tokens": {"d48l2": 60_000}})
    counts = _dry_run(cfg, changed)
    assert counts["train"] == 4 and counts["transfer"] == 2 and "ingest" not in counts


def _dry_run(cfg: Path, raw: dict) -> dict[str, int]:
    """Jobs `snakemake -n` would run for an edited copy of the study config (without the totals)."""
    from test_workflow import _dry_run as dry_run

    edited = cfg.with_name("edited.yaml")
    edited.write_text(yaml.safe_dump(raw))
    counts = dry_run(edited, timeout=300)
    counts.pop("total", None)
    counts.pop("all", None)
    return counts


def _snakemake_report_bundles(cfg: Path, study: Path, out: Path) -> None:
    """`snakemake --report report.zip`: the HTML report and every drawn figure, each with its caption."""
    import zipfile

    res = subprocess.run([str(ROOT / ".venv" / "bin" / "snakemake"), "--report", str(out), "--profile",
                          "workflow/profiles/local", "--configfile", str(cfg)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    drawn = json.loads((study / "report" / "report.json").read_text())["drawn"]
    with zipfile.ZipFile(out) as z:
        names = z.namelist()
        page = z.read(next(n for n in names if n.endswith("report.html"))).decode()
    assert any(n.endswith("index.html") for n in names)
    for fig in drawn:
        assert any(n.endswith(f"{fig}.svg") for n in names), (fig, names)
    assert "Validation loss on the target language vs training compute" in page  # a figure's caption


def _renders_in_chromium(study: Path) -> None:
    """The report of real runs, opened offline in headless Chromium: no console errors, every drawn
    figure rendered with marks; a screenshot is kept in test-artifacts/."""
    from test_report import ARTIFACTS, CHROMIUM, render

    if not os.path.exists(CHROMIUM):
        return  # the browser tests in test_report.py report the skip
    info = json.loads((study / "report" / "report.json").read_text())
    res = render(study / "report" / "index.html", ARTIFACTS / "report-demo-micro.png")
    st = res["status"]
    assert st is not None, res["stderr"][-2000:]
    assert st["errors"] == [], st["errors"]
    assert set(st["rendered"]) == set(info["drawn"]) and len(info["drawn"]) >= 6, (st, info["missing"])
    assert all(n > 0 for n in st["rendered"].values()), st["rendered"]
