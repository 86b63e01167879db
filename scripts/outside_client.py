"""A service outside this project, pushing real photos to the running fleet.

It imports nothing from this repository: plain Celery, tasks sent by name with
msgpack, as docs/contract.md describes. It keeps ``--concurrency`` jobs in
flight, waiting on the oldest each time, and prints what it saw as JSON, to
set beside ``ident bench`` (docs/benchmarks.md, "A client outside the project").

    python scripts/outside_client.py --jobs 120 --concurrency 8 [--by-reference] [--inputs DIR]

``IDENT_REDIS_URL`` names the fleet's Redis. By default each photo travels
inside its message; ``--by-reference`` writes it to Redis first and sends the
key, as the contract allows for large payloads.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

import redis
from celery import Celery
from celery import exceptions as celery_exceptions

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
# From docs/contract.md: a payload argument may be {"payload_ref": key} for a key with this prefix.
PAYLOAD_KEY_PREFIX = "ident:payload:"
PAYLOAD_TTL_S = 3600


def photos(folder: Path) -> list[bytes]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        sys.exit(f"no photos under {folder}: pass --inputs DIR")
    return [p.read_bytes() for p in files]


def main() -> int:
    shared = Path(os.environ.get("IDENT_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))
    data = Path(os.environ.get("IDENT_SAMPLES_DIR", shared / "data"))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=120)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--inputs", type=Path, default=data / "images", help="folder of photos (../shared/data/images)")
    parser.add_argument("--by-reference", action="store_true")
    parser.add_argument("--answer-timeout", type=float, default=300.0,
                        help="seconds without any answer before giving up (default: 300)")
    args = parser.parse_args()
    if args.jobs < 1 or args.concurrency < 1:
        parser.error("--jobs and --concurrency must be at least 1")

    # Empty counts as unset, as it does for the fleet.
    url = os.environ.get("IDENT_REDIS_URL", "").strip() or "redis://localhost:6379/0"
    app = Celery("outside-client", broker=url, backend=url)
    app.conf.update(task_serializer="msgpack", result_serializer="msgpack",
                    accept_content=["msgpack"], result_accept_content=["msgpack"])
    store = redis.Redis.from_url(url)
    try:
        store.ping()
    except redis.ConnectionError as exc:
        sys.exit(f"cannot reach Redis at {url} ({exc}): set IDENT_REDIS_URL to the fleet's Redis")
    images = photos(args.inputs)

    def send(index: int):
        image = images[index % len(images)]
        if args.by_reference:
            key = f"{PAYLOAD_KEY_PREFIX}{uuid.uuid4().hex}"
            store.set(key, image, ex=PAYLOAD_TTL_S)
            image = {"payload_ref": key}
        return app.send_task("vision.analyze", args=[image, None], queue="vision"), time.perf_counter()

    in_flight: collections.deque = collections.deque()
    latencies_ms, failures = [], collections.Counter()
    started = time.perf_counter()
    sent = 0
    while sent < min(args.jobs, args.concurrency):
        in_flight.append(send(sent))
        sent += 1
    last_answer = time.monotonic()
    while in_flight:
        job, sent_at = in_flight.popleft()
        try:
            # The patience is for the run, not each job: with no worker on the
            # queue, waiting on every job in turn would take hours.
            job.get(timeout=max(0.1, args.answer_timeout - (time.monotonic() - last_answer)))
        except celery_exceptions.TimeoutError:
            sys.exit(f"no answer for {args.answer_timeout:g} s with {len(in_flight) + 1} jobs in flight: is a vision "
                     f"worker consuming the vision queue at {url}?")
        except Exception as exc:  # noqa: BLE001 -- a job's own failure is counted, not fatal to the run
            failures[type(exc).__name__] += 1
        else:
            # As ident bench does: the latency of the jobs that succeeded.
            latencies_ms.append((time.perf_counter() - sent_at) * 1000.0)
        last_answer = time.monotonic()
        if sent < args.jobs:
            in_flight.append(send(sent))
            sent += 1
    wall = time.perf_counter() - started
    done = args.jobs - sum(failures.values())
    print(json.dumps({
        "jobs": args.jobs,
        "concurrency": args.concurrency,
        "by_reference": args.by_reference,
        "photos": len(images),
        "wall_s": round(wall, 3),
        "throughput_per_s": round(done / wall, 3),
        "latency_ms_p50": round(statistics.median(latencies_ms), 1) if latencies_ms else None,
        "failures": dict(failures),
    }))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
