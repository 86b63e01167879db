"""The workers' Prometheus metrics: the series, and the functions that record them.

With ``IDENT_METRICS_PORT`` set, each worker's main process serves ``/metrics``
(workers/health_server.py) for itself and its pool processes together. The
jobs run in the pool processes, so that is where most series are recorded:
prometheus-client's multiprocess mode gives every process its own files in
one folder, the worker's own (:func:`enable`, under its status folder,
workers/status.py), and the main process sums them at each scrape. A worker
is one target, with one series per label set, never one per pid.

Recorded by the process that runs the job (and, for the jobs the main process
ends itself, a hard time limit or a batch failed as a whole, by the main process):

* ``ident_jobs_total{task, outcome, error}``: jobs ended, ``outcome`` ``success``
  or ``failure``; ``error`` is the exception's type name (``InvalidInput`` for a
  refused input), empty on success. A job put back on its queue has not ended.
* ``ident_job_seconds{task}``: from the worker's receipt of the job to its stored result.
* ``ident_queue_wait_seconds{queue}``: from the producer's send to the job's start,
  see :func:`job_started`; ``ident_queue_wait_unstamped_total{queue}`` counts the
  starts measured from the worker's receipt instead.
* ``ident_model_inference_seconds{model, provider}`` and ``ident_batch_size{model}``:
  one observation per ONNX Runtime run (models/runtime.py, ``ModelSession.on_run``),
  its time and its rows (the first input's leading dimension).
* ``ident_model_info{model, provider, device, reason} 1``: what each model runs on
  and why (``reason`` is ``ModelSession.reason_code``: cuda_ok, device_cpu,
  cuda_unavailable, cpu_models, ...). Its multiprocess mode is ``livemax``: one
  series per label set across the worker's live pool processes, whatever their
  number, and a process's series go when it exits (:func:`mark_dead_processes`).
  A label set a process has left (a model moved to the CPU) reads 0 in it; it
  reads 1 while any other live process still has it.

Measured by the main process at each scrape (workers/scrape_gauges.py):
``ident_queue_length{queue}``, ``ident_jobs_in_progress{queue}``,
``ident_gpu_memory_used_bytes{gpu}`` and ``ident_gpu_utilization_ratio{gpu}``.

No label carries anything of a job's input or result: task, queue and model
names, providers, reason codes and exception type names only.

With ``IDENT_METRICS_PORT`` 0 (the default) nothing is recorded: every function
here returns at once.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Iterable

import psutil
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Defined once, at import, with labels: a labelled series gets its storage at
# its first use, in the process that uses it, by then in multiprocess mode.
# registry=None: they are read from their files (scrape_registry), never from
# prometheus-client's default registry.
JOBS = Counter("ident_jobs", "Jobs ended, by outcome (success, failure) and the failure's exception type.",
               ["task", "outcome", "error"], registry=None)
JOB_SECONDS = Histogram("ident_job_seconds", "Seconds from the worker's receipt of a job to its stored result.",
                        ["task"], registry=None,
                        buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 180))
QUEUE_WAIT = Histogram("ident_queue_wait_seconds",
                       "Seconds from a job's send (the producer's ident_sent_at header) to its start in a pool "
                       "process.", ["queue"], registry=None,
                       buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300,
                                600))
QUEUE_WAIT_UNSTAMPED = Counter("ident_queue_wait_unstamped",
                               "Job starts whose queue wait was measured from the worker's receipt: the producer "
                               "sent no ident_sent_at header, so the time in Redis is left out.",
                               ["queue"], registry=None)
INFERENCE_SECONDS = Histogram("ident_model_inference_seconds", "Seconds of one ONNX Runtime run of a model.",
                              ["model", "provider"], registry=None,
                              buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
BATCH_SIZE = Histogram("ident_batch_size",
                       "Rows in one ONNX Runtime run of a model (the first input's leading dimension).",
                       ["model"], registry=None, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
MODEL_INFO = Gauge("ident_model_info", "1 for the provider, device and reason code each model runs with.",
                   ["model", "provider", "device", "reason"], registry=None, multiprocess_mode="livemax")

# The worker's multiprocess folder once enable() ran; None: metrics are off.
_folder: Path | None = None
# The model_info label set each model last published in this process.
_published_info: dict[str, tuple[str, str, str, str]] = {}
# (ident_model_inference_seconds, ident_batch_size) of each (model, provider), looked up once.
_run_series: dict[tuple[str, str], tuple] = {}
# Jobs whose tracer runs in this process now: their task_failure is counted at task_postrun.
_running: set[str] = set()


def metrics_folder(status_folder: Path) -> Path:
    """The worker's multiprocess folder, inside its status folder (one per worker name and main pid)."""
    return status_folder / "metrics"


def enable(folder: Path) -> None:
    """In the main process, before the pool starts: multiprocess mode, in an empty ``folder``.

    An earlier incarnation's files (a restarted container is pid 1 again) would
    add to this one's counters, so the folder is wiped. PROMETHEUS_MULTIPROC_DIR
    is set to it, whatever it was: two workers sharing a folder would sum each
    other's jobs. The pool processes inherit it at the fork.
    """
    global _folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    os.environ[MULTIPROC_ENV] = str(folder)
    # prometheus-client picks its value class when it is imported, from the
    # environment; it was imported before the folder could be named.
    if not getattr(values.ValueClass, "_multiprocess", False):
        values.ValueClass = values.MultiProcessValue()
    _folder = folder


def enabled() -> bool:
    return _folder is not None


def declare(tasks: Iterable[str], queues: Iterable[str]) -> None:
    """Every task's success count, job time and every queue's wait, at 0 from the start.

    A series that appears only with its first job makes ``rate()`` blind to that
    first job, and leaves a dashboard empty instead of at 0. Failure series
    appear with their first failure: their error types are not known before.
    """
    if _folder is None:
        return
    for task in tasks:
        JOBS.labels(task, "success", "")
        JOB_SECONDS.labels(task)
    for queue in queues:
        QUEUE_WAIT.labels(queue)
        QUEUE_WAIT_UNSTAMPED.labels(queue)


# --- jobs ------------------------------------------------------------------------------


def job_started(task_id: str | None, queue: str | None, sent_at: object, received_at: object,
                now: float | None = None) -> None:
    """A job starts in this process: its queue wait.

    The wait runs from the producer's send, the ``ident_sent_at`` header that
    tasks/client.py sets (wall clock, so a producer clock ahead of the worker's
    reads as 0). Celery's protocol carries no send time, so for a job from a
    plain ``send_task`` that does not set the header, the wait runs from this
    worker's receipt of the job instead: the part it spent prefetched here,
    not its time in Redis (a lower bound), and ``ident_queue_wait_unstamped_total``
    counts it. A job started again (its batch failed as a whole, or it was
    redelivered) is observed at each start.
    """
    if _folder is None:
        return
    if task_id:
        _running.add(task_id)
    now = time.time() if now is None else now
    sent, received = seconds_since_epoch(sent_at), seconds_since_epoch(received_at)
    start_of_wait = sent if sent is not None else received
    if start_of_wait is None:
        return
    queue = queue or ""
    if sent is None:
        QUEUE_WAIT_UNSTAMPED.labels(queue).inc()
    QUEUE_WAIT.labels(queue).observe(max(0.0, now - start_of_wait))


def job_ended(task: str, task_id: str | None, error: BaseException | str | None, received_at: object,
              now: float | None = None) -> None:
    """A job's result is stored: its outcome, and its time since the worker received it."""
    if _folder is None:
        return
    if task_id:
        _running.discard(task_id)
    JOBS.labels(task, *outcome_labels(error)).inc()
    received = seconds_since_epoch(received_at)
    if received is not None:
        now = time.time() if now is None else now
        JOB_SECONDS.labels(task).observe(max(0.0, now - received))


def job_not_ended(task_id: str | None) -> None:
    """A job left this process without an end (put back on its queue, retried, ignored)."""
    if task_id:
        _running.discard(task_id)


def runs_here(task_id: str | None) -> bool:
    """Whether this process's tracer is running the job (and counts its end at task_postrun)."""
    return task_id in _running


def outcome_labels(error: BaseException | str | None) -> tuple[str, str]:
    """(outcome, error) of ``ident_jobs_total``: the exception's type name only (or the name
    given), never its message, which may quote the input."""
    if error is None:
        return "success", ""
    return "failure", error if isinstance(error, str) else type(error).__name__


def seconds_since_epoch(value: object) -> float | None:
    """A timestamp from a message header, or None when it is missing or not a finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) else None


# --- models ----------------------------------------------------------------------------


def watch_models(sessions: Iterable) -> None:
    """In a pool process whose runtime is built: publish each model's info, and observe each run from now on."""
    if _folder is None:
        return
    for session in sessions:
        publish_model_info(session)
        session.on_run = observe_run
        previous = session.on_device_change

        def device_changed(session=session, previous=previous) -> None:
            if previous is not None:
                previous()
            publish_model_info(session)

        session.on_device_change = device_changed


def observe_run(session, seconds: float, rows: int) -> None:
    """``ModelSession.on_run``: one run's time and rows (and its info, when the provider changed).

    Silero VAD runs once per 32 ms of audio, so this is kept short: the
    series of each (model, provider) are looked up once, and a run costs
    four small writes to this process's files (~20 us on the dev machine).
    """
    model, provider = session.spec.key, session.provider
    series = _run_series.get((model, provider))
    if series is None:
        series = _run_series[(model, provider)] = (INFERENCE_SECONDS.labels(model, provider), BATCH_SIZE.labels(model))
    if _published_info.get(model) != model_info_labels(session):
        publish_model_info(session)
    series[0].observe(seconds)
    series[1].observe(rows)


def model_info_labels(session) -> tuple[str, str, str, str]:
    return session.spec.key, session.provider, session.device, session.reason_code or "unknown"


def publish_model_info(session) -> None:
    labels = model_info_labels(session)
    previous = _published_info.get(labels[0])
    if previous == labels:
        return
    if previous is not None:
        MODEL_INFO.labels(*previous).set(0)
    MODEL_INFO.labels(*labels).set(1)
    _published_info[labels[0]] = labels


# --- the main process: exited processes, and the scrape ------------------------------------

_LIVE_GAUGE_FILE = re.compile(r"^gauge_live[a-z]+_(\d+)\.db$")


def dead_pids(file_names: Iterable[str], live_pids: set[int]) -> set[int]:
    """The pids with live-gauge files (``gauge_livemax_<pid>.db``) among ``file_names`` that are not live."""
    found = set()
    for name in file_names:
        match = _LIVE_GAUGE_FILE.match(name)
        if match and int(match.group(1)) not in live_pids:
            found.add(int(match.group(1)))
    return found


def process_exited(pid: int) -> None:
    """A pool process that exits cleanly takes its live series along (worker_process_shutdown)."""
    if _folder is not None:
        mark_process_dead(pid, str(_folder))


def mark_dead_processes() -> None:
    """In the main process: drop the live series of pool processes that exited, killed ones included.

    Their counters and histograms stay, summed into the worker's: a worker's
    totals never go down when a process is replaced.
    """
    if _folder is None:
        return
    me = psutil.Process()
    live = {me.pid}
    for child in me.children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                live.add(child.pid)
        except psutil.NoSuchProcess:
            continue
    for pid in dead_pids(os.listdir(_folder), live):
        mark_process_dead(pid, str(_folder))


def scrape_registry(*collectors) -> CollectorRegistry:
    """What /metrics serves: the sum of every process's files, and ``collectors`` measured at the scrape."""
    if _folder is None:
        raise RuntimeError("metrics are off: enable() them first (IDENT_METRICS_PORT)")
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(_folder))
    for collector in collectors:
        registry.register(collector)
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    """The Prometheus text of ``registry``, the exited processes' live series dropped first."""
    mark_dead_processes()
    return generate_latest(registry)
