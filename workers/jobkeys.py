"""A job's own Redis keys: fetched in one round trip, deleted with its result.

Each job owns a delivery counter (``ident:deliveries:<id>``) and, when its
payload travels by reference, the payload key. On a loaded worker every Redis
round trip costs about a millisecond of the pool process's time between two
jobs, so a job's keys cost two round trips, not five:

- at the start, one pipeline counts the delivery and fetches every referenced
  payload, each size-checked inside Redis before its bytes are sent (a Lua
  script, so an oversized value never reaches the process);
- at the end, the job's keys are deleted in the same transaction that stores
  and publishes its result (``FleetResultBackend``), so the producer hears
  of the result no later than before, and a result is never visible while
  the payload lingers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from celery.backends.redis import RedisBackend

log = logging.getLogger(__name__)

RESULT_BACKEND = "workers.jobkeys:FleetResultBackend"

# STRLEN then GET, atomically: {size} when the value is larger than ARGV[1] or
# missing, {size, bytes} otherwise.
_GUARDED_GET = """
local size = redis.call('STRLEN', KEYS[1])
if size > tonumber(ARGV[1]) then return {size} end
return {size, redis.call('GET', KEYS[1])}
"""


@dataclass(frozen=True)
class FetchedPayload:
    """What Redis held under a payload key, or why it could not be used."""

    size: int = 0
    data: bytes | None = None
    error: Exception | None = None


def count_and_fetch(client, counter_key: str, ttl: int, references: list[str], max_bytes: int
                    ) -> tuple[int, dict[str, FetchedPayload]]:
    """Count one more delivery of a job and fetch its payloads, in one round trip."""
    with client.pipeline(transaction=False) as pipe:
        pipe.incr(counter_key)
        pipe.expire(counter_key, ttl)
        for reference in references:
            pipe.eval(_GUARDED_GET, 1, reference, max_bytes)
        replies = pipe.execute(raise_on_error=False)
    for reply in replies[:2]:
        if isinstance(reply, Exception):
            raise reply
    return int(replies[0]), _fetched(references, replies[2:])


def fetch_payloads(client, references: list[str], max_bytes: int) -> dict[str, FetchedPayload]:
    with client.pipeline(transaction=False) as pipe:
        for reference in references:
            pipe.eval(_GUARDED_GET, 1, reference, max_bytes)
        return _fetched(references, pipe.execute(raise_on_error=False))


def _fetched(references: list[str], replies: list) -> dict[str, FetchedPayload]:
    fetched = {}
    for reference, reply in zip(references, replies):
        if isinstance(reply, Exception):
            # A key holding something other than bytes: the job's own bad input.
            fetched[reference] = FetchedPayload(error=reply)
        else:
            fetched[reference] = FetchedPayload(int(reply[0]), reply[1] if len(reply) > 1 else None)
    return fetched


class FleetResultBackend(RedisBackend):
    """Celery's Redis result backend, deleting a job's keys with its result.

    Only the worker apps use it (``IDENT_REDIS_URL`` behind a ``+``, Celery's
    way of naming a backend class with its URL); producers read results with
    the stock backend, and the stored result is byte for byte the same.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._delete_with_result: dict[bytes, tuple[str, ...]] = {}

    def delete_with_result(self, task_id: str, keys: list[str]) -> None:
        """Delete ``keys`` when the job's result is stored, whatever its state."""
        self._delete_with_result[self.get_key_for_task(task_id)] = tuple(keys)

    def delete_now(self, task_id: str) -> tuple[str, ...]:
        """The keys still waiting for the job's result, which will not come: the caller deletes them."""
        return self._delete_with_result.pop(self.get_key_for_task(task_id), ())

    def _set(self, key, value, expires=None):
        # RedisBackend._set (SET and PUBLISH in one pipeline) with the job's
        # DEL added; the pipeline is a transaction, so all of it or none lands.
        # The keys are dropped only once it has run: a retried store deletes them too.
        keys = self._delete_with_result.get(key, ())
        if expires is None:
            expires = self.expires
        with self.client.pipeline() as pipe:
            pipe.set(key, value, ex=expires or None)
            pipe.publish(key, value)
            if keys:
                pipe.delete(*keys)
            pipe.execute()
        if keys:
            self._delete_with_result.pop(key, None)
