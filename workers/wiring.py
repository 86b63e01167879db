"""A worker's Celery app, and its life through Celery's signals.

1. The main process (``celery -A workers.vision worker``) reads the settings,
   checks the model files and, for ``IDENT_DEVICE=cuda``, that CUDA can run;
   a worker that cannot serve refuses to start and says why
   (``celeryd_after_setup``).
2. Each pool process, after the fork, builds its runtime (workers/runtime.py)
   and only then takes jobs (``worker_process_init``); one that cannot stops
   the worker with the reason.
3. Each pool process publishes its status to a small file (workers/status.py);
   the ``model_status`` control command, which runs in the main process, reads
   those files for the pool's live processes.
4. With ``IDENT_METRICS_PORT`` set, the main process serves /metrics, /healthz
   and /readyz (workers/health_server.py) from start-up on; each job's start and
   end (``task_prerun``, ``task_postrun``, and ``task_failure`` for the jobs the
   main process ends itself) and each model run are recorded where they happen
   (workers/metrics.py), and an exiting pool process takes its live series along.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import signal
import time

from celery import Celery, signals
from celery.platforms import EX_FAILURE
from celery.worker.control import inspect_command

from tasks.app import make_app
from tasks.contract import MODEL_STATUS_COMMAND, SENT_AT_HEADER
from tasks.errors import ConfigurationError, DeviceUnavailable, IdentError, ModelUnavailable
from tasks.settings import Settings, load_settings
from workers import celery_internals, health_server, kombu_internals, logsafety, metrics
from workers import status as status_files
from workers.job_input import forget, forget_unstored
from workers.jobkeys import job_keys
from workers.runtime import PROCESS, PipelineFactory, current_runtime
from workers.scrape_gauges import WorkerGauges
from workers.tasks import define_tasks

log = logging.getLogger(__name__)


def make_worker_app(kind: str, pipeline: PipelineFactory, settings: Settings | None = None) -> Celery:
    """The ``kind`` worker's app: its tasks, the fleet's pool, transport and result backend."""
    settings = settings or load_settings()
    celery_internals.install()
    kombu_internals.install()
    app = make_app(f"workers.{kind}", settings)
    # The fleet's result backend, for the workers alone (producers read results
    # with the stock one); Celery names a backend class and its URL as CLASS+URL.
    app.conf.result_backend = f"{celery_internals.result_backend_class(settings.redis_url)}+{settings.redis_url}"
    app.conf.worker_hijack_root_logger = True
    # -P prefork (the default) means this subclass: see workers/celery_internals.py.
    app.conf.worker_pool = celery_internals.POOL
    if settings.max_batch > 1:
        # A batch can only fill from jobs the main process has already
        # received; each pool process may have a full batch waiting.
        app.conf.worker_prefetch_multiplier = max(settings.max_batch, settings.prefetch_multiplier)
    app._ident_kind = kind  # noqa: SLF001 -- lets the signal handlers tell our apps apart
    PROCESS.pipelines[kind] = pipeline
    PROCESS.app = app
    define_tasks(app, kind)
    return app


@signals.celeryd_after_setup.connect
def _on_worker_setup(sender, instance, conf, **kwargs) -> None:
    kind = getattr(instance.app, "_ident_kind", None)
    if kind is None:
        return
    identity = PROCESS.identity
    identity.kind = kind
    identity.hostname = sender
    identity.main_pid = os.getpid()
    autoscale = getattr(instance, "autoscale", None)
    identity.pool_processes = max(instance.concurrency or 1, *(autoscale or (0,)))
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
        status_files.fresh_status_dir(identity)
        if settings.metrics_port:
            _serve_metrics_and_health(instance, settings)
    except IdentError as exc:
        log.critical("the %s worker cannot serve: %s", kind, exc)
        # Celery logs and swallows an Exception from a signal handler; the
        # worker must not start, so leave with SystemExit, which it lets through.
        raise SystemExit(f"the {kind} worker refused to start: {exc}") from None


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
            reason = probe_pool.apply(cuda_reason, (settings.gpu_ids,))
        if reason:
            raise DeviceUnavailable(f"IDENT_DEVICE=cuda but CUDA cannot be used: {reason}")


# The main process's health server and its readiness checks, once started.
_health: dict = {}


def _serve_metrics_and_health(worker, settings: Settings) -> None:
    """/metrics, /healthz and /readyz on IDENT_METRICS_PORT, from now on (before the pool forks,
    so that every pool process records into the worker's multiprocess folder)."""
    identity = PROCESS.identity
    metrics.enable(metrics.metrics_folder(status_files.status_dir(identity)))
    metrics.declare([name for name in worker.app.tasks if name.startswith(f"{identity.kind}.")],
                    worker.app.amqp.queues.consume_from)
    client = health_server.redis_probe_client(settings)
    gauges = WorkerGauges(worker.app.amqp.queues.consume_from, client, celery_internals.held_job_queues,
                          worker.app.conf.broker_transport_options)
    registry = metrics.scrape_registry(gauges)
    readiness = health_server.Readiness(identity, lambda: celery_internals.pool_processes(worker), client)
    try:
        server = health_server.HealthServer(settings.metrics_port, lambda: metrics.exposition(registry),
                                            readiness.problems)
    except OSError as exc:
        raise ConfigurationError(
            f"IDENT_METRICS_PORT={settings.metrics_port}: the worker cannot listen on that port ({exc.strerror}); "
            "another process (another worker on this host?) may hold it: give each worker a port of its own"
        ) from None
    server.start()
    _health.update(server=server, readiness=readiness)
    log.info("metrics on http://%s:%d/metrics, health on /healthz and /readyz", health_server.BIND_ADDRESS,
             server.port)


def cuda_reason(device_ids: tuple[int, ...]) -> str | None:
    """Why CUDA cannot serve one of ``device_ids`` (every GPU a pool process may be given), or None."""
    from models.cuda import explain_cpu_fallback, probe_cuda

    facts = probe_cuda()
    return next(filter(None, (explain_cpu_fallback(facts, device_id) for device_id in dict.fromkeys(device_ids))), None)


@inspect_command(name=MODEL_STATUS_COMMAND)
def model_status(state, **kwargs) -> dict:
    """Every pool process's real sessions, one entry per process with its pid.

    This runs in the worker's main process, which holds no sessions: it reads
    what each pool child published after loading and after each change.
    """
    identity = PROCESS.identity
    pool = state.consumer.pool
    pids = []
    info = pool.info if pool is not None else {}
    if isinstance(info, dict):
        pids = [pid for pid in info.get("processes", []) if pid]
    if pids:
        processes = [status_files.read_status_file(identity, pid) for pid in pids]
    else:  # solo and thread pools run jobs in the main process itself
        processes = [current_runtime().status()]
    return {"hostname": identity.hostname, "queue": identity.kind, "processes": processes}


@signals.worker_process_init.connect
def _on_process_init(**kwargs) -> None:
    if PROCESS.identity.kind is None:
        return
    if "server" in _health:
        _health.pop("server").close_in_child()
        _health.clear()
    try:
        runtime = current_runtime()
    except Exception as exc:  # noqa: BLE001 -- any of them leaves this process without models
        if not isinstance(exc, IdentError):
            log.error("loading the %s models failed", PROCESS.identity.kind, exc_info=True)
        # Celery would log this and let the process take jobs that can only
        # fail. The pre-start checks catch most causes; this is what they cannot
        # see (a model ONNX Runtime cannot load, a GPU that refuses one, a bug).
        PROCESS.load_failure = exc if isinstance(exc, IdentError) else ModelUnavailable(
            f"loading the models failed with {type(exc).__name__}: {exc}")
        _stop_the_worker(PROCESS.load_failure)
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


@signals.task_prerun.connect
def _on_job_start(task_id=None, task=None, **kwargs) -> None:
    if PROCESS.identity.kind is None or not metrics.enabled() or task is None:
        return
    request = task.request
    metrics.job_started(task_id, (request.delivery_info or {}).get("routing_key") or PROCESS.identity.kind,
                        getattr(request, SENT_AT_HEADER, None), getattr(request, celery_internals.RECEIVED_AT, None))


@signals.task_postrun.connect
def _on_job_end(task_id=None, task=None, state=None, retval=None, **kwargs) -> None:
    """A job that ran here ended (its result is stored), or left without an end (put back, retried)."""
    if PROCESS.identity.kind is None or not metrics.enabled() or task is None:
        return
    received_at = getattr(task.request, celery_internals.RECEIVED_AT, None)
    if state == "SUCCESS":
        metrics.job_ended(task.name, task_id, None, received_at)
    elif state == "FAILURE":
        metrics.job_ended(task.name, task_id, retval if isinstance(retval, BaseException) else "unknown", received_at)
    else:
        metrics.job_not_ended(task_id)


@signals.task_failure.connect
def _on_job_failed_in_main(sender=None, task_id=None, exception=None, **kwargs) -> None:
    """A failure the main process stores itself (a hard time limit, say): no task_postrun comes for it."""
    if PROCESS.identity.kind is None or not metrics.enabled() or sender is None:
        return
    if os.getpid() != PROCESS.identity.main_pid or metrics.runs_here(task_id):
        return  # a job's tracer counts it at task_postrun
    metrics.job_ended(sender.name, task_id, exception if isinstance(exception, BaseException) else "unknown",
                      getattr(sender.request, celery_internals.RECEIVED_AT, None))


@signals.task_postrun.connect
def _after_job(state=None, **kwargs) -> None:
    """Delete the job's keys if its result was not stored, and free a failed job's traceback at once.

    Each failure leaves reference cycles behind (billiard's picklable copy of
    the traceback keeps every frame's code positions, ~200 KB a job) that the
    generational collector reaches only late: 300 bad inputs grew a pool
    process by 30 MB, plateauing 110 MB up. Collected here, memory stays flat.
    """
    if PROCESS.identity.kind is None:
        return
    forget_unstored(kwargs.get("task"), kwargs.get("task_id"))
    if state != "SUCCESS":
        gc.collect()
    if PROCESS.load_failure is not None:
        # The job was put back unrun; building a runtime here would load the
        # models again and report this process ready while it refuses every job.
        return
    current_runtime().free_since = time.time()


@signals.task_revoked.connect
def _on_revoked(request=None, **kwargs) -> None:
    """A job revoked or expired before it ran: Celery has stored that end, and its keys go now."""
    if PROCESS.identity.kind is None or getattr(request, "id", None) is None:
        return
    backend = getattr(kwargs.get("sender"), "backend", None)
    if backend is not None:
        forget(backend.client, job_keys(request.id, request.args, request.kwargs))


def _stop_the_worker(exc: IdentError) -> None:
    """Say why this pool process cannot serve, and ask its worker for a warm shutdown."""
    identity = PROCESS.identity
    status_files.write_status_file(identity, status_files.status_without_models(
        identity, os.getpid(), status_files.FAILED, f"{type(exc).__name__}: {exc}"))
    log.critical("a %s pool process could not load its models, so the worker stops; its jobs stay queued. %s: %s",
                 identity.kind, type(exc).__name__, exc)
    os.kill(os.getppid(), signal.SIGTERM)


@signals.worker_process_shutdown.connect
def _on_process_shutdown(pid=None, **kwargs) -> None:
    if PROCESS.identity.kind is None:
        return
    metrics.process_exited(pid or os.getpid())
    if PROCESS.load_failure is not None:
        return  # a failed process's status stays, for the worker's exit status
    status_files.remove_status_file(PROCESS.identity, pid or os.getpid())


@signals.worker_shutting_down.connect
def _on_worker_shutting_down(**kwargs) -> None:
    """/readyz says 503 from the moment a shutdown starts: no new traffic for a stopping worker."""
    readiness = _health.get("readiness")
    if readiness is not None:
        readiness.stopping = True


@signals.worker_shutdown.connect
def _on_worker_shutdown(sender=None, **kwargs) -> None:
    """A worker stopped by a pool process that could not load its models exits with 1, not 0."""
    if PROCESS.identity.kind is None or sender is None:
        return
    server = _health.pop("server", None)
    if server is not None:
        server.stop()
    if status_files.any_failed(PROCESS.identity):
        sender.exitcode = EX_FAILURE


signals.after_setup_logger.connect(logsafety.install)
signals.after_setup_task_logger.connect(logsafety.install)
