#!/usr/bin/env bash
# Every figure in docs/benchmarks.md, side by side in one run: starts its own
# embedded redis-server and workers, runs `ident bench` against them, writes
# JSON reports and charts to ${OUT:-bench-out}/. Usage: scripts/benchmarks.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(mkdir -p "${OUT:-bench-out}" && cd "${OUT:-bench-out}" && pwd)

PY=.venv/bin/python
export IDENT_MODELS_DIR=${IDENT_MODELS_DIR:-$(cd ../shared/models && pwd)}
PORT=$($PY -c 'from ident.fleet import free_port; print(free_port())')
export IDENT_REDIS_URL=redis://127.0.0.1:$PORT/0
.venv/bin/redis-server --port "$PORT" --bind 127.0.0.1 --save "" --appendonly no --daemonize yes \
  --pidfile "$OUT/redis.pid" --logfile "$OUT/redis.log"
worker_pid=""
stop_worker() { if [ -n "$worker_pid" ]; then kill -TERM "$worker_pid" 2>/dev/null; wait "$worker_pid" 2>/dev/null || true; worker_pid=""; fi; }
cleanup() { stop_worker; kill "$(cat "$OUT/redis.pid")" 2>/dev/null || true; }
trap cleanup EXIT

start_worker() {  # kind concurrency [ENV=VALUE...]
  local kind=$1 conc=$2; shift 2
  env "$@" $PY -m celery -A "workers.$kind" worker -Q "$kind" -c "$conc" -n "$kind-bench@%h" \
    --loglevel WARNING >"$OUT/worker-$kind.log" 2>&1 &
  worker_pid=$!
  for _ in $(seq 120); do
    $PY -m ident.cli status --json --timeout 1 2>/dev/null | grep -q '"state": "ready"' && return 0
    sleep 1
  done
  echo "worker did not become ready" >&2; exit 1
}

bench() { .venv/bin/ident bench "$@"; }

start_worker vision 2
bench --kind vision --jobs 120 --concurrency 8 --json "$OUT/vision-c8.json"
bench --kind vision --jobs 120 --concurrency 8 --inline --json "$OUT/vision-c8-inline.json"
bench --kind vision --jobs 120 --concurrency 1,2,4,8,16 --json "$OUT/vision-sweep.json" --chart "$OUT/vision-sweep.png"
bench --kind vision --jobs 160 --concurrency 16 --json "$OUT/vision-c16-batch1.json"
stop_worker
start_worker vision 2 IDENT_MAX_BATCH=8 IDENT_MAX_WAIT_MS=5
bench --kind vision --jobs 160 --concurrency 16 --batch 8 --json "$OUT/vision-c16-batch8.json"
stop_worker

# One pool process owning both cores, two intra-op threads per session: where
# batching has threads to fill on a CPU.
start_worker vision 1 IDENT_CPU_THREADS=2
bench --kind vision --jobs 160 --concurrency 16 --json "$OUT/vision-1x2threads-c16-batch1.json"
stop_worker
start_worker vision 1 IDENT_CPU_THREADS=2 IDENT_MAX_BATCH=8 IDENT_MAX_WAIT_MS=5
bench --kind vision --jobs 160 --concurrency 16 --batch 8 --json "$OUT/vision-1x2threads-c16-batch8.json"
stop_worker

start_worker audio 2
bench --kind audio --jobs 40 --concurrency 8 --json "$OUT/audio-c8.json"
bench --kind audio --jobs 40 --concurrency 1,2,4,8 --json "$OUT/audio-sweep.json" --chart "$OUT/audio-sweep.png"
bench --kind audio --jobs 48 --concurrency 16 --json "$OUT/audio-c16-batch1.json"
stop_worker
start_worker audio 2 IDENT_MAX_BATCH=8 IDENT_MAX_WAIT_MS=5
bench --kind audio --jobs 48 --concurrency 16 --batch 8 --json "$OUT/audio-c16-batch8.json"
stop_worker

for kind in vision audio; do
  bench --kind "$kind" --chart "$OUT/$kind-c16-batch.png" --chart-from "$OUT/$kind-c16-batch1.json" "$OUT/$kind-c16-batch8.json"
done
bench --kind vision --chart "$OUT/vision-1x2threads-c16-batch.png" \
  --chart-from "$OUT/vision-1x2threads-c16-batch1.json" "$OUT/vision-1x2threads-c16-batch8.json"

$PY scripts/stage_batching.py > "$OUT/stages.json"
IDENT_CPU_THREADS=2 $PY scripts/stage_batching.py > "$OUT/stages-2threads.json"
echo "reports in $OUT/"
