#!/usr/bin/env bash
# Set up, then run the whole test suite (unit and integration) with the real models.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# One test needs a redis-server built with TLS (the bundled one is not); Debian's
# is. Installed when possible, otherwise that one test says why it skips.
if ! command -v redis-server >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (DEBIAN_FRONTEND=noninteractive timeout 300 apt-get update -qq && \
   DEBIAN_FRONTEND=noninteractive timeout 300 apt-get install -y -qq --no-install-recommends redis-server openssl) \
    >/dev/null 2>&1 || echo "note: could not install Debian's redis-server; the TLS test will skip" >&2
fi
exec .venv/bin/python -m pytest "$@"
