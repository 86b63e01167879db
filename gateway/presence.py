"""Which queues have a worker consuming them, from the fleet's ``model_status`` broadcast.

A job sent to a queue nobody consumes would wait there unanswered until the
caller gave up, and run later for nobody. The gateway refuses it instead
(503, nothing sent), and must know that cheaply: a background thread asks the
fleet every REFRESH_S seconds (one broadcast, the one ``ident status`` sends)
and requests read the last answer. A queue counts as served while a worker
that is not failing answered for it within the last STALE_AFTER_S seconds.
"""

from __future__ import annotations

import logging
import threading
import time

from tasks.client import IdentClient

log = logging.getLogger("ident.gateway")

REFRESH_S = 2.0
# Three broadcasts in a row without the queue's worker: a restart's gap is not an outage.
STALE_AFTER_S = 3 * REFRESH_S + 1.0
BROADCAST_TIMEOUT_S = 1.0


class FleetPresence:
    def __init__(self, client: IdentClient) -> None:
        self.client = client
        self._seen: dict[str, float] = {}
        self._replies: list[dict] = []
        self._refreshed = threading.Event()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ident-gateway-presence", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=BROADCAST_TIMEOUT_S + 2)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
            except Exception as exc:  # noqa: BLE001 -- Redis down: no queue counts as served until it is back
                log.warning("fleet status broadcast failed: %s", exc)
                self._refreshed.set()
            self._stop.wait(REFRESH_S)

    def refresh(self) -> list[dict]:
        """Ask the fleet now; the replies are also what GET /v1/status summarises."""
        replies = self.client.model_status(timeout=BROADCAST_TIMEOUT_S)
        now = time.monotonic()
        with self._lock:
            self._replies = replies
            for reply in replies:
                for body in reply.values():
                    processes = body.get("processes") or []
                    # A worker whose processes all failed to load is shutting down: it takes no job.
                    if body.get("queue") and any(p.get("state") != "failed" for p in processes):
                        self._seen[body["queue"]] = now
        self._refreshed.set()
        return replies

    def serves(self, queue: str) -> bool:
        """Whether a worker consumes ``queue``: waits for the first broadcast after start, then reads the cache."""
        self._refreshed.wait(BROADCAST_TIMEOUT_S + 2)
        with self._lock:
            seen = self._seen.get(queue)
        return seen is not None and time.monotonic() - seen < STALE_AFTER_S


def summarize(replies: list[dict]) -> dict:
    """GET /v1/status: per queue, its workers and their pool processes by state; per worker, its devices."""
    queues: dict[str, dict] = {}
    workers = []
    for reply in replies:
        for name, body in reply.items():
            processes = body.get("processes") or []
            queue = body.get("queue") or "unknown"
            states: dict[str, int] = {}
            for process in processes:
                states[process.get("state", "unknown")] = states.get(process.get("state", "unknown"), 0) + 1
            workers.append({
                "worker": name, "queue": queue, "processes": len(processes), "states": states,
                "devices": sorted({str(p.get("device")) for p in processes if p.get("device")}),
                "execution_providers": sorted({str(p.get("execution_provider")) for p in processes
                                               if p.get("execution_provider")}),
            })
            entry = queues.setdefault(queue, {"workers": 0, "processes": 0, "ready": 0})
            entry["workers"] += 1
            entry["processes"] += len(processes)
            entry["ready"] += states.get("ready", 0)
    return {"queues": queues, "workers": sorted(workers, key=lambda w: w["worker"])}
