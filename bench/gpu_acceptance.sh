#!/usr/bin/env bash
# GPU acceptance in one command, no arguments, at most 8 minutes on one GPU:
#
#     bash bench/gpu_acceptance.sh
#
# On a bare GPU machine it sets itself up, then runs bench/gpu_acceptance.py (what each check does is
# there), prints one table and writes results/gpu-acceptance/gpu_acceptance.json (exit 0: all checks
# passed; 1: a check failed; 3: no GPU on this machine, nothing installed or checked).
#
# Setup, in this order:
#  1. a Python whose torch sees CUDA: the machine's python3 when it has one (GPU images ship torch with
#     its CUDA libraries), else a venv (.venv-gpu) with PyPI's default torch build (the CUDA one);
#  2. the project's pinned dependencies (requirements.lock) that this Python lacks, installed with
#     --no-deps into .gpu-site/ (put on PYTHONPATH; the project itself runs from src/): from a local
#     wheelhouse when one exists (CPTSCALE_WHEELHOUSE, default .whl/; bench/gpu_wheelhouse.sh fills it
#     on a machine with network, for a GPU machine without), else from the package index;
#  3. Transformer Engine: used if importable; else installed from PyPI (limited to 150 s: its torch
#     extension may build from source); if that fails, the checks use Megatron-Core's local layer spec
#     and the table says so.
# Knobs (environment): CPTSCALE_ACCEPT_OUT (result dir), CPTSCALE_WHEELHOUSE, CPTSCALE_GPU_PEAK_FLOPS
# (per-GPU bf16 peak for MFU when the device name is not in the script's datasheet table), PYTHON.
# When $OUT is set (the device tool's result folder), the JSON, the table and the logs are copied there.
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
TOTAL_S=465  # 8 minutes, less a margin for start-up and copying results
OUTDIR=${CPTSCALE_ACCEPT_OUT:-results/gpu-acceptance}
WHEELHOUSE=${CPTSCALE_WHEELHOUSE:-.whl}
SITE=$PWD/.gpu-site
SYSPY=${PYTHON:-python3}
mkdir -p "$OUTDIR"

log() { printf '[gpu-acceptance] %s\n' "$*" >&2; }
elapsed() { echo $(( $(date +%s) - T0 )); }

copy_out() {
  [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ] || return 0
  local f
  for f in "$OUTDIR"/gpu_acceptance.json "$OUTDIR"/table.txt "$OUTDIR"/gpu_acceptance.log "$OUTDIR"/te-install.log; do
    [ -f "$f" ] && cp "$f" "$OUT"/
  done
  # every check's logs, also those of the launches and workflows inside a check (work/<check>/...)
  [ -d "$OUTDIR/work" ] && (cd "$OUTDIR/work" && find . -name '*.log' -size -20M -print0 | tar -czf "$OUT/check-logs.tar.gz" --null -T -) 2>/dev/null
  return 0
}

# -- 1. is there a GPU? (a machine without one stops here, before installing anything) ---------------
if ! { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; } && [ ! -e /dev/nvidia0 ]; then
  "$SYSPY" bench/gpu_acceptance.py --out "$OUTDIR" \
    --no-gpu "no NVIDIA GPU: nvidia-smi lists none and /dev/nvidia0 does not exist" | tee "$OUTDIR/table.txt"
  copy_out
  exit 3
fi
NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
log "$NGPU GPU(s): $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1)"

exec > >(tee "$OUTDIR/gpu_acceptance.log") 2>&1  # everything from here on is also kept in a log

# -- 2. a Python with CUDA torch ------------------------------------------------------------------------
if "$SYSPY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  PY=$(command -v "$SYSPY")
  log "torch $("$PY" -c 'import torch; print(torch.__version__)') with CUDA in $PY ($("$PY" -V 2>&1))"
else
  log "no torch with CUDA in $SYSPY: a venv (.venv-gpu) with PyPI's torch (CUDA build)"
  [ -x .venv-gpu/bin/python ] || "$SYSPY" -m venv .venv-gpu || { log "cannot create a venv"; exit 1; }
  PY=$PWD/.venv-gpu/bin/python
  "$PY" -m pip install -q "torch==$(sed -n 's/^torch==//p' requirements.lock)" || "$PY" -m pip install -q torch \
    || { log "cannot install torch (no network and no torch on this machine)"; exit 1; }
fi
export PYTHONPATH="$PWD/src:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$SITE/bin:$PATH"

# -- 3. the project's dependencies this Python lacks ----------------------------------------------------
# (bench/gpu_requirements.py: the lock's pins for this Python, markers evaluated, without torch, whose CUDA
# build is the machine's, and what the acceptance run never imports; the same list bench/gpu_wheelhouse.sh
# downloads)
MISSING=$("$PY" bench/gpu_requirements.py --missing) || { log "cannot read requirements.lock"; copy_out; exit 1; }
if [ -n "$MISSING" ]; then
  n=$(echo "$MISSING" | wc -l)
  if ls "$WHEELHOUSE"/*.whl >/dev/null 2>&1; then
    log "installing $n missing pinned packages from the wheelhouse $WHEELHOUSE into $SITE"
    # shellcheck disable=SC2086
    "$PY" -m pip install -q --no-index --find-links "$WHEELHOUSE" --no-deps --target "$SITE" $MISSING \
      || { log "wheelhouse install failed: run bench/gpu_wheelhouse.sh on a machine with network"; copy_out; exit 1; }
  else
    log "installing $n missing pinned packages from the package index into $SITE"
    # shellcheck disable=SC2086
    "$PY" -m pip install -q --no-deps --target "$SITE" $MISSING \
      || { log "cannot install $MISSING: no network? fill a wheelhouse with bench/gpu_wheelhouse.sh"; copy_out; exit 1; }
  fi
fi
mkdir -p "$SITE/bin"
printf '#!/bin/sh\nexec "%s" -m cptscale.cli "$@"\n' "$PY" > "$SITE/bin/cptscale"
chmod +x "$SITE/bin/cptscale"
"$PY" -c 'import megatron.core, snakemake, duckdb, pydantic, cptscale.cli' \
  || { log "the project does not import with $PY; see above"; copy_out; exit 1; }

# -- 4. Transformer Engine ------------------------------------------------------------------------------
if "$PY" -c 'import transformer_engine.pytorch' >/dev/null 2>&1; then
  TE="importable on this machine"
else
  CUDA_MAJOR=$("$PY" -c 'import torch; print((torch.version.cuda or "12").split(".")[0])')
  log "Transformer Engine missing: trying PyPI (transformer_engine, _cu$CUDA_MAJOR, _torch; 150 s at most)"
  if timeout 150 "$PY" -m pip install -q --retries 0 --timeout 15 --no-deps --no-build-isolation --target "$SITE" \
       transformer_engine "transformer_engine_cu$CUDA_MAJOR" transformer_engine_torch >"$OUTDIR/te-install.log" 2>&1 \
     && "$PY" -c 'import transformer_engine.pytorch' >>"$OUTDIR/te-install.log" 2>&1; then
    TE="installed from PyPI"
  else
    why=$(grep -v '^\s*$' "$OUTDIR/te-install.log" | tail -n 1 | cut -c1-160)
    TE="not installable from PyPI here (${why:-timed out after 150 s}): Megatron-Core local spec"
  fi
fi
log "Transformer Engine: $TE"

# -- 5. the checks -----------------------------------------------------------------------------------------
BUDGET=$(( TOTAL_S - $(elapsed) - 10 ))
log "setup took $(elapsed) s; checks get $BUDGET s"
"$PY" bench/gpu_acceptance.py --out "$OUTDIR" --te-status "$TE" --budget-s "$BUDGET" | tee "$OUTDIR/table.txt"
rc=${PIPESTATUS[0]}
log "done in $(elapsed) s (exit $rc)"
copy_out
exit "$rc"
