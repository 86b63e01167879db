"""Failover under load: jobs/s before and after a SIGKILLed Redis master, and how long the fleet stalled.

Starts a master, a replica and three Sentinels (ident/redis_ha.py) and an
audio worker on them, keeps ``--in-flight`` jobs queued from one producer,
and after ``--seconds`` kills the master with SIGKILL. The killed server is
started again once a replica has been promoted, through the compose files'
deploy/redis-ha/start-redis.sh, as Docker's restart would run it: it asks the
Sentinels and comes back as the new master's replica. Reported:

* ``failover_s``: SIGKILL until the Sentinels name a new master that answers as one;
* ``stall_s``: the longest time without an answer around the kill, as a producer sees it;
* ``jobs_per_s_before`` / ``jobs_per_s_after``: answers per second over
  ``--seconds`` before the kill, and over ``--seconds`` starting once the
  stall is over;
* ``lost``: jobs sent and never answered (it must be 0); ``failed``: jobs answered with an error.

    .venv/bin/python scripts/failover_bench.py --seconds 20 --json /tmp/failover.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from celery.exceptions import TimeoutError as CeleryTimeout  # noqa: E402
from rich.console import Console  # noqa: E402

from ident.fleet import start_worker, wait_until_ready  # noqa: E402
from ident.redis_ha import SentinelGroup  # noqa: E402
from tasks.client import IdentClient  # noqa: E402
from tasks.settings import Settings  # noqa: E402

console = Console(stderr=True)
DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
MODELS = Path(__file__).resolve().parent.parent.parent / "shared" / "models"


def recording(path: Path | None) -> bytes:
    if path:
        return path.read_bytes()
    files = sorted((DATA / "audio" / "speakers").rglob("*.wav"))
    if not files:
        raise SystemExit(f"no recordings under {DATA / 'audio' / 'speakers'}: pass --audio FILE")
    return min(files, key=lambda p: p.stat().st_size).read_bytes()


def run(args) -> dict:
    group = SentinelGroup(password="bench").start()
    env = {key: value for key, value in os.environ.items() if not key.startswith("IDENT_")}
    env.update(group.env(), IDENT_MODELS_DIR=str(args.models), PYTHONUNBUFFERED="1",
               IDENT_CPU_THREADS=str(args.cpu_threads))
    worker = None
    try:
        logs = Path(tempfile.mkdtemp(prefix="ident-failover-"))
        worker = start_worker("audio", env, concurrency=args.concurrency, name="audio@failover", log_dir=logs)
        client = IdentClient(Settings.from_env(env))
        with console.status("loading models..."):
            wait_until_ready(client.app, [worker], timeout=300)
        payload = recording(args.audio)
        client.analyze("audio", payload).get(timeout=120)

        in_flight: deque = deque()
        answered: list[float] = []
        failed = lost = 0
        started = time.monotonic()
        killed_at = failover_s = None
        # Until the kill, then (once it is known) --seconds past the stall and a margin for it.
        stop_sending = started + 10 * args.seconds
        while time.monotonic() < stop_sending or in_flight:
            while time.monotonic() < stop_sending and len(in_flight) < args.in_flight:
                in_flight.append(client.analyze("audio", payload))
            oldest = in_flight.popleft()
            try:
                oldest.get(timeout=args.answer_timeout)
            except CeleryTimeout:
                lost += 1
                stored = client.app.backend.get_task_meta(oldest.id).get("status")
                console.print(f"no answer for job {oldest.id} within {args.answer_timeout:g} s; Redis holds its result as {stored}")
                continue
            except Exception as exc:  # noqa: BLE001 -- counted, as a producer would
                failed += 1
                console.print(f"failed: {type(exc).__name__}: {exc}")
            answered.append(time.monotonic())
            if killed_at is None and answered[-1] - started >= args.seconds:
                old_port = group.master_port()
                killed = group.kill_master()
                killed_at = time.monotonic()
                failover_s = group.wait_for_failover(old_port)
                console.print(f"master killed; a replica promoted {failover_s:.2f} s later")
                # As Docker's restart of the compose file's redis: through start-redis.sh,
                # which asks the Sentinels and starts it as the new master's replica.
                group.restart(killed)
                stop_sending = killed_at + failover_s + args.seconds + 15
        before = [t for t in answered if started <= t < killed_at]
        stall_s = _longest_gap([t for t in answered if killed_at - 5 <= t])
        recovered = _stall_end(answered, killed_at)
        after = [t for t in answered if recovered <= t < recovered + args.seconds]
        return {
            "machine": args.machine, "kind": "audio", "concurrency": args.concurrency, "in_flight": args.in_flight,
            "seconds": args.seconds, "answered": len(answered), "lost": lost, "failed": failed,
            "failover_s": round(failover_s, 2), "stall_s": round(stall_s, 2),
            "jobs_per_s_before": round(len(before) / (killed_at - started), 2),
            "jobs_per_s_after": round(len(after) / args.seconds, 2),
        }
    finally:
        if worker:
            worker.stop(timeout=30)
        group.stop()


def _longest_gap(times: list[float]) -> float:
    return max((b - a for a, b in zip(times, times[1:])), default=0.0)


def _stall_end(answered: list[float], killed_at: float) -> float:
    """When answers came again after the longest gap following the kill."""
    later = [t for t in answered if t >= killed_at - 5]
    gaps = [(b - a, b) for a, b in zip(later, later[1:])]
    return max(gaps)[1] if gaps else killed_at


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0, help="measured before the kill, and after it")
    parser.add_argument("--in-flight", type=int, default=8, help="jobs kept queued (default 8)")
    parser.add_argument("--concurrency", type=int, default=2, help="the worker's pool processes (default 2)")
    parser.add_argument("--cpu-threads", type=int, default=1)
    parser.add_argument("--answer-timeout", type=float, default=120.0,
                        help="seconds a producer waits for one answer before counting the job lost (default 120)")
    parser.add_argument("--audio", type=Path, help="the recording sent (default: the shortest in ../shared/data)")
    parser.add_argument("--models", type=Path, default=MODELS)
    parser.add_argument("--machine", default="2 shared cores (AMD EPYC), no GPU")
    parser.add_argument("--json", type=Path, help="write the report here too")
    args = parser.parse_args()
    report = run(args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0 if report["failed"] == report["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
