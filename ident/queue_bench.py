"""``ident bench --kind queue``: what the queue alone costs, raw Redis against stock Celery against the fleet.

Three ways of running a job that does nothing, side by side on one Redis,
each with two consumer processes and the same producer process:

``raw``
    two redis-py processes, each looping ``BLMOVE`` from the queue into its
    own processing list, then storing the result (``SET`` with an expiry) and
    handing it to the producer (``RPUSH`` onto a per-job reply list) in one
    ``MULTI`` round trip, then ``LREM`` from the processing list (the ack).
    The producer ``LPUSH``es each message (one round trip each, as a Celery
    publish is) and then ``BLPOP``s the replies in order. That is the least a
    reliable Redis queue does per job: a take that survives a dead consumer,
    a stored result whose writer wakes the waiter, an acknowledgement.
``celery``
    stock Celery (``ident/noop_app.py``): ``celery -A ident.noop_app worker
    -c 2``, prefork pool, stock kombu transport and result backend, msgpack,
    late acks, two jobs prefetched per process, as the fleet is configured.
``fleet``
    ``vision.get_status``, the fleet's cheapest task, on a real vision worker
    (``ident.fleet.start_worker``, ``-c 2``, ``IDENT_DEVICE=cpu``): the
    fleet's transport, pool, task base class and result backend.

For ``celery`` and ``fleet`` the producer is plain Celery in this process
(``send_task`` by name, msgpack, kombu's stock Redis transport named
explicitly, the stock Redis result backend), keeping the results as
``AsyncResult`` and then ``get()``-ing them in order. Every run sends all its
jobs, then waits for them in order; jobs/s = jobs / (first send to last
result). Each run is preceded by untimed warm-up jobs of its own kind, and
the three kinds run in turn, twice (A B C A B C), so that noise shows as the
spread between a kind's two runs. Each run also reports the CPU time per job
of the producer, the consumers (a worker's main process), the pool processes
and the embedded redis-server, read from /proc before and after it.

The bench starts everything it measures (an embedded redis-server unless
IDENT_REDIS_URL is set; then it uses that Redis with queue names of its own,
never the fleet's ``vision``/``audio`` queues) and stops all of it, on
Ctrl-C, SIGTERM, SIGHUP and errors too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import msgpack
import redis

from ident.fleet import signals_held, stopped_by_signals
from tasks.errors import IdentError

REPO_ROOT = Path(__file__).resolve().parent.parent

KINDS = ("raw", "celery", "fleet")
LABELS = {
    "raw": "raw redis-py",
    "celery": "stock Celery",
    "fleet": "fleet (vision.get_status)",
}
DEFAULT_JOBS = 1500
DEFAULT_WARMUP = 100
ROUNDS = 2
CONSUMERS = 2
FLEET_TASK = "vision.get_status"
# The fleet's workers log at INFO (ident.fleet.worker_command); the stock worker logs alike.
WORKER_LOGLEVEL = "INFO"
ANSWER_TIMEOUT_S = 60
START_TIMEOUT_S = 180
STOP_TIMEOUT_S = 10
RESULT_TTL_S = 3600


def console():
    from rich.console import Console

    return Console(stderr=True)


# --- the raw consumer (a process of its own: python -m ident.queue_bench consume ...) ---


def raw_keys(prefix: str, job_id: str) -> tuple[str, str]:
    """(result key, reply list) of one raw job."""
    return f"{prefix}:result:{job_id}", f"{prefix}:reply:{job_id}"


def consume(url: str, queue: str, processing: str, prefix: str, ready_key: str, parent: int) -> None:
    client = redis.Redis.from_url(url)
    client.rpush(ready_key, os.getpid())
    while True:
        item = client.blmove(queue, processing, 1, "RIGHT", "LEFT")
        if item is None:
            if os.getppid() != parent:
                return  # the bench is gone: do not outlive it
            continue
        message = msgpack.unpackb(item)
        if message.get("stop"):
            client.lrem(processing, 1, item)
            return
        result_key, reply_key = raw_keys(prefix, message["id"])
        result = msgpack.packb({"ok": True})
        # Stored and handed over in one round trip, as Celery's backend stores and publishes (MULTI).
        with client.pipeline(transaction=True) as pipe:
            pipe.set(result_key, result, ex=RESULT_TTL_S).rpush(reply_key, result).expire(reply_key, RESULT_TTL_S)
            pipe.execute()
        client.lrem(processing, 1, item)


def _consumer_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m ident.queue_bench consume",
                                     description="a raw consumer; the Redis is IDENT_REDIS_URL (kept off the command "
                                                 "line, which any local user can read)")
    for name in ("queue", "processing", "prefix", "ready_key"):
        parser.add_argument(name)
    parser.add_argument("parent", type=int)
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        consume(os.environ["IDENT_REDIS_URL"], args.queue, args.processing, args.prefix, args.ready_key, args.parent)
    return 0


# --- the processes this bench starts ----------------------------------------------


@dataclass
class Child:
    """A process started in a session of its own: Ctrl-C in the terminal reaches the bench, which stops it."""

    name: str
    process: subprocess.Popen
    log_path: Path | None = None
    celery: bool = False

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        if not self.log_path:
            return ""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def exited(self) -> IdentError:
        tail = self.log_tail()
        return IdentError(f"{self.name} exited with code {self.process.returncode}"
                          + (f"; its log ({self.log_path}) ends:\n{tail}" if tail else ""))

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM (a Celery worker's warm shutdown), SIGQUIT (its cold one), SIGKILL; then what it left behind."""
        import psutil

        try:
            # A Celery worker's pool processes, taken before they can be orphaned.
            children = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        # A stock Celery worker in a warm shutdown sometimes waited 20 s and more here
        # (after a run was interrupted); the bench's jobs need no warm shutdown.
        steps = [(signal.SIGTERM, timeout / 2), (signal.SIGQUIT if self.celery else signal.SIGKILL, timeout / 2),
                 (signal.SIGKILL, None)]
        for sig, wait in steps:
            if not self.alive():
                break
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                # psutil checks the process is the one seen above, not a reuse of its pid.
                child.kill()
        psutil.wait_procs(children, timeout=5)


def start_logged(name: str, command: list[str], env: dict, log_dir: Path, celery: bool = False) -> Child:
    log_path = log_dir / f"{name}.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    return Child(name, process, log_path, celery)


@contextlib.contextmanager
def sigint_blocked():
    """SIGINT blocked in this process, and so in every process it starts meanwhile (the mask survives exec).

    A Ctrl-C meanwhile is delivered here on leaving, as KeyboardInterrupt.
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def redis_url_for_bench() -> tuple[str, bool]:
    """(URL, whether IDENT_REDIS_URL named it); an IdentError when that Redis cannot be used."""
    from tasks.settings import load_settings, redacted_url

    if not (os.environ.get("IDENT_REDIS_URL") or "").strip():
        return "", False
    url = load_settings().redis_url
    if not url.startswith("redis://"):
        raise IdentError(f"ident bench --kind queue runs on a plain redis:// URL, not {redacted_url(url)}: "
                         "unset IDENT_REDIS_URL to let it start an embedded redis-server")
    try:
        with redis.Redis.from_url(url, socket_connect_timeout=5) as client:
            client.ping()
    except redis.RedisError as exc:
        raise IdentError(f"nothing answers at IDENT_REDIS_URL={redacted_url(url)} ({exc}): start that Redis, "
                         "or unset IDENT_REDIS_URL so that the bench starts an embedded redis-server") from exc
    return url, True


class QueueBench:
    """Everything one ``ident bench --kind queue`` starts, and the three producers."""

    def __init__(self) -> None:
        self.tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.prefix = f"identbench:{self.tag}"
        self.queues = {kind: f"identbench.{self.tag}.{kind}" for kind in KINDS}
        self.noop_name = f"identbench-celery-{self.tag}@localhost"
        self.raw_processing = [f"{self.prefix}:processing:{i}" for i in range(CONSUMERS)]
        self.log_dir = Path(tempfile.mkdtemp(prefix="ident-queue-bench-"))
        self.redis_server = None
        self.external = False
        self.url = ""
        self.children: list[Child] = []
        self.raw_consumers: list[Child] = []
        self.noop_worker: Child | None = None
        self.fleet_worker = None
        self.app = None
        self.client: redis.Redis | None = None

    # -- start --------------------------------------------------------------------

    def start(self, kinds: tuple[str, ...] = KINDS) -> None:
        from ident.fleet import EmbeddedRedis

        self.url, self.external = redis_url_for_bench()
        if not self.external:
            self.redis_server = EmbeddedRedis()
            # Everything else runs in a session of its own; redis-server, which
            # EmbeddedRedis starts in ours, is kept from the terminal's Ctrl-C
            # so that the workers can still stop cleanly after one.
            with sigint_blocked():
                self.redis_server.start()
            self.url = self.redis_server.url
        self.client = redis.Redis.from_url(self.url)
        self.app = producer_app(self.url)
        env = dict(os.environ, IDENT_REDIS_URL=self.url)
        # All start at once (the vision worker takes longest, loading its models); then each is waited for.
        ready_key = f"{self.prefix}:ready"
        if "raw" in kinds:
            self._start_raw_consumers(env, ready_key)
        if "celery" in kinds:
            self._start_noop_worker(env)
        if "fleet" in kinds:
            self._start_fleet_worker(env)
        if "raw" in kinds:
            self._wait_for_raw_consumers(ready_key)
        if "celery" in kinds:
            self._wait_for_noop_worker()
        if "fleet" in kinds:
            self._wait_for_fleet_worker()

    def _start_raw_consumers(self, env: dict, ready_key: str) -> None:
        for index, processing in enumerate(self.raw_processing):
            consumer = start_logged(
                f"raw-consumer-{index}",
                [sys.executable, "-m", "ident.queue_bench", "consume", self.queues["raw"], processing,
                 self.prefix, ready_key, str(os.getpid())],
                env, self.log_dir)
            self.raw_consumers.append(consumer)
            self.children.append(consumer)

    def _start_noop_worker(self, env: dict) -> None:
        self.noop_worker = start_logged(
            "celery-noop",
            [sys.executable, "-m", "celery", "-A", "ident.noop_app", "worker", "-Q", self.queues["celery"],
             "-c", str(CONSUMERS), "-n", self.noop_name, "--loglevel", WORKER_LOGLEVEL],
            env, self.log_dir, celery=True)
        self.children.append(self.noop_worker)

    def _start_fleet_worker(self, env: dict) -> None:
        from ident.fleet import start_worker

        # ident.fleet.worker_command gives -Q vision; Celery takes the last -Q, this bench's own queue.
        self.fleet_worker = start_worker("vision", dict(env, IDENT_DEVICE="cpu"), concurrency=CONSUMERS,
                                         name=f"identbench-fleet-{self.tag}@localhost", log_dir=self.log_dir,
                                         extra=["-Q", self.queues["fleet"]])
        self.children.append(Child(f"the vision worker {self.fleet_worker.name}", self.fleet_worker.process,
                                   self.fleet_worker.log_path, celery=True))

    def _wait_for_raw_consumers(self, ready_key: str) -> None:
        waiting = CONSUMERS
        deadline = time.monotonic() + START_TIMEOUT_S
        while waiting:
            for consumer in self.raw_consumers:
                if not consumer.alive():
                    raise consumer.exited()
            if time.monotonic() > deadline:
                raise IdentError(f"the raw redis-py consumers did not start within {START_TIMEOUT_S} s")
            if self.client.blpop(ready_key, timeout=1):
                waiting -= 1
        self.client.delete(ready_key)

    def _wait_for_noop_worker(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if not self.noop_worker.alive():
                raise self.noop_worker.exited()
            if self.app.control.ping(destination=[self.noop_name], timeout=1.0):
                return
            time.sleep(0.2)
        raise IdentError(f"the stock Celery worker did not answer within {START_TIMEOUT_S} s; "
                         f"its log ({self.noop_worker.log_path}) ends:\n{self.noop_worker.log_tail()}")

    def _wait_for_fleet_worker(self) -> None:
        from ident.fleet import wait_until_ready

        # A broadcast to this worker alone, by name: a fleet on the same Redis is not asked.
        wait_until_ready(self.app, [self.fleet_worker], timeout=START_TIMEOUT_S)

    # -- runs ---------------------------------------------------------------------

    def check_alive(self) -> None:
        for child in self.children:
            if not child.alive():
                raise child.exited()

    def run(self, kind: str, jobs: int) -> tuple[float, dict[str, float | None]]:
        """(seconds from the first of ``jobs`` sends to the last result, CPU ms per job by role).

        The CPU is read from /proc before and after, outside the timing. The
        run's keys are deleted after it, also outside.
        """
        from kombu.exceptions import OperationalError

        self.check_alive()
        cpu_before = self.cpu_seconds(kind)
        try:
            if kind == "raw":
                wall, keys = self._run_raw(jobs)
            else:
                wall, keys = self._run_celery(kind, jobs)
        except (redis.ConnectionError, OperationalError) as exc:
            raise self.redis_lost(exc) from exc
        cpu_after = self.cpu_seconds(kind)
        cpu = {role: None if cpu_before[role] is None else round((cpu_after[role] - cpu_before[role]) * 1000 / jobs, 3)
               for role in cpu_before}
        # Each run starts on the same keyspace, and a shared Redis keeps nothing.
        for start in range(0, len(keys), 500):
            self.client.delete(*keys[start:start + 500])
        return wall, cpu

    def cpu_seconds(self, kind: str) -> dict[str, float | None]:
        """CPU seconds so far of this process (the producer), the kind's consumers and the embedded Redis.

        ``consumers`` are the raw consumers or a worker's main process (which
        takes jobs from Redis and hands them to its pool), ``pool`` its pool
        processes (which run them and store the results). None for a Redis
        that is not this bench's own.
        """
        import psutil

        def used(process: psutil.Process) -> float:
            with contextlib.suppress(psutil.NoSuchProcess):
                times = process.cpu_times()
                return times.user + times.system
            return 0.0

        if kind == "raw":
            mains = [psutil.Process(c.process.pid) for c in self.raw_consumers]
        else:
            mains = [psutil.Process((self.noop_worker.process if kind == "celery" else self.fleet_worker.process).pid)]
        pool = [child for main in mains for child in main.children(recursive=True)]
        server = self.redis_server.process if self.redis_server is not None else None
        return {
            "producer": used(psutil.Process()),
            "consumers": sum(map(used, mains)),
            "pool": sum(map(used, pool)),
            "redis": used(psutil.Process(server.pid)) if server is not None else None,
        }

    def redis_lost(self, exc: Exception) -> IdentError:
        from tasks.settings import redacted_url

        server = self.redis_server
        if server is not None and server.process is not None and server.process.poll() is not None:
            return IdentError(f"the embedded redis-server exited with code {server.process.returncode} "
                              f"in the middle of the bench ({exc})")
        return IdentError(f"the Redis at {redacted_url(self.url)} stopped answering in the middle of the bench: {exc}")

    def _run_raw(self, jobs: int) -> tuple[float, list[str]]:
        client, queue = self.client, self.queues["raw"]
        started = time.perf_counter()
        ids = []
        for _ in range(jobs):
            job_id = uuid.uuid4().hex  # as send_task makes a task id
            client.lpush(queue, msgpack.packb({"id": job_id}))
            ids.append(job_id)
        for job_id in ids:
            answer = client.blpop(raw_keys(self.prefix, job_id)[1], timeout=ANSWER_TIMEOUT_S)
            if answer is None:
                self.check_alive()
                raise IdentError(f"a raw redis-py job got no answer in {ANSWER_TIMEOUT_S} s")
            msgpack.unpackb(answer[1])
        wall = time.perf_counter() - started
        return wall, [raw_keys(self.prefix, job_id)[0] for job_id in ids]

    def _run_celery(self, kind: str, jobs: int) -> tuple[float, list[str]]:
        from celery.exceptions import TimeoutError as CeleryTimeout
        from kombu.exceptions import OperationalError

        from ident.noop_app import NOOP_TASK

        name = NOOP_TASK if kind == "celery" else FLEET_TASK
        queue = self.queues[kind]
        send = self.app.send_task
        results = []
        done = False
        try:
            started = time.perf_counter()
            for _ in range(jobs):
                results.append(send(name, queue=queue, routing_key=queue))
            for result in results:
                result.get(timeout=ANSWER_TIMEOUT_S)
            wall = time.perf_counter() - started
            done = True
        except CeleryTimeout:
            self.check_alive()
            raise IdentError(f"a {LABELS[kind]} job got no answer in {ANSWER_TIMEOUT_S} s") from None
        except (IdentError, redis.ConnectionError, OperationalError):
            raise  # a lost Redis is named by run()
        except Exception as exc:  # noqa: BLE001 -- the task's own failure, as the worker reported it
            raise IdentError(f"a {LABELS[kind]} job failed: {type(exc).__name__}: {exc}") from exc
        finally:
            if not done:
                # Results still awaited (an interrupted or failed run) are given up
                # now, while Redis answers: each unsubscribes when let go.
                for pending in results:
                    with contextlib.suppress(Exception):
                        self.app.backend.remove_pending_result(pending)
                results.clear()
                result = None  # noqa: F841 -- the last one, which the exception's traceback keeps
        keys = [self.app.backend.get_key_for_task(r.id) for r in results]
        return wall, [k.decode() if isinstance(k, bytes) else k for k in keys]

    # -- stop ---------------------------------------------------------------------

    def stop(self, keep_logs: bool = False) -> None:
        # A second Ctrl-C or SIGTERM must not cut this short and leave processes behind.
        try:
            with signals_held():
                self._stop()
        finally:
            if not keep_logs:
                import shutil

                shutil.rmtree(self.log_dir, ignore_errors=True)

    def _stop(self) -> None:
        if self.client is not None:
            # Jobs left queued by an interrupted run: a stock Celery worker told
            # to stop with a flooded queue took 20 s or more to go (3 times in 5 here).
            with contextlib.suppress(redis.RedisError):
                self.client.delete(*self.queues.values())
        if self.client is not None and self.raw_consumers:
            with contextlib.suppress(redis.RedisError):
                for _ in self.raw_consumers:
                    self.client.lpush(self.queues["raw"], msgpack.packb({"stop": True}))
            for consumer in self.raw_consumers:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    consumer.process.wait(timeout=3)
        # Side by side: each Celery worker takes a second or two to stop.
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=len(self.children) or 1) as pool:
            list(pool.map(Child.stop, self.children))
        if self.app is not None:
            with contextlib.suppress(Exception):
                self.app.close()
        if self.client is not None:
            if self.external:
                # The bench's own lists (queues, processing lists, kombu's bindings) on a shared Redis.
                with contextlib.suppress(redis.RedisError):
                    stale = [*self.client.scan_iter(f"{self.prefix}:*"), *self.queues.values(),
                             *(f"_kombu.{table}.{q}" for q in self.queues.values()
                               for table in ("binding", "binding_permanent")),
                             *(f"unacked:handover:{self.queues['fleet']}{s}" for s in ("", ":seen"))]
                    self.client.delete(*stale)
            self.client.close()
        if self.redis_server is not None:
            self.redis_server.cleanup()


def producer_app(url: str):
    """The producer for stock Celery and the fleet: plain Celery, stock kombu, msgpack."""
    from celery import Celery

    from ident.noop_app import stock_config

    app = Celery("identbench-producer", set_as_current=False)
    app.config_from_object(stock_config(url))
    return app


# --- the report ----------------------------------------------------------------------


def package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def machine(client: redis.Redis | None = None) -> dict:
    import platform

    cpu = ""
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    server = None
    if client is not None:
        with contextlib.suppress(redis.RedisError):
            server = client.info("server").get("redis_version")
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "celery": package_version("celery"),
        "kombu": package_version("kombu"),
        "redis": package_version("redis"),
        "msgpack": package_version("msgpack"),
        "redis_server": server,
    }


def commit() -> str | None:
    """The checkout's commit (read only; a dirty tree is not detected)."""
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (done.stdout.strip() or None) if done.returncode == 0 else None


def summarise(runs: list[dict]) -> tuple[dict, dict]:
    """Per kind its runs' jobs/s and their median; the ratios between the medians."""
    kinds = {}
    for kind in KINDS:
        mine = [r for r in runs if r["kind"] == kind]
        rates = [r["jobs_per_s"] for r in mine]
        cpu = {}
        for role in (mine[0].get("cpu_ms_per_job") or {}) if mine else ():
            spent = [r["cpu_ms_per_job"][role] for r in mine if r["cpu_ms_per_job"].get(role) is not None]
            cpu[role] = round(statistics.median(spent), 3) if spent else None
        kinds[kind] = {"label": LABELS[kind], "jobs_per_s": rates,
                       "median_jobs_per_s": round(statistics.median(rates), 1) if rates else None,
                       "median_cpu_ms_per_job": cpu}

    def ratio(top: str, bottom: str) -> float | None:
        a, b = kinds[top]["median_jobs_per_s"], kinds[bottom]["median_jobs_per_s"]
        return round(a / b, 3) if a and b else None

    return kinds, {
        "fleet_to_celery": ratio("fleet", "celery"),
        "celery_to_raw": ratio("celery", "raw"),
        "fleet_to_raw": ratio("fleet", "raw"),
    }


def render(report: dict):
    from rich.table import Table

    rounds = report["settings"]["rounds"]
    table = Table(title=f"ident bench: queue ({report['settings']['jobs']} jobs per run, "
                        f"{report['settings']['warm_up_jobs']} warm-up, jobs/s)")
    table.add_column("")
    for index in range(rounds):
        table.add_column(f"run {index + 1}", justify="right")
    table.add_column("median", justify="right")
    table.add_column("CPU ms/job", justify="right", no_wrap=True)
    table.caption = ("CPU ms per job, median of the runs: producer / consumers (a worker's main process) / "
                     "pool processes / redis-server")
    for kind in KINDS:
        entry = report["kinds"][kind]
        cpu = "/".join("-" if ms is None else f"{ms:.2f}" for ms in entry["median_cpu_ms_per_job"].values())
        table.add_row(entry["label"], *(f"{rate:.1f}" for rate in entry["jobs_per_s"]),
                      f"[bold]{entry['median_jobs_per_s']:.1f}[/]", cpu)
    table.add_section()
    names = {"fleet_to_celery": "fleet / stock Celery", "celery_to_raw": "stock Celery / raw",
             "fleet_to_raw": "fleet / raw"}
    for key, name in names.items():
        value = report["ratios"][key]
        table.add_row(name, *([""] * rounds), "-" if value is None else f"{value:.3f}", "")
    return table


def bench(jobs: int, warm_jobs: int, rounds: int = ROUNDS) -> dict:
    out = console()
    runner = QueueBench()
    failed = False
    try:
        with out.status("starting redis-server, the raw consumers and both Celery workers..."):
            runner.start()
        out.print(f"redis at {'IDENT_REDIS_URL' if runner.external else 'an embedded redis-server'}; "
                  f"queues {', '.join(runner.queues.values())}")
        runs = []
        for round_index in range(rounds):
            for kind in KINDS:
                if warm_jobs:
                    runner.run(kind, warm_jobs)
                wall, cpu = runner.run(kind, jobs)
                rate = round(jobs / wall, 1)
                runs.append({"round": round_index + 1, "kind": kind, "jobs": jobs, "wall_s": round(wall, 4),
                             "jobs_per_s": rate, "cpu_ms_per_job": cpu})
                spent = ", ".join(f"{role} {ms:.2f}" for role, ms in cpu.items() if ms is not None)
                out.print(f"run {round_index + 1}, {LABELS[kind]}: {jobs} jobs in {wall:.3f} s, {rate} jobs/s "
                          f"(CPU ms per job: {spent})")
        kinds, ratios = summarise(runs)
        report = {
            "kind": "queue",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "commit": commit(),
            "settings": {
                "jobs": jobs, "warm_up_jobs": warm_jobs, "rounds": rounds, "consumers": CONSUMERS,
                "order": [r["kind"] for r in runs],
                "redis": "IDENT_REDIS_URL" if runner.external else "embedded",
                "fleet_task": FLEET_TASK, "worker_loglevel": WORKER_LOGLEVEL,
            },
            "machine": machine(runner.client),
            "runs": runs,
            "kinds": kinds,
            "ratios": ratios,
        }
        return report
    except Exception:
        failed = True
        raise
    finally:
        keep_logs = failed and bool(runner.children)
        if keep_logs:
            out.print(f"stopping everything the bench started (their logs are kept in {runner.log_dir})")
        runner.stop(keep_logs=keep_logs)


def run(args, jobs: int | None, refused: list[str]) -> int:
    """``ident bench --kind queue``.

    ``jobs`` is None when --jobs was not given; ``refused`` names the options given that do not apply.
    """
    from rich.console import Console

    if refused:
        raise IdentError(f"--kind queue takes --jobs, --warmup and --json only, not {', '.join(refused)}: "
                         "each run sends all its jobs at once, to a task that does nothing")
    jobs = DEFAULT_JOBS if jobs is None else jobs
    warm_jobs = DEFAULT_WARMUP if args.warm_jobs is None else args.warm_jobs
    with stopped_by_signals():
        try:
            report = bench(jobs, warm_jobs)
        except KeyboardInterrupt:
            console().print("ident bench --kind queue interrupted")
            return 130
    Console().print(render(report))
    if args.json_path:
        args.json_path.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] != ["consume"]:
        sys.exit("usage: python -m ident.queue_bench consume QUEUE PROCESSING PREFIX READY_KEY PARENT_PID")
    sys.exit(_consumer_main(sys.argv[2:]))
