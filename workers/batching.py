"""Micro-batching: several waiting jobs, one model call per stage.

With IDENT_MAX_BATCH > 1, the worker's main process holds the ``*.analyze``
jobs it receives for up to IDENT_MAX_WAIT_MS (or until IDENT_MAX_BATCH are
waiting), then hands them to one pool process as one batch. The pipeline's
``analyze_many`` runs each model once over the whole batch, and every job
still gets its own result, its own failure and its own acknowledgement.

Written here rather than taken from celery-batches: that package pins
Celery < 5.7, flushes on a timer in whole seconds of latency budget, and does
not put a batch's jobs back when its pool process dies. Here a batch that
loses its process or runs out of time runs again one job at a time, so that
only the job that caused it fails (or, killing its process on every delivery,
ends as a PoisonMessage) and its batch-mates finish. A job sent with a
countdown or an ETA runs alone, and a job revoked or expired while it waited
for its batch is not run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from billiard.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded, WorkerLostError
from celery import signals
from celery.exceptions import Reject

from tasks.settings import load_settings
from workers import celery_internals, metrics
from workers.celery_internals import release_unstored
from workers.job_input import forget_unstored
from workers.runtime import PROCESS, current_runtime

log = logging.getLogger(__name__)

# Failures of a batch as a whole that one of its jobs alone may have caused.
ALONE_AFTER = (WorkerLostError, SoftTimeLimitExceeded, TimeLimitExceeded)


def analyze_strategy() -> str:
    """The Celery strategy for ``*.analyze``: batching when IDENT_MAX_BATCH > 1."""
    return f"{__name__}:batching_strategy" if load_settings().max_batch > 1 else "celery.worker.strategy:default"


@dataclass
class BatchItem:
    """What a pool process needs of one job; plain data, so it crosses the pipe."""

    task_id: str
    args: tuple
    kwargs: dict
    # For the metrics (workers/metrics.py): the queue it came from, the
    # producer's send time (if it sent one) and the worker's receipt time.
    queue: str | None = None
    sent_at: object = None
    received_at: object = None


def batching_strategy(task, app, consumer, **kwargs):
    """A Celery task strategy that buffers requests and flushes them as one pool job."""
    settings = load_settings()
    max_batch = settings.max_batch
    max_wait_s = settings.max_wait_ms / 1000.0
    hostname = consumer.hostname
    eventer = consumer.event_dispatcher
    revoked_tasks = consumer.controller.state.revoked
    Request = celery_internals.request_class(task, app, consumer)
    # A job sent with a countdown or an ETA waits on Celery's timer and then
    # runs alone, as it would without batching.
    one_at_a_time = celery_internals.one_at_a_time(task, app, consumer, **kwargs)
    buffer: list = []
    timer_entry = [None]

    def flush() -> None:
        if timer_entry[0] is not None:
            timer_entry[0].cancel()
            timer_entry[0] = None
        # A job revoked or expired while it waited is acknowledged and marked so, not run.
        requests = [request for request in buffer if not request.revoked()]
        buffer.clear()
        if requests:
            dispatch(requests)

    def dispatch(requests: list) -> bool:
        """Hand ``requests`` to the pool as one job; False when the pool is shutting down."""
        items = [BatchItem(r.id, tuple(r.args), dict(r.kwargs), *celery_internals.job_clock(r)) for r in requests]

        def on_accepted(pid, time_accepted):
            for request in requests:
                celery_internals.accepted(request)

        def on_done(_result):
            for request in requests:
                request.acknowledge()
                celery_internals.ready(request)

        def on_error(exc_info):
            # billiard hands over an ExceptionInfo or an ExceptionWithTraceback.
            exception = getattr(exc_info, "exception", exc_info)
            exception = getattr(exception, "exc", exception)
            if len(requests) > 1 and isinstance(exception, ALONE_AFTER):
                # Any one job may have killed the process or used up the time:
                # each runs again alone, so that only the culprit fails.
                log.warning("a batch of %d %s jobs failed as a whole (%s); running each alone",
                            len(requests), task.name, type(exception).__name__)
                for request in requests:
                    if not dispatch([request]):
                        request.reject(requeue=True)
                        celery_internals.ready(request)
                return
            if isinstance(exception, (WorkerLostError, Reject)):
                # The pool process died or was killed, or could not load its
                # models: put the job back so that another process runs it (each
                # delivery is counted, so a job that kills its process every time ends).
                log.warning("%d %s job(s) lost their pool process; requeueing them", len(requests), task.name)
                for request in requests:
                    request.reject(requeue=True)
                    celery_internals.ready(request)
                return
            log.error("%d %s job(s) failed: %s", len(requests), task.name, type(exception).__name__)
            for request in requests:
                request.release_keys()
                task.backend.mark_as_failure(request.id, exception)
                metrics.job_ended(task.name, None, exception, celery_internals.job_clock(request)[2])
                request.acknowledge()
                celery_internals.ready(request)

        return consumer.pool.apply_async(
            run_batch,
            args=(task.name, items),
            accept_callback=on_accepted,
            callback=on_done,
            error_callback=on_error,
            soft_timeout=task.soft_time_limit or app.conf.task_soft_time_limit,
            timeout=task.time_limit or app.conf.task_time_limit,
        ) is not None

    def task_message_handler(message, body, ack, reject, callbacks, **kw):
        if message.headers.get("eta"):
            return one_at_a_time(message, body, ack, reject, callbacks, **kw)
        request = Request(
            message, on_ack=ack, on_reject=reject, app=app, hostname=hostname, eventer=eventer,
            task=task, connection_errors=consumer.connection_errors, body=message.body,
            headers=message.headers, decoded=False, utc=app.uses_utc_timezone(),
        )
        if (request.expires or request.id in revoked_tasks) and request.revoked():
            return
        signals.task_received.send(sender=consumer, request=request)
        celery_internals.reserved(request)
        buffer.append(request)
        if len(buffer) >= max_batch:
            flush()
        elif timer_entry[0] is None:
            timer_entry[0] = consumer.timer.call_after(max_wait_s, flush)

    return task_message_handler


def run_batch(task_name: str, items: list[BatchItem]) -> int:
    """In a pool process: run the jobs of one batch and store each job's result.

    A batch runs outside Celery's tracer, so no task_prerun or task_postrun
    fires for its jobs: each job's metrics are recorded here.
    """
    task = PROCESS.app.tasks[task_name]
    started = time.perf_counter()
    for item in items:
        metrics.job_started(None, item.queue, item.sent_at, item.received_at)
    try:
        outcomes = task.run_many(items)
    except BaseException:
        # The main process decides what becomes of these jobs (each run again
        # alone, or failed and their keys deleted with the failure): forget the
        # deletions waiting here for results this process will not store.
        for item in items:
            release_unstored(task, item.task_id)
        raise
    for item, outcome in zip(items, outcomes):
        if isinstance(outcome, BaseException):
            task.backend.mark_as_failure(item.task_id, outcome)
        else:
            task.backend.mark_as_done(item.task_id, outcome)
        forget_unstored(task, item.task_id)
        metrics.job_ended(task_name, None, outcome if isinstance(outcome, BaseException) else None, item.received_at)
    current_runtime().free_since = time.time()
    log.info("%s batch of %d jobs done in %.1f ms", task_name, len(items), (time.perf_counter() - started) * 1000)
    return len(items)

