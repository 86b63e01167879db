"""``ident bench --via http``: the same workload through the HTTP gateway beside direct Celery, in one run.

Each round runs the workload twice, taking turns: straight to the queue from
this process (ident.bench.run_fleet, as ``--via celery`` does) and as HTTP
calls to a running gateway (``ident serve``), both with ``concurrency`` calls
in flight on the same inputs and the same fleet. What the gateway costs is the
difference: throughput ratio and added latency, medians over the rounds. The
raw ONNX Runtime baseline of ``--via celery`` is not run: it is the same on
both sides.
"""

from __future__ import annotations

import asyncio
import time

from ident import bench
from tasks.errors import IdentError
from tasks.settings import Settings


def gateway_target(url: str | None, api_key: str | None, settings: Settings) -> tuple[str, str]:
    """The gateway's base URL and the key to call it with: from the options, else from the settings."""
    if not url:
        host = settings.gateway_host
        # A gateway listening on every interface is reached on this host's loopback.
        host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        url = f"http://{host}:{settings.gateway_port}"
    if not url.startswith(("http://", "https://")):
        raise IdentError(f"--gateway-url {url}: give an http:// or https:// URL, such as http://127.0.0.1:8080")
    key = api_key or (settings.api_keys[0] if settings.api_keys else None)
    if not key:
        raise IdentError("--via http needs an API key of the gateway: pass --api-key KEY or set IDENT_API_KEYS")
    return url.rstrip("/"), key


def run_http(kind: str, inputs: list[tuple[str, bytes]], jobs: int, concurrency: int, url: str, key: str,
             progress=None) -> dict:
    """Keep ``concurrency`` calls in flight to ``POST {url}/v1/{kind}/analyze``, from one thread (as run_fleet)."""
    import httpx

    records: list[bench.JobRecord] = []

    async def main() -> float:
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, limits=limits,
                                     timeout=bench.ANSWER_TIMEOUT_S) as client:
            sent = 0

            async def slot() -> None:
                nonlocal sent
                while sent < jobs:
                    payload = inputs[sent % len(inputs)][1]
                    sent += 1
                    sent_at = time.time()
                    response = await client.post(f"/v1/{kind}/analyze", content=payload)
                    records.append(_record(kind, response, sent_at, time.time()))
                    if progress:
                        progress()

            started = time.perf_counter()
            await asyncio.gather(*(slot() for _ in range(min(concurrency, jobs))))
            return time.perf_counter() - started

    wall = asyncio.run(main())
    ok = [r for r in records if r.error is None]
    return {
        "wall_s": round(wall, 3),
        "throughput_per_s": round(len(ok) / wall, 3),
        "latency_ms": bench.percentiles([r.end_to_end_ms for r in ok]),
        "worker_ms": bench.percentiles([r.worker_ms for r in ok]),
        "outside_task_ms": bench.percentiles([r.end_to_end_ms - (r.finished_at - r.started_at) * 1000.0 for r in ok]),
        "errors": sorted({r.error for r in records if r.error}),
        "failed": len(records) - len(ok),
    }


def _record(kind: str, response, sent_at: float, received_at: float) -> bench.JobRecord:
    if response.status_code != 200:
        try:
            error = response.json()["error"]["type"]
        except (ValueError, KeyError, TypeError):
            error = f"HTTP {response.status_code}"
        return bench.JobRecord(sent_at, received_at, error=error)
    result = response.json()
    worker = result["worker"]
    return bench.JobRecord(sent_at, received_at, float(result["timings_ms"]["total"]), bench.units_of(kind, result),
                           worker["free_since"], worker["started_at"], worker["finished_at"])


def _celery_figures(figures: dict) -> dict:
    keep = ("wall_s", "throughput_per_s", "latency_ms", "worker_ms", "outside_task_ms", "errors", "failed")
    return {name: figures[name] for name in keep}


def compare(kind: str, jobs: int, concurrency: int, inputs_dir, warm_jobs: int | None, rounds: int,
            url: str, key: str) -> dict:
    """``rounds`` x (celery, http), each side warmed up once before its first round."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    inputs = bench.load_inputs(kind, inputs_dir)
    shape = bench.fleet_shape(kind)
    warm_jobs = jobs if warm_jobs is None else warm_jobs
    sides = {"celery": [], "http": []}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=bench.console) as progress:
        def advance(task):
            return lambda: progress.advance(task)

        for round_no in range(1, rounds + 1):
            for side in ("celery", "http"):
                if round_no == 1 and warm_jobs:
                    task = progress.add_task(f"{side} warm-up", total=warm_jobs)
                    _run_side(side, kind, inputs, warm_jobs, concurrency, url, key, advance(task))
                task = progress.add_task(f"{side} round {round_no}/{rounds}, {concurrency} in flight", total=jobs)
                sides[side].append(_run_side(side, kind, inputs, jobs, concurrency, url, key, advance(task)))
    each = [{"round": n, "celery": c, "http": h,
             "ratio": round(h["throughput_per_s"] / c["throughput_per_s"], 3) if c["throughput_per_s"] else None,
             "added_latency_ms_p50": _added(h, c, "p50")}
            for n, (c, h) in enumerate(zip(sides["celery"], sides["http"]), start=1)]
    celery, http = bench.summarize(sides["celery"]), bench.summarize(sides["http"])
    return {
        "kind": kind, "via": "http",
        "settings": {"jobs": jobs, "warm_up_jobs": warm_jobs, "concurrency": concurrency, "rounds": rounds,
                     "inputs": len(inputs), "gateway_url": url, "fleet": shape},
        "machine": bench.machine(),
        "celery_per_s": celery["throughput_per_s"],
        "http_per_s": http["throughput_per_s"],
        "ratio_http_to_celery": bench.spread([r["ratio"] for r in each])["median"],
        "added_latency_ms": {q: _added(http, celery, q) for q in ("p50", "p95", "p99")},
        "celery": celery,
        "http": http,
        "rounds": each,
    }


def _run_side(side, kind, inputs, jobs, concurrency, url, key, progress) -> dict:
    if side == "celery":
        return _celery_figures(bench.run_fleet(kind, inputs, jobs, concurrency, progress))
    return run_http(kind, inputs, jobs, concurrency, url, key, progress)


def _added(http: dict, celery: dict, q: str) -> float | None:
    a, b = http["latency_ms"][q], celery["latency_ms"][q]
    return None if a is None or b is None else round(a - b, 2)


def render(report: dict):
    from rich.table import Table

    table = Table(title=f"ident bench --via http: {report['kind']}, {report['settings']['concurrency']} in flight")
    table.add_column("measure")
    table.add_column("celery", justify="right")
    table.add_column("http", justify="right")
    celery, http = report["celery"], report["http"]
    table.add_row("throughput (jobs/s)", str(celery["throughput_per_s"]), str(http["throughput_per_s"]))
    for q in ("p50", "p95", "p99"):
        table.add_row(f"latency {q} (ms)", str(celery["latency_ms"][q]), str(http["latency_ms"][q]))
    table.add_row("outside the task p50 (ms)", str(celery["outside_task_ms"]["p50"]), str(http["outside_task_ms"]["p50"]))
    table.add_row("failed", str(celery["failed"]), str(http["failed"]))
    table.add_row("http / celery throughput (median of rounds)", "", str(report["ratio_http_to_celery"]))
    table.add_row("added latency p50 (ms)", "", str(report["added_latency_ms"]["p50"]))
    return table


def run(args) -> int:
    import json

    from rich.console import Console

    from tasks.settings import load_settings

    if args.kind not in ("vision", "audio"):
        raise IdentError("--via http drives --kind vision or audio through the gateway")
    refused = [flag for flag, given in (("--batch", args.batch is not None), ("--inline", args.inline),
                                        ("--chart", args.chart is not None), ("--chart-from", bool(args.chart_from)))
               if given]
    if refused:
        raise IdentError(f"--via http does not take {', '.join(refused)}: they belong to the raw ONNX baseline "
                         "and the charts of --via celery")
    url, key = gateway_target(args.gateway_url, args.api_key, load_settings())
    rounds = bench.DEFAULT_ROUNDS if args.rounds is None else args.rounds
    reports = [compare(args.kind, args.jobs, level, args.inputs, args.warm_jobs, rounds, url, key)
               for level in args.concurrency]
    for report in reports:
        Console().print(render(report))
    if args.json_path:
        args.json_path.write_text(json.dumps(reports[0] if len(reports) == 1 else reports, indent=2))
    return 1 if any(r["celery"]["failed"] or r["http"]["failed"] for r in reports) else 0
