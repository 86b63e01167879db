"""Every use of Celery's internals, in one place, installed when a worker app is made.

Celery offers no public hook for what these do; each is a subclass or a patch
of a class or function that Celery documents only in its sources. The names
they rely on are checked against the installed Celery by
tests/unit/test_library_internals.py, which also pins the versions this was
written against: an upgrade that moves one fails there, loudly, first.

* :class:`TaskPool`: the prefork pool with each process's next job already in
  its pipe (Celery's ``AsynPool`` and its private ``_busy_workers``);
* :class:`SafeRequest`, :class:`FleetRequest`: the worker's view of a job,
  with redacted argument reprs, that takes the job's Redis keys along when the
  main process itself ends the job (``Request._request_dict``, ``on_timeout``);
* :class:`FleetResultBackend`: Celery's Redis result backend storing a result
  in one atomic round trip (``RedisBackend._store_result``);
* the pieces of a task strategy that micro-batching needs
  (``create_request_cls``, the worker state's reserved/accepted/ready);
* what the metrics read of the main process (workers/metrics.py): the jobs
  the worker holds (the worker state's ``requests``), each job's receipt time
  (stamped by :class:`FleetRequest`) and the pool's processes (billiard's ``Pool._pool``, ``_processes``);
* :func:`install`: the tracer's and the request's ``saferepr`` given redacted values.
"""

from __future__ import annotations

import logging
import time
from collections import Counter

from celery.app import trace
from celery.backends.redis import RedisBackend, SentinelBackend
from celery.concurrency import asynpool, prefork
from celery.exceptions import BackendStoreError
from celery.utils.imports import symbol_by_name
from celery.utils.saferepr import saferepr
from celery.worker import request as worker_request
from celery.worker import state as worker_state
from celery.worker.request import Request, create_request_cls
from celery.worker.strategy import default as default_strategy
from kombu.utils.encoding import bytes_to_str

from tasks.contract import SENT_AT_HEADER
from tasks.redis_urls import is_sentinel_url
from tasks.settings import load_settings
from workers.jobkeys import STORE_RESULT, job_keys
from workers.logsafety import redact_argument, redact_arguments, redacted_saferepr
from tasks.replicas import ReplicaConfirmation

log = logging.getLogger(__name__)

POOL = f"{__name__}:TaskPool"
RESULT_BACKEND = f"{__name__}:FleetResultBackend"
SENTINEL_RESULT_BACKEND = f"{__name__}:FleetSentinelResultBackend"
REQUEST = f"{__name__}:FleetRequest"
# When the worker's main process received a job (seconds since the epoch), in
# the job's request: the pool process reads it as ``task.request.ident_received_at``.
RECEIVED_AT = "ident_received_at"


def install() -> None:
    """The tracer's repr of a task's return value (the task-succeeded event) and the
    request's own (a job whose process died after storing its result), redacted."""
    trace.saferepr = redacted_saferepr
    worker_request.saferepr = redacted_saferepr


# --- the prefork pool ---------------------------------------------------------------
#
# Celery's prefork pool, with each pool process's next job already in its pipe.
#
# Celery's fair scheduling writes a job to a pool process only once that process
# has reported its previous one. The main process must then read the report, go
# once round its event loop (often parsing the next message from Redis first)
# and write the job, and the pool process must wake up to read it: 1.5 to 2.5 ms
# on a loaded 2-core machine during which that process computes nothing
# (docs/benchmarks.md). Here a process counts as busy only once it holds
# IDENT_PREFETCH_MULTIPLIER jobs. With the default of 2, its next job waits in its
# own pipe and starts ~0.3 ms after the current one ends.
#
# Each job goes to the least loaded process, so an idle process is always served
# first. The price: a job queued behind a slow one waits for it even if another
# process frees up sooner. IDENT_PREFETCH_MULTIPLIER=1 is Celery's own strict
# fair scheduling. Celery itself recovers a job left in the pipe of a process
# that died or was recycled: never accepted, it is written to another process.
# On a warm shutdown the jobs already in a pipe are run and acknowledged, as the
# running ones are, and ``--autoscale`` never stops a process with a job in its pipe.
#
# Celery keeps its busy processes in a set private to ``AsynPool``
# (``_busy_workers``, there since Celery 4; checked against 5.7). A Celery
# without it gets its own scheduling and a warning in the log.


class JobsPerProcess:
    """Jobs written to each pool process (keyed by its pipe) and not yet reported done.

    Stands in for the set of busy processes of Celery's fair scheduler, which
    adds, discards, tests membership, counts and trims it: a process is in the
    set once it holds ``depth`` jobs.
    """

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self._jobs: Counter[int] = Counter()

    def add(self, fd: int) -> None:
        self._jobs[fd] += 1

    def discard(self, fd: int) -> None:
        if self._jobs[fd] > 1:
            self._jobs[fd] -= 1
        else:
            del self._jobs[fd]

    def forget(self, fd: int) -> None:
        """The process behind ``fd`` is gone; Celery puts its unread jobs back."""
        self._jobs.pop(fd, None)

    def load(self, fd: int) -> int:
        return self._jobs.get(fd, 0)

    def __contains__(self, fd: int) -> bool:
        return self.load(fd) >= self.depth

    def __len__(self) -> int:
        return sum(1 for jobs in self._jobs.values() if jobs >= self.depth)

    def intersection_update(self, fds) -> None:
        for fd in [fd for fd in self._jobs if fd not in fds]:
            del self._jobs[fd]


class QueueingAsynPool(asynpool.AsynPool):
    def __init__(self, *args, depth: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.jobs_per_process: JobsPerProcess | None = None
        if not isinstance(getattr(self, "_busy_workers", None), set):
            log.warning("this Celery's prefork pool has no set of busy processes to extend: each pool "
                        "process gets its next job only once it is free (as IDENT_PREFETCH_MULTIPLIER=1)")
            return
        self.jobs_per_process = JobsPerProcess(depth or load_settings().prefetch_multiplier)
        self._busy_workers = self.jobs_per_process
        self._mark_worker_as_available = self.jobs_per_process.discard

    def _create_write_handlers(self, hub, *args, **kwargs):
        handlers = super()._create_write_handlers(hub, *args, **kwargs)
        if self.jobs_per_process is not None:
            write_jobs = hub.consolidate_callback
            load = self.jobs_per_process.load

            def write_to_least_loaded(ready_fds, *rest, **options):
                # Celery writes one job to each writable pipe, in the order given.
                return write_jobs(sorted(ready_fds, key=load), *rest, **options)

            hub.consolidate_callback = write_to_least_loaded
        return handlers

    def _worker_active(self, worker) -> bool:
        """Billiard counts a process busy once it has accepted a job; shrinking the pool
        (``--autoscale``) must not stop one that has a job in its pipe either."""
        if super()._worker_active(worker):
            return True
        return self.jobs_per_process is not None and self.jobs_per_process.load(worker.inqW_fd) > 0

    def flush(self):
        """On shutdown, wait for the jobs already written to a process, as for the running ones.

        Celery forgets every job not yet accepted, leaving it to the broker to
        deliver again. A job already in a process's pipe is read and run all
        the same: its report would go unread (the process then waits 30 s
        before it exits) and the job would run twice.
        """
        written = [job for job in self._cache.values()
                   if not job._accepted and job._write_to is not None and job._write_to._is_alive()]
        super().flush()
        for job in written:
            self._cache[job._job] = job

    def _create_process_handlers(self, hub, *args, **kwargs):
        handlers = super()._create_process_handlers(hub, *args, **kwargs)
        if self.jobs_per_process is not None:
            on_process_down = self.on_process_down
            jobs_per_process = self.jobs_per_process

            def forget_process(proc):
                on_process_down(proc)
                jobs_per_process.forget(proc.inqW_fd)

            self.on_process_down = forget_process
        return handlers


class TaskPool(prefork.TaskPool):
    """``-P prefork`` for fleet workers (set as ``worker_pool`` in workers/wiring.py)."""

    Pool = QueueingAsynPool
    # The worker's semaphore would hand the pool one job per process at a time;
    # the pool bounds what each process holds, and the prefetch bounds the total.
    uses_semaphore = False


# --- the worker's view of a job -------------------------------------------------------


class SafeRequest(Request):
    """The worker's view of a job, with argsrepr/kwargsrepr rebuilt from the redacted arguments.

    The producer's argsrepr is not trusted to be safe: Celery fills it with a
    repr of the payload when the producer does not set it. The rebuilt reprs
    are what the worker logs, sends in events, answers to ``inspect`` and
    hands to the pool process.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        try:
            argsrepr = saferepr(redact_arguments(self.args), 512)
            kwargsrepr = saferepr({key: redact_argument(v) for key, v in (self.kwargs or {}).items()}, 512)
        except Exception:  # noqa: BLE001 -- malformed arguments: the task itself will say so
            argsrepr = kwargsrepr = "<not shown>"
        self._argsrepr = self._request_dict["argsrepr"] = argsrepr
        self._kwargsrepr = self._request_dict["kwargsrepr"] = kwargsrepr


class FleetRequest(SafeRequest):
    """A job as the worker's main process sees it.

    The main process itself stores the end of a job whose pool process hit
    the hard time limit, of a batch that failed as a whole, and of a job
    revoked or expired before it ran (``task_revoked``, workers/wiring.py).
    None of them runs again, so the job's keys go with that result instead of
    lingering until they expire.

    It is made as the main process receives the job, and stamps that time in
    the request that the pool process gets (``ident_job_seconds`` runs from it).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._request_dict[RECEIVED_AT] = time.time()

    def release_keys(self) -> None:
        release_with_result(self.task.backend, self.id, job_keys(self.id, self.args, self.kwargs))

    def on_timeout(self, soft, timeout):
        if not soft:
            self.release_keys()
        super().on_timeout(soft, timeout)



# --- the result backend ----------------------------------------------------------------


class FleetResultBackend(RedisBackend):
    """Celery's Redis result backend, storing a result in one atomic round trip.

    Celery stores a result in two round trips: a GET, so that a job already
    stored as SUCCESS (by an earlier delivery) is not overwritten by a late
    duplicate, then SET and PUBLISH. Here one Lua script does the check and
    the writes at once, with no window between them, and deletes the job's
    own keys in the same step.

    Only the worker apps use it (``IDENT_REDIS_URL`` behind a ``+``, Celery's
    way of naming a backend class with its URL); producers read results with
    the stock backend, and the stored result is byte for byte the same.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._delete_with_result: dict[bytes, tuple[str, ...]] = {}
        self._store_script = None
        self.replica_confirmation = ReplicaConfirmation.from_settings()

    def delete_with_result(self, task_id: str, keys: list[str]) -> None:
        """Delete ``keys`` when the job's result is stored, whatever its state."""
        self._delete_with_result[self.get_key_for_task(task_id)] = tuple(keys)

    def delete_now(self, task_id: str) -> tuple[str, ...]:
        """The keys still waiting for the job's result, which will not come: the caller deletes them."""
        return self._delete_with_result.pop(self.get_key_for_task(task_id), ())

    def _store_result(self, task_id, result, state, traceback=None, request=None, **kwargs):
        meta = self._get_result_meta(result=result, state=state, traceback=traceback, request=request)
        meta["task_id"] = bytes_to_str(task_id)
        key = self.get_key_for_task(task_id)
        value = self.encode(meta)
        if isinstance(value, str) and len(value) > self._MAX_STR_VALUE_SIZE:
            raise BackendStoreError("value too large for Redis backend", state=state, task_id=task_id)
        keys = self._delete_with_result.get(key, ())
        self.ensure(self._store_once, (key, value, keys))
        # Dropped only once stored: a retried store deletes them too.
        self._delete_with_result.pop(key, None)
        return result

    def _store_once(self, key: bytes, value, keys: tuple[str, ...]) -> None:
        # By its SHA-1 (EVALSHA; redis-py loads it again after a Redis restart):
        # Redis then neither receives nor hashes the script's text for every job.
        if self._store_script is None:
            self._store_script = self.client.register_script(STORE_RESULT)
        # WAIT in the same pipeline, so on the same connection as the writes it confirms (tasks/replicas.py).
        self.replica_confirmation.write(
            self.client, lambda pipe: self._store_script(keys=[key, *keys], args=[value, int(self.expires or 0)],
                                                         client=pipe),
            "a job's result")

class FleetSentinelResultBackend(FleetResultBackend, SentinelBackend):
    """The same backend on the master that Sentinel names (``IDENT_REDIS_URL=sentinel://...``)."""


def result_backend_class(redis_url: str) -> str:
    """The fleet's result backend class for ``redis_url``, as Celery names one: ``module:Class``."""
    return SENTINEL_RESULT_BACKEND if is_sentinel_url(redis_url) else RESULT_BACKEND


def release_with_result(backend, task_id: str, keys: list[str]) -> bool:
    """Have ``keys`` deleted in the step that stores the job's result; False on another backend."""
    if isinstance(backend, FleetResultBackend):
        backend.delete_with_result(task_id, keys)
        return True
    return False


def release_unstored(task, task_id: str | None) -> tuple[str, ...]:
    """Stop waiting to delete a job's keys with its result; the keys themselves stay."""
    backend = getattr(task, "backend", None)
    if task_id and isinstance(backend, FleetResultBackend):
        return backend.delete_now(task_id)
    return ()


# --- what a batching task strategy needs of Celery's worker ----------------------------------


def request_class(task, app, consumer):
    """The request class Celery's own strategy builds for ``task`` on this consumer."""
    return create_request_cls(symbol_by_name(task.Request), task, consumer.pool, consumer.hostname,
                              consumer.event_dispatcher, app=app)


def one_at_a_time(task, app, consumer, **kwargs):
    """Celery's own strategy for ``task``: a job handled alone (one with a countdown or an ETA)."""
    return default_strategy(task, app, consumer, **kwargs)


def reserved(request) -> None:
    worker_state.task_reserved(request)


def accepted(request) -> None:
    worker_state.task_accepted(request)


def ready(request) -> None:
    worker_state.task_ready(request)


# --- what the metrics read of the worker (workers/metrics.py, workers/health_server.py) ---------


def job_clock(request) -> tuple[str | None, object, object]:
    """(queue, the producer's send time or None, the worker's receipt time) of a job the main process holds."""
    headers = request.request_dict
    return (request.delivery_info or {}).get("routing_key"), headers.get(SENT_AT_HEADER), headers.get(RECEIVED_AT)


def held_job_queues() -> list[str | None]:
    """The queue of every job this worker holds: received and not yet ended (prefetched, held for a
    batch, scheduled for an ETA, in a pool process's pipe or running); the main process's view.

    Read from another thread than the worker's event loop: the copy of the
    dictionary is one step under the GIL, and one that changes meanwhile is read again.
    """
    for _ in range(5):
        try:
            requests = list(worker_state.requests.values())
            break
        except RuntimeError:  # changed size while being copied
            continue
    else:
        return []
    return [(getattr(request, "delivery_info", None) or {}).get("routing_key") for request in requests]


def pool_processes(worker) -> tuple[list[int], int] | None:
    """(the pids of the worker's prefork pool processes, how many it should have), ([], 0) while the
    pool is starting; None for a pool without child processes (solo, threads), whose jobs run in
    the main process itself.

    Read from billiard's own ``Pool._pool`` (the processes) and ``Pool._processes``
    (its size, which ``--autoscale`` changes): between a process's death and its
    replacement's start the list is one short. ``TaskPool.info`` lists the
    processes too, but also computes write statistics over structures that the
    event loop changes meanwhile.
    """
    pool = getattr(worker, "pool", None)
    if pool is None:
        return [], 0
    if not isinstance(pool, prefork.TaskPool):
        return None
    processes = getattr(pool._pool, "_pool", None)
    if processes is None:
        return [], 0
    return [process.pid for process in list(processes) if process.pid], int(pool._pool._processes)
