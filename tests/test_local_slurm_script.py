"""scripts/local-slurm.sh without starting SLURM: its pid-file check must not take a reused pid for a
daemon (a stale /run/slurmd-<node>.pid once named the test runner's pid, and stop_slurm killed it)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _alive(pid_file: Path) -> bool:
    script = (ROOT / "scripts" / "local-slurm.sh").read_text()
    start = script.index("alive() {")
    body = script[start:script.index("\n}\n", start) + 3]
    res = subprocess.run(["bash", "-c", body + f'alive "{pid_file}"'], capture_output=True, text=True, timeout=30)
    return res.returncode == 0


def test_pid_file_naming_another_process_is_not_alive(tmp_path: Path) -> None:
    stale = tmp_path / "slurmd-node1.pid"
    stale.write_text(f"{os.getpid()}\n")  # this pytest process: alive, but not slurmd
    assert not _alive(stale)
    (tmp_path / "empty.pid").write_text("")
    assert not _alive(tmp_path / "empty.pid") and not _alive(tmp_path / "missing.pid")


def test_pid_file_of_a_running_daemon_is_alive(tmp_path: Path) -> None:
    """A process whose name is the pid file's daemon name counts (a copy of sleep named slurmd)."""
    fake = tmp_path / "slurmd"
    fake.symlink_to("/bin/sleep")
    proc = subprocess.Popen([str(fake), "30"])
    try:
        pid_file = tmp_path / "slurmd-node1.pid"
        pid_file.write_text(f"{proc.pid}\n")
        assert _alive(pid_file)
    finally:
        proc.kill()
        proc.wait()
    assert not _alive(pid_file)
