"""Celery's prefork pool, with each pool process's next job already in its pipe.

Celery's fair scheduling writes a job to a pool process only once that process
has reported its previous one. The main process must then read the report, go
once round its event loop (often parsing the next message from Redis first)
and write the job, and the pool process must wake up to read it: 1.5 to 2.5 ms
on a loaded 2-core machine during which that process computes nothing
(docs/benchmarks.md). Here a process counts as busy only once it holds
IDENT_PREFETCH_MULTIPLIER jobs. With the default of 2, its next job waits in its
own pipe and starts ~0.3 ms after the current one ends.

Each job goes to the least loaded process, so an idle process is always served
first. The price: a job queued behind a slow one waits for it even if another
process frees up sooner. IDENT_PREFETCH_MULTIPLIER=1 is Celery's own strict
fair scheduling. Celery itself recovers a job left in the pipe of a process
that died or was recycled: never accepted, it is written to another process.
On a warm shutdown the jobs already in a pipe are run and acknowledged, as the
running ones are, and ``--autoscale`` never stops a process with a job in its pipe.

Celery keeps its busy processes in a set private to ``AsynPool``
(``_busy_workers``, there since Celery 4; checked against 5.7). A Celery
without it gets its own scheduling and a warning in the log.
"""

from __future__ import annotations

import logging
from collections import Counter

from celery.concurrency import asynpool, prefork

from tasks.settings import load_settings

log = logging.getLogger(__name__)


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
    """``-P prefork`` for fleet workers (set as ``worker_pool`` in workers/bootstrap.py)."""

    Pool = QueueingAsynPool
    # The worker's semaphore would hand the pool one job per process at a time;
    # the pool bounds what each process holds, and the prefetch bounds the total.
    uses_semaphore = False
