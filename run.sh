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
PY=${PYTHON:-python3}
STAMP="$VENV/.cptscale-setup"

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

setup() {
  "$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' \
    || { log "Python 3.11 is required (found $("$PY" --version 2>&1))"; exit 1; }
  if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV" 2>/dev/null || { apt_install python3-venv && "$PY" -m venv "$VENV"; }
  fi
  local want
  want=$(cat requirements.lock pyproject.toml | sha256sum | cut -c1-16)
  if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
    log "installing pinned Python dependencies into $VENV (first run: a few minutes)"
    "$VENV/bin/pip" install -q --upgrade pip >/dev/null
    # torch first: a CPU-only machine gets the CPU wheel when CPTSCALE_TORCH_INDEX points at a CPU wheel index.
    "$VENV/bin/pip" install -q "torch==$(sed -n 's/^torch==//p' requirements.lock)" \
      ${CPTSCALE_TORCH_INDEX:+--index-url "$CPTSCALE_TORCH_INDEX"}
    "$VENV/bin/pip" install -q -r requirements.lock
    "$VENV/bin/pip" install -q --no-deps -e .
    echo "$want" > "$STAMP"
  fi
  export PATH="$PWD/$VENV/bin:$PATH"
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
