"""No job lost between Redis and a worker (workers/kombu_internals.py).

kombu takes a job with BRPOP and records it as unacknowledged only in a
second command: a worker killed in between lost the job for good. These tests
stop a worker's main process (SIGSTOP) while it waits for a job, so that Redis
hands the next job over to a process that will never record it, then kill it:
the job must come back and be answered by the next worker, also when Redis
restarts in between.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from ident.fleet import EmbeddedRedis
from tests.integration.fleetkit import Fleet, kill_group, make_env, outcome, wait_for

pytestmark = pytest.mark.integration

VISIBILITY_TIMEOUT = 10
HANDOVER = "unacked:handover:vision"
SEEN = HANDOVER + ":seen"


@pytest.fixture(scope="module")
def fleet(models_path, tmp_path_factory):
    redis = EmbeddedRedis().start()
    env = make_env(redis, models_path, visibility_timeout=VISIBILITY_TIMEOUT, task_soft_time_limit=8,
                   task_time_limit=9, prefetch_multiplier=1, cpu_threads=1)
    fleet = Fleet(redis, env, tmp_path_factory.mktemp("handover-logs"))
    try:
        yield fleet
    finally:
        fleet.stop_all()
        redis.cleanup()


@pytest.fixture(scope="module")
def photo(data_path) -> bytes:
    return sorted((data_path / "images" / "faces").glob("*"))[0].read_bytes()


def hand_to_a_stopped_worker(fleet, worker, photo):
    """A job that Redis gave ``worker``'s main process, stopped (SIGSTOP) as it waited for it."""
    for _attempt in range(5):
        assert "faces" in fleet.client.analyze_image(photo).get(timeout=60)
        # Idle, the main process soon waits in its blocking pop again (for up
        # to a second at a time); stopped, it cannot record what it gets.
        time.sleep(0.5)
        os.kill(worker.process.pid, signal.SIGSTOP)
        job = fleet.client.analyze_image(photo)
        try:
            wait_for(lambda: fleet.backend.llen(HANDOVER) == 1, timeout=2, what="Redis handing the job over")
            return job
        except AssertionError:
            # Stopped between two pops: the job waited in the queue. Let it run, and try again.
            os.kill(worker.process.pid, signal.SIGCONT)
            assert "faces" in job.get(timeout=60)
    pytest.fail("five times the worker was stopped outside its blocking pop")


def test_a_worker_killed_with_a_job_in_its_hands_loses_nothing(fleet, photo):
    doomed = fleet.start("vision", "doomed@itest")
    job = hand_to_a_stopped_worker(fleet, doomed, photo)
    assert fleet.backend.llen("vision") == 0 and fleet.backend.hlen("unacked") == 0
    kill_group(doomed)
    fleet.workers.pop("doomed@itest")

    heir = fleet.start("vision", "heir@itest")
    ok, value = outcome(job, timeout=VISIBILITY_TIMEOUT + 60)
    assert ok, value
    assert "faces" in value
    assert fleet.backend.llen(HANDOVER) == 0
    wait_for(lambda: fleet.backend.hlen(SEEN) == 0, timeout=15, what="the sweep forgetting the restored job")
    assert "put back on the queue: a worker took them and died" in heir.log_path.read_text()
    kill_group(heir)
    fleet.workers.pop("heir@itest")


def test_jobs_recorded_as_they_arrive_leave_nothing_in_the_hand_over(fleet, photo):
    fleet.start("vision", "steady@itest", concurrency=2)
    jobs = [fleet.client.analyze_image(photo) for _ in range(12)]
    for job in jobs:
        ok, value = outcome(job, timeout=60)
        assert ok, value
    assert fleet.backend.llen(HANDOVER) == 0
    # Acknowledged just after their results are stored.
    wait_for(lambda: fleet.backend.hlen("unacked") == 0, timeout=10, what="every job acknowledged")


def test_a_job_under_a_stock_kombu_priority_list_is_served(fleet, photo):
    # A producer on stock kombu settings queues a job with priority 6 under
    # vision\x06\x166, a list this fleet does not block on.
    for worker in list(fleet.workers.values()):
        kill_group(worker)
    fleet.workers.clear()
    job = fleet.client.analyze_image(photo)
    fleet.backend.rename("vision", "vision\x06\x166")
    worker = fleet.start("vision", "priority@itest")
    ok, value = outcome(job, timeout=30)
    assert ok, value
    assert fleet.backend.exists("vision\x06\x166") == 0
    assert "moved from kombu priority lists onto the queue" in worker.log_path.read_text()


def test_a_redis_restart_with_a_job_in_transit_loses_nothing(models_path, tmp_path_factory, photo):
    """Redis restarted with a job handed over whose reply never reaches its worker."""
    redis = EmbeddedRedis(appendonly=True).start()
    env = make_env(redis, models_path, visibility_timeout=VISIBILITY_TIMEOUT, task_soft_time_limit=8,
                   task_time_limit=9, prefetch_multiplier=1, cpu_threads=1)
    fleet = Fleet(redis, env, tmp_path_factory.mktemp("handover-restart-logs"))
    try:
        stopped = fleet.start("vision", "transit@itest")
        job = hand_to_a_stopped_worker(fleet, stopped, photo)
        redis.stop()  # SIGTERM: Redis writes its append-only file and exits
        redis.start()  # same port, same directory: it reloads the file
        assert fleet.backend.llen(HANDOVER) == 1, "the hand-over list did not survive the restart"
        # Killed before it reads the reply, as if the reply had never left Redis.
        kill_group(stopped)
        fleet.workers.pop("transit@itest")
        fleet.start("vision", "after@itest")
        ok, value = outcome(job, timeout=VISIBILITY_TIMEOUT + 60)
        assert ok, value
        assert "faces" in value
        assert fleet.backend.llen(HANDOVER) == 0
    finally:
        fleet.stop_all()
        redis.cleanup()
