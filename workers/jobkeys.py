"""A job's own Redis keys: fetched in one round trip, deleted with its result.

Each job owns a delivery counter (``ident:deliveries:<id>``) and, when its
payload travels by reference, the payload key. On a loaded worker every Redis
round trip costs about a millisecond of the pool process's time between two
jobs, so a job's Redis work costs two round trips, not six:

- at the start, one pipeline counts the delivery and fetches every referenced
  payload, each size-checked inside Redis before its bytes are sent (a Lua
  script, so an oversized value never reaches the process);
- at the end, one script stores and publishes its result and deletes the
  job's keys (``FleetResultBackend``, workers/celery_internals.py), so a
  result is never visible while the payload lingers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tasks.contract import PAYLOAD_KEY_PREFIX, PAYLOAD_REF_FIELD


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
STORE_RESULT = """
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
