"""``ident bench``: the running fleet against the same pipeline on raw ONNX Runtime.

The fleet run drives the fleet at IDENT_REDIS_URL with real files, keeping
``concurrency`` jobs in flight. The baseline runs the very same pipeline code
in-process on plain ONNX Runtime sessions, with as many processes and threads
as the fleet's pool uses, on the same inputs. Each side is warmed up alike
before it is timed. Both run one after the other in one invocation, so the
ratio between them is what to quote: the absolute numbers move with whatever
else the machine is doing.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import multiprocessing
import os
import platform
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

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

    return load_settings().data_dir / DATA_FOLDERS[kind]


def load_inputs(kind: str, folder: Path | None) -> list[tuple[str, bytes]]:
    folder = folder or default_inputs_dir(kind)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in EXTENSIONS[kind] and p.is_file())
    if not files:
        raise IdentError(f"no {kind} inputs under {folder}: pass --inputs DIR")
    return [(str(p.relative_to(folder)), p.read_bytes()) for p in files]


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        # null in the JSON report (NaN is not JSON): every job failed.
        return {"p50": None, "p95": None, "p99": None}
    # Here, not at the top: `ident` also serves producers, which install no numpy.
    import numpy as np

    array = np.asarray(values)
    return {f"p{q}": round(float(np.percentile(array, q)), 2) for q in (50, 95, 99)}


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
              by_reference: bool = True) -> dict:
    """Keep ``concurrency`` jobs in flight from one producer.

    One thread sends and collects everything, woken by each result as it is
    published: a load generator with a thread per slot would time its own
    threads queueing for the interpreter lock, not the fleet.
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
    }


def job_record(kind: str, job, sent_at: float, received_at: float) -> JobRecord:
    """A finished job's times; a job's own failure is part of the report, not the end of it."""
    if not job.successful():
        return JobRecord(sent_at, received_at, error=type(job.result).__name__)
    result = job.result
    worker = result["worker"]
    return JobRecord(sent_at, received_at, float(result["timings_ms"]["total"]), units_of(kind, result),
                     worker["free_since"], worker["started_at"], worker["finished_at"])


def fleet_shape(kind: str, timeout: float = 3.0) -> dict:
    """Pool processes and session threads of the running fleet's ``kind`` workers."""
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
    import redis

    from tasks.settings import load_settings

    return int(redis.Redis.from_url(load_settings().redis_url).info("stats")["total_net_input_bytes"])


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


def _baseline_job(payloads: list[bytes]) -> tuple[int, float]:
    """(jobs that succeeded, their units): a bad input fails alone, as it does in the fleet."""
    results = _baseline_runtime.pipeline.analyze_many(payloads, [None] * len(payloads))
    succeeded = [r for r in results if isinstance(r, dict)]
    return len(succeeded), sum(units_of(_baseline_runtime.kind, r) for r in succeeded)


def _start_baseline_processes(pool, kind: str, processes: int) -> None:
    starts = [pool.apply_async(_baseline_start, (i,)) for i in range(processes)]
    errors = []
    for start in starts:
        try:
            start.get()
        except Exception as exc:  # noqa: BLE001 -- gathered, the first real one re-raised below
            errors.append(exc)
    if errors:
        # The processes that waited for a failed one only report the broken barrier.
        cause = next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
        raise IdentError(f"the in-process baseline runs on this machine and could not load the {kind} "
                         f"pipeline: {cause}") from cause


def run_baseline(kind: str, inputs: list[tuple[str, bytes]], jobs: int, processes: int, threads: int,
                 batch: int = 1, warm_jobs: int = 0, progress=None, warm_progress=None,
                 models: Sequence[str] = ()) -> dict:
    """The same pipeline in ``processes`` spawned processes: ``warm_jobs`` untimed, then ``jobs`` timed.

    ``models`` (catalog keys) are the fleet's; by default, those this environment selects.
    """
    context = multiprocessing.get_context("spawn")
    start_args = (kind, threads, tuple(models), context.Barrier(processes))
    with context.Pool(processes, initializer=_baseline_process_init, initargs=start_args) as pool:
        _start_baseline_processes(pool, kind, processes)
        for _outcome, payloads in _feed(pool, inputs, warm_jobs, batch):
            if warm_progress:
                warm_progress(len(payloads))
        started = time.perf_counter()
        succeeded, units = 0, 0.0
        for (call_succeeded, call_units), payloads in _feed(pool, inputs, jobs, batch):
            succeeded += call_succeeded
            units += call_units
            if progress:
                progress(len(payloads))
        wall = time.perf_counter() - started
    # Counted as the fleet's throughput is: jobs that succeeded.
    return {
        "wall_s": round(wall, 3),
        "throughput_per_s": round(succeeded / wall, 3),
        "units_per_s": round(units / wall, 3),
        "failed": jobs - succeeded,
        "processes": processes,
        "threads": threads,
        "batch": batch,
        "warm_up_jobs": warm_jobs,
    }


def _feed(pool, inputs: list[tuple[str, bytes]], jobs: int, batch: int):
    """((succeeded, units), payloads) per call, the inputs cycled as the fleet run cycles them."""
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
          by_reference: bool = True, warm_jobs: int | None = None) -> dict:
    """One fleet run and one baseline run, each after the same number of untimed warm-up jobs.

    Both sides warm up alike, because a process's first pass over the inputs
    is slower than the ones after it (its heap and ONNX Runtime's buffers grow
    to the inputs' sizes: a fleet's process took about 140 photos to settle, see
    docs/benchmarks.md), and a fleet already warm from an earlier run must not
    be compared with a cold baseline. By default each side runs the timed
    workload once untimed first.
    """
    inputs = load_inputs(kind, inputs_dir)
    shape = fleet_shape(kind)
    batch, mismatch = baseline_batch(batch, shape["max_batch"])
    if mismatch:
        console.print(f"[yellow]note:[/] {mismatch}")
    payload_mean = sum(len(inputs[i % len(inputs)][1]) for i in range(jobs)) / jobs
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    if warm_jobs is None:
        warm_jobs = jobs
    with Progress(*columns, console=console) as progress:
        if warm_jobs:
            fleet_warm = progress.add_task("fleet warm-up", total=warm_jobs)
            run_fleet(kind, inputs, warm_jobs, concurrency, lambda: progress.advance(fleet_warm), by_reference)
        fleet_task = progress.add_task(f"fleet, {concurrency} in flight", total=jobs)
        bytes_before = redis_bytes_in()
        fleet = run_fleet(kind, inputs, jobs, concurrency, lambda: progress.advance(fleet_task), by_reference)
        bytes_per_job = (redis_bytes_in() - bytes_before) / jobs
        warm_progress = None
        if warm_jobs:
            base_warm = progress.add_task("baseline warm-up", total=warm_jobs)
            warm_progress = lambda n: progress.advance(base_warm, n)  # noqa: E731
        processes = shape["processes"]
        base_task = progress.add_task(f"baseline, {processes} process{'' if processes == 1 else 'es'}", total=jobs)
        baseline = run_baseline(kind, inputs, jobs, processes, shape["threads"], batch, warm_jobs,
                                lambda n: progress.advance(base_task, n), warm_progress, shape["models"])
    # null in the JSON when the baseline finished no job: there is nothing to compare with.
    ratio = fleet["throughput_per_s"] / baseline["throughput_per_s"] if baseline["throughput_per_s"] else None
    return {
        "kind": kind,
        "settings": {"jobs": jobs, "warm_up_jobs": warm_jobs, "concurrency": concurrency, "batch": batch,
                     "inputs": len(inputs),
                     "payloads_by_reference": by_reference, "fleet": shape},
        "machine": machine(),
        "throughput_per_s": fleet["throughput_per_s"],
        "units_per_s": fleet["units_per_s"],
        "units": "images" if kind == "vision" else "audio_seconds",
        "baseline_per_s": baseline["throughput_per_s"],
        "ratio_to_baseline": None if ratio is None else round(ratio, 3),
        "overhead_ms_p50": fleet["overhead_ms"]["p50"],
        "latency_ms": fleet["latency_ms"],
        "wire": {
            "payload_bytes_mean": round(payload_mean),
            "redis_bytes_in_per_job": round(bytes_per_job),
            "ratio_to_payload": round(bytes_per_job / payload_mean, 3) if payload_mean else None,
        },
        "fleet": fleet,
        "baseline": baseline,
    }


def render(report: dict) -> Table:
    table = Table(title=f"ident bench: {report['kind']}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    rows = [
        ("fleet throughput (jobs/s)", report["throughput_per_s"]),
        (f"fleet {report['units']}/s", report["units_per_s"]),
        ("baseline throughput (jobs/s)", report["baseline_per_s"]),
        ("ratio_to_baseline", report["ratio_to_baseline"]),
        ("latency p50 / p95 / p99 (ms)", " / ".join(_shown(report["latency_ms"][k]) for k in ("p50", "p95", "p99"))),
        ("queue overhead p50 (ms): dispatch + return", report["overhead_ms_p50"]),
        ("waiting for a free process p50 (ms)", report["fleet"]["waiting_ms"]["p50"]),
        ("end to end minus in-task p50 (ms): all three", report["fleet"]["outside_task_ms"]["p50"]),
        ("redis bytes in per job / payload", report["wire"]["ratio_to_payload"]),
        ("failed jobs: fleet / baseline", f"{report['fleet']['failed']} / {report['baseline']['failed']}"),
    ]
    if report["fleet"]["errors"]:
        rows.append(("fleet errors", ", ".join(report["fleet"]["errors"])))
    for name, value in rows:
        table.add_row(name, _shown(value))
    return table


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


def count(least: int):
    """An argparse type: a whole number of at least ``least``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < least:
            raise argparse.ArgumentTypeError(f"expected a whole number of at least {least}, got {text!r}")
        return value

    return parse


def counts(least: int):
    """An argparse type: a comma list of whole numbers, each at least ``least``."""
    parse_one = count(least)

    def parse(text: str) -> list[int]:
        values = [parse_one(part.strip()) for part in text.split(",")]
        if len(set(values)) != len(values):
            # Each value is one point of the sweep (and of its chart).
            raise argparse.ArgumentTypeError(f"{text!r} repeats a value; give each one once")
        return values

    return parse


def add_arguments(parser) -> None:
    parser.add_argument("--kind", choices=("vision", "audio"), required=True,
                        help="the pipeline to measure: the running fleet's workers of that kind")
    parser.add_argument("--jobs", type=count(1), default=120, help="timed jobs on each side (default: 120)")
    parser.add_argument("--concurrency", type=counts(1), default=[8],
                        help="jobs in flight (default: 8); a comma list (1,4,8,16) runs one bench per value")
    parser.add_argument("--batch", type=count(1),
                        help="jobs per call in the baseline's analyze_many (default: the fleet's IDENT_MAX_BATCH)")
    parser.add_argument("--warmup", type=count(0), dest="warm_jobs",
                        help="untimed jobs on each side before timing (default: as many as --jobs)")
    parser.add_argument("--inputs", type=Path,
                        help="folder of input files (default: IDENT_DATA_DIR's images/ or audio/)")
    parser.add_argument("--inline", action="store_true",
                        help="send every payload inside the message instead of by reference")
    parser.add_argument("--json", type=Path, dest="json_path", help="write the report here")
    parser.add_argument("--chart", type=Path, help="write a PNG of throughput and latency against concurrency, "
                        "or against batch size for --chart-from reports of differently batched fleets")
    parser.add_argument("--chart-from", type=Path, nargs="+", metavar="REPORT.json",
                        help="draw --chart from reports saved with --json instead of running the bench")


def run(args) -> int:
    if args.chart_from:
        if not args.chart:
            raise IdentError("--chart-from draws a chart: give --chart OUT.png too")
        chart(load_reports(args.kind, args.chart_from), args.chart)
        return 0
    reports = [bench(args.kind, args.jobs, level, args.batch, args.inputs, not args.inline, args.warm_jobs)
               for level in args.concurrency]
    for report in reports:
        Console().print(render(report))
    if args.json_path:
        args.json_path.write_text(json.dumps(reports[0] if len(reports) == 1 else reports, indent=2))
    if args.chart:
        chart(reports, args.chart)
    any_failed = any(r["fleet"]["failed"] or r["baseline"]["failed"] for r in reports)
    return 1 if any_failed else 0
