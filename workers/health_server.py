"""The HTTP server of a worker's main process: /metrics, /healthz and /readyz on IDENT_METRICS_PORT.

* ``/metrics``: the Prometheus text of the worker (workers/metrics.py), summed
  over its pool processes, with the gauges read at the scrape (workers/scrape_gauges.py).
* ``/healthz``: 200 while the main process runs and answers; it asks nothing of
  Redis or the pool, so a Redis outage or a slow model load never gets a
  worker restarted (a liveness probe).
* ``/readyz``: 200 when every pool process has loaded its models and Redis
  answers a PING within :data:`REDIS_TIMEOUT_S`, else 503 with every reason, one
  a line ("redis unreachable: ...", "pool process 2 of 2 (pid 4242) is still
  loading its models"). Checked at each request, so it follows a change at once.

A small threaded ``http.server`` rather than prometheus-client's
``start_http_server`` alone: that one serves the same metrics on every path,
with no way to add health endpoints that answer 503, and a second port for
them would be one more thing to open, probe and document per worker. Here one
port serves all three, each request on its own thread, so a slow scrape or a
PING waiting on an unreachable Redis never holds up ``/healthz``.
"""

from __future__ import annotations

import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

import psutil
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tasks.app import celery_config
from tasks.redis_connection import redis_client
from tasks.settings import Settings
from workers import status as status_files

log = logging.getLogger(__name__)

# Connect and read timeouts of the readiness PING (and of the queue lengths'
# LLENs), with one immediate retry: a connection pooled before a Redis restart
# fails once, and the retry reconnects. About a second at worst.
REDIS_TIMEOUT_S = 0.5
# Every interface: Prometheus and Kubernetes' probes reach a pod by its IP.
BIND_ADDRESS = "0.0.0.0"
TEXT = "text/plain; charset=utf-8"
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


def redis_probe_client(settings: Settings) -> redis.Redis:
    """A Redis client of the main process's own, apart from Celery's connections, that gives up fast."""
    tls = celery_config(settings).get("redis_backend_use_ssl") or {}
    return redis_client(settings, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S,
                        retry=Retry(NoBackoff(), 1), health_check_interval=0, **tls)


def redis_problem(client: redis.Redis) -> str | None:
    """Why Redis does not answer a PING, or None. The URL (and any password in it) is never quoted."""
    try:
        client.ping()
    except Exception as exc:  # noqa: BLE001 -- any failure means not ready
        return f"redis unreachable: {type(exc).__name__}: {exc}"
    return None


def pool_problems(pool: tuple[list[int], int] | None, statuses: dict[int, dict],
                  alive: Callable[[int], bool]) -> list[str]:
    """Why the pool cannot take jobs yet, one reason per process; [] when every process has loaded its models.

    ``pool``: (the pool's processes in its order, how many it should have), or
    None for a pool without child processes, whose models load in the main
    process on its first job; ``statuses``: each one's status file (workers/status.py).
    """
    if pool is None:
        return []
    pids, size = pool
    if not pids and not size:
        return ["the pool has not started its processes yet"]
    total = max(size, len(pids))
    problems = []
    for number, pid in enumerate(pids, start=1):
        name = f"pool process {number} of {total} (pid {pid})"
        status = statuses.get(pid) or {}
        state = status.get("state")
        if not alive(pid):
            problems.append(f"{name} has exited; the pool is replacing it")
        elif state == status_files.FAILED:
            problems.append(f"{name} could not load its models: {status.get('message')}")
        elif state != "ready":
            problems.append(f"{name} is still loading its models")
    for number in range(len(pids) + 1, total + 1):
        problems.append(f"pool process {number} of {total} has not started yet")
    return problems


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class Readiness:
    """/readyz's checks for one worker: its pool processes' models, then Redis."""

    def __init__(self, identity, pool: Callable[[], tuple[list[int], int] | None], redis_client: redis.Redis) -> None:
        self.identity = identity
        self.pool = pool
        self.redis = redis_client
        self.stopping = False

    def problems(self) -> list[str]:
        if self.stopping:
            return ["the worker is shutting down"]
        pool = self.pool()
        statuses = {pid: status_files.read_status_file(self.identity, pid) for pid in (pool or ((), 0))[0]}
        problems = pool_problems(pool, statuses, _alive)
        redis_says = redis_problem(self.redis)
        return problems + ([redis_says] if redis_says else [])


class HealthServer:
    """The three endpoints on one port, served from a daemon thread of the main process."""

    def __init__(self, port: int, metrics_text: Callable[[], bytes], readiness: Callable[[], list[str]],
                 address: str = BIND_ADDRESS) -> None:
        handler = type("Handler", (_Handler,), {"metrics_text": staticmethod(metrics_text),
                                                "readiness": staticmethod(readiness)})
        self._server = ThreadingHTTPServer((address, port), handler)
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> None:
        self._thread = threading.Thread(target=self._server.serve_forever, name="ident-health-server", daemon=True)
        self._thread.start()

    def close_in_child(self) -> None:
        """In a pool process forked from the main process: close its copy of the listening socket
        (the serving thread was not copied), so that the port goes with the main process."""
        self._server.socket.close()

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.server_close()


class _Handler(BaseHTTPRequestHandler):
    metrics_text: Callable[[], bytes]
    readiness: Callable[[], list[str]]
    server_version = "ident-worker"

    def do_GET(self) -> None:  # noqa: N802 -- http.server's name
        path = self.path.split("?", 1)[0]
        try:
            status, body, content_type = self._respond(path)
        except Exception:  # noqa: BLE001 -- one failed request must not take the others down
            log.exception("the health server could not answer %s", path)
            status, body, content_type = HTTPStatus.INTERNAL_SERVER_ERROR, b"internal error\n", TEXT
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _respond(self, path: str) -> tuple[HTTPStatus, bytes, str]:
        if path == "/healthz":
            return HTTPStatus.OK, b"ok\n", TEXT
        if path == "/readyz":
            problems = self.readiness()
            if problems:
                return HTTPStatus.SERVICE_UNAVAILABLE, ("\n".join(problems) + "\n").encode(), TEXT
            return HTTPStatus.OK, b"ready\n", TEXT
        if path == "/metrics":
            return HTTPStatus.OK, self.metrics_text(), PROMETHEUS_TEXT
        return HTTPStatus.NOT_FOUND, b"not found: /metrics, /healthz and /readyz are served here\n", TEXT

    def log_message(self, format: str, *args) -> None:  # noqa: A002 -- http.server's signature
        # Probes and scrapes every few seconds would flood the worker's log.
        log.debug("%s %s", self.address_string(), format % args)
