#!/usr/bin/env bash
# Fill a wheelhouse (default .whl/, git-ignored) for bench/gpu_acceptance.sh on a GPU machine that has no
# network: run this on a machine that has one, then bring .whl/ along with the checkout.
#
#     bash bench/gpu_wheelhouse.sh [--python-version 3.12] [--have FILE]
#
# It downloads (pip download --no-deps, binary wheels for manylinux x86_64 and that Python version) the
# pinned packages of requirements.lock the acceptance run needs, except those the GPU machine already
# has: torch and its CUDA stack always; by default the scientific stack a CUDA PyTorch image ships
# (DEFAULT_HAVE below); with --have FILE, exactly the distributions named in FILE (`pip list
# --format=freeze` or one name per line, taken on the GPU machine). The list, with environment markers
# evaluated for that Python, and what is never downloaded (linters, tests, the report, corpus fetching,
# the ILP solver, W&B) come from bench/gpu_requirements.py, which bench/gpu_acceptance.sh also uses.
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=3.12
HAVE_FILE=""
DEST=${CPTSCALE_WHEELHOUSE:-.whl}
while [ $# -gt 0 ]; do
  case "$1" in
    --python-version) PYVER=$2; shift 2 ;;
    --have) HAVE_FILE=$2; shift 2 ;;
    *) echo "usage: $0 [--python-version X.Y] [--have FILE]" >&2; exit 2 ;;
  esac
done
[ -z "$HAVE_FILE" ] || [ -f "$HAVE_FILE" ] || { echo "gpu_wheelhouse: --have $HAVE_FILE: no such file" >&2; exit 2; }

DEFAULT_HAVE="numpy pandas pyarrow scipy tokenizers pyyaml psutil jinja2 markupsafe requests urllib3 certifi idna
charset-normalizer packaging filelock fsspec sympy mpmath networkx typing-extensions tqdm attrs pygments
huggingface-hub hf-xet python-dateutil six xxhash anyio h11 click"
if [ -z "$HAVE_FILE" ]; then
  HAVE_FILE=$(mktemp)
  trap 'rm -f "$HAVE_FILE"' EXIT
  echo "$DEFAULT_HAVE" | tr ' ' '\n' > "$HAVE_FILE"
fi
# the lock's pins for that Python (markers evaluated), less torch, what the run never imports, and HAVE
reqs=$(python3 bench/gpu_requirements.py --python-version "$PYVER" --have "$HAVE_FILE")
mapfile -t want <<<"$reqs"

mkdir -p "$DEST"
echo "gpu_wheelhouse: ${#want[@]} wheels for Python $PYVER into $DEST" >&2
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64; do platforms+=(--platform "$p"); done
failed=()
for req in "${want[@]}"; do
  # a binary wheel for the target; a package published only as an sdist (pure Python) is built into a
  # wheel here instead
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
      "${platforms[@]}" -d "$DEST" "$req" 2>/dev/null \
    || python3 -m pip wheel -q --no-deps -w "$DEST" "$req" >/dev/null 2>&1 \
    || failed+=("$req")
done
du -sh "$DEST" >&2
if [ ${#failed[@]} -gt 0 ]; then echo "gpu_wheelhouse: no wheel for: ${failed[*]}" >&2; exit 1; fi
