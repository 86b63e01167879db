"""A job's own Redis keys against a real redis-server: one round trip in, deleted with the result."""

from __future__ import annotations

import uuid

import pytest
import redis
from celery import Celery

from workers.celery_internals import RESULT_BACKEND, FleetResultBackend
from workers.jobkeys import count_and_fetch, fetch_payloads


@pytest.fixture
def db(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


@pytest.fixture(params=["msgpack", "json"])
def backend(request, redis_server) -> FleetResultBackend:
    app = Celery("jobkeys-test", set_as_current=False)
    app.conf.result_backend = f"{RESULT_BACKEND}+{redis_server.url}"
    app.conf.result_serializer = request.param
    app.conf.result_accept_content = ["msgpack", "json"]
    app.conf.result_expires = 600
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
    assert 0 < db.ttl(f"celery-task-meta-{job_id}") <= 600
    # A producer with the stock backend reads the result as usual.
    producer = Celery("producer", set_as_current=False, backend=redis_server.url)
    producer.conf.result_serializer = backend.app.conf.result_serializer
    producer.conf.result_accept_content = ["msgpack", "json"]
    assert producer.AsyncResult(job_id).get(timeout=5) == {"faces": []}


def test_a_success_is_never_overwritten_by_a_late_duplicate(backend):
    job_id = str(uuid.uuid4())
    backend.mark_as_done(job_id, {"faces": [1]})
    backend.mark_as_failure(job_id, RuntimeError("a duplicate delivery failed later"))
    assert backend.get_task_meta(job_id)["status"] == "SUCCESS"
    assert backend.get_task_meta(job_id)["result"] == {"faces": [1]}
    # A failure, on the other hand, is replaced by a later success.
    other = str(uuid.uuid4())
    backend.mark_as_failure(other, RuntimeError("first delivery failed"))
    backend.mark_as_done(other, {"faces": []})
    assert backend.get_task_meta(other)["status"] == "SUCCESS"


def test_a_late_duplicate_publishes_the_stored_success_again(db, backend):
    """A producer that missed the first publish (it was resubscribing) still gets the result."""
    job_id = str(uuid.uuid4())
    backend.mark_as_done(job_id, {"faces": [1]})
    listener = db.pubsub(ignore_subscribe_messages=True)
    listener.subscribe(backend.get_key_for_task(job_id))
    try:
        backend.mark_as_failure(job_id, RuntimeError("a duplicate delivery failed later"))
        message = None
        for _ in range(50):
            message = listener.get_message(timeout=0.1)
            if message:
                break
        assert message is not None, "nothing was published for the duplicate"
        assert backend.decode_result(message["data"])["status"] == "SUCCESS"
        assert backend.decode_result(message["data"])["result"] == {"faces": [1]}
    finally:
        listener.close()


def test_keys_of_a_result_never_stored_are_handed_back(db, backend):
    job_id = str(uuid.uuid4())
    owned = [key("deliveries")]
    backend.delete_with_result(job_id, owned)
    assert backend.delete_now(job_id) == tuple(owned)
    assert backend.delete_now(job_id) == ()


def test_a_store_retried_through_a_redis_outage_still_deletes_the_keys(db, backend, monkeypatch):
    job_id = str(uuid.uuid4())
    owned = [key("payload")]
    db.set(owned[0], b"1")
    backend.delete_with_result(job_id, owned)
    # The backend runs its script by SHA-1 (EVALSHA): the outage is stood in there.
    evaluate = redis.Redis.evalsha
    calls = []

    def restarting_redis(client, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise redis.ConnectionError("Redis is restarting")
        return evaluate(client, *args, **kwargs)

    monkeypatch.setattr(redis.Redis, "evalsha", restarting_redis)

    backend.mark_as_done(job_id, {"faces": []})

    assert len(calls) == 2
    assert db.exists(*owned) == 0
    assert backend.get_task_meta(job_id)["status"] == "SUCCESS"
    assert backend.delete_now(job_id) == ()
