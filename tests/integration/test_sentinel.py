"""Redis behind Sentinel (issue #33): the master SIGKILLed with jobs in flight, every job answered.

Real redis-server processes: a master, a replica and three Sentinels
(ident/redis_ha.py), real audio workers on the Sentinel URL, the fleet's own
client and a plain Celery producer that knows only the task names. The master
dies by SIGKILL, as a host does; the Sentinels promote the replica, and the
same worker processes, the producers and the result backend follow it
without a restart.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest
from celery import Celery

from ident.redis_ha import SentinelGroup
from tasks import contract
from tasks.app import celery_config
from tasks.client import IdentClient
from tasks.redis_connection import redis_client
from tasks.settings import Settings
from tests.conftest import data_dir
from tests.integration.fleetkit import Fleet, make_env, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WORKER = "audio-ha@itest"
MASTER_PASSWORD = "master-secret"
SENTINEL_PASSWORD = "sentinel-secret"
IN_FLIGHT = 60
PLAIN_PRODUCER_JOBS = 20
JUST_BEFORE_THE_KILL = 5


def recordings() -> list[bytes]:
    """Four real recordings of speech, 115-320 kB each: every one travels by reference."""
    folder = data_dir() / "audio" / "speakers"
    files = sorted(folder.rglob("*.wav"))[:4]
    assert len(files) == 4, f"expected speech recordings under {folder}"
    return [path.read_bytes() for path in files]


@pytest.fixture(scope="module")
def group():
    group = SentinelGroup(password=MASTER_PASSWORD, sentinel_password=SENTINEL_PASSWORD).start()
    try:
        yield group
    finally:
        group.stop()


@pytest.fixture(scope="module")
def fleet(group, models_path, tmp_path_factory):
    env = make_env(group, models_path, redis_sentinel_master=group.master_name,
                   redis_sentinel_password=SENTINEL_PASSWORD, cpu_threads=1)
    fleet = Fleet(group, env, tmp_path_factory.mktemp("sentinel-logs"))
    try:
        fleet.start("audio", WORKER, concurrency=2)
        yield fleet
    finally:
        fleet.stop_all()


def plain_celery_producer(group) -> Celery:
    """What another team's service runs: stock Celery, task names and Sentinel's transport options, nothing of ours."""
    options = {"master_name": group.master_name, "sentinel_kwargs": {"password": SENTINEL_PASSWORD}}
    app = Celery("plain-producer", broker=group.url, backend=group.url, set_as_current=False)
    app.conf.update(task_serializer="msgpack", result_serializer="msgpack", accept_content=["msgpack", "json"],
                    result_accept_content=["msgpack", "json"], broker_transport_options=options,
                    result_backend_transport_options=options,
                    task_routes={"audio.*": {"queue": contract.AUDIO_QUEUE}})
    return app


def worker_processes(fleet: Fleet) -> set[int]:
    main = psutil.Process(fleet.workers[WORKER].process.pid)
    return {main.pid, *(child.pid for child in main.children())}


def job_seconds(log: str, job_id: str) -> float:
    """How long the worker's log says ``job_id`` took, storing its result included."""
    found = re.search(rf"\[{job_id}\] succeeded in ([0-9.]+)s", log)
    assert found, f"job {job_id} is not in the worker's log"
    return float(found.group(1))


def essentials(result: dict) -> tuple:
    """What must be the same in two answers to one recording (timings differ)."""
    return (result["duration_s"], tuple(tuple(s.values()) for s in result["speech_segments"]),
            round(result["spoof"]["score"], 4), tuple(round(x, 4) for x in result["embedding"][:8]))


def test_the_settings_and_the_worker_use_sentinel(fleet, group):
    settings = fleet.settings
    assert settings.replicas_to_confirm() == 1
    config = celery_config(settings)
    for options in (config["broker_transport_options"], config["result_backend_transport_options"]):
        assert options["master_name"] == group.master_name
        assert options["sentinel_kwargs"]["password"] == SENTINEL_PASSWORD
    client = redis_client(settings)
    assert client.connection_pool.connection_kwargs.get("password") == MASTER_PASSWORD
    assert client.info("server")["tcp_port"] == group.master_port()
    # `ident status` finds the master through the Sentinels too.
    shown = subprocess.run([sys.executable, "-m", "ident.cli", "status", "--json"], env=fleet.env,
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert WORKER in shown.stdout


def test_every_job_in_flight_is_answered_after_the_master_is_killed(fleet, group):
    payloads = recordings()
    expected = [essentials(fleet.client.analyze("audio", p).get(timeout=120)) for p in payloads]
    processes = worker_processes(fleet)
    plain = plain_celery_producer(group)

    sent = [(i % 4, fleet.client.analyze("audio", payloads[i % 4])) for i in range(IN_FLIGHT)]
    sent += [(i % 4, plain.send_task(contract.AUDIO_ANALYZE, args=[payloads[i % 4], None]))
             for i in range(PLAIN_PRODUCER_JOBS)]
    # Some answered, most still queued or running, when the master dies.
    wait_for(lambda: sum(result.ready() for _, result in sent) >= 3, 120, what="the first answers")
    # The last jobs sent a moment before the kill: the client returns only once
    # the replica has them, so the master cannot take them along.
    sent += [(i % 4, fleet.client.analyze("audio", payloads[i % 4])) for i in range(JUST_BEFORE_THE_KILL)]
    old_port = group.master_port()
    killed_at = time.monotonic()
    group.kill_master()
    failover_s = group.wait_for_failover(old_port)

    answers = [(index, result.get(timeout=240)) for index, result in sent]
    answered_all_s = time.monotonic() - killed_at
    assert len(answers) == IN_FLIGHT + PLAIN_PRODUCER_JOBS + JUST_BEFORE_THE_KILL
    for index, answer in answers:
        assert essentials(answer) == expected[index]
    # The same processes answered: nothing restarted to follow the new master.
    assert worker_processes(fleet) == processes
    print(f"failover {failover_s:.1f} s; all {len(answers)} answered {answered_all_s:.1f} s after the kill")

    # New jobs go to the new master, from both producers.
    after = [fleet.client.analyze("audio", payloads[0]), plain.send_task(contract.AUDIO_ANALYZE,
                                                                          args=[payloads[1], None])]
    assert [essentials(r.get(timeout=120)) for r in after] == expected[:2]

    # Nothing is left behind on the new master: no job unacknowledged, none in a hand-over list.
    new_master = redis_client(fleet.settings)
    assert new_master.info("server")["tcp_port"] != old_port
    wait_for(lambda: new_master.hlen("unacked") == 0 and new_master.llen(f"unacked:handover:{contract.AUDIO_QUEUE}")
             == 0 and new_master.llen(contract.AUDIO_QUEUE) == 0, 30, what="every job acknowledged")


def test_the_killed_master_restarted_as_compose_restarts_it_comes_back_as_a_replica(group):
    """Through deploy/redis-ha/start-redis.sh: never an empty master that a lagging Sentinel could name."""
    import redis

    killed = next(server for server in group.servers if server.process is None)
    group.restart(killed)
    # At once, before any Sentinel has told it anything.
    info = redis.Redis(port=killed.port, password=MASTER_PASSWORD).info("replication")
    assert info["role"] == "slave"
    assert info["master_port"] == group.master_port() != killed.port


def test_a_result_waits_for_the_replica_and_a_missing_replica_costs_one_timeout(models_path, tmp_path_factory):
    """WAIT really blocks: with the replica stopped (SIGSTOP), the hand-over and the result each wait out its timeout once."""
    # A group of its own: the module's has been through a failover and a restart, and
    # its replica may still be resyncing, which would blur the timings.
    group = own_group = SentinelGroup(password=MASTER_PASSWORD, sentinel_password=SENTINEL_PASSWORD).start()
    try:
        env = make_env(group, models_path, redis_sentinel_master=group.master_name,
                       redis_sentinel_password=SENTINEL_PASSWORD, redis_wait_timeout_ms=3000, cpu_threads=1)
        fleet = Fleet(group, env, tmp_path_factory.mktemp("sentinel-wait-logs"))
        try:
            worker = fleet.start("audio", "audio-wait@itest", concurrency=1)
            # The workers' two WAITs are timed here; the producer's own (its sent
            # fence, IdentClient._confirm_sent) would overlap the first and blur it.
            producer = IdentClient(Settings.from_env({**env, "IDENT_REDIS_WAIT_REPLICAS": "0"}))
            payload = recordings()[2]
            producer.analyze("audio", payload).get(timeout=120)
            started = time.monotonic()
            producer.analyze("audio", payload).get(timeout=120)
            confirmed_s = time.monotonic() - started

            replica = next(s for s in group.servers if s.process and s.port != group.master_port())
            os.kill(replica.process.pid, signal.SIGSTOP)
            try:
                seconds, jobs = [], []
                for _ in range(3):
                    started = time.monotonic()
                    jobs.append(producer.analyze("audio", payload))
                    jobs[-1].get(timeout=120)
                    seconds.append(time.monotonic() - started)
            finally:
                os.kill(replica.process.pid, signal.SIGCONT)
            # The first job's hand-over waits out the 3 s in the main process before it runs;
            # its result, published before its WAIT, then holds the pool process for 3 s more,
            # inside the job's own time in the log (the producer, already answered, does not
            # see it); from then on both skip WAIT for a while, and jobs are fast again.
            assert seconds[0] >= 3.0 > confirmed_s
            log = worker.log_path.read_text()
            assert job_seconds(log, jobs[0].id) >= 3.0
            assert job_seconds(log, jobs[2].id) < 3.0
            assert seconds[2] < 3.0
            assert "a job's hand-over reached 0 of the 1 replica(s)" in log
            assert "a job's result reached 0 of the 1 replica(s)" in log
        finally:
            fleet.stop_all()
    finally:
        own_group.stop()


def test_the_http_gateway_finds_the_master_through_the_sentinels(fleet, group, tmp_path):
    """After the failover above: `ident serve` on the Sentinel URL sends, rate-limits and answers."""
    import httpx

    from tests.integration.test_gateway import AUTH, GatewayProcess, gateway_env

    payload = recordings()[1]
    expected = essentials(fleet.client.analyze("audio", payload).get(timeout=120))
    gateway = GatewayProcess(gateway_env(fleet.env, api_rate_limit="100/second"), tmp_path / "gateway.log")
    try:
        answer = httpx.post(f"{gateway.url}/v1/audio/analyze", content=payload, headers=AUTH, timeout=120)
        assert answer.status_code == 200, answer.text
        assert essentials(answer.json()) == expected
        status = httpx.get(f"{gateway.url}/v1/status", headers=AUTH, timeout=30).json()
        assert status["queues"][contract.AUDIO_QUEUE]["workers"] == 1
    finally:
        gateway.stop()


def test_ident_up_and_submit_use_the_sentinels(fleet, group, tmp_path):
    """`ident up` against Redis behind Sentinel runs no Redis of its own; `ident submit` is answered through it."""
    photo = sorted((data_dir() / "images" / "faces").glob("*.jpg"))[0]
    env = {**fleet.env, "IDENT_DATA_DIR": str(tmp_path)}
    up = subprocess.Popen([sys.executable, "-m", "ident.cli", "up", "--audio-concurrency", "1",
                           "--vision-concurrency", "1"], env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    said = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not any("Ctrl-C stops everything" in line for line in said):
            line = up.stderr.readline()
            if not line:
                break
            said.append(line)
        assert any("Ctrl-C stops everything" in line for line in said), "".join(said)
        assert not any("embedded redis-server" in line for line in said), "".join(said)
        assert not [p for p in psutil.Process(up.pid).children(recursive=True) if "redis-server" in p.name()]
        submitted = subprocess.run([sys.executable, "-m", "ident.cli", "submit", str(photo)], env=env,
                                   capture_output=True, text=True, timeout=180)
        assert submitted.returncode == 0, submitted.stderr[-3000:]
        assert '"execution_provider"' in submitted.stdout and '"faces"' in submitted.stdout, submitted.stdout[-2000:]
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=90) == 0
    finally:
        if up.poll() is None:
            up.kill()
