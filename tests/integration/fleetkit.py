"""Helpers for the reliability and security tests: own fleets, real signals.

Each test module that needs settings of its own (a short visibility timeout,
tight limits, a password) starts its own ``redis-server`` and its own
``celery -A workers.<kind> worker`` processes through :mod:`ident.fleet`,
exactly as the shared fixtures in ``conftest.py`` do.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil

from ident.fleet import EmbeddedRedis, WorkerProcess, start_worker, wait_until_ready
from tasks.client import IdentClient
from tasks.settings import Settings

DELIVERIES_KEY = "ident:deliveries:{}"


def make_env(redis: EmbeddedRedis, models_path: Path, **ident: object) -> dict[str, str]:
    """The environment of a worker or producer: this process's, minus IDENT_*, plus ``ident``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("IDENT_")}
    env.update(IDENT_REDIS_URL=redis.url, IDENT_MODELS_DIR=str(models_path), PYTHONUNBUFFERED="1")
    env.update({f"IDENT_{key.upper()}": str(value) for key, value in ident.items()})
    return env


class Fleet:
    """One redis-server, the workers started on it, and a producer client."""

    def __init__(self, redis: EmbeddedRedis, env: dict[str, str], logs_dir: Path) -> None:
        self.redis = redis
        self.env = env
        self.logs_dir = logs_dir
        self.client = IdentClient(Settings.from_env(env))
        self.app = self.client.app
        self.settings = self.client.settings
        self.workers: dict[str, WorkerProcess] = {}

    @property
    def backend(self):
        """A plain redis-py client on the fleet's Redis (the result backend's own)."""
        return self.app.backend.client

    def start(self, kind: str, name: str, concurrency: int = 1, env: dict[str, str] | None = None,
              extra: list[str] | None = None, wait: bool = True) -> WorkerProcess:
        worker = start_worker(kind, env or self.env, concurrency=concurrency, name=name,
                              log_dir=self.logs_dir, extra=extra)
        self.workers[name] = worker
        if wait:
            self.wait_ready([worker])
        return worker

    def wait_ready(self, workers: list[WorkerProcess] | None = None, timeout: float = 180) -> list[dict]:
        return wait_until_ready(self.app, workers or list(self.workers.values()), timeout=timeout)

    def processes(self, name: str, timeout: float = 3.0) -> list[dict]:
        """model_status's entries for worker ``name``'s pool processes."""
        with self.app.connection_for_read() as connection:
            connection_errors = connection.connection_errors
        for attempt in range(3):
            try:
                replies = self.app.control.broadcast("model_status", reply=True, timeout=timeout,
                                                     destination=[name], limit=1)
                break
            except connection_errors:
                # kombu does not retry a broadcast on a connection pooled
                # before a Redis restart; the next call reconnects.
                if attempt == 2:
                    raise
        for reply in replies:
            if name in reply:
                return reply[name]["processes"]
        return []

    def stop_all(self) -> None:
        for worker in self.workers.values():
            worker.stop(timeout=20)
            kill_group(worker)
        self.workers.clear()


def kill_group(worker: WorkerProcess) -> None:
    """SIGKILL to the worker's whole process group (start_worker starts a new session)."""
    try:
        os.killpg(worker.process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        worker.process.wait(timeout=10)
    except Exception:  # noqa: BLE001 -- already reaped
        pass


def active_jobs(app, names: list[str], timeout: float = 1.0) -> dict[str, list[dict]]:
    """``inspect active`` of the named workers, without the payloads (safe=True)."""
    inspector = app.control.inspect(destination=names, timeout=timeout, limit=len(names))
    return inspector.active(safe=True) or {}


def reserved_jobs(app, names: list[str], timeout: float = 1.0) -> dict[str, list[dict]]:
    inspector = app.control.inspect(destination=names, timeout=timeout, limit=len(names))
    return inspector.reserved(safe=True) or {}


def find_running(app, names: list[str], job_id: str | None = None, exclude_pids=(), timeout: float = 60.0,
                 give_up=lambda: False) -> tuple[str, int, str] | None:
    """(worker name, pool process pid, job id) of a job that a pool process is running now.

    ``job_id`` picks that job; otherwise any job. Pids in ``exclude_pids``
    (processes already killed, still listed until the main process notices)
    are skipped.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not give_up():
        for name, requests in active_jobs(app, names).items():
            for request in requests:
                pid = request.get("worker_pid")
                if not pid or pid in exclude_pids or not psutil.pid_exists(pid):
                    continue
                if job_id is None or request["id"] == job_id:
                    return name, pid, request["id"]
        time.sleep(0.05)
    return None


def deliveries(fleet: Fleet, job_id: str) -> int:
    return int(fleet.backend.get(DELIVERIES_KEY.format(job_id)) or 0)


def children_rss(worker: WorkerProcess) -> dict[int, int]:
    """Resident set size (bytes) of each pool process of ``worker``."""
    parent = psutil.Process(worker.process.pid)
    return {child.pid: child.memory_info().rss for child in parent.children()}


def wait_for(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"{what} not reached within {timeout:.0f} s")


def outcome(result, timeout: float):
    """(True, value) for a success, (False, exception) for a failure; never raises."""
    try:
        return True, result.get(timeout=timeout)
    except Exception as exc:  # noqa: BLE001 -- the exception is the outcome under test
        return False, exc


def slow_image(tiles: int = 3) -> bytes:
    """A real group photo tiled ``tiles`` x ``tiles``: 51 faces at 3, 96 at 4, 147 at 5, 200+ at 8.

    At the default 50-face cap that is about 0.8 s of CPU per job on the dev
    machine; raise IDENT_MAX_FACES for longer jobs (96 faces: 1.3 s, 200: about 4 s).
    """
    import cv2
    import numpy as np

    from tests.conftest import data_dir

    photo = cv2.imread(str(data_dir() / "images" / "multi_face" / "selfie_many_people.jpg"))
    ok, encoded = cv2.imencode(".jpg", np.tile(photo, (tiles, tiles, 1)), [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return encoded.tobytes()
