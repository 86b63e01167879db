"""A job's own Redis keys against a real redis-server: one round trip in, deleted with the result."""

from __future__ import annotations

import uuid

import pytest
import redis
from celery import Celery

from workers.jobkeys import RESULT_BACKEND, FleetResultBackend, count_and_fetch, fetch_payloads


@pytest.fixture
def db(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


@pytest.fixture
def backend(redis_server) -> FleetResultBackend:
    app = Celery("jobkeys-test", set_as_current=False)
    app.conf.result_backend = f"{RESULT_BACKEND}+{redis_server.url}"
    app.conf.result_serializer = "json"
    assert isinstance(app.backend, FleetResultBackend)
    return app.backend


def key(kind: str) -> str:
    return f"ident:{kind}:test-{uuid.uuid4().hex}"


def test_count_and_fetch_counts_and_fetches_in_one_go(db):
    counter, small, large, missing, wrong = (key(k) for k in ("deliveries", "payload", "payload", "payload", "payload"))
    db.set(small, b"\x00photo\xff")
    db.set(large, b"x" * 101)
    db.rpush(wrong, b"not bytes")
    references = [small, large, missing, wrong]

    first, fetched = count_and_fetch(db, counter, 60, references, max_bytes=100)
    second, _ = count_and_fetch(db, counter, 60, [], max_bytes=100)

    assert (first, second) == (1, 2)
    assert 0 < db.ttl(counter) <= 60
    assert fetched[small].data == b"\x00photo\xff" and fetched[small].size == len(b"\x00photo\xff")
    # Over the limit: its size, never its bytes.
    assert fetched[large].data is None and fetched[large].size == 101
    assert fetched[missing].data is None and fetched[missing].size == 0 and fetched[missing].error is None
    assert isinstance(fetched[wrong].error, redis.ResponseError)
    assert fetch_payloads(db, [small], max_bytes=100)[small].data == b"\x00photo\xff"


def test_a_result_is_stored_and_the_job_keys_deleted_together(db, backend, redis_server):
    job_id = str(uuid.uuid4())
    owned = [key("deliveries"), key("payload")]
    for name in owned:
        db.set(name, b"1")
    backend.delete_with_result(job_id, owned)

    backend.mark_as_done(job_id, {"faces": []})

    assert db.exists(*owned) == 0
    assert backend.delete_now(job_id) == ()
    # A producer with the stock backend reads the result as usual.
    producer = Celery("producer", set_as_current=False, backend=redis_server.url)
    producer.conf.result_serializer = "json"
    assert producer.AsyncResult(job_id).get(timeout=5) == {"faces": []}


def test_keys_of_a_result_never_stored_are_handed_back(db, backend):
    job_id = str(uuid.uuid4())
    owned = [key("deliveries")]
    backend.delete_with_result(job_id, owned)
    assert backend.delete_now(job_id) == tuple(owned)
    assert backend.delete_now(job_id) == ()


def test_a_failed_store_keeps_the_keys_for_the_retry(db, backend, monkeypatch):
    job_id = str(uuid.uuid4())
    owned = [key("payload")]
    db.set(owned[0], b"1")
    backend.delete_with_result(job_id, owned)
    execute = redis.client.Pipeline.execute
    calls = []

    def restarting_redis(pipe, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise redis.ConnectionError("Redis is restarting")
        return execute(pipe, *args, **kwargs)

    monkeypatch.setattr(redis.client.Pipeline, "execute", restarting_redis)

    with pytest.raises(redis.ConnectionError):
        backend._set(backend.get_key_for_task(job_id), b"{}")
    assert db.exists(*owned) == 1
    backend._set(backend.get_key_for_task(job_id), b"{}")

    assert db.exists(*owned) == 0
    assert backend.delete_now(job_id) == ()
