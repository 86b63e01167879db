"""The fleet's prefork pool (workers/celery_internals.py), on real forked processes without Redis.

A kombu event loop drives the pool as the worker's main process does; the
jobs are plain functions that sleep, so which process holds what, and when,
is decided by the pool alone.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from billiard.exceptions import WorkerLostError
from kombu.asynchronous import Hub

from workers.celery_internals import JobsPerProcess, QueueingAsynPool


def nap(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


class Harness:
    def __init__(self, processes: int, depth: int, **options) -> None:
        self.hub = Hub()
        self.pool = QueueingAsynPool(processes=processes, threads=False, depth=depth, **options)
        self.pool.register_with_event_loop(self.hub)
        self.finished: dict[str, object] = {}
        self.failed: dict[str, object] = {}
        self.run_until(lambda: len(self.pool._all_inqueues) == processes)

    def submit(self, name: str, seconds: float):
        return self.pool.apply_async(
            nap, (seconds,),
            callback=lambda pid: self.finished.__setitem__(name, (pid, time.monotonic())),
            error_callback=lambda error: self.failed.__setitem__(name, error),
        )

    def run_until(self, condition, timeout: float = 20.0) -> bool:
        deadline = time.monotonic() + timeout
        while not condition() and time.monotonic() < deadline:
            self.hub.run_once()
        return bool(condition())

    def close(self) -> None:
        self.pool.terminate()
        self.hub.close()


@pytest.fixture
def harness(request):
    processes, depth = request.param
    harness = Harness(processes, depth)
    yield harness
    harness.close()


def test_a_process_counts_as_busy_once_it_holds_depth_jobs():
    jobs = JobsPerProcess(depth=2)
    jobs.add(7)
    assert 7 not in jobs and len(jobs) == 0 and jobs.load(7) == 1
    jobs.add(7)
    jobs.add(9)
    assert 7 in jobs and 9 not in jobs and len(jobs) == 1
    jobs.discard(7)
    assert 7 not in jobs and jobs.load(7) == 1
    jobs.intersection_update({9})
    assert jobs.load(7) == 0 and jobs.load(9) == 1
    jobs.forget(9)
    assert jobs.load(9) == 0 and len(jobs) == 0


@pytest.mark.parametrize("harness", [(1, 2)], indirect=True)
def test_the_next_job_waits_in_the_pipe_of_a_busy_process(harness):
    first = harness.submit("first", 2.0)
    second = harness.submit("second", 0.0)
    assert harness.run_until(lambda: first._accepted and second._write_to is not None, timeout=1.5)
    assert "first" not in harness.finished, "written while the first job still ran"
    assert harness.run_until(lambda: len(harness.finished) == 2)
    assert harness.finished["first"][0] == harness.finished["second"][0]


@pytest.mark.parametrize("harness", [(1, 1)], indirect=True)
def test_depth_one_keeps_celerys_strict_fair_scheduling(harness):
    first = harness.submit("first", 1.0)
    second = harness.submit("second", 0.0)
    assert harness.run_until(lambda: first._accepted)
    assert not harness.run_until(lambda: second._write_to is not None, timeout=0.5)
    assert harness.run_until(lambda: len(harness.finished) == 2)


@pytest.mark.parametrize("harness", [(2, 2)], indirect=True)
def test_an_idle_process_gets_the_job_before_a_busy_one_queues_it(harness):
    slow = harness.submit("slow", 2.0)
    assert harness.run_until(lambda: slow._accepted)
    harness.submit("quick", 0.0)
    assert harness.run_until(lambda: "quick" in harness.finished, timeout=1.5), "queued behind the slow job"
    assert harness.finished["quick"][0] != slow._worker_pid
    assert harness.run_until(lambda: "slow" in harness.finished)


@pytest.mark.parametrize("harness", [(1, 2)], indirect=True)
def test_a_job_waiting_in_a_killed_process_pipe_runs_in_its_replacement(harness):
    running = harness.submit("running", 30.0)
    waiting = harness.submit("waiting", 0.0)
    assert harness.run_until(lambda: running._accepted and waiting._write_to is not None)
    killed = running._worker_pid
    os.kill(killed, signal.SIGKILL)
    assert harness.run_until(lambda: "waiting" in harness.finished and "running" in harness.failed)
    assert harness.finished["waiting"][0] != killed
    # billiard wraps the error to carry it across processes.
    assert isinstance(harness.failed["running"].exception.exc, WorkerLostError)


def test_a_process_recycled_after_its_job_limit_hands_its_waiting_job_on():
    """``--max-tasks-per-child``: a process leaves with its next job still unread in its pipe."""
    harness = Harness(processes=1, depth=2, maxtasksperchild=1)
    try:
        for index in range(3):
            harness.submit(f"job-{index}", 0.3)
        assert harness.run_until(lambda: len(harness.finished) == 3), (harness.finished, harness.failed)
        assert not harness.failed
        assert len({pid for pid, _ in harness.finished.values()}) == 3, "each job ran in a fresh process"
    finally:
        harness.close()


@pytest.mark.parametrize("harness", [(1, 2)], indirect=True)
def test_shrinking_the_pool_spares_a_process_with_a_job_in_its_pipe(harness):
    """``--autoscale`` shrinks the pool by stopping processes billiard sees as idle."""
    job = harness.submit("job", 0.5)
    # A write happens last in a turn of the event loop, so the process's
    # acceptance of the job is read on a later turn: here, not yet.
    assert harness.run_until(lambda: job._write_to is not None)
    assert not job._accepted
    with pytest.raises(ValueError, match="busy"):
        harness.pool.shrink(1)
    assert harness.run_until(lambda: "job" in harness.finished)
    assert not harness.failed
