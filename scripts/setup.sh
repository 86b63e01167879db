#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: virtual environment, dependencies, models.
#
#   scripts/setup.sh [--cuda 13|12|none] [--dry-run] [--json]
#
# The onnxruntime-gpu line comes from the GPU: `nvidia-smi --query-gpu=compute_cap`
# and models/cuda_builds.json (the architectures each published wheel really
# carries) decide between the CUDA 13 line (constraints.txt: Turing and newer), the
# CUDA 12 line (constraints-cuda12.txt: Pascal and Volta, e.g. a GeForce MX230,
# with cuDNN below 9.11), the newest build with Maxwell 5.2 code
# (constraints-cuda12-sm52.txt), and the CPU (no nvidia-smi, or a card no build
# has code for). --cuda overrides it; --dry-run installs nothing and prints the
# choice, as one JSON object on its last line with --json.
# Models come from ../shared/models when it exists (or IDENT_MODELS_MIRROR), else upstream.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { echo "usage: scripts/setup.sh [--cuda 13|12|none] [--dry-run] [--json]" >&2; exit 2; }
cuda=""
dry_run=0
json=0
while [ $# -gt 0 ]; do
  case "$1" in
    --cuda) [ $# -ge 2 ] || usage; cuda=$2; shift 2 ;;
    --cuda=*) cuda=${1#--cuda=}; shift ;;
    --dry-run) dry_run=1; shift ;;
    --json) json=1; shift ;;
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "scripts/setup.sh: unknown argument $1" >&2; usage ;;
  esac
done
case "$cuda" in ""|13|12|none) ;; *) echo "scripts/setup.sh: --cuda takes 13, 12 or none, not $cuda" >&2; exit 2 ;; esac

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "identification needs Python >= 3.11 (found $("$PYTHON" --version 2>&1)); set PYTHON=python3.11" >&2
  exit 1
fi

# The choice needs only the standard library, so it runs before the venv exists.
choice=$("$PYTHON" -m models.cuda_builds choose --json ${cuda:+--cuda "$cuda"})
field() { "$PYTHON" -c 'import json, sys; v = json.loads(sys.argv[1])[sys.argv[2]]; print(v if isinstance(v, str) else "\n".join(v))' "$choice" "$1"; }
line=$(field line)
if [ "$dry_run" = 1 ]; then
  if [ "$json" = 1 ]; then
    echo "$choice"
  else
    echo "line:     $line"
    echo "reason:   $(field reason)"
    echo "command:  $(field command)"
  fi
  exit 0
fi
echo "onnxruntime line: $line ($(field reason))"

# A venv left without pip (python3 -m venv fails half-way on Debian/Ubuntu
# without python3.X-venv) is made again rather than reused.
if ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
  rm -rf .venv
  if ! "$PYTHON" -m venv .venv; then
    echo "could not create a virtual environment: on Debian/Ubuntu, install python3-venv (apt install python3.11-venv)" >&2
    rm -rf .venv
    exit 1
  fi
fi
constraints=$(field constraints)
stamp=.venv/.installed-$line-$(cat pyproject.toml "$constraints" | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  mapfile -t packages < <(field packages)
  .venv/bin/python -m pip install --quiet -c "$constraints" -e ".[dev]" "${packages[@]}"
  rm -f .venv/.installed-*
  touch "$stamp"
fi

mirror=${IDENT_MODELS_MIRROR:-}
if [ -z "$mirror" ] && [ -d ../shared/models ]; then
  mirror=$(cd ../shared/models && pwd)
fi
if [ -n "$mirror" ]; then
  .venv/bin/ident models fetch --from "$mirror"
else
  .venv/bin/ident models fetch
fi
