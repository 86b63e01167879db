#!/usr/bin/env bash
# Set up, then run the whole test suite (unit and integration) with the real models.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
