"""``ident bench``: the running fleet against the same pipeline on raw ONNX Runtime.

The fleet run drives the fleet at IDENT_REDIS_URL with real files, keeping
``concurrency`` jobs in flight. The baseline runs the very same pipeline code
in-process on plain ONNX Runtime sessions, with as many processes and threads
as the fleet's pool uses, on the same inputs. Each side is warmed up alike
before it is timed. Both run in one invocation, taking turns (``--rounds R``:
fleet, baseline, fleet, baseline, ...), so the ratio between them is what to
quote, and its spread over the rounds shows how noisy the machine was: the
absolute numbers move with whatever else the machine is doing.

Besides throughput and latency the report gives each stage's time (the
results' ``timings_ms``), the CPU seconds each process spent in the timed
windows (the worker's main and pool processes, redis-server, the bench's own
producer, the baseline's processes), how full the fleet's micro-batches were,
and what the models ran on.

``--kind queue`` measures the queue alone instead, on processes it starts
itself: see ident/queue_bench.py. ``--kind gallery`` measures 1:N search of a
synthetic gallery on PostgreSQL + pgvector: see ident/gallery_bench.py.
"""

from __future__ import annotations

import gc
import importlib
import json
import multiprocessing
import os
import platform
import socket
import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ident.arguments import count, counts
from tasks.errors import IdentError

console = Console(stderr=True)

EXTENSIONS = {
    "vision": {".jpg", ".jpeg", ".png", ".webp", ".bmp"},
    "audio": {".wav", ".flac", ".mp3", ".ogg", ".opus"},
}
DATA_FOLDERS = {"vision": "images", "audio": "audio"}
ANSWER_TIMEOUT_S = 300


def default_inputs_dir(kind: str) -> Path:
    from tasks.settings import load_settings

    return load_settings().samples_dir / DATA_FOLDERS[kind]


def load_inputs(kind: str, folder: Path | None) -> list[tuple[str, bytes]]:
    folder = folder or default_inputs_dir(kind)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in EXTENSIONS[kind] and p.is_file())
    if not files:
        raise IdentError(f"no {kind} inputs under {folder}: pass --inputs DIR")
    return [(str(p.relative_to(folder)), p.read_bytes()) for p in files]


def percentiles(values: list[float], qs: Sequence[int] = (50, 95, 99)) -> dict[str, float | None]:
    if not values:
        # null in the JSON report (NaN is not JSON): every job failed.
        return {f"p{q}": None for q in qs}
    # Here, not at the top: `ident` also serves producers, which install no numpy.
    import numpy as np

    array = np.asarray(values)
    return {f"p{q}": round(float(np.percentile(array, q)), 2) for q in qs}


def stage_percentiles(timings: Sequence[dict]) -> dict[str, dict]:
    """p50 and p90 of each stage of the results' ``timings_ms``, stages in the order the results name them.

    A stage that runs only for some jobs (audio's ``spoof`` and ``embed``, when
    a recording has speech) is counted over the jobs that carry it: ``jobs``.
    Nested objects (``audio.verify``'s per side) and non-numbers are left out.
    """
    values: dict[str, list[float]] = {}
    for timing in timings:
        for stage, ms in timing.items():
            if isinstance(ms, (int, float)) and not isinstance(ms, bool):
                values.setdefault(stage, []).append(float(ms))
    return {stage: {**percentiles(ms, (50, 90)), "jobs": len(ms)} for stage, ms in values.items()}


def batch_fill(stamps: Sequence[tuple]) -> dict[str, int]:
    """{jobs in a batch: batches}, from each result's (worker hostname, pid, started_at).

    The jobs of one batch ran in one pool process under one start stamp
    (``AnalyzeTask.run_many`` stamps the batch once); a job run alone has a
    stamp of its own. Keys are strings, as they are in the JSON report.
    """
    sizes = Counter(Counter(stamps).values())
    return {str(size): sizes[size] for size in sorted(sizes)}


def spread(values: Sequence[float | None]) -> dict:
    """Median, min and max of the values that are not None (None each when there are none)."""
    known = [v for v in values if v is not None]
    if not known:
        return {"median": None, "min": None, "max": None}
    return {"median": round(statistics.median(known), 3), "min": round(min(known), 3), "max": round(max(known), 3)}


def alternation(rounds: int) -> list[tuple[str, int]]:
    """The order of the timed windows: fleet 1, baseline 1, fleet 2, baseline 2, ..."""
    return [(side, r) for r in range(1, rounds + 1) for side in ("fleet", "baseline")]


# Figures that add up over rounds rather than take the median: jobs that failed, batches counted.
SUMMED = frozenset({"failed", "batch_fill"})
# Figures of one window only: not summarised.
PER_ROUND = frozenset({"window"})


def summarize(sides: Sequence[dict]) -> dict:
    """One side's rounds as one figure each: the median over rounds of every number.

    ``failed`` and the batch-fill counts add up; ``errors`` is the union; a
    value that is not a number is kept when the rounds agree on it, listed when
    they do not.
    """
    return _combine(list(sides), key=None)


def _combine(values: list, key: str | None):
    if key == "errors":
        return sorted({e for v in values for e in v})
    if all(isinstance(v, dict) for v in values):
        keys = list(dict.fromkeys(k for v in values for k in v if k not in PER_ROUND))
        if key in SUMMED:
            # Counts keyed by size ("1", "2", ...): the sum for each, in size order.
            return {k: sum(v.get(k, 0) for v in values) for k in sorted(keys, key=int)}
        return {k: _combine([v[k] for v in values if k in v], k) for k in keys}
    if all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in values):
        known = [v for v in values if v is not None]
        if not known:
            return None
        if key in SUMMED:
            return sum(known)
        if all(v == known[0] for v in known):
            return known[0]  # a setting, such as processes: kept as it was, an int an int
        return round(statistics.median(known), 3)
    return values[0] if all(v == values[0] for v in values) else values


def units_of(kind: str, result: dict) -> float:
    """Images for vision, seconds of audio for audio."""
    return float(result.get("duration_s", 0.0)) if kind == "audio" else 1.0


@dataclass
class JobRecord:
    sent_at: float
    received_at: float
    worker_ms: float = 0.0
    units: float = 0.0
    free_since: float = 0.0
    started_at: float = 0.0
    finished_at: float = 0.0
    error: str | None = None
    dispatch_ms: float = 0.0
    return_ms: float = 0.0
    waiting_ms: float = 0.0
    timings: dict = field(default_factory=dict)
    hostname: str = ""
    pid: int = 0

    @property
    def end_to_end_ms(self) -> float:
        return (self.received_at - self.sent_at) * 1000.0


def split_overhead(records: list[JobRecord]) -> None:
    """Split each job's time outside the worker into waiting and queue overhead.

    A job sent while every pool process is busy waits for one to free up; that
    wait measures the load, not the queue. What the queue itself costs is the
    gap between a process being free for the job and the job starting
    (*dispatch*), plus the gap between the job ending and its result reaching
    the producer (*return*). A process is free once it has reported its
    previous job (``worker.free_since``): the reporting is that job's return,
    not counted a second time as this one's dispatch. Timestamps come from the
    worker's result (same clock on one machine).
    """
    for record in records:
        ready_at = max(record.sent_at, record.free_since)
        record.dispatch_ms = max(0.0, (record.started_at - ready_at) * 1000.0)
        record.return_ms = max(0.0, (record.received_at - record.finished_at) * 1000.0)
        record.waiting_ms = max(0.0, (ready_at - record.sent_at) * 1000.0)


# --- the fleet -------------------------------------------------------------------


def run_fleet(kind: str, inputs: list[tuple[str, bytes]], jobs: int, concurrency: int, progress=None,
              by_reference: bool = True, max_batch: int = 1) -> dict:
    """Keep ``concurrency`` jobs in flight from one producer.

    One thread sends and collects everything, woken by each result as it is
    published: a load generator with a thread per slot would time its own
    threads queueing for the interpreter lock, not the fleet. ``max_batch`` is
    the fleet's IDENT_MAX_BATCH: above 1, the report counts how full its
    batches were (``batch_fill``, {} when it does not batch).
    """
    import dataclasses

    from tasks.client import IdentClient
    from tasks.settings import load_settings

    settings = load_settings()
    if not by_reference:
        settings = dataclasses.replace(settings, payload_ref_bytes=1 << 62)
    client = IdentClient(settings)
    results = client.app.backend.result_consumer
    in_flight: dict[str, float] = {}
    arrived: list = []
    records: list[JobRecord] = []
    sent = 0

    def send() -> None:
        nonlocal sent
        payload = inputs[sent % len(inputs)][1]
        sent += 1
        sent_at = time.time()
        job = client.analyze(kind, payload)
        in_flight[job.id] = sent_at
        # Called from inside drain_events below, as the result is read.
        job.then(lambda done: arrived.append((done, time.time())))

    started = time.perf_counter()
    last_answer = time.monotonic()
    while sent < min(jobs, concurrency):
        send()
    while in_flight:
        if time.monotonic() - last_answer > ANSWER_TIMEOUT_S:
            raise IdentError(f"{len(in_flight)} {kind} jobs got no answer in {ANSWER_TIMEOUT_S} s: "
                             "is the fleet still running?")
        results.drain_events(timeout=1.0)
        if arrived:
            last_answer = time.monotonic()
        while arrived:
            job, received_at = arrived.pop()
            sent_at = in_flight.pop(job.id)
            if sent < jobs:
                send()
            records.append(job_record(kind, job, sent_at, received_at))
            if progress:
                progress()
    wall = time.perf_counter() - started
    ok = [r for r in records if r.error is None]
    split_overhead(ok)
    return {
        "wall_s": round(wall, 3),
        "throughput_per_s": round(len(ok) / wall, 3),
        "units_per_s": round(sum(r.units for r in ok) / wall, 3),
        "latency_ms": percentiles([r.end_to_end_ms for r in ok]),
        "worker_ms": percentiles([r.worker_ms for r in ok]),
        "overhead_ms": percentiles([r.dispatch_ms + r.return_ms for r in ok]),
        "dispatch_ms": percentiles([r.dispatch_ms for r in ok]),
        "return_ms": percentiles([r.return_ms for r in ok]),
        "waiting_ms": percentiles([r.waiting_ms for r in ok]),
        # End to end minus the time in the task, waiting for a free process included:
        # what the jobs spent outside the worker's task, under this load.
        "outside_task_ms": percentiles([r.end_to_end_ms - (r.finished_at - r.started_at) * 1000.0 for r in ok]),
        "errors": sorted({r.error for r in records if r.error}),
        "failed": len(records) - len(ok),
        "stages_ms": stage_percentiles([r.timings for r in ok]),
        # Failed jobs carry no stamps: a batch that held one counts as one job smaller.
        "batch_fill": batch_fill([(r.hostname, r.pid, r.started_at) for r in ok]) if max_batch > 1 else {},
    }


def job_record(kind: str, job, sent_at: float, received_at: float) -> JobRecord:
    """A finished job's times; a job's own failure is part of the report, not the end of it."""
    if not job.successful():
        return JobRecord(sent_at, received_at, error=type(job.result).__name__)
    result = job.result
    worker = result["worker"]
    return JobRecord(sent_at, received_at, float(result["timings_ms"]["total"]), units_of(kind, result),
                     worker["free_since"], worker["started_at"], worker["finished_at"],
                     timings=dict(result["timings_ms"]), hostname=worker.get("hostname", ""),
                     pid=worker.get("pid", 0))


def fleet_processes(kind: str, timeout: float = 3.0) -> list[dict]:
    """model_status of every ready pool process of the running fleet's ``kind`` workers."""
    from tasks.client import IdentClient

    processes = [
        process
        for reply in IdentClient().model_status(timeout=timeout)
        for body in reply.values()
        for process in body.get("processes", [])
        if process.get("queue") == kind and process.get("state") == "ready"
    ]
    if not processes:
        raise IdentError(f"no ready {kind} worker answered at IDENT_REDIS_URL: start the fleet first")
    return processes


def fleet_shape(kind: str, timeout: float = 3.0, processes: list[dict] | None = None) -> dict:
    """Pool processes and session threads of the running fleet's ``kind`` workers."""
    if processes is None:
        processes = fleet_processes(kind, timeout)
    threads = max(m["threads"] for p in processes for m in p["models"].values())
    # model_status keys each process's models by catalog key.
    models = sorted(processes[0]["models"])
    if any(sorted(p["models"]) != models for p in processes[1:]):
        raise IdentError(f"the {kind} workers at IDENT_REDIS_URL run different models: bench a fleet of one kind")
    return {
        "workers": sorted({p["hostname"] for p in processes}),
        "processes": len(processes),
        "threads": threads,
        "models": models,
        "execution_provider": sorted({p["execution_provider"] for p in processes}),
        # A worker from before the field was reported counts as unbatched.
        "max_batch": max(p.get("max_batch", 1) for p in processes),
    }


def baseline_batch(requested: int | None, fleet_max_batch: int) -> tuple[int, str | None]:
    """The baseline's jobs per call (the fleet's own batching unless asked otherwise), and a note if they differ."""
    if requested is None:
        return fleet_max_batch, None
    if requested == fleet_max_batch:
        return requested, None
    return requested, (f"the fleet batches up to {fleet_max_batch} jobs (IDENT_MAX_BATCH) and the baseline "
                       f"{requested}: ratio_to_baseline compares two different batch sizes")


def redis_bytes_in() -> int:
    from tasks.redis_connection import redis_client
    from tasks.settings import load_settings

    return int(redis_client(load_settings()).info("stats")["total_net_input_bytes"])


# --- where the CPU goes ----------------------------------------------------------------

NOT_LOCAL = "not local"
LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "0.0.0.0"}


def local_worker_processes(processes: list[dict]) -> dict:
    """The fleet's worker main and pool processes that run on this host, as psutil processes.

    A pool process is this host's when its pid here has a parent whose status
    folder (workers/status.py: by worker name and main pid, in this host's
    temporary folder) holds that pid's status file: a pid of a worker in a
    container or on another host names some other process here, or none.
    Roles with no process found here are ``"not local"``; ``not_local`` names
    the workers that were not found.
    """
    import types

    import psutil

    from workers.status import status_dir

    mains: dict[int, psutil.Process] = {}
    pool: list[psutil.Process] = []
    not_local: set[str] = set()
    for status in processes:
        hostname, pid = status.get("hostname", ""), status.get("pid")
        try:
            process = psutil.Process(pid)
            main_pid = process.ppid()
        except (psutil.Error, TypeError, ValueError):
            not_local.add(hostname)
            continue
        identity = types.SimpleNamespace(kind=None, hostname=hostname, main_pid=main_pid)
        itself = types.SimpleNamespace(kind=None, hostname=hostname, main_pid=pid)
        if (status_dir(identity) / f"{pid}.json").is_file():
            pool.append(process)
            if main_pid not in mains:
                with_main = _process(main_pid)
                if with_main is not None:
                    mains[main_pid] = with_main
        elif (status_dir(itself) / f"{pid}.json").is_file():
            mains[pid] = process  # a solo or threads pool: the main process runs the jobs itself
        else:
            not_local.add(hostname)
    if pool:
        pool_role = pool
    else:
        pool_role = "none: the jobs run in the worker's main process" if mains else NOT_LOCAL
    return {"worker_main": list(mains.values()) or NOT_LOCAL, "pool": pool_role, "not_local": sorted(not_local)}


def _process(pid: int):
    import psutil

    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def local_redis(url: str):
    """The redis-server at ``url`` as a psutil process, or why it cannot be measured (a string).

    Redis reports its own pid and executable (INFO server); the pid is taken
    only when the URL is this host's and the process with that pid here runs
    that executable (a Redis in a container reports its pid there).
    """
    from urllib.parse import urlsplit

    import redis

    from tasks.redis_urls import is_sentinel_url

    if is_sentinel_url(url):
        # The master moves from host to host; its CPU time is not attributed.
        return "not measured: Redis behind Sentinel"
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    if parts.scheme != "unix" and host not in LOCAL_HOSTS and host not in {socket.gethostname(), socket.getfqdn()}:
        return f"{NOT_LOCAL} (Redis at {host})"
    try:
        info = redis.Redis.from_url(url).info("server")
    except redis.RedisError as exc:
        return f"not found: INFO server failed ({exc})"
    process = _process(int(info.get("process_id", 0)))
    if process is None:
        return f"not found: no process {info.get('process_id')} here (Redis in a container?)"
    try:
        name, exe = process.name(), process.exe()
    except Exception as exc:  # noqa: BLE001 -- psutil.AccessDenied and the like: say so
        return f"not found: process {process.pid} cannot be read ({type(exc).__name__})"
    reported = info.get("executable")
    same = (os.path.realpath(str(reported)) == os.path.realpath(exe)) if reported and os.path.isabs(str(reported)) \
        else "redis" in name
    if not same:
        return f"not found: process {process.pid} here is {name}, not the redis-server at {host} (in a container?)"
    return process


def cpu_seconds(process) -> float | None:
    """A process's user + system CPU seconds so far; None once it is gone."""
    import psutil

    try:
        times = process.cpu_times()
    except psutil.Error:
        return None
    return times.user + times.system


def machine_busy_seconds() -> float:
    """CPU seconds every core of this machine spent busy, all processes (steal and I/O wait left out)."""
    import psutil

    times = psutil.cpu_times()
    return sum(getattr(times, name, 0.0) for name in ("user", "nice", "system", "irq", "softirq"))


def cpu_snapshot(roles: dict) -> dict:
    """{role: {pid: CPU seconds}} for roles of processes; a role that is a string stays that string."""
    snapshot = {role: members if isinstance(members, str) else {p.pid: cpu_seconds(p) for p in members}
                for role, members in roles.items()}
    snapshot["machine"] = machine_busy_seconds()
    return snapshot


def cpu_report(before: dict, after: dict, jobs: int) -> dict:
    """CPU used between two snapshots, per role: total seconds and ms per job (all jobs sent, failed ones too).

    A process gone by the second snapshot (its CPU lost with it) is listed in
    ``gone`` and left out. ``others`` is what the whole machine spent besides
    the roles listed: other processes, this machine's noise.
    """
    report: dict = {}
    ours = 0.0
    for role, start in before.items():
        if role == "machine":
            continue
        if isinstance(start, str):
            report[role] = start
            continue
        end = after.get(role, {})
        used = {pid: end[pid] - start[pid] for pid in start
                if start[pid] is not None and end.get(pid) is not None}
        gone = sorted(pid for pid in start if pid not in used)
        total = sum(used.values())
        ours += total
        report[role] = {"cpu_s": round(total, 3), "ms_per_job": round(total * 1000.0 / jobs, 3),
                        "processes": len(used), "pids": sorted(used)}
        if gone:
            report[role]["gone"] = gone
    machine = after["machine"] - before["machine"]
    report["machine"] = {"cpu_s": round(machine, 3), "ms_per_job": round(machine * 1000.0 / jobs, 3)}
    others = machine - ours
    report["others"] = {"cpu_s": round(others, 3), "ms_per_job": round(others * 1000.0 / jobs, 3)}
    return report


def cpu_per_job(cpu: dict) -> dict:
    """{role: ms per job, or why not measured} from a cpu_report or its summary."""
    return {role: value if isinstance(value, str) else value.get("ms_per_job") for role, value in cpu.items()}


# --- what the models ran on ---------------------------------------------------------------


def device_report(processes: list[dict], workers_local: bool) -> dict:
    """Each model's provider and device, the message saying why any is on CPU, and the GPU when on CUDA."""
    models: dict[str, dict] = {}
    for status in processes:
        for key, model in status.get("models", {}).items():
            seen = models.setdefault(key, {"provider": set(), "device": set(), "device_id": set()})
            for field_name in ("provider", "device", "device_id"):
                if model.get(field_name) is not None:
                    seen[field_name].add(model[field_name])
    models = {key: {name: _one_or_list(values) for name, values in seen.items()} for key, seen in models.items()}
    devices = sorted({s.get("device") for s in processes if s.get("device")})
    report = {
        "device": "+".join(devices) or None,
        "execution_provider": sorted({s.get("execution_provider") for s in processes if s.get("execution_provider")}),
        "models": models,
        "onnxruntime": _one_or_list(sorted({s.get("onnxruntime") for s in processes if s.get("onnxruntime")})),
        "message": "; ".join(sorted({s["message"] for s in processes if s.get("message")})) or None,
        "gpus": [],
    }
    if any("CUDA" in d for d in devices):
        from models.cuda_builds import query_gpus

        gpus, problem = query_gpus()
        used = {i for m in models.values() for i in _as_list(m["device_id"])}
        report["gpus"] = [{"index": g["index"], "name": g["name"], "driver_version": g["driver_version"]}
                          for g in gpus if not used or g["index"] in used]
        if problem:
            report["gpu_problem"] = problem
        if not workers_local:
            report["gpu_problem"] = ("the workers do not run on this host: these are this host's GPUs, "
                                     "read with nvidia-smi here")
    return report


def _as_list(value) -> list:
    return value if isinstance(value, list) else [] if value is None else [value]


def _one_or_list(values):
    values = sorted(values, key=str)
    return None if not values else values[0] if len(values) == 1 else values


def device_line(device: dict) -> str:
    """The device row of the table: CPU with its reason, or the GPU and its driver."""
    if not device.get("device"):
        return "-"
    providers = sorted({str(p) for m in device["models"].values() for p in _as_list(m["provider"])})
    line = f"{device['device']} ({', '.join(providers)}), onnxruntime {device['onnxruntime']}"
    if device["gpus"]:
        line += "; " + ", ".join(f"GPU {g['index']} {g['name']} (driver {g['driver_version']})" for g in device["gpus"])
    if device.get("gpu_problem"):
        line += f"; {device['gpu_problem']}"
    if device.get("message"):
        line += f": {device['message']}"
    return line


# --- the baseline ------------------------------------------------------------------

_baseline_runtime = None
_baseline_start_args: tuple = ()


def _baseline_process_init(kind: str, threads: int, models: Sequence[str], barrier) -> None:
    # Nothing here may fail: a Pool whose initializer raises replaces the
    # process and runs it again, forever. The runtime is built by _baseline_start.
    global _baseline_start_args
    _baseline_start_args = (kind, threads, models, barrier)


def _baseline_start(index: int) -> int:
    """Build the worker's own runtime, on plain ORT sessions, as pool process ``index`` does.

    Each process then waits at the barrier for the others, so each takes
    exactly one of these calls; one that fails breaks the barrier for all.
    """
    global _baseline_runtime
    import dataclasses

    from models.catalog import settings_selecting
    from tasks.settings import load_settings
    from workers.runtime import WorkerRuntime

    kind, threads, models, barrier = _baseline_start_args
    try:
        importlib.import_module(f"workers.{kind}")  # registers the kind's pipeline
        settings = dataclasses.replace(load_settings(), cpu_threads=threads, **settings_selecting(models))
        _baseline_runtime = WorkerRuntime(kind, settings, index, 1)
    except BaseException:
        barrier.abort()
        raise
    # As a worker's pool process does after loading (workers/wiring.py).
    gc.collect()
    gc.freeze()
    barrier.wait()
    return os.getpid()


def _baseline_job(payloads: list[bytes]) -> tuple[int, float, list[dict]]:
    """(jobs that succeeded, their units, their timings_ms): a bad input fails alone, as it does in the fleet."""
    results = _baseline_runtime.pipeline.analyze_many(payloads, [None] * len(payloads))
    succeeded = [r for r in results if isinstance(r, dict)]
    return (len(succeeded), sum(units_of(_baseline_runtime.kind, r) for r in succeeded),
            [r.get("timings_ms", {}) for r in succeeded])


def _start_baseline_processes(pool, kind: str, processes: int) -> list[int]:
    """Start every process's runtime; their pids."""
    starts = [pool.apply_async(_baseline_start, (i,)) for i in range(processes)]
    errors, pids = [], []
    for start in starts:
        try:
            pids.append(start.get())
        except Exception as exc:  # noqa: BLE001 -- gathered, the first real one re-raised below
            errors.append(exc)
    if errors:
        # The processes that waited for a failed one only report the broken barrier.
        cause = next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
        raise IdentError(f"the in-process baseline runs on this machine and could not load the {kind} "
                         f"pipeline: {cause}") from cause
    return pids


class Baseline:
    """The same pipeline in ``processes`` spawned processes, kept for several timed windows.

    ``models`` (catalog keys) are the fleet's; by default, those this
    environment selects. Its processes stay up (idle) between windows, so that
    a second round times the same warm processes as the first.
    """

    def __init__(self, kind: str, inputs: list[tuple[str, bytes]], processes: int, threads: int,
                 batch: int = 1, models: Sequence[str] = ()):
        self.kind, self.inputs, self.processes, self.threads, self.batch = kind, inputs, processes, threads, batch
        self.models = tuple(models)
        self.pids: list[int] = []
        self.warm_up_jobs = 0
        self._pool = None

    def __enter__(self) -> "Baseline":
        context = multiprocessing.get_context("spawn")
        start_args = (self.kind, self.threads, self.models, context.Barrier(self.processes))
        self._pool = context.Pool(self.processes, initializer=_baseline_process_init, initargs=start_args)
        try:
            self.pids = _start_baseline_processes(self._pool, self.kind, self.processes)
        except BaseException:
            self._pool.terminate()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._pool.terminate()
        self._pool.join()

    def warm(self, jobs: int, progress=None) -> None:
        """``jobs`` untimed."""
        for _outcome, payloads in _feed(self._pool, self.inputs, jobs, self.batch):
            if progress:
                progress(len(payloads))
        self.warm_up_jobs += jobs

    def timed(self, jobs: int, progress=None) -> dict:
        """``jobs`` timed, with the CPU each process spent on them."""
        import psutil

        roles = {"processes": [p for p in map(_process, self.pids) if p is not None], "producer": [psutil.Process()]}
        cpu_before = cpu_snapshot(roles)
        window_start = time.time()
        started = time.perf_counter()
        succeeded, units, timings = 0, 0.0, []
        for (call_succeeded, call_units, call_timings), payloads in _feed(self._pool, self.inputs, jobs, self.batch):
            succeeded += call_succeeded
            units += call_units
            timings += call_timings
            if progress:
                progress(len(payloads))
        wall = time.perf_counter() - started
        window = {"start": round(window_start, 3), "end": round(time.time(), 3)}
        cpu = cpu_report(cpu_before, cpu_snapshot(roles), jobs)
        # Counted as the fleet's throughput is: jobs that succeeded.
        return {
            "wall_s": round(wall, 3),
            "throughput_per_s": round(succeeded / wall, 3),
            "units_per_s": round(units / wall, 3),
            "failed": jobs - succeeded,
            "processes": self.processes,
            "threads": self.threads,
            "batch": self.batch,
            "warm_up_jobs": self.warm_up_jobs,
            "stages_ms": stage_percentiles(timings),
            "cpu": cpu,
            "window": window,
        }


def run_baseline(kind: str, inputs: list[tuple[str, bytes]], jobs: int, processes: int, threads: int,
                 batch: int = 1, warm_jobs: int = 0, progress=None, warm_progress=None,
                 models: Sequence[str] = ()) -> dict:
    """The same pipeline in ``processes`` spawned processes: ``warm_jobs`` untimed, then ``jobs`` timed.

    ``models`` (catalog keys) are the fleet's; by default, those this environment selects.
    """
    with Baseline(kind, inputs, processes, threads, batch, models) as baseline:
        baseline.warm(warm_jobs, warm_progress)
        return baseline.timed(jobs, progress)


def _feed(pool, inputs: list[tuple[str, bytes]], jobs: int, batch: int):
    """(outcome, payloads) per call, the inputs cycled as the fleet run cycles them."""
    work = [
        [inputs[i % len(inputs)][1] for i in range(start, min(start + batch, jobs))]
        for start in range(0, jobs, batch)
    ]
    return zip(pool.imap(_baseline_job, work, chunksize=1), work)


# --- the command ---------------------------------------------------------------------


def machine() -> dict:
    import onnxruntime as ort

    model = ""
    try:
        model = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return {
        "platform": platform.platform(),
        "cpu": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
    }


def bench(kind: str, jobs: int, concurrency: int, batch: int | None, inputs_dir: Path | None,
          by_reference: bool = True, warm_jobs: int | None = None, rounds: int = 2) -> dict:
    """``rounds`` fleet runs and baseline runs, taking turns, each side warmed up before its first.

    Both sides warm up alike, because a process's first pass over the inputs
    is slower than the ones after it (its heap and ONNX Runtime's buffers grow
    to the inputs' sizes: a fleet's process took about 140 photos to settle, see
    docs/benchmarks.md), and a fleet already warm from an earlier run must not
    be compared with a cold baseline. By default each side runs the timed
    workload once untimed first: the fleet before its first round, the
    baseline (whose processes then stay up) before its first.

    The order is fleet 1, baseline 1, fleet 2, baseline 2, ...; each round's
    ratio is its fleet run over its baseline run, and the report's single
    figures are the medians over the rounds (every round is in ``rounds``).
    """
    import psutil

    from tasks.settings import load_settings

    inputs = load_inputs(kind, inputs_dir)
    statuses = fleet_processes(kind)
    shape = fleet_shape(kind, processes=statuses)
    batch, mismatch = baseline_batch(batch, shape["max_batch"])
    if mismatch:
        console.print(f"[yellow]note:[/] {mismatch}")
    workers = local_worker_processes(statuses)
    fleet_roles = {"worker_main": workers["worker_main"], "pool": workers["pool"],
                   "redis": _as_role(local_redis(load_settings().redis_url)), "producer": [psutil.Process()]}
    device = device_report(statuses, workers_local=not workers["not_local"])
    payload_mean = sum(len(inputs[i % len(inputs)][1]) for i in range(jobs)) / jobs
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    if warm_jobs is None:
        warm_jobs = jobs
    processes = shape["processes"]
    timed: dict[str, list[dict]] = {"fleet": [], "baseline": []}
    with Progress(*columns, console=console) as progress, \
            Baseline(kind, inputs, processes, shape["threads"], batch, shape["models"]) as baseline:
        for side, round_no in alternation(rounds):
            of = f"round {round_no}/{rounds}"
            if side == "fleet":
                if round_no == 1 and warm_jobs:
                    fleet_warm = progress.add_task("fleet warm-up", total=warm_jobs)
                    run_fleet(kind, inputs, warm_jobs, concurrency, lambda: progress.advance(fleet_warm),
                              by_reference, shape["max_batch"])
                task = progress.add_task(f"fleet {of}, {concurrency} in flight", total=jobs)
                timed["fleet"].append(_fleet_window(kind, inputs, jobs, concurrency, by_reference, shape["max_batch"],
                                                    fleet_roles, lambda: progress.advance(task)))
            else:
                if round_no == 1 and warm_jobs:
                    base_warm = progress.add_task("baseline warm-up", total=warm_jobs)
                    baseline.warm(warm_jobs, lambda n: progress.advance(base_warm, n))
                task = progress.add_task(
                    f"baseline {of}, {processes} process{'' if processes == 1 else 'es'}", total=jobs)
                timed["baseline"].append(baseline.timed(jobs, lambda n: progress.advance(task, n)))
    round_reports = []
    for round_no, (fleet_round, base_round) in enumerate(zip(timed["fleet"], timed["baseline"]), start=1):
        ratio = (fleet_round["throughput_per_s"] / base_round["throughput_per_s"]
                 if base_round["throughput_per_s"] else None)
        round_reports.append({"round": round_no, "ratio": None if ratio is None else round(ratio, 3),
                              "fleet": fleet_round, "baseline": base_round})
    ratios = spread([r["ratio"] for r in round_reports])
    fleet, base = summarize(timed["fleet"]), summarize(timed["baseline"])
    wire = fleet.pop("wire")
    fleet_state = "on" if shape["max_batch"] > 1 else "off"
    return {
        "kind": kind,
        "settings": {"jobs": jobs, "warm_up_jobs": warm_jobs, "concurrency": concurrency, "batch": batch,
                     "inputs": len(inputs), "rounds": rounds,
                     "payloads_by_reference": by_reference, "fleet": shape},
        "machine": machine(),
        "device": device,
        "throughput_per_s": fleet["throughput_per_s"],
        "units_per_s": fleet["units_per_s"],
        "units": "images" if kind == "vision" else "audio_seconds",
        "baseline_per_s": base["throughput_per_s"],
        # The median of the rounds' ratios, each fleet run over the baseline run after it; null when
        # the baseline finished no job: there is nothing to compare with.
        "ratio_to_baseline": ratios["median"],
        "ratio_rounds": {**ratios, "each": [r["ratio"] for r in round_reports]},
        "overhead_ms_p50": fleet["overhead_ms"]["p50"],
        "latency_ms": fleet["latency_ms"],
        "wire": {
            "payload_bytes_mean": round(payload_mean),
            "redis_bytes_in_per_job": round(wire["redis_bytes_in_per_job"]),
            "ratio_to_payload": round(wire["redis_bytes_in_per_job"] / payload_mean, 3) if payload_mean else None,
        },
        "cpu_ms_per_job": {"fleet": cpu_per_job(fleet["cpu"]), "baseline": cpu_per_job(base["cpu"])},
        # Workers whose processes were not found on this host: their CPU is in no figure.
        "workers_not_local": workers["not_local"],
        "batch_fill": {"max_batch": shape["max_batch"], "state": fleet_state, "histogram": fleet["batch_fill"]},
        "fleet": fleet,
        "baseline": base,
        "rounds": round_reports,
    }


def _as_role(found):
    """A located process as a role of one, or the string that says why there is none."""
    return found if isinstance(found, str) else [found]


def _fleet_window(kind: str, inputs, jobs: int, concurrency: int, by_reference: bool, max_batch: int,
                  roles: dict, progress) -> dict:
    """One timed fleet run, with the bytes written to Redis and the CPU each process spent on it."""
    bytes_before = redis_bytes_in()
    cpu_before = cpu_snapshot(roles)
    window_start = time.time()
    figures = run_fleet(kind, inputs, jobs, concurrency, progress, by_reference, max_batch)
    window = {"start": round(window_start, 3), "end": round(time.time(), 3)}
    figures["cpu"] = cpu_report(cpu_before, cpu_snapshot(roles), jobs)
    figures["wire"] = {"redis_bytes_in_per_job": round((redis_bytes_in() - bytes_before) / jobs)}
    figures["window"] = window
    return figures


def render(report: dict) -> Table:
    table = Table(title=f"ident bench: {report['kind']}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    rounds = report.get("rounds", [])
    ratio = report.get("ratio_rounds")
    rows = [
        ("fleet throughput (jobs/s)", report["throughput_per_s"]),
        (f"fleet {report['units']}/s", report["units_per_s"]),
        ("baseline throughput (jobs/s)", report["baseline_per_s"]),
        ("ratio_to_baseline" + (f" (median of {len(rounds)} rounds, min-max)" if ratio else ""),
         f"{_shown(ratio['median'])} ({_shown(ratio['min'])}-{_shown(ratio['max'])})" if ratio
         else report["ratio_to_baseline"]),
    ]
    if rounds:
        rows.append(("rounds: fleet / baseline jobs/s (ratio)", "; ".join(
            f"{_fixed(r['fleet']['throughput_per_s'])} / {_fixed(r['baseline']['throughput_per_s'])} "
            f"({_shown(r['ratio'])})" for r in rounds)))
    rows += [
        ("latency p50 / p95 / p99 (ms)", " / ".join(_shown(report["latency_ms"][k]) for k in ("p50", "p95", "p99"))),
        ("queue overhead p50 (ms): dispatch + return", report["overhead_ms_p50"]),
        ("waiting for a free process p50 (ms)", report["fleet"]["waiting_ms"]["p50"]),
        ("end to end minus in-task p50 (ms): all three", report["fleet"]["outside_task_ms"]["p50"]),
        ("redis bytes in per job / payload", report["wire"]["ratio_to_payload"]),
        ("failed jobs: fleet / baseline", f"{report['fleet']['failed']} / {report['baseline']['failed']}"),
    ]
    fleet_stages = report["fleet"].get("stages_ms", {})
    base_stages = report["baseline"].get("stages_ms", {})
    for stage in dict.fromkeys([*fleet_stages, *base_stages]):
        rows.append((f"stage {stage} p50 / p90 (ms): fleet | baseline",
                     f"{_stage_shown(fleet_stages.get(stage))} | {_stage_shown(base_stages.get(stage))}"))
    for side, cpu in report.get("cpu_ms_per_job", {}).items():
        rows.append((f"CPU ms per job, {side}", " · ".join(
            f"{role} {_fixed(ms)}" if not isinstance(ms, str) else f"{role}: {ms}" for role, ms in cpu.items())))
    if "batch_fill" in report:
        fill = report["batch_fill"]
        rows.append(("batch fill (jobs in a batch: batches)", "off" if fill["state"] == "off" else
                     " ".join(f"{size}:{n}" for size, n in fill["histogram"].items()) or "-"))
    if "device" in report:
        rows.append(("device", device_line(report["device"])))
    if report["fleet"]["errors"]:
        rows.append(("fleet errors", ", ".join(report["fleet"]["errors"])))
    for name, value in rows:
        table.add_row(name, _shown(value))
    return table


def _stage_shown(stage: dict | None) -> str:
    return "-" if not stage else f"{_fixed(stage['p50'], 1)} / {_fixed(stage['p90'], 1)}"


def _fixed(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _shown(value) -> str:
    return "-" if value is None else str(value)


def chart_axis(reports: list[dict]) -> tuple[str, str]:
    """What the reports differ in, as a settings key and an axis label: jobs in flight, or batch size."""
    varies = {key for key in ("concurrency", "batch") if len({r["settings"][key] for r in reports}) > 1}
    if varies == {"batch"}:
        return "batch", "jobs per batch (IDENT_MAX_BATCH)"
    if len(varies) > 1:
        raise IdentError("these reports differ in both jobs in flight and batch size: chart one of the two at a time")
    if not varies and len(reports) > 1:
        raise IdentError("these reports share their jobs in flight and batch size: nothing to put on the x-axis")
    return "concurrency", "jobs in flight"


def is_report(saved) -> bool:
    """Whether ``saved`` holds every field that chart() draws."""
    return (isinstance(saved, dict) and isinstance(saved.get("settings"), dict)
            and {"concurrency", "batch"} <= saved["settings"].keys()
            and {"kind", "throughput_per_s", "baseline_per_s"} <= saved.keys()
            and isinstance(saved.get("latency_ms"), dict) and {"p50", "p95", "p99"} <= saved["latency_ms"].keys())


def load_reports(kind: str, paths: list[Path]) -> list[dict]:
    """Reports saved by --json (one report or a list per file), all of ``kind``."""
    reports = []
    for path in paths:
        try:
            saved = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise IdentError(f"cannot read the report {path}: {exc}") from exc
        for report in saved if isinstance(saved, list) else [saved]:
            if not is_report(report):
                raise IdentError(f"{path} is not a report saved by ident bench --json")
            reports.append(report)
    other = sorted({str(r["kind"]) for r in reports} - {kind})
    if other:
        raise IdentError(f"--chart-from mixes kinds: {', '.join(other)} besides {kind}")
    return reports


def chart(reports: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setting, label = chart_axis(reports)
    reports = sorted(reports, key=lambda r: r["settings"][setting])
    x = [r["settings"][setting] for r in reports]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(x, [r["throughput_per_s"] for r in reports], marker="o", label="fleet")
    left.plot(x, [r["baseline_per_s"] for r in reports], marker="s", linestyle="--", label="raw ORT baseline")
    left.set_xlabel(label)
    left.set_ylabel("jobs/s")
    left.legend()
    for key in ("p50", "p95", "p99"):
        right.plot(x, [r["latency_ms"][key] for r in reports], marker="o", label=key)
    right.set_xlabel(label)
    right.set_ylabel("end-to-end latency (ms)")
    right.legend()
    fig.suptitle(f"{reports[0]['kind']} pipeline")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)




class _Default(int):
    """An int default that run() tells apart from the same number given on the command line."""


# Defaults that --kind queue replaces or refuses, told apart by identity from values given.
DEFAULT_JOBS = _Default(120)
DEFAULT_CONCURRENCY = [8]
DEFAULT_ROUNDS = 2


def add_arguments(parser) -> None:
    parser.add_argument("--kind", choices=("vision", "audio", "queue", "gallery"), required=True,
                        help="the pipeline to measure: the running fleet's workers of that kind; queue: the "
                             "queue alone, raw redis-py against stock Celery against the fleet's cheapest task, "
                             "on processes it starts itself (takes --jobs, default 1500, --warmup, default 100, "
                             "and --json); gallery: 1:N search on PostgreSQL + pgvector over synthetic templates "
                             "(takes the --kind gallery options and --json)")
    parser.add_argument("--jobs", type=count(1), default=DEFAULT_JOBS,
                        help="timed jobs on each side (default: 120; 1500 per run for --kind queue)")
    parser.add_argument("--concurrency", type=counts(1), default=DEFAULT_CONCURRENCY,
                        help="jobs in flight (default: 8); a comma list (1,4,8,16) runs one bench per value")
    parser.add_argument("--batch", type=count(1),
                        help="jobs per call in the baseline's analyze_many (default: the fleet's IDENT_MAX_BATCH)")
    parser.add_argument("--warmup", type=count(0), dest="warm_jobs",
                        help="untimed jobs on each side before timing (default: as many as --jobs)")
    parser.add_argument("--rounds", type=count(1),
                        help=f"timed runs of each side, taking turns: fleet, baseline, fleet, baseline, ... "
                             f"(default: {DEFAULT_ROUNDS}); the report gives each round and the median and "
                             "min-max of their ratios")
    parser.add_argument("--inputs", type=Path,
                        help="folder of input files (default: IDENT_SAMPLES_DIR's images/ or audio/)")
    parser.add_argument("--inline", action="store_true",
                        help="send every payload inside the message instead of by reference")
    parser.add_argument("--json", type=Path, dest="json_path", help="write the report here")
    parser.add_argument("--chart", type=Path, help="write a PNG of throughput and latency against concurrency, "
                        "or against batch size for --chart-from reports of differently batched fleets")
    parser.add_argument("--chart-from", type=Path, nargs="+", metavar="REPORT.json",
                        help="draw --chart from reports saved with --json instead of running the bench")
    parser.add_argument("--via", choices=("celery", "http"), default="celery",
                        help="celery (default): the fleet straight from this process, against raw ONNX Runtime; "
                             "http: the same workload through a running gateway (ident serve) beside direct "
                             "Celery, so that the gateway's overhead is measured side by side (ident/http_bench.py)")
    parser.add_argument("--gateway-url", help="with --via http: the gateway's base URL "
                                              "(default: http://IDENT_GATEWAY_HOST:IDENT_GATEWAY_PORT)")
    parser.add_argument("--api-key", help="with --via http: a key of the gateway (default: the first of IDENT_API_KEYS)")
    from ident import gallery_bench

    gallery_bench.add_arguments(parser)


def queue_refused(args) -> list[str]:
    """The options given that --kind queue has no use for."""
    given = {
        "--concurrency": args.concurrency is not DEFAULT_CONCURRENCY,
        "--batch": args.batch is not None,
        "--rounds": args.rounds is not None,
        "--inputs": args.inputs is not None,
        "--inline": args.inline,
        "--chart": args.chart is not None,
        "--chart-from": bool(args.chart_from),
    }
    return [flag for flag, present in given.items() if present]


def run(args) -> int:
    from ident import gallery_bench

    if args.gateway_url is not None or args.api_key is not None:
        raise IdentError("--gateway-url and --api-key go with --via http")
    if args.kind == "gallery":
        refused = queue_refused(args) + [flag for flag, given in (("--jobs", type(args.jobs) is not _Default),
                                                                  ("--warmup", args.warm_jobs is not None)) if given]
        return gallery_bench.run(args, refused)
    gallery_bench.refuse_gallery_options(args)
    if args.kind == "queue":
        from ident import queue_bench

        jobs = None if type(args.jobs) is _Default else args.jobs
        return queue_bench.run(args, jobs, queue_refused(args))
    if args.chart_from:
        if not args.chart:
            raise IdentError("--chart-from draws a chart: give --chart OUT.png too")
        chart(load_reports(args.kind, args.chart_from), args.chart)
        return 0
    rounds = DEFAULT_ROUNDS if args.rounds is None else args.rounds
    reports = [bench(args.kind, args.jobs, level, args.batch, args.inputs, not args.inline, args.warm_jobs, rounds)
               for level in args.concurrency]
    for report in reports:
        Console().print(render(report))
    if args.json_path:
        args.json_path.write_text(json.dumps(reports[0] if len(reports) == 1 else reports, indent=2))
    if args.chart:
        chart(reports, args.chart)
    any_failed = any(r["fleet"]["failed"] or r["baseline"]["failed"] for r in reports)
    return 1 if any_failed else 0
