"""Redis behind Sentinel, without a server: the URL, the settings, Celery's options, and WAIT's bookkeeping."""

from __future__ import annotations

import logging

import pytest

from tasks.app import celery_config
from tasks.errors import ConfigurationError
from tasks.redis_connection import redis_client
from tasks.redis_urls import parse_sentinel_url
from tasks.settings import Settings
from tasks.replicas import RECHECK_S, ReplicaConfirmation

SENTINELS = "sentinel://:s%40cret@10.0.0.1:26379/2;sentinel://10.0.0.2:26380;sentinel://10.0.0.3"


def test_a_sentinel_url_names_every_sentinel_and_the_masters_login():
    target = parse_sentinel_url(SENTINELS)
    assert target.addresses == (("10.0.0.1", 26379), ("10.0.0.2", 26380), ("10.0.0.3", 26379))
    assert target.db == 2 and target.password == "s@cret"
    assert target.master_credentials() == {"db": 2, "password": "s@cret"}


@pytest.mark.parametrize("url, says", [
    ("sentinel://a:26379;redis://b:6379", "starts with sentinel://"),
    ("sentinel://a:port", "port is not a number"),
    ("sentinel://a:26379/zero", "must be a number"),
    ("sentinel://", None),
])
def test_a_bad_sentinel_url_is_refused_with_the_reason(url, says):
    if says is None:
        # No host is localhost, as for redis://.
        assert Settings.from_env({"IDENT_REDIS_URL": url}).redis_url == url
        return
    with pytest.raises(ConfigurationError, match=says):
        Settings.from_env({"IDENT_REDIS_URL": url})


def test_the_password_never_appears_in_the_refusal():
    with pytest.raises(ConfigurationError) as refused:
        Settings.from_env({"IDENT_REDIS_URL": "sentinel://:hunter2@a:x"})
    assert "hunter2" not in str(refused.value)


def test_results_wait_for_one_replica_behind_sentinel_and_for_none_on_one_server():
    assert Settings.from_env({"IDENT_REDIS_URL": SENTINELS}).replicas_to_confirm() == 1
    assert Settings.from_env({}).replicas_to_confirm() == 0
    assert Settings.from_env({"IDENT_REDIS_URL": SENTINELS, "IDENT_REDIS_WAIT_REPLICAS": "0"}).replicas_to_confirm() == 0
    assert Settings.from_env({"IDENT_REDIS_WAIT_REPLICAS": "2"}).replicas_to_confirm() == 2
    with pytest.raises(ConfigurationError, match="IDENT_REDIS_WAIT_REPLICAS"):
        Settings.from_env({"IDENT_REDIS_WAIT_REPLICAS": "-1"})
    with pytest.raises(ConfigurationError, match="IDENT_REDIS_WAIT_TIMEOUT_MS"):
        Settings.from_env({"IDENT_REDIS_WAIT_TIMEOUT_MS": "0"})
    with pytest.raises(ConfigurationError, match="IDENT_REDIS_SENTINEL_MASTER"):
        Settings.from_env({"IDENT_REDIS_URL": SENTINELS, "IDENT_REDIS_SENTINEL_MASTER": " "})


def test_celery_gets_the_masters_name_and_the_sentinels_password_for_broker_and_results():
    settings = Settings.from_env({"IDENT_REDIS_URL": SENTINELS, "IDENT_REDIS_SENTINEL_MASTER": "fleet",
                                  "IDENT_REDIS_SENTINEL_PASSWORD": "watchers"})
    config = celery_config(settings)
    assert config["broker_url"] == config["result_backend"] == SENTINELS
    for options in (config["broker_transport_options"], config["result_backend_transport_options"]):
        assert options["master_name"] == "fleet"
        assert options["sentinel_kwargs"]["password"] == "watchers"
    assert "broker_use_ssl" not in config
    plain = celery_config(Settings.from_env({}))
    assert "master_name" not in plain["broker_transport_options"]
    assert "master_name" not in plain["result_backend_transport_options"]


def test_a_sentinel_client_asks_the_sentinels_with_their_password_and_logs_in_to_the_master_with_its_own():
    settings = Settings.from_env({"IDENT_REDIS_URL": SENTINELS, "IDENT_REDIS_SENTINEL_PASSWORD": "watchers"})
    client = redis_client(settings, socket_timeout=0.5)
    pool = client.connection_pool
    assert pool.service_name == "ident"
    assert pool.connection_kwargs["password"] == "s@cret" and pool.connection_kwargs["db"] == 2
    assert pool.connection_kwargs["socket_timeout"] == 0.5
    sentinels = pool.sentinel_manager.sentinels
    assert [s.connection_pool.connection_kwargs["port"] for s in sentinels] == [26379, 26380, 26379]
    assert all(s.connection_pool.connection_kwargs["password"] == "watchers" for s in sentinels)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Pipe:
    def __init__(self) -> None:
        self.commands = []

    def execute_command(self, *args):
        self.commands.append(args)


def test_wait_is_appended_until_replicas_fall_short_then_skipped_for_a_while(caplog):
    clock = Clock()
    confirmation = ReplicaConfirmation(1, 250, clock=clock)
    pipe = Pipe()
    assert confirmation.add_to(pipe) and pipe.commands == [("WAIT", 1, 250)]
    confirmation.check(1, "a job's result")
    assert confirmation.add_to(Pipe())
    with caplog.at_level(logging.WARNING):
        confirmation.check(0, "a job's result")
    assert "a job's result reached 0 of the 1 replica(s)" in caplog.text
    assert not confirmation.add_to(Pipe())
    clock.now += RECHECK_S
    assert confirmation.add_to(Pipe())
    confirmation.check(RuntimeError("NOPERM"), "a job's hand-over")
    assert not confirmation.add_to(Pipe())


def test_nothing_waits_when_no_replica_is_asked_for():
    pipe = Pipe()
    assert not ReplicaConfirmation(0, 250).add_to(pipe)
    assert pipe.commands == []


def test_a_worker_resolves_sentinel_urls_to_the_fleets_transport_and_result_backend():
    import subprocess
    import sys

    code = """
from kombu import Connection
from workers import kombu_internals, celery_internals
kombu_internals.install()
transport = Connection("sentinel://127.0.0.1:1", transport_options={"master_name": "x"}).transport
assert type(transport) is kombu_internals.SentinelTransport, type(transport)
channel = kombu_internals.SentinelChannel
from kombu.transport import redis
# The hand-over and the reused client come first, kombu's Sentinel pool after them.
assert channel._brpop_start is kombu_internals.Channel._brpop_start
assert channel.conn_or_acquire is kombu_internals.Channel.conn_or_acquire
assert channel._get_pool is redis.SentinelChannel._get_pool
assert channel.QoS is kombu_internals.QoS
assert kombu_internals.SentinelTransport.default_port == 26379
assert celery_internals.result_backend_class("sentinel://a;sentinel://b") == celery_internals.SENTINEL_RESULT_BACKEND
assert celery_internals.result_backend_class("redis://a") == celery_internals.RESULT_BACKEND
from celery.backends.redis import SentinelBackend
assert issubclass(celery_internals.FleetSentinelResultBackend, SentinelBackend)
assert celery_internals.FleetSentinelResultBackend._store_once is celery_internals.FleetResultBackend._store_once
assert celery_internals.FleetSentinelResultBackend._get_pool is SentinelBackend._get_pool
"""
    from pathlib import Path

    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


class RecordingPipeline(Pipe):
    """A pipeline's shape, with the replies a real one gives back (errors as values)."""

    def __init__(self, replies: list) -> None:
        super().__init__()
        self.replies = replies

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def set(self, *args):
        self.commands.append(("SET", *args))

    def execute(self, raise_on_error=True):
        assert raise_on_error is False
        return self.replies


class OnePipelineClient:
    def __init__(self, replies: list) -> None:
        self.pipe = RecordingPipeline(replies)

    def pipeline(self, transaction=True):
        assert transaction is False, "WAIT cannot follow its writes inside MULTI"
        return self.pipe


def test_write_puts_wait_after_the_writes_and_raises_a_failed_write():
    client = OnePipelineClient(["OK", 1])
    confirmation = ReplicaConfirmation(1, 250)
    assert confirmation.write(client, lambda pipe: pipe.set("k", "v"), "a test write") == ["OK"]
    assert client.pipe.commands == [("SET", "k", "v"), ("WAIT", 1, 250)]
    failing = OnePipelineClient([ValueError("WRONGTYPE"), 1])
    with pytest.raises(ValueError, match="WRONGTYPE"):
        confirmation.write(failing, lambda pipe: pipe.set("k", "v"), "a test write")
    assert ReplicaConfirmation(0, 250).write(OnePipelineClient(["OK"]), lambda pipe: pipe.set("k", "v"), "x") == ["OK"]
