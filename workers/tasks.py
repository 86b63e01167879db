"""The fleet's tasks, one factory for both workers: decode the call, run the pipeline, shape the result.

Every task takes its input through :class:`~workers.job_input.JobInput`, once
per delivery. With late acks and reject-on-worker-lost, a job whose process
dies is put back on the queue; a job that kills its process every time (a
poison message) would loop forever, so each delivery is counted in Redis, and
past IDENT_MAX_DELIVERIES the job fails with PoisonMessage instead of running.
A job's own Redis keys (its counter and payloads) are deleted in the step
that stores its result, whatever the result is.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from functools import cached_property

from celery import Celery, Task
from celery.exceptions import Reject

from tasks import contract
from tasks.errors import IdentError
from workers import batching
from workers.celery_internals import REQUEST, release_with_result
from workers.job_input import JobInput, forget, options_dict
from workers.runtime import PROCESS, current_runtime

# The contract's argument names for each kind's payloads: analyze's, then verify's two.
PAYLOAD_ARGUMENTS = {
    "vision": ("image", "image_a", "image_b"),
    "audio": ("audio", "audio_a", "audio_b"),
}
TASK_NAMES = {
    "vision": (contract.VISION_ANALYZE, contract.VISION_VERIFY, contract.VISION_GET_STATUS),
    "audio": (contract.AUDIO_ANALYZE, contract.AUDIO_VERIFY, contract.AUDIO_GET_STATUS),
}
# enroll, identify and forget (workers/galleries.py).
GALLERY_TASK_NAMES = {
    "vision": (contract.VISION_ENROLL, contract.VISION_IDENTIFY, contract.VISION_FORGET),
    "audio": (contract.AUDIO_ENROLL, contract.AUDIO_IDENTIFY, contract.AUDIO_FORGET),
}


class FleetTask(Task):
    """Base of every fleet task: delivery counting, payloads as bytes, job timestamps."""

    abstract = True
    # The worker shows redacted argument reprs, whatever the producer sent, and a
    # job the main process ends itself takes its Redis keys along.
    Request = REQUEST
    # The arguments that carry payloads, handed to the task body as bytes.
    payload_names: tuple[str, ...] = ()
    # Whether each delivery is counted (against poison messages). A job that
    # brings no payload cannot crash its process by its input, so counting it
    # would only cost a Redis round trip.
    counts_deliveries = True

    def __call__(self, *args, **kwargs):
        refuse_without_models()
        runtime = current_runtime()
        runtime.job_started_at = time.time()
        if not self.counts_deliveries and not (args or kwargs):
            return super().__call__()
        with self.job_input(self.request.id, args, kwargs) as job:
            return super().__call__(*job.arguments(self.arguments_signature, self.payload_names).values())

    @cached_property
    def arguments_signature(self) -> inspect.Signature:
        """The task's arguments as the contract names them, read once (inspect is slow per job).

        Not ``signature``: that is Celery's own method, which makes canvas signatures.
        """
        return inspect.signature(self.run)

    @contextlib.contextmanager
    def job_input(self, task_id: str, args: tuple, kwargs: dict):
        """The job's input for this delivery; its keys are released however the job ends.

        A process that dies mid-job never gets to the release, so a redelivery
        still finds its payload.
        """
        job = JobInput(task_id, args, kwargs, current_runtime().settings)
        try:
            job.deliver(self.app.backend.client)
            yield job
        finally:
            self.release_keys(task_id, job.keys)

    def release_keys(self, task_id: str, keys: list[str]) -> None:
        """Delete a job's own keys in the step that stores its result (at once on other backends)."""
        if not release_with_result(self.backend, task_id, keys):
            forget(self.backend.client, keys)


class AnalyzeTask(FleetTask):
    """An ``*.analyze(payload, options)`` task, runnable one job at a time or as a batch."""

    abstract = True

    def run_many(self, items) -> list:
        """Each job's result or its own exception, the models run once for all of them."""
        refuse_without_models()
        runtime = current_runtime()
        runtime.job_started_at = time.time()
        (payload_name,) = self.payload_names
        outcomes: list = [None] * len(items)
        slots, payloads, options = [], [], []
        with contextlib.ExitStack() as inputs:
            for slot, item in enumerate(items):
                try:
                    job = inputs.enter_context(self.job_input(item.task_id, item.args, item.kwargs))
                    arguments = job.arguments(self.arguments_signature, self.payload_names)
                    payloads.append(arguments[payload_name])
                    options.append(options_dict(arguments.get("options")))
                    slots.append(slot)
                except IdentError as exc:  # this job's own failure, reported to its producer
                    outcomes[slot] = exc
            for slot, result in zip(slots, runtime.pipeline.analyze_many(payloads, options)):
                outcomes[slot] = result if isinstance(result, BaseException) else runtime.finish(result)
        return outcomes


def refuse_without_models() -> None:
    """Put a job back on its queue, uncounted, if this process could not load its models.

    The worker is already stopping (see workers/wiring.py); another worker,
    or this one restarted once the operator has fixed it, runs the job.
    """
    if PROCESS.load_failure is not None:
        raise Reject(f"this pool process could not load its models: {PROCESS.load_failure}", requeue=True)


def define_tasks(app: Celery, kind: str) -> None:
    """Register ``kind``'s analyze, verify, get_status, enroll, identify and forget on ``app``, under the contract's names."""
    one, first, second = PAYLOAD_ARGUMENTS[kind]
    analyze_name, verify_name, status_name = TASK_NAMES[kind]

    def analyze(self, payload: bytes, options=None) -> dict:
        runtime = current_runtime()
        return runtime.finish(runtime.pipeline.analyze(payload, options_dict(options)))

    def verify(self, payload_a: bytes, payload_b: bytes) -> dict:
        runtime = current_runtime()
        return runtime.finish(runtime.pipeline.verify(payload_a, payload_b))

    def get_status(self) -> dict:
        return current_runtime().status()

    def enroll(self, gallery: str, subject_id: str, payload: bytes, options=None) -> dict:
        runtime = current_runtime()
        return runtime.finish(runtime.galleries.enroll(gallery, subject_id, payload, options))

    def identify(self, gallery: str, payload: bytes, options=None) -> dict:
        runtime = current_runtime()
        return runtime.finish(runtime.galleries.identify(gallery, payload, options))

    def forget_subject(self, gallery: str, subject_id: str) -> dict:
        runtime = current_runtime()
        return runtime.finish(runtime.galleries.forget(gallery, subject_id))

    # shared=False: each worker app has its own kind's tasks, not every app's.
    app.task(base=AnalyzeTask, bind=True, shared=False, name=analyze_name, payload_names=(one,),
             Strategy=batching.analyze_strategy())(_named(analyze, payload=one))
    app.task(base=FleetTask, bind=True, shared=False, name=verify_name, payload_names=(first, second))(
        _named(verify, payload_a=first, payload_b=second))
    # Celery renders every result's repr for its task-succeeded event (saferepr,
    # ~0.25 ms per KB); 256 characters of a status are enough for Flower's list.
    app.task(base=FleetTask, bind=True, shared=False, name=status_name, counts_deliveries=False,
             resultrepr_maxsize=256)(get_status)
    enroll_name, identify_name, forget_name = GALLERY_TASK_NAMES[kind]
    app.task(base=FleetTask, bind=True, shared=False, name=enroll_name, payload_names=(one,))(
        _named(enroll, payload=one))
    app.task(base=FleetTask, bind=True, shared=False, name=identify_name, payload_names=(one,))(
        _named(identify, payload=one))
    app.task(base=FleetTask, bind=True, shared=False, name=forget_name)(forget_subject)


def _named(function, **names):
    """``function`` with its parameters renamed as the contract names them (producers may send keywords).

    FleetTask binds a job's arguments to this signature and calls the body
    with them in order, so the body's own parameter names do not matter.
    """
    signature = inspect.signature(function)
    function.__signature__ = signature.replace(
        parameters=[p.replace(name=names.get(p.name, p.name)) for p in signature.parameters.values()]
    )
    return function
