#!/usr/bin/env bash
# Quick start: set up, then bring up a local fleet on an embedded Redis, run the
# sample inputs through it, print the results with the provider used, and stop.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/ident demo "$@"
