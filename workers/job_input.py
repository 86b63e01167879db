"""A job's input, made once per delivery: its arguments by name, its payloads as bytes, its Redis keys.

:meth:`JobInput.deliver` counts the delivery and fetches every payload the job
passes by reference in one Redis round trip (workers/jobkeys.py), each
size-checked inside Redis so an oversized value never reaches the process.
:meth:`JobInput.arguments` then binds the job's arguments to the task's
signature and turns each payload argument into bytes: msgpack bytes as they
are, JSON base64 text decoded, a reference replaced by what was fetched. An
inline payload's size is checked by the pipeline that reads it, a
reference's here from the size Redis reported: each payload once.
"""

from __future__ import annotations

import base64
import binascii
import inspect
import logging
from typing import Any, Callable

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from tasks.contract import PAYLOAD_KEY_PREFIX, PAYLOAD_REF_FIELD
from tasks.errors import InvalidInput, LimitExceeded, PoisonMessage
from tasks.settings import Settings
from workers.celery_internals import release_unstored
from workers.jobkeys import FetchedPayload, count_and_fetch, is_payload_key, job_keys, payload_references

log = logging.getLogger(__name__)

REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError)


# redis-py's ExponentialBackoff(cap=5, base=0.1) waits 0.2, 0.4, 0.8, 1.6, 3.2 s, then 5 s a retry.
RETRIES_FOR_A_MINUTE = 16
RETRIES_FOR_HALF_A_MINUTE = 10


def through_redis_outage(operation: Callable[[], Any], what: str, retries: int = RETRIES_FOR_A_MINUTE) -> Any:
    """``operation()``, retried by redis-py while Redis is unreachable (a restart, a failover).

    A job cannot report its result without Redis either, so waiting for it to
    come back is better than failing the job with a ConnectionError.
    """
    def failed(exc: Exception) -> None:
        log.warning("Redis is unreachable (%s); will %s again", exc, what)

    retry = Retry(ExponentialBackoff(cap=5.0, base=0.1), retries, supported_errors=REDIS_ERRORS)
    return retry.call_with_retry(operation, failed)


class JobInput:
    """One delivery of one job (see the module's docstring)."""

    def __init__(self, task_id: str, args: tuple, kwargs: dict, settings: Settings) -> None:
        self.task_id = task_id
        self.args = tuple(args or ())
        self.kwargs = dict(kwargs or {})
        self.settings = settings
        self.references = payload_references(self.args, self.kwargs)
        # Every key the job owns, its delivery counter first: deleted with its result, whatever it is.
        self.keys = job_keys(task_id, self.args, self.kwargs)
        self._fetched: dict[str, FetchedPayload] = {}

    def deliver(self, client) -> None:
        """Count this delivery and fetch the job's payloads; PoisonMessage past IDENT_MAX_DELIVERIES."""
        settings = self.settings
        deliveries, self._fetched = through_redis_outage(
            lambda: count_and_fetch(client, self.keys[0], settings.payload_lifetime_s(), self.references,
                                    settings.max_payload_bytes),
            f"count the deliveries of job {self.task_id}",
        )
        if deliveries > settings.max_deliveries:
            raise PoisonMessage(
                f"job {self.task_id} was delivered {deliveries} times and its worker process died "
                f"each time (limit IDENT_MAX_DELIVERIES={settings.max_deliveries}); it is not run again"
            )

    def arguments(self, signature: inspect.Signature, payload_names: tuple[str, ...]) -> dict[str, Any]:
        """The job's arguments by name, each of ``payload_names`` as bytes; InvalidInput when they do not fit."""
        try:
            bound = dict(signature.bind(*self.args, **self.kwargs).arguments)
        except TypeError as exc:
            raise InvalidInput(f"bad arguments: {exc}; see docs/contract.md for each task's arguments") from None
        for name in payload_names:
            bound[name] = self.payload(bound[name], name)
        return bound

    def payload(self, value: Any, name: str) -> bytes:
        """The payload as bytes: msgpack bytes, JSON base64 text, or ``{"payload_ref": "ident:payload:..."}``."""
        if isinstance(value, dict) and PAYLOAD_REF_FIELD in value:
            reference = value[PAYLOAD_REF_FIELD]
            if not is_payload_key(reference):
                raise InvalidInput(f"{name}.{PAYLOAD_REF_FIELD} must be a Redis key starting with {PAYLOAD_KEY_PREFIX!r}")
            found = self._fetched[reference]
            if found.error is not None:
                raise InvalidInput(f"{name} refers to {reference}, which does not hold bytes: {found.error}")
            # Checked inside Redis: an oversized value never reaches the process.
            LimitExceeded.check(f"{name} size", found.size, self.settings.max_payload_bytes,
                                "IDENT_MAX_PAYLOAD_BYTES", "bytes")
            if found.data is None:
                raise InvalidInput(
                    f"{name} refers to {reference}, which is not in Redis: it expired or was never stored"
                )
            return found.data
        return payload_bytes(value, name)


def payload_bytes(value: Any, name: str) -> bytes:
    """Bytes from msgpack bytes or JSON base64 text."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
    elif isinstance(value, str):
        try:
            data = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInput(
                f"{name} is text but not base64: send raw bytes with msgpack, or base64 text with json"
            ) from None
    else:
        raise InvalidInput(
            f"{name} must be bytes (msgpack), base64 text (json) or a payload reference, not {type(value).__name__}"
        )
    if not data:
        raise InvalidInput(f"{name} is empty")
    return data


def options_dict(value: Any) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"options must be a mapping or null, not {type(value).__name__}")
    return dict(value)


def forget(client, keys: list[str]) -> None:
    """Delete a finished job's counter and payload; they expire anyway, so an outage only logs."""
    try:
        through_redis_outage(lambda: client.delete(*keys), "delete a finished job's keys",
                             retries=RETRIES_FOR_HALF_A_MINUTE)
    except REDIS_ERRORS as exc:
        log.warning("could not delete %d keys of a finished job (%s); they expire on their own", len(keys), exc)


def forget_unstored(task, task_id: str | None) -> None:
    """Delete a job's keys that were left waiting for a result that was never stored."""
    keys = release_unstored(task, task_id)
    if keys:
        forget(task.backend.client, list(keys))
