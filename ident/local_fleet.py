"""The local fleet `ident up` and `ident demo` run in the foreground.

An embedded redis-server (unless IDENT_REDIS_URL names one), one worker per
kind and, if asked, Flower; started and stopped as one. The processes
themselves are ident.fleet's.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time

from rich.console import Console

from ident.fleet import EmbeddedRedis, FleetError, make_client, signals_held, start_worker, wait_until_ready
from tasks.errors import IdentError

err_console = Console(stderr=True)


def metrics_ports(port: int) -> dict[str, int]:
    """The port of each worker of a local fleet for IDENT_METRICS_PORT=port: two workers on one host
    cannot share one, so vision gets it and audio the next (the one before, at 65535); {} when off."""
    if not port:
        return {}
    return {"vision": port, "audio": port + 1 if port < 65535 else port - 1}


class LocalFleetRunner:
    """The fleet `ident up` and `ident demo` run: Redis, one worker per kind, Flower."""

    def __init__(self, args) -> None:
        self.args = args
        self.redis = None
        self.workers = []
        self.flower = None
        self.flower_log = None

    def start(self):
        from kombu.exceptions import OperationalError
        from redis.exceptions import ConnectionError as RedisConnectionError

        from tasks.client import IdentClient
        from tasks.settings import load_settings, redacted_url

        # What can be found wrong now stops the command before any process is started.
        load_settings()
        if self.args.flower:
            check_port_free(self.args.flower_port)
        env = dict(os.environ)
        # Empty counts as unset here as in tasks/settings.py, which reads it as the default URL.
        if (env.get("IDENT_REDIS_URL") or "").strip():
            try:
                make_client()
            except (OperationalError, RedisConnectionError) as exc:
                # The workers would retry it until --ready-timeout ran out.
                raise FleetError(
                    f"nothing answers at IDENT_REDIS_URL={redacted_url(load_settings().redis_url)} ({exc}). "
                    f"`ident {self.args.command}` uses that Redis when IDENT_REDIS_URL is set: start Redis there, "
                    "or unset IDENT_REDIS_URL so that it runs an embedded one"
                ) from exc
        else:
            self.redis = EmbeddedRedis().start()
            env["IDENT_REDIS_URL"] = self.redis.url
            os.environ["IDENT_REDIS_URL"] = self.redis.url
            err_console.print(f"embedded redis-server at {self.redis.url}")
        ports = metrics_ports(load_settings().metrics_port)
        with err_console.status("starting workers and loading models..."):
            self.workers = [
                start_worker(kind, {**env, **({"IDENT_METRICS_PORT": str(ports[kind])} if ports else {})},
                             concurrency, name=f"{kind}@local")
                for kind, concurrency in (("vision", self.args.vision_concurrency),
                                          ("audio", self.args.audio_concurrency))
            ]
            client = IdentClient()
            wait_until_ready(client.app, self.workers, timeout=self.args.ready_timeout)
        if self.args.flower:
            self.flower = self._start_flower(env)
        for worker in self.workers:
            err_console.print(f"{worker.name}: log {worker.log_path}")
        for kind, port in ports.items():
            err_console.print(f"{kind}@local: metrics at http://127.0.0.1:{port}/metrics, health on /healthz and /readyz")
        return client

    def _start_flower(self, env: dict) -> subprocess.Popen:
        """Flower on loopback only, with basic auth, its log beside the workers'."""
        from tasks.settings import load_settings

        user, _, password = (self.args.flower_auth or load_settings().flower_auth).partition(":")
        if not password:
            password = secrets.token_urlsafe(12)
        log_path = self.flower_log = self.workers[0].log_path.with_name("flower.log")
        with log_path.open("ab") as log_file:
            flower = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "workers.vision", "flower", "--address=127.0.0.1",
                 f"--port={self.args.flower_port}", f"--basic-auth={user or 'admin'}:{password}"],
                env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if flower.poll() is not None:
                raise IdentError(f"Flower exited with {flower.returncode}; see {log_path}")
            try:
                with socket.create_connection(("127.0.0.1", self.args.flower_port), timeout=0.2):
                    break
            except OSError:
                time.sleep(0.2)
        else:
            flower.kill()
            raise IdentError(f"Flower did not listen on port {self.args.flower_port} within 20 s; see {log_path}")
        err_console.print(f"Flower at http://127.0.0.1:{self.args.flower_port} (user {user or 'admin'}, "
                          f"password {password}); log {log_path}")
        return flower

    def first_exit(self) -> str | None:
        """Which of the fleet's processes has ended, with its exit code and log; None while all run."""
        children = [(f"worker {w.name}", w.process, w.log_path) for w in self.workers]
        if self.redis:
            children.append(("the embedded redis-server", self.redis.process, None))
        if self.flower:
            children.append(("Flower", self.flower, self.flower_log))
        for name, process, log_path in children:
            code = process.poll()
            if code is not None:
                return f"{name} {exit_status(code)}" + (f"; see {log_path}" if log_path else "")
        return None

    def stop(self) -> None:
        # A stop signal arriving now (a second Ctrl-C, or SIGTERM as the demo ends)
        # must not cut this short: that would leave the rest of the fleet running.
        with signals_held():
            self._stop_processes()

    def _stop_processes(self) -> None:
        with err_console.status("stopping the fleet..."):
            if self.flower and self.flower.poll() is None:
                self.flower.terminate()
                try:
                    self.flower.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.flower.kill()
                    self.flower.wait()
            for worker in self.workers:
                worker.stop()
            if self.redis:
                self.redis.cleanup()


def check_port_free(port: int) -> None:
    """Refuse a Flower port that another program holds: it would answer in Flower's place."""
    with socket.socket() as probe:
        # As a listening server does, so that a closed connection's TIME_WAIT is no obstacle.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as exc:
            raise IdentError(f"Flower cannot listen on 127.0.0.1:{port}: {exc.strerror or exc} (another program "
                             "holds the port?); pick another with --flower-port") from exc


def exit_status(code: int) -> str:
    """A Popen returncode in words: a negative one is the signal that ended the process."""
    if code >= 0:
        return f"exited with code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    return f"exited with code {code} (killed by {name})"
