#!/usr/bin/env bash
# One entry point for people and CI:
#   ./run.sh demo       set up everything, then run the default study (config.yaml) end to end
#   ./run.sh test       set up everything, then run the test suite (what CI runs)
#   ./run.sh test-all   the same plus the heavier tests (multi-process training, full studies)
#   ./run.sh setup      only set up
# Idempotent: a second run reuses the virtual environment and every finished result.
set -euo pipefail
cd "$(dirname "$0")"

VENV=${CPTSCALE_VENV:-.venv}
STAMP="$VENV/.cptscale-setup"
#: Python versions the project supports (requirements.lock pins per version with environment markers:
#: megatron-core 0.16.x on 3.11, the newest release on 3.12+, which needs >= 3.12)
SUPPORTED_PYTHONS="3.11 3.12 3.13"
TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

log() { printf '\033[1m[cptscale]\033[0m %s\n' "$*" >&2; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo -n "$@"; else return 1; fi; }

apt_install() {
  # Debian packages a step needs (skipped, with a note, when we cannot be root).
  local missing=()
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null || { log "no apt-get: cannot install ${missing[*]}"; return 1; }
  log "installing Debian packages: ${missing[*]}"
  if [ ! -f /tmp/.cptscale-apt-updated ]; then as_root apt-get update -q >/dev/null && touch /tmp/.cptscale-apt-updated; fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null \
    || { log "could not install ${missing[*]} (not root?); tests that need them will be skipped"; return 1; }
}

has_nvidia_gpu() { command -v nvidia-smi >/dev/null 2>&1 || [ -e /proc/driver/nvidia ] || [ -e /dev/nvidia0 ]; }

index_reachable() {
  # One HEAD request with a 5 s timeout, no retries (a machine without internet answers at once or times out).
  "$VENV/bin/python" -c 'import sys, urllib.request as u; u.urlopen(u.Request(sys.argv[1], method="HEAD"), timeout=5)' \
    "$1" >/dev/null 2>&1
}

install_torch() {
  # torch before the lock, so that the lock's `torch==X` is already satisfied by the wheel chosen here:
  #   CPTSCALE_TORCH_INDEX set     -> that index (e.g. a CUDA or CPU wheel index);
  #   an NVIDIA GPU (driver seen)  -> PyPI's default build (CUDA);
  #   no NVIDIA GPU                -> PyTorch's CPU wheel index (~200 MB instead of several GB of CUDA
  #                                   libraries; its dependencies come from the lock), tried once with a short
  #                                   timeout and no retries; if that index cannot be reached, plain
  #                                   `pip install torch==X` (PyPI's default build, or what pip's own
  #                                   configuration provides, e.g. a local wheel directory).
  # A torch==X already installed satisfies every branch without any download (idempotent).
  local version=$1 pip="$VENV/bin/pip"
  if [ -n "${CPTSCALE_TORCH_INDEX:-}" ]; then
    "$pip" install -q "torch==$version" --index-url "$CPTSCALE_TORCH_INDEX"
  elif has_nvidia_gpu; then
    "$pip" install -q "torch==$version"
  elif index_reachable "$TORCH_CPU_INDEX/torch/" \
      && "$pip" install -q --no-deps --timeout 10 --retries 0 --index-url "$TORCH_CPU_INDEX" "torch==$version"; then
    log "no NVIDIA GPU: CPU build of torch $version (from $TORCH_CPU_INDEX)"
  else
    log "no NVIDIA GPU and $TORCH_CPU_INDEX unreachable: torch $version from pip's default sources"
    "$pip" install -q "torch==$version"
  fi
}

py_version() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null; }

supported() { case " $SUPPORTED_PYTHONS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

pick_python() {
  # PYTHON=... wins (refused if unsupported); else the first supported of python3, python3.11, 3.12, 3.13.
  local c v
  if [ -n "${PYTHON:-}" ]; then
    v=$(py_version "$PYTHON") || { log "PYTHON=$PYTHON does not run"; exit 1; }
    supported "$v" || { log "PYTHON=$PYTHON is Python $v; cptscale supports Python ${SUPPORTED_PYTHONS// /, }"; exit 1; }
    PY=$PYTHON; return
  fi
  for c in python3 python3.11 python3.12 python3.13; do
    command -v "$c" >/dev/null 2>&1 || continue
    v=$(py_version "$c") || continue
    if supported "$v"; then PY=$c; return; fi
  done
  log "no supported Python found (python3 is $(python3 --version 2>&1)); cptscale supports Python" \
      "${SUPPORTED_PYTHONS// /, }: install one (e.g. apt-get install python3.11) or set PYTHON=/path/to/python"
  exit 1
}

setup() {
  pick_python
  local pyv venv_v
  pyv=$(py_version "$PY")
  if [ -x "$VENV/bin/python" ]; then
    venv_v=$(py_version "$VENV/bin/python")
    [ "$venv_v" = "$pyv" ] || { log "$VENV was made with Python $venv_v, not $pyv ($PY): remove it, or set" \
      "CPTSCALE_VENV to another directory"; exit 1; }
  else
    log "creating $VENV with Python $pyv ($PY)"
    "$PY" -m venv "$VENV" 2>/dev/null || { apt_install "python$pyv-venv" python3-venv && "$PY" -m venv "$VENV"; }
  fi
  local want
  want=$(cat requirements.lock pyproject.toml | sha256sum | cut -c1-16)-py$pyv
  if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
    log "installing pinned Python dependencies into $VENV (first run: a few minutes)"
    "$VENV/bin/pip" install -q --upgrade pip >/dev/null
    install_torch "$(sed -n 's/^torch==\([^ ;]*\).*/\1/p' requirements.lock)"
    "$VENV/bin/pip" install -q -r requirements.lock
    "$VENV/bin/pip" install -q --no-deps -e .
    echo "$want" > "$STAMP"
  fi
  case $VENV in /*) export PATH="$VENV/bin:$PATH" ;; *) export PATH="$PWD/$VENV/bin:$PATH" ;; esac
}

test_system_packages() {
  # Real components for the integration tests: a headless browser and a one-node SLURM cluster.
  apt_install chromium || true
  apt_install slurmctld slurmd slurm-client munge || true
}

clear_stale_lock() {
  # A killed Snakemake leaves its lock behind; remove it only when no Snakemake runs in this directory.
  [ -n "$(ls -A .snakemake/locks 2>/dev/null)" ] || return 0
  local pid
  for pid in $(pgrep -f 'bin/snakemake' 2>/dev/null); do
    [ "$(readlink "/proc/$pid/cwd" 2>/dev/null)" = "$PWD" ] && { log "another Snakemake (pid $pid) runs here"; return 0; }
  done
  log "removing a stale Snakemake lock left by an interrupted run"
  snakemake --unlock --profile workflow/profiles/local --configfile "$cfg" >/dev/null
}

cmd=${1:-demo}
shift || true
case "$cmd" in
  setup)
    setup ;;
  demo)
    setup
    cfg=${CPTSCALE_CONFIG:-config.yaml}
    cptscale validate "$cfg"
    clear_stale_lock
    log "running study $cfg (Snakemake, local profile; an interrupted run resumes where it stopped)"
    snakemake --profile workflow/profiles/local --configfile "$cfg" "$@"
    cptscale summary --config "$cfg" ;;
  test)
    setup
    test_system_packages
    ruff check src tests bench
    pytest -m "not slow" "$@" ;;
  test-all)
    setup
    test_system_packages
    ruff check src tests bench
    pytest "$@" ;;
  *)
    echo "usage: $0 {demo|test|test-all|setup} [extra args]" >&2; exit 2 ;;
esac
