"""One workflow run per study: a second Snakemake run on the same study, started from any directory
while the first runs, is refused with a clear message; a crashed (SIGKILLed) run leaves nothing to
unlock for the next one started elsewhere (Snakemake's own per-directory lock is what `--unlock` is for)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from faults import fault_config, snakemake_cmd

from cptscale.integrity import WORKFLOW_LOCK, StudyBusyError, hold_study_lock


def _holder(study: Path) -> subprocess.Popen:
    code = ("import sys, time; from cptscale.integrity import hold_study_lock; hold_study_lock(sys.argv[1]); "
            "print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(study)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_study_lock_names_its_holder_and_dies_with_it(tmp_path: Path) -> None:
    proc = _holder(tmp_path)
    try:
        with pytest.raises(StudyBusyError, match=rf"pid {proc.pid} on .* a second run would race it"):
            hold_study_lock(tmp_path)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    sub = subprocess.run([sys.executable, "-c", "import sys; from cptscale.integrity import hold_study_lock; "
                          "hold_study_lock(sys.argv[1])", str(tmp_path)])
    assert sub.returncode == 0  # a killed holder leaves nothing behind


@pytest.mark.skipif(not Path(sys.executable).with_name("snakemake").exists(), reason="needs snakemake")
def test_second_snakemake_on_the_same_study_is_refused(tmp_path: Path) -> None:
    cfg = fault_config(tmp_path)
    study = tmp_path / "results" / "faults"
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    a = subprocess.Popen(snakemake_cmd(cfg), cwd=first, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and a.poll() is None:
            lock = study / WORKFLOW_LOCK
            if lock.exists() and lock.read_text().strip() and json.loads(lock.read_text())["pid"] == a.pid:
                break
            time.sleep(0.2)
        assert a.poll() is None, "the first run ended before it held the study"
        b = subprocess.run(snakemake_cmd(cfg), cwd=second, capture_output=True, text=True, timeout=300)
        assert b.returncode != 0
        assert f"another workflow run is working on study {study} (pid {a.pid}" in b.stdout + b.stderr
    finally:
        os.killpg(a.pid, signal.SIGKILL)  # a crash: Snakemake, its jobs, all at once
        a.wait()
    target = str(study / "data" / "en" / "sources.json")
    again = subprocess.run([*snakemake_cmd(cfg), target], cwd=second, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
