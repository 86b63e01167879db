#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: virtual environment, dependencies, models.
# Models come from ../shared/models when it exists (or IDENT_MODELS_MIRROR), else upstream.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "identification needs Python >= 3.11 (found $("$PYTHON" --version 2>&1)); set PYTHON=python3.11" >&2
  exit 1
fi
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
stamp=.venv/.installed-$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -c constraints.txt -e ".[dev]"
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
