"""Python 3.11, 3.12 and 3.13: run.sh picks a supported interpreter, refuses others with a clear message,
and (slow) sets up a 3.12 environment, with the newest megatron-core it allows, in which the unit tests pass."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _fake_python(tmp_path: Path, version: str) -> Path:
    """An interpreter stand-in that only answers run.sh's version query (the refusal happens before
    anything else runs)."""
    p = tmp_path / f"python{version}"
    p.write_text(f"#!/bin/sh\necho {version}\n")
    p.chmod(0o755)
    return p


@pytest.mark.parametrize("version", ["3.10", "3.14"])
def test_run_sh_refuses_an_unsupported_python(tmp_path, version):
    env = {**os.environ, "PYTHON": str(_fake_python(tmp_path, version)), "CPTSCALE_VENV": str(tmp_path / "venv")}
    out = subprocess.run(["bash", str(ROOT / "run.sh"), "setup"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert f"is Python {version}; cptscale supports Python 3.11, 3.12, 3.13" in out.stderr
    assert not (tmp_path / "venv").exists()


def test_run_sh_refuses_a_venv_of_another_python(tmp_path):
    """A venv made with one Python is not silently reused by another."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(_fake_python(tmp_path, "3.13"))
    import sys

    env = {**os.environ, "PYTHON": sys.executable, "CPTSCALE_VENV": str(venv)}
    out = subprocess.run(["bash", str(ROOT / "run.sh"), "setup"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "was made with Python 3.13, not 3.11" in out.stderr


def _python(version: str) -> str | None:
    """An interpreter of ``version`` (e.g. "3.12") on PATH or under pyenv, or None."""
    minor = tuple(int(x) for x in version.split("."))
    for c in [shutil.which(f"python{version}"),
              *sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}*/bin/python{version}")))]:
        if c and subprocess.run([c, "-c", f"import sys; assert sys.version_info[:2] == {minor}"],
                                capture_output=True).returncode == 0:
            return c
    return None


#: the unit tests run under 3.12 and 3.13: config, ladder, schedule, the Megatron-Core engine's CPU patches
#: and a training run, and the Hugging Face round trip (megatron-core 0.19.2, transformers)
UNIT_TESTS = ["tests/test_config.py", "tests/test_ladder_plan.py", "tests/test_schedule.py", "tests/test_hf.py",
              "tests/test_train.py::test_cpu_compat_patches_what_it_expects",
              "tests/test_train.py::test_resume_after_sigterm_is_exact"]


@pytest.mark.slow
@pytest.mark.timeout(7200)
@pytest.mark.parametrize("version", ["3.12", "3.13"])
def test_setup_and_unit_tests_under_newer_python(version):
    """``PYTHON=python3.X ./run.sh setup`` into its own venv (``CPTSCALE_VENV312``/``CPTSCALE_VENV313``, default
    /tmp/cptscale-venv-py312 and -py313, kept between runs: a second setup is a no-op), then the unit tests
    in it. On a machine without an NVIDIA GPU whose CPU torch index is unreachable, torch for these Pythons
    is PyPI's CUDA build (several GB): the first setup took 945 s for 3.12 and 91 s for 3.13 here, the
    difference being how much of it pip's cache already held (see the README)."""
    py = _python(version)
    if py is None:
        pytest.skip(f"no Python {version} interpreter on this machine (python{version} or ~/.pyenv/versions/{version}*)")
    tag = version.replace(".", "")
    venv = os.environ.get(f"CPTSCALE_VENV{tag}", f"/tmp/cptscale-venv-py{tag}")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PYTHON=py, CPTSCALE_VENV=venv)
    t0 = time.time()
    out = subprocess.run(["bash", str(ROOT / "run.sh"), "setup"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=6000)
    assert out.returncode == 0, out.stderr[-3000:]
    print(f"setup under {py}: {time.time() - t0:.0f} s")
    check = subprocess.run([f"{venv}/bin/python", "-c", "import sys, megatron.core, torch; "
                            "print(sys.version_info[:2], megatron.core.__version__, torch.__version__)"],
                           env=env, capture_output=True, text=True, timeout=300)
    minor = version.split(".")[1]
    assert check.returncode == 0 and f"(3, {minor}) 0.19.2" in check.stdout, check.stdout + check.stderr
    env["PYTHONPATH"] = str(ROOT / "src")
    tests = subprocess.run([f"{venv}/bin/python", "-m", "pytest", "-q", "-x", "-m", "not slow", "-p", "no:cacheprovider",
                            "-p", "no:warnings", "--tb=short",
                            *UNIT_TESTS], cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    print(tests.stdout[-2000:])
    assert tests.returncode == 0, tests.stdout[-4000:] + tests.stderr[-2000:]
