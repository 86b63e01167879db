"""workers.kombu_internals against a real redis-server: kombu's Redis transport with one client per channel."""

from __future__ import annotations

import uuid

import pytest
import redis
from kombu import Connection, Exchange, Queue

from kombu.transport.redis import Transport as StockTransport

from workers.kombu_internals import Transport


@pytest.fixture
def queue_name() -> str:
    return f"transport-test-{uuid.uuid4().hex}"


def consume_one(connection: Connection, queue: Queue, *, ack: bool):
    got = []

    def on_message(body, message):
        got.append(body)
        if ack:
            message.ack()

    with connection.Consumer(queue, callbacks=[on_message], accept=["json"]):
        connection.drain_events(timeout=5)
    return got


def test_one_client_serves_publishing_acknowledging_and_unacked_bookkeeping(redis_server, queue_name):
    queue = Queue(queue_name, Exchange(queue_name), routing_key=queue_name)
    with Connection(redis_server.url, transport=Transport) as connection:
        channel = connection.default_channel
        with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
            assert first is second
        with connection.Producer(serializer="json") as producer:
            producer.publish({"n": 1}, exchange=queue.exchange, routing_key=queue_name, declare=[queue])

        assert consume_one(connection, queue, ack=True) == [{"n": 1}]
        db = redis.Redis.from_url(redis_server.url)
        assert db.llen(queue_name) == 0
        assert not db.hgetall("unacked"), "the ack went through the reused client"


def test_a_new_connection_pool_gets_a_new_client(redis_server):
    with Connection(redis_server.url, transport=Transport) as connection:
        channel = connection.default_channel
        with channel.conn_or_acquire() as before:
            pass
        channel._pool = None  # what kombu does when it drops a broken pool
        with channel.conn_or_acquire() as after:
            assert after is not before and after.connection_pool is channel.pool
            assert after.ping()


def test_interoperates_with_stock_kombu_both_ways(redis_server, queue_name):
    queue = Queue(queue_name, Exchange(queue_name), routing_key=queue_name)
    for publisher, consumer in ((StockTransport, Transport), (Transport, StockTransport)):
        with Connection(redis_server.url, transport=publisher) as connection:
            with connection.Producer(serializer="json") as producer:
                producer.publish({"from": str(publisher)}, exchange=queue.exchange, routing_key=queue_name,
                                 declare=[queue])
        with Connection(redis_server.url, transport=consumer) as connection:
            assert consume_one(connection, queue, ack=True) == [{"from": str(publisher)}]


def test_a_consumer_that_cannot_use_the_hand_over_says_why_once(redis_server, queue_name, caplog):
    queues = [Queue(name, Exchange(name), routing_key=name) for name in (queue_name, queue_name + "-other")]
    with Connection(redis_server.url, transport=Transport, transport_options={"priority_steps": [0]}) as connection:
        channel = connection.default_channel
        with connection.Consumer(queues[:1], accept=["json"]):
            assert channel._single_source() == queue_name
        assert "BRPOP" not in caplog.text

        with connection.Consumer(queues, accept=["json"]):
            for _turn in range(3):
                assert channel._single_source() is None
        warnings = [r.getMessage() for r in caplog.records if "BRPOP" in r.getMessage()]
        assert len(warnings) == 1, warnings
        assert f"consumes 2 queues ({queue_name}, {queue_name}-other)" in warnings[0]

        # A Redis before 6.2 cannot run here; its version check is what is stood in for.
        channel.__dict__["server_has_blmove"] = False
        with connection.Consumer(queues[:1], accept=["json"]):
            assert channel._single_source() is None
        assert "has no BLMOVE; upgrade it" in caplog.text
