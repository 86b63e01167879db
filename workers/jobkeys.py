"""A job's own Redis keys: fetched in one round trip, deleted with its result.

Each job owns a delivery counter (``ident:deliveries:<id>``) and, when its
payload travels by reference, the payload key. On a loaded worker every Redis
round trip costs about a millisecond of the pool process's time between two
jobs, so a job's Redis work costs two round trips, not six:

- at the start, one pipeline counts the delivery and fetches every referenced
  payload, each size-checked inside Redis before its bytes are sent (a Lua
  script, so an oversized value never reaches the process);
- at the end, one script stores and publishes its result and deletes the
  job's keys (``FleetResultBackend``), so a result is never visible while
  the payload lingers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from celery.backends.redis import RedisBackend
from celery.exceptions import BackendStoreError
from kombu.utils.encoding import bytes_to_str

from tasks.contract import PAYLOAD_KEY_PREFIX, PAYLOAD_REF_FIELD
from workers.logsafety import SafeRequest

RESULT_BACKEND = "workers.jobkeys:FleetResultBackend"


def delivery_counter_key(task_id: str) -> str:
    return f"ident:deliveries:{task_id}"


def is_payload_key(reference: Any) -> bool:
    return isinstance(reference, str) and reference.startswith(PAYLOAD_KEY_PREFIX) and len(reference) < 200


def payload_references(args, kwargs) -> list[str]:
    """The payload keys a job's arguments refer to."""
    values = list(args or ()) + list((kwargs or {}).values())
    references = [v[PAYLOAD_REF_FIELD] for v in values if isinstance(v, dict) and PAYLOAD_REF_FIELD in v]
    return [r for r in references if is_payload_key(r)]


def job_keys(task_id: str, args, kwargs) -> list[str]:
    """Every Redis key a job owns: its delivery counter and its payloads."""
    return [delivery_counter_key(task_id), *payload_references(args, kwargs)]


class FleetRequest(SafeRequest):
    """A job as the worker's main process sees it.

    The main process itself stores the end of a job whose pool process hit
    the hard time limit, of a batch that failed as a whole, and of a job
    revoked or expired before it ran. None of them runs again, so the job's
    keys go with that result instead of lingering until they expire.
    """

    def release_keys(self) -> None:
        backend = self.task.backend
        if isinstance(backend, FleetResultBackend):
            backend.delete_with_result(self.id, job_keys(self.id, self.args, self.kwargs))

    def on_timeout(self, soft, timeout):
        if not soft:
            self.release_keys()
        super().on_timeout(soft, timeout)

    def _announce_revoked(self, reason, terminated, signum, expired):
        # Where Celery (4 to 5.7) stores a revoked or expired job's end.
        self.release_keys()
        super()._announce_revoked(reason, terminated, signum, expired)

# STRLEN then GET, atomically: {size} when the value is larger than ARGV[1] or
# missing, {size, bytes} otherwise.
_GUARDED_GET = """
local size = redis.call('STRLEN', KEYS[1])
if size > tonumber(ARGV[1]) then return {size} end
return {size, redis.call('GET', KEYS[1])}
"""


# Stores a job's result (KEYS[1]) unless it is already stored as SUCCESS,
# publishes it to the producers waiting on it, and deletes the job's own keys
# (KEYS[2..]). ARGV: the encoded result (msgpack or JSON) and its expiry in
# seconds (0: none).
#
# A duplicate delivery of a job already stored as SUCCESS publishes the stored
# result again: Celery's producer, reconnecting after a Redis restart, reads
# the results stored so far and only then subscribes, so a result stored in
# between reached nobody. Producers ignore a result they already have.
_STORE_RESULT = """
for i = 2, #KEYS do redis.call('DEL', KEYS[i]) end
local stored = redis.call('GET', KEYS[1])
if stored then
  local ok, meta = pcall(cmsgpack.unpack, stored)
  if not (ok and type(meta) == 'table') then ok, meta = pcall(cjson.decode, stored) end
  if ok and type(meta) == 'table' and meta['status'] == 'SUCCESS' then
    redis.call('PUBLISH', KEYS[1], stored)
    return 0
  end
end
if tonumber(ARGV[2]) > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
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
        self.client.eval(_STORE_RESULT, 1 + len(keys), key, *keys, value, int(self.expires or 0))
