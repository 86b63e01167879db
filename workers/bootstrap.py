"""What every worker shares: the per-process runtime, status, and the Celery wiring.

The life of a worker process:

1. The main process (``celery -A workers.vision worker``) reads the settings,
   checks the model files and, for ``IDENT_DEVICE=cuda``, that CUDA can run;
   a worker that cannot serve refuses to start and says why.
2. Each pool process, after the fork, opens one ONNX Runtime session per
   model, pinned to GPU ``IDENT_GPU_IDS[k mod n]`` for pool process k, warms
   them up and only then takes jobs (``worker_process_init``).
3. Each pool process publishes its status to a small file; the
   ``model_status`` control command, which runs in the main process, reads
   those files for the pool's live processes.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import json
import logging
import multiprocessing
import os
import re
import shutil
import signal
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import psutil
from celery import Celery, Task, signals
from celery.exceptions import Reject
from celery.platforms import EX_FAILURE
from celery.utils.log import current_process_index
from celery.worker.control import inspect_command

from tasks.app import make_app
from tasks.contract import (
    CPU_EP_NAME,
    CUDA_EP_NAME,
    DEVICE_FIELD,
    EXECUTION_PROVIDER_FIELD,
    MODEL_STATUS_COMMAND,
    PAYLOAD_KEY_PREFIX,
    PAYLOAD_REF_FIELD,
)
from tasks.errors import ConfigurationError, DeviceUnavailable, IdentError, InvalidInput, LimitExceeded, ModelUnavailable, PoisonMessage
from tasks.settings import Settings, load_settings
from workers import logsafety
from workers.jobkeys import (
    RESULT_BACKEND,
    FleetResultBackend,
    count_and_fetch,
    delivery_counter_key,
    fetch_payloads,
    is_payload_key,
    payload_references,
)

log = logging.getLogger(__name__)


@dataclass
class WorkerIdentity:
    """Facts about this worker that the main process learns and its children inherit."""

    kind: str | None = None
    hostname: str = field(default_factory=socket.gethostname)
    pool_processes: int = 1
    main_pid: int = field(default_factory=os.getpid)


_identity = WorkerIdentity()
_runtime: "WorkerRuntime | None" = None
# The running jobs' payloads, fetched with their delivery count (see jobkeys).
_fetched_payloads: dict = {}
_pipeline_factories: dict[str, Callable[..., Any]] = {}
# Why this pool process could not load its models; it then serves nothing.
_load_failure: IdentError | None = None


class WorkerRuntime:
    """The sessions and the pipeline of one worker process."""

    def __init__(self, kind: str, settings: Settings, process_index: int, pool_processes: int) -> None:
        from models.catalog import selected_models
        from models.runtime import cpu_threads_per_session, open_session, plan_device
        from workers.allocator import keep_freed_memory

        # First, so that loading the models already allocates under these settings.
        self.allocator = keep_freed_memory()
        self.kind = kind
        self.settings = settings
        self.pid = os.getpid()
        self.process_index = process_index
        self.device_id = gpu_for_process(settings.gpu_ids, process_index)
        started = time.perf_counter()
        plan = plan_device(settings.device, self.device_id, conv_algo_search=settings.cudnn_conv_algo_search,
                           tf32=settings.cuda_tf32)
        threads = cpu_threads_per_session(settings.cpu_threads, pool_processes)
        self.specs = selected_models(settings, kind)
        self.sessions = {
            role: open_session(spec, settings.models_dir,
                               plan.for_model(spec, settings.cpu_models, settings.gpu_mem_limit_mb, settings.max_batch),
                               threads)
            for role, spec in self.specs.items()
        }
        if settings.device == "cuda":
            on_cpu = [s.spec.key for s in self.sessions.values() if s.device != "CUDA" and s.reason_code != "cpu_models"]
            if on_cpu:
                raise DeviceUnavailable(f"IDENT_DEVICE=cuda but {', '.join(on_cpu)} run on CPU: {self.message()}")
        for session in self.sessions.values():
            session.on_device_change = lambda: self.publish_status(force=True)
        self.pipeline = _pipeline_factories[kind](self.sessions, self.specs, settings)
        self.load_ms = round((time.perf_counter() - started) * 1000.0, 1)
        self.jobs = 0
        self.job_started_at: float | None = None
        # When this process last became free to take a job: ready, or done
        # reporting its previous job (result stored). Lets ident bench tell
        # the queue's cost from time spent behind another job.
        self.free_since: float = time.time()
        self._published: str | None = None

    def providers(self) -> tuple[str, str, dict[str, str]]:
        """(execution_provider, device, {model: provider}) as of the last run."""
        models = {s.spec.key: s.provider for s in self.sessions.values()}
        distinct = sorted(set(models.values()), key=lambda p: (p != CUDA_EP_NAME, p))
        provider = "+".join(distinct)
        device = "CUDA" if distinct == [CUDA_EP_NAME] else ("CPU" if distinct == [CPU_EP_NAME] else "CUDA+CPU")
        return provider, device, models

    def message(self) -> str | None:
        """Why any model is on CPU; None when everything runs on CUDA."""
        reasons = {s.cpu_reason for s in self.sessions.values() if s.device != "CUDA" and s.cpu_reason}
        return "; ".join(sorted(reasons)) or None

    def status(self) -> dict:
        import onnxruntime as ort

        provider, device, _ = self.providers()
        return {
            "hostname": _identity.hostname,
            "pid": self.pid,
            "queue": self.kind,
            "process_index": self.process_index,
            "state": "ready",
            DEVICE_FIELD: device,
            EXECUTION_PROVIDER_FIELD: provider,
            "message": self.message(),
            "onnxruntime": ort.__version__,
            "available_providers": ort.get_available_providers(),
            "models": {s.spec.key: s.status() for s in self.sessions.values()},
            "load_ms": self.load_ms,
            "allocator": self.allocator,
            "jobs": self.jobs,
            # The worker's micro-batching (1 = off); ident bench sizes its baseline's batches by it.
            "max_batch": self.settings.max_batch,
            "max_wait_ms": self.settings.max_wait_ms,
        }

    def finish(self, result: dict) -> dict:
        """Add the provider fields every result carries, and republish status if it changed."""
        self.jobs += 1
        provider, device, models = self.providers()
        result[EXECUTION_PROVIDER_FIELD] = provider
        result[DEVICE_FIELD] = device
        result["models"] = models
        # Wall-clock stamps let a caller tell time spent queued from time spent
        # in transport (ident bench does); they identify no person.
        result["worker"] = {
            "hostname": _identity.hostname,
            "pid": self.pid,
            "free_since": self.free_since,
            "started_at": self.job_started_at,
            "finished_at": time.time(),
        }
        self.publish_status()
        return result

    def publish_status(self, force: bool = False) -> None:
        provider_state = json.dumps(self.providers(), sort_keys=True)
        if force or provider_state != self._published:
            write_status_file(self.status())
            self._published = provider_state


def gpu_for_process(gpu_ids: tuple[int, ...], process_index: int) -> int:
    """Pool process k of a worker uses GPU ids[k mod n]."""
    return gpu_ids[process_index % len(gpu_ids)]


def register_pipeline(kind: str, factory: Callable[..., Any]) -> None:
    _pipeline_factories[kind] = factory


def current_runtime() -> WorkerRuntime:
    """This process's runtime, built on first use in pools without worker_process_init."""
    global _runtime
    if _runtime is None or _runtime.pid != os.getpid():
        if _identity.kind is None:
            raise RuntimeError("this process is not a worker: start it with `celery -A workers.<kind> worker`")
        _runtime = WorkerRuntime(_identity.kind, load_settings(), current_process_index(base=0) or 0,
                                 _identity.pool_processes)
        _runtime.publish_status(force=True)
    return _runtime


# --- the task base class ----------------------------------------------------------


class FleetTask(Task):
    """Base of every fleet task: delivery counting, payloads, job timestamps.

    With late acks and reject-on-worker-lost, a job whose process dies is put
    back on the queue. A job that kills its process every time (a poison
    message) would loop forever; each delivery is counted in Redis, and past
    IDENT_MAX_DELIVERIES the job fails with PoisonMessage instead of running.
    """

    abstract = True
    # The worker shows redacted argument reprs, whatever the producer sent (see logsafety),
    # and a job the main process ends itself takes its Redis keys along (see jobkeys).
    Request = "workers.jobkeys:FleetRequest"

    def __call__(self, *args, **kwargs):
        refuse_without_models()
        current_runtime().job_started_at = time.time()
        with self.delivery(self.request.id, args, kwargs):
            bound_arguments(self.run, args, kwargs)
            return super().__call__(*args, **kwargs)

    @contextlib.contextmanager
    def delivery(self, task_id: str, args: tuple, kwargs: dict):
        settings = current_runtime().settings
        client = self.app.backend.client
        key = delivery_counter_key(task_id)
        references = payload_references(args, kwargs)
        owned = [key, *references]
        ttl = max(settings.visibility_timeout, settings.task_time_limit) * (settings.max_deliveries + 1)
        deliveries, fetched = through_redis_outage(
            lambda: count_and_fetch(client, key, ttl, references, settings.max_payload_bytes),
            f"count the deliveries of job {task_id}",
        )
        if deliveries > settings.max_deliveries:
            # Given up for good: its payload (biometric data) goes too, with the
            # PoisonMessage result. Deleted before it, a process killed in between
            # would leave the next delivery a fresh count and no payload.
            self.release_keys(task_id, owned)
            raise PoisonMessage(
                f"job {task_id} was delivered {deliveries} times and its worker process died "
                f"each time (limit IDENT_MAX_DELIVERIES={settings.max_deliveries}); it is not run again"
            )
        _fetched_payloads.update(fetched)
        try:
            yield
        finally:
            # Reached only when the job finished, well or badly; a process that
            # dies mid-job skips this, so a redelivery still finds its payload.
            for reference in fetched:
                _fetched_payloads.pop(reference, None)
            self.release_keys(task_id, owned)

    def release_keys(self, task_id: str, keys: list[str]) -> None:
        """Delete a job's own keys in the step that stores its result (at once on other backends)."""
        backend = self.backend
        if isinstance(backend, FleetResultBackend):
            backend.delete_with_result(task_id, keys)
        else:
            _forget(backend.client, keys)

    def payload(self, value: Any, name: str) -> bytes:
        """The job's payload as bytes.

        msgpack producers send bytes; JSON producers send base64 text; large
        payloads may be passed by reference: ``{"payload_ref": "ident:payload:..."}``,
        a Redis key the producer stored the bytes under (see docs/contract.md).
        """
        settings = current_runtime().settings
        if isinstance(value, dict) and PAYLOAD_REF_FIELD in value:
            reference = value[PAYLOAD_REF_FIELD]
            if not is_payload_key(reference):
                raise InvalidInput(f"{name}.{PAYLOAD_REF_FIELD} must be a Redis key starting with {PAYLOAD_KEY_PREFIX!r}")
            found = _fetched_payloads.get(reference)
            if found is None:  # not among the job's arguments that delivery() fetched
                client = self.app.backend.client
                found = through_redis_outage(
                    lambda: fetch_payloads(client, [reference], settings.max_payload_bytes), f"fetch {name}"
                )[reference]
            if found.error is not None:
                raise InvalidInput(f"{name} refers to {reference}, which does not hold bytes: {found.error}")
            # Checked inside Redis: an oversized value never reaches the process.
            LimitExceeded.check(f"{name} size", found.size, settings.max_payload_bytes, "IDENT_MAX_PAYLOAD_BYTES", "bytes")
            if found.data is None:
                raise InvalidInput(
                    f"{name} refers to {reference}, which is not in Redis: it expired or was never stored"
                )
            value = found.data
        return payload_bytes(value, name, settings)


class AnalyzeTask(FleetTask):
    """An ``*.analyze(payload, options)`` task, runnable one job at a time or as a batch."""

    abstract = True
    payload_name = "payload"

    def run_many(self, items) -> list:
        """Each job's result or its own exception, the models run once for all of them."""
        refuse_without_models()
        runtime = current_runtime()
        runtime.job_started_at = time.time()
        outcomes: list = [None] * len(items)
        slots, payloads, options = [], [], []
        with contextlib.ExitStack() as deliveries:
            for slot, item in enumerate(items):
                try:
                    deliveries.enter_context(self.delivery(item.task_id, item.args, item.kwargs))
                    bound = bound_arguments(self.run, item.args, item.kwargs)
                    payloads.append(self.payload(bound[self.payload_name], self.payload_name))
                    options.append(options_dict(bound.get("options")))
                    slots.append(slot)
                except IdentError as exc:  # this job's own failure, reported to its producer
                    outcomes[slot] = exc
            for slot, result in zip(slots, runtime.pipeline.analyze_many(payloads, options)):
                outcomes[slot] = result if isinstance(result, BaseException) else runtime.finish(result)
        return outcomes


def bound_arguments(run: Callable[..., Any], args: tuple, kwargs: dict) -> dict[str, Any]:
    """The job's arguments by name; InvalidInput when they do not fit the task's signature."""
    try:
        return dict(inspect.signature(run).bind(*args, **kwargs).arguments)
    except TypeError as exc:
        raise InvalidInput(f"bad arguments: {exc}; see docs/contract.md for each task's arguments") from None


def refuse_without_models() -> None:
    """Put a job back on its queue, uncounted, if this process could not load its models.

    The worker is already stopping (see ``_on_process_init``); another worker,
    or this one restarted once the operator has fixed it, runs the job.
    """
    if _load_failure is not None:
        raise Reject(f"this pool process could not load its models: {_load_failure}", requeue=True)


def through_redis_outage(operation: Callable[[], Any], what: str, patience: float = 60.0) -> Any:
    """``operation()``, retried while Redis is unreachable (a restart, a failover).

    A job cannot report its result without Redis either, so waiting for it to
    come back is better than failing the job with a ConnectionError.
    """
    import redis

    deadline = time.monotonic() + patience
    delay = 0.1
    while True:
        try:
            return operation()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.warning("Redis is unreachable (%s); will %s again in %.1f s", exc, what, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def _forget(client, keys: list[str]) -> None:
    """Delete a finished job's counter and payload; they expire anyway, so an outage only logs."""
    import redis

    try:
        through_redis_outage(lambda: client.delete(*keys), "delete a finished job's keys", patience=30.0)
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        log.warning("could not delete %d keys of a finished job (%s); they expire on their own", len(keys), exc)


def payload_bytes(value: Any, name: str, settings: Settings) -> bytes:
    """Bytes from msgpack bytes or JSON base64 text, checked against the size limit."""
    import base64
    import binascii

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
    LimitExceeded.check(f"{name} size", len(data), settings.max_payload_bytes, "IDENT_MAX_PAYLOAD_BYTES", "bytes")
    return data


def options_dict(value: Any) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"options must be a mapping or null, not {type(value).__name__}")
    return dict(value)


# --- status files ---------------------------------------------------------------


STATUS_ROOT = Path(tempfile.gettempdir()) / f"identification-{os.getuid()}"


def status_dir() -> Path:
    """This worker's status files: by name and main process, as two fleets on one host
    (two `ident up`, each with its vision@local) must not read or clear each other's."""
    return STATUS_ROOT / f"{_safe_name(_identity.hostname)}.{_identity.main_pid}"


def _safe_name(hostname: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.@-]", "_", hostname)


def fresh_status_dir() -> None:
    """An empty status folder for this starting worker, and none left of dead ones of its name."""
    clear_dead_status_dirs(_identity.hostname)
    # Anything already under this name and pid is an earlier incarnation's: a
    # restarted container is pid 1 again, with the same name and /tmp.
    shutil.rmtree(status_dir(), ignore_errors=True)
    status_dir().mkdir(parents=True)


def clear_dead_status_dirs(hostname: str) -> None:
    """Remove the status folders of earlier workers of this name whose main process is gone."""
    for folder in STATUS_ROOT.glob(f"{_safe_name(hostname)}.*"):
        pid = folder.name.rsplit(".", 1)[1]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


FAILED = "failed"


def status_without_models(pid: int, state: str, message: str) -> dict:
    """The status of a pool process that has no runtime: still loading, or failed to load."""
    return {"hostname": _identity.hostname, "pid": pid, "queue": _identity.kind, "state": state,
            DEVICE_FIELD: None, "message": message}


def write_status_file(status: dict) -> None:
    folder = status_dir()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{status['pid']}.json"
    temporary = target.with_suffix(".tmp")
    temporary.write_text(json.dumps(status))
    os.replace(temporary, target)


def read_status_file(pid: int) -> dict:
    try:
        return json.loads((status_dir() / f"{pid}.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return status_without_models(pid, "starting", "the process has not finished loading its models yet")


@inspect_command(name=MODEL_STATUS_COMMAND)
def model_status(state, **kwargs) -> dict:
    """Every pool process's real sessions, one entry per process with its pid.

    This runs in the worker's main process, which holds no sessions: it reads
    what each pool child published after loading and after each change.
    """
    pool = state.consumer.pool
    pids = []
    info = pool.info if pool is not None else {}
    if isinstance(info, dict):
        pids = [pid for pid in info.get("processes", []) if pid]
    if pids:
        processes = [read_status_file(pid) for pid in pids]
    else:  # solo and thread pools run jobs in the main process itself
        processes = [current_runtime().status()]
    return {"hostname": _identity.hostname, "queue": _identity.kind, "processes": processes}


# --- Celery wiring ------------------------------------------------------------------


def analyze_strategy() -> str:
    """The Celery strategy for ``*.analyze``: batching when IDENT_MAX_BATCH > 1."""
    from workers.batching import BATCH_STRATEGY

    return BATCH_STRATEGY if load_settings().max_batch > 1 else "celery.worker.strategy:default"


def make_worker_app(kind: str) -> Celery:
    settings = load_settings()
    app = make_app(f"workers.{kind}", settings)
    # Celery names a backend class and its URL as CLASS+URL.
    app.conf.result_backend = f"{RESULT_BACKEND}+{settings.redis_url}"
    app.conf.worker_hijack_root_logger = True
    # -P prefork (the default) means this subclass: see workers/prefork.py.
    app.conf.worker_pool = "workers.prefork:TaskPool"
    if settings.max_batch > 1:
        # A batch can only fill from jobs the main process has already
        # received; each pool process may have a full batch waiting.
        app.conf.worker_prefetch_multiplier = max(settings.max_batch, settings.prefetch_multiplier)
    app._ident_kind = kind  # noqa: SLF001 -- lets the signal handlers tell our apps apart
    return app


@signals.celeryd_after_setup.connect
def _on_worker_setup(sender, instance, conf, **kwargs) -> None:
    kind = getattr(instance.app, "_ident_kind", None)
    if kind is None:
        return
    _identity.kind = kind
    _identity.hostname = sender
    _identity.main_pid = os.getpid()
    autoscale = getattr(instance, "autoscale", None)
    _identity.pool_processes = max(instance.concurrency or 1, *(autoscale or (0,)))
    queues = instance.app.amqp.queues
    if not queues.consume_from:
        # Without -Q a worker would also consume the other kind's queue, whose
        # tasks it cannot run; it serves its own queue by default.
        queues.select([kind])
    settings = load_settings()
    for warning in settings.warnings():
        log.warning("%s", warning)
    try:
        _preflight(kind, settings)
    except IdentError as exc:
        log.critical("the %s worker cannot serve: %s", kind, exc)
        # Celery logs and swallows an Exception from a signal handler; the
        # worker must not start, so leave with SystemExit, which it lets through.
        raise SystemExit(f"the {kind} worker refused to start: {exc}") from None
    fresh_status_dir()


def _preflight(kind: str, settings: Settings) -> None:
    """Refuse to start a worker that cannot serve, with the reason."""
    from models.catalog import CATALOG, selected_models
    from models.runtime import checked_model_file

    for spec in selected_models(settings, kind).values():
        checked_model_file(spec, settings.models_dir)
    known = set(CATALOG) | {spec.role for spec in CATALOG.values()}
    unknown = [name for name in settings.cpu_models if name not in known]
    if unknown:
        raise ConfigurationError(f"IDENT_CPU_MODELS names {', '.join(unknown)}, which is no catalog model or role; "
                                 f"use catalog keys or roles such as silero_vad, vad, spoof")
    if settings.device == "cuda":
        # Probed in a throw-away process: initialising CUDA in the parent
        # before the pool forks would break CUDA in every child.
        context = multiprocessing.get_context("spawn")
        with context.Pool(1) as probe_pool:
            reason = probe_pool.apply(_cuda_reason, (settings.gpu_ids,))
        if reason:
            raise DeviceUnavailable(f"IDENT_DEVICE=cuda but CUDA cannot be used: {reason}")


def _cuda_reason(device_ids: tuple[int, ...]) -> str | None:
    """Why CUDA cannot serve one of ``device_ids`` (every GPU a pool process may be given), or None."""
    from models.cuda import explain_cpu_fallback, probe_cuda

    facts = probe_cuda()
    return next(filter(None, (explain_cpu_fallback(facts, device_id) for device_id in dict.fromkeys(device_ids))), None)


@signals.worker_process_init.connect
def _on_process_init(**kwargs) -> None:
    global _load_failure
    if _identity.kind is None:
        return
    try:
        runtime = current_runtime()
    except Exception as exc:  # noqa: BLE001 -- any of them leaves this process without models
        if not isinstance(exc, IdentError):
            log.error("loading the %s models failed", _identity.kind, exc_info=True)
        # Celery would log this and let the process take jobs that can only
        # fail. The pre-start checks catch most causes; this is what they cannot
        # see (a model ONNX Runtime cannot load, a GPU that refuses one, a bug).
        _load_failure = exc if isinstance(exc, IdentError) else ModelUnavailable(
            f"loading the models failed with {type(exc).__name__}: {exc}")
        _stop_the_worker(_load_failure)
        return
    # Everything alive now (modules, sessions, the pipeline) lives as long as
    # the process: moved out of the collector's sight, a full collection
    # after a failed job costs well under a millisecond instead of ~35 ms.
    gc.collect()
    gc.freeze()
    log.info(
        "%s pool process %d ready in %.0f ms: %s; malloc %s",
        runtime.kind,
        runtime.pid,
        runtime.load_ms,
        runtime.providers()[0],
        runtime.allocator,
    )


@signals.task_postrun.connect
def _after_job(state=None, **kwargs) -> None:
    """Delete the job's keys if its result was not stored, and free a failed job's traceback at once.

    Each failure leaves reference cycles behind (billiard's picklable copy of
    the traceback keeps every frame's code positions, ~200 KB a job) that the
    generational collector reaches only late: 300 bad inputs grew a pool
    process by 30 MB, plateauing 110 MB up. Collected here, memory stays flat.
    """
    if _identity.kind is None:
        return
    forget_unstored(kwargs.get("task"), kwargs.get("task_id"))
    if state != "SUCCESS":
        gc.collect()
    if _load_failure is not None:
        # The job was put back unrun; building a runtime here would load the
        # models again and report this process ready while it refuses every job.
        return
    current_runtime().free_since = time.time()


def forget_unstored(task, task_id: str | None) -> None:
    """Delete a job's keys that were left waiting for a result that was never stored."""
    keys = release_unstored(task, task_id)
    if keys:
        _forget(task.backend.client, list(keys))


def release_unstored(task, task_id: str | None) -> tuple[str, ...]:
    """Stop waiting to delete a job's keys with its result; the keys themselves stay."""
    backend = getattr(task, "backend", None)
    if task_id and isinstance(backend, FleetResultBackend):
        return backend.delete_now(task_id)
    return ()


def _stop_the_worker(exc: IdentError) -> None:
    """Say why this pool process cannot serve, and ask its worker for a warm shutdown."""
    write_status_file(status_without_models(os.getpid(), FAILED, f"{type(exc).__name__}: {exc}"))
    log.critical("a %s pool process could not load its models, so the worker stops; its jobs stay queued. %s: %s",
                 _identity.kind, type(exc).__name__, exc)
    os.kill(os.getppid(), signal.SIGTERM)


@signals.worker_process_shutdown.connect
def _on_process_shutdown(pid=None, **kwargs) -> None:
    if _identity.kind is None or _load_failure is not None:
        return  # a failed process's status stays, for the worker's exit status
    (status_dir() / f"{pid or os.getpid()}.json").unlink(missing_ok=True)


@signals.worker_shutdown.connect
def _on_worker_shutdown(sender=None, **kwargs) -> None:
    """A worker stopped by a pool process that could not load its models exits with 1, not 0."""
    if _identity.kind is None or sender is None:
        return
    for path in status_dir().glob("*.json"):
        with contextlib.suppress(OSError, json.JSONDecodeError):
            if json.loads(path.read_text()).get("state") == FAILED:
                sender.exitcode = EX_FAILURE
                return


signals.after_setup_logger.connect(logsafety.install)
signals.after_setup_task_logger.connect(logsafety.install)
