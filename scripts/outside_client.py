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
    data = Path(os.environ.get("IDENT_DATA_DIR", shared / "data"))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=120)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--inputs", type=Path, default=data / "images", help="folder of photos (../shared/data/images)")
    parser.add_argument("--by-reference", action="store_true")
    args = parser.parse_args()
    if args.jobs < 1 or args.concurrency < 1:
        parser.error("--jobs and --concurrency must be at least 1")

    url = os.environ.get("IDENT_REDIS_URL", "redis://localhost:6379/0")
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
    while in_flight:
        job, sent_at = in_flight.popleft()
        try:
            job.get(timeout=300)
        except Exception as exc:  # noqa: BLE001 -- a job's own failure is counted, not fatal to the run
            failures[type(exc).__name__] += 1
        latencies_ms.append((time.perf_counter() - sent_at) * 1000.0)
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
        "latency_ms_p50": round(statistics.median(latencies_ms), 1),
        "failures": dict(failures),
    }))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
