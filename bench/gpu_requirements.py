"""The pinned requirements (requirements.lock) that the GPU acceptance run needs, for one Python version.

One list for both ``bench/gpu_wheelhouse.sh`` (what to download for an offline GPU machine) and
``bench/gpu_acceptance.sh`` (what to install there)::

    python3 bench/gpu_requirements.py --python-version 3.12 [--have FILE]   # for the wheelhouse
    python3 bench/gpu_requirements.py --missing                              # what this Python lacks

It prints one ``name==version`` per line, with environment markers evaluated for that Python and
stripped (``megatron-core==0.19.2; python_version >= "3.12"`` becomes ``megatron-core==0.19.2`` on 3.12
and nothing on 3.11), because pip's command line takes no markers. Standard library only (plus
``packaging``, or pip's vendored copy), since it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import sys
from pathlib import Path

try:
    from packaging.markers import Marker
except ImportError:  # a bare machine: pip always carries a copy
    from pip._vendor.packaging.markers import Marker

ROOT = Path(__file__).resolve().parents[1]
#: never needed by the acceptance run: torch (the machine's own CUDA build), linters and tests, the
#: report (altair, PNG export), PyPI corpus fetching (datasets), the ILP scheduler's solver (PuLP; the
#: acceptance workflow runs Snakemake with --scheduler greedy) and the optional W&B tracking with what
#: only it pulls in (20 MB of wheels that would not fit the device tool's 64 MiB transfer)
NOT_NEEDED = frozenset([
    "torch", "ruff", "pytest", "pytest-timeout", "hypothesis", "sortedcontainers", "iniconfig", "pluggy",
    "vl-convert-python", "altair", "narwhals", "datasets", "dill", "multiprocess", "httpx2", "httpcore2",
    "truststore", "pulp", "wandb", "cwevals", "distro", "googleapis-common-protos", "opentelemetry-api",
    "opentelemetry-exporter-http-transport", "opentelemetry-exporter-otlp-common",
    "opentelemetry-exporter-otlp-proto-common", "opentelemetry-exporter-otlp-proto-http",
    "opentelemetry-proto", "opentelemetry-sdk", "opentelemetry-semantic-conventions",
])


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name.strip().lower())


def pinned(lock: Path, python_version: str) -> list[tuple[str, str]]:
    """(normalised name, ``name==version``) of every lock line whose marker holds for ``python_version``."""
    env = {"python_version": python_version, "python_full_version": f"{python_version}.0"}
    out = []
    for raw in lock.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if "==" not in line:
            continue
        req, _, marker = line.partition(";")
        if marker.strip() and not Marker(marker.strip()).evaluate(env):
            continue
        out.append((norm(req.split("==")[0]), req.strip()))
    return out


def have_names(path: Path) -> set[str]:
    """Names in ``pip list --format=freeze`` output or one name per line."""
    return {norm(re.split(r"[=<>@ ]", x.strip(), maxsplit=1)[0]) for x in path.read_text().splitlines() if x.strip()}


def installed(name: str) -> bool:
    try:
        md.version(name)
    except md.PackageNotFoundError:
        return False
    return True


def needed(lock: Path, python_version: str, have: set[str] | None = None, missing_only: bool = False) -> list[str]:
    reqs = []
    for name, req in pinned(lock, python_version):
        if name in NOT_NEEDED or (have is not None and name in have):
            continue
        if missing_only and installed(name):
            continue
        reqs.append(req)
    return reqs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="gpu_requirements", description=__doc__.split("\n\n")[0])
    ap.add_argument("--lock", type=Path, default=ROOT / "requirements.lock")
    ap.add_argument("--python-version", default="{}.{}".format(*sys.version_info[:2]),
                    help="X.Y the markers are evaluated for (default: this Python)")
    ap.add_argument("--have", type=Path, help="leave out the distributions named in this file")
    ap.add_argument("--missing", action="store_true", help="leave out what this Python already has installed")
    a = ap.parse_args(argv)
    if not re.fullmatch(r"3\.\d+", a.python_version):
        ap.error(f"--python-version {a.python_version!r}: expected X.Y, e.g. 3.12")
    if not a.lock.is_file():
        ap.error(f"--lock {a.lock}: no such file")
    if a.have is not None and not a.have.is_file():
        ap.error(f"--have {a.have}: no such file")
    have = have_names(a.have) if a.have else None
    print("\n".join(needed(a.lock, a.python_version, have, a.missing)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
