"""Sending jobs by name, waiting for their results, and reading them back by id for their owner only.

Jobs go through tasks/client.IdentClient (names, payloads by reference), on one
sender thread: Celery keeps a result backend per thread, and the one whose
sends subscribe to the results' channel must be the one whose channel is read.
A drainer thread reads that channel and settles each waiting call's future as
its result is published, so a waiting call holds no thread.

Who sent a job is recorded in Redis (the digest of its key, never the key)
with the result's expiry, so that any gateway replica can refuse a job id to
every other key.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from celery import states
from celery.result import AsyncResult

from tasks.client import IdentClient
from tasks.settings import Settings

log = logging.getLogger("ident.gateway")

OWNER_KEY = "ident:gateway:owner:{}"
# What GET /v1/jobs/{id} reports; Celery's other states are folded into these.
PUBLIC_STATES = {states.PENDING: "PENDING", states.RECEIVED: "PENDING", states.RETRY: "PENDING",
                 states.STARTED: "STARTED", states.SUCCESS: "SUCCESS", states.FAILURE: "FAILURE",
                 states.REVOKED: "FAILURE"}
DRAIN_TIMEOUT_S = 0.5


@dataclass(frozen=True)
class JobOutcome:
    """Where a job stands: ``result`` on SUCCESS, ``error_type`` and ``message`` on FAILURE."""

    state: str
    result: object = None
    error_type: str | None = None
    message: str | None = None


def outcome_of(job: AsyncResult) -> JobOutcome:
    """A ready job's outcome from its cached state (no Redis round trip)."""
    if job.state == states.SUCCESS:
        return JobOutcome("SUCCESS", result=job.result)
    error = job.result
    if job.state == states.REVOKED:
        return JobOutcome("FAILURE", error_type="Revoked", message="the job was revoked before it ran")
    return JobOutcome("FAILURE", error_type=type(error).__name__, message=str(error))


@dataclass
class SentJob:
    id: str
    job: AsyncResult
    answer: asyncio.Future | None


class JobDesk:
    def __init__(self, settings: Settings, client: IdentClient | None = None) -> None:
        self.settings = settings
        self.client = client or IdentClient(settings)
        self._sender = ThreadPoolExecutor(1, thread_name_prefix="ident-gateway-send")
        # The sender thread's own backend: its sends subscribe, the drainer reads.
        self.backend = self._sender.submit(lambda: self.client.app.backend).result()
        self._stop = threading.Event()
        self._drainer: threading.Thread | None = None

    @property
    def redis(self):
        """The result backend's redis-py client: the fleet's Redis, reached however the fleet reaches it."""
        return self.backend.client

    def start(self) -> None:
        self._drainer = threading.Thread(target=self._drain, name="ident-gateway-results", daemon=True)
        self._drainer.start()

    def stop(self) -> None:
        self._stop.set()
        if self._drainer is not None:
            self._drainer.join(timeout=DRAIN_TIMEOUT_S + 2)
        self._sender.shutdown(wait=True)

    def _drain(self) -> None:
        consumer = self.backend.result_consumer
        while not self._stop.is_set():
            try:
                consumer.drain_events(timeout=DRAIN_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 -- Redis restarting: the waiting calls time out, the loop goes on
                log.warning("reading results failed: %s", exc)
                self._stop.wait(DRAIN_TIMEOUT_S)

    async def send(self, call: Callable[[IdentClient], AsyncResult], owner: str, wait: bool) -> SentJob:
        """Send one job (``call`` names it through the client) for ``owner``; with ``wait``, its answer's future."""
        loop = asyncio.get_running_loop()
        answer = loop.create_future() if wait else None

        def settle(job: AsyncResult) -> None:
            # In the drainer thread, as the result is read.
            done = outcome_of(job)
            loop.call_soon_threadsafe(_set_once, answer, done)

        def send_now() -> SentJob:
            job = call(self.client)
            self.redis.set(OWNER_KEY.format(job.id), owner, ex=self.settings.result_expires)
            if answer is None:
                # Nobody waits here: no need to hear the result published.
                self.backend.result_consumer.cancel_for(job.id)
            else:
                job.then(settle)
            return SentJob(job.id, job, answer)

        return await asyncio.wrap_future(self._sender.submit(send_now))

    async def wait(self, sent: SentJob, timeout: float) -> JobOutcome | None:
        """The job's outcome, or None when it is not done within ``timeout`` seconds."""
        try:
            return await asyncio.wait_for(asyncio.shield(sent.answer), timeout)
        except TimeoutError:
            # Stop listening for it; its result stays readable by id until it expires.
            await asyncio.wrap_future(self._sender.submit(self.backend.remove_pending_result, sent.job))
            return None

    def owned_by(self, job_id: str, owner: str) -> bool:
        recorded = self.redis.get(OWNER_KEY.format(job_id))
        return recorded is not None and hmac.compare_digest(recorded, owner.encode())

    def read(self, job_id: str) -> JobOutcome:
        """The job's outcome now, from the result backend (PENDING while it is queued or running)."""
        meta = self.backend.get_task_meta(job_id)
        state = PUBLIC_STATES.get(meta["status"], "PENDING")
        if state == "SUCCESS":
            return JobOutcome(state, result=meta["result"])
        if state == "FAILURE":
            if meta["status"] == states.REVOKED:
                return JobOutcome(state, error_type="Revoked", message="the job was revoked before it ran")
            error = meta["result"]
            return JobOutcome(state, error_type=type(error).__name__, message=str(error))
        return JobOutcome(state)


def _set_once(future: asyncio.Future, value: JobOutcome) -> None:
    if not future.done():
        future.set_result(value)
