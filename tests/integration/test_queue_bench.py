"""`ident bench --kind queue` starts its own Redis and consumers, reports consistently, and leaves nothing running.

Speed itself is measured in docs/benchmarks.md ("The queue alone"), not asserted here.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time

import psutil
import pytest

pytestmark = pytest.mark.integration

KINDS = ("raw", "celery", "fleet")


def _env(models_path) -> dict:
    # No IDENT_REDIS_URL: the bench starts an embedded redis-server of its own.
    env = {k: v for k, v in os.environ.items() if not k.startswith("IDENT_")}
    env.update(IDENT_MODELS_DIR=str(models_path), PYTHONUNBUFFERED="1")
    return env


def _run_watched(command: list[str], env: dict, timeout: float) -> tuple[subprocess.CompletedProcess, dict]:
    """Run ``command``, noting every process under it while it runs, with its command line.

    Once the command has ended, what it left behind has been reparented: only
    a list taken meanwhile can find it.
    """
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: dict[int, tuple[psutil.Process, str]] = {}
    deadline = time.monotonic() + timeout
    output: dict[str, str] = {}

    def read() -> None:
        output["stdout"], output["stderr"] = process.communicate()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while process.poll() is None and time.monotonic() < deadline:
        try:
            for child in psutil.Process(process.pid).children(recursive=True):
                if child.pid not in seen:
                    with contextlib.suppress(psutil.Error):
                        seen[child.pid] = (child, " ".join(child.cmdline()))
        except psutil.NoSuchProcess:
            break
        time.sleep(0.1)
    if process.poll() is None:
        process.kill()
    reader.join(timeout=30)
    return subprocess.CompletedProcess(command, process.returncode, output.get("stdout", ""),
                                       output.get("stderr", "")), seen


def _still_running(processes) -> list[str]:
    left = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                left.append(" ".join(process.cmdline()[:6]))
        except psutil.NoSuchProcess:
            pass
    return left


def test_queue_bench_reports_three_kinds_and_stops_everything(models_path, tmp_path):
    report_path = tmp_path / "queue.json"
    completed, seen = _run_watched(
        [sys.executable, "-m", "ident.cli", "bench", "--kind", "queue", "--jobs", "60", "--json", str(report_path)],
        _env(models_path), timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(report_path.read_text())

    assert report["kind"] == "queue"
    assert report["settings"]["jobs"] == 60 and report["settings"]["warm_up_jobs"] == 100
    assert report["settings"]["redis"] == "embedded"
    # A B C A B C: each kind twice, interleaved.
    assert report["settings"]["order"] == [*KINDS, *KINDS]
    assert [(r["round"], r["kind"]) for r in report["runs"]] == [(i, k) for i in (1, 2) for k in KINDS]
    for run in report["runs"]:
        assert run["jobs"] == 60 and run["wall_s"] > 0 and run["jobs_per_s"] > 0
        assert run["jobs_per_s"] == pytest.approx(60 / run["wall_s"], rel=0.01)
        cpu = run["cpu_ms_per_job"]
        assert set(cpu) == {"producer", "consumers", "pool", "redis"}
        # CPU times tick in 10 ms: 60 jobs may show none for a process that did little.
        assert all(ms >= 0 for ms in cpu.values()) and sum(cpu.values()) > 0
        if run["kind"] == "raw":
            assert cpu["pool"] == 0, "the raw consumers have no pool"
    assert set(report["kinds"]) == set(KINDS)
    for kind, entry in report["kinds"].items():
        rates = [r["jobs_per_s"] for r in report["runs"] if r["kind"] == kind]
        assert entry["jobs_per_s"] == rates
        assert entry["median_jobs_per_s"] == pytest.approx(statistics.median(rates), abs=0.051)
    medians = {kind: report["kinds"][kind]["median_jobs_per_s"] for kind in KINDS}
    ratios = report["ratios"]
    assert ratios["fleet_to_celery"] == pytest.approx(medians["fleet"] / medians["celery"], abs=0.001)
    assert ratios["celery_to_raw"] == pytest.approx(medians["celery"] / medians["raw"], abs=0.001)
    assert ratios["fleet_to_raw"] == pytest.approx(medians["fleet"] / medians["raw"], abs=0.001)
    machine = report["machine"]
    assert machine["cores"] >= 1 and machine["python"] and machine["redis_server"]
    assert all(machine[package] for package in ("celery", "kombu", "redis"))
    # The table names each kind.
    for label in ("raw redis-py", "stock Celery", "fleet (vision.get_status)", "fleet / stock Celery"):
        assert label in completed.stdout

    commands = [command for _process, command in seen.values()]
    for part in ("redis-server", "ident.noop_app", "workers.vision", "ident.queue_bench consume"):
        assert any(part in command for command in commands), f"the watch saw no {part} process"
    time.sleep(0.5)
    left = _still_running(process for process, _command in seen.values())
    assert not left, f"left running: {left}"


def test_options_that_do_not_apply_are_refused_before_anything_starts(models_path):
    completed = subprocess.run(
        [sys.executable, "-m", "ident.cli", "bench", "--kind", "queue", "--concurrency", "4", "--inline"],
        env=_env(models_path), capture_output=True, text=True, timeout=60,
    )
    assert completed.returncode == 2
    said = " ".join(completed.stderr.split())
    assert "--kind queue takes --jobs, --warmup and --json only, not --concurrency, --inline" in said


def test_ctrl_c_in_the_middle_of_a_run_stops_everything(models_path):
    """Ctrl-C reaches the terminal's whole process group: the bench, and the redis-server it started there."""
    bench = subprocess.Popen(
        [sys.executable, "-m", "ident.cli", "bench", "--kind", "queue", "--jobs", "5000", "--warmup", "0"],
        env=_env(models_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(bench.stderr), daemon=True)
    reader.start()
    seen: dict[int, psutil.Process] = {}
    try:
        deadline = time.monotonic() + 120
        # Interrupted during the second kind's run, with thousands of jobs queued.
        while not any("run 1, raw redis-py" in line for line in lines):
            assert bench.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
            for child in psutil.Process(bench.pid).children(recursive=True):
                seen.setdefault(child.pid, child)
            time.sleep(0.1)
        time.sleep(0.3)
        os.killpg(bench.pid, signal.SIGINT)
        started = time.monotonic()
        assert bench.wait(timeout=60) == 130
        assert time.monotonic() - started < 20, "stopped within seconds, not after waiting out a worker"
        reader.join(timeout=10)
        assert "interrupted" in "".join(lines)
        assert len(seen) >= 5, "redis-server, two raw consumers, two Celery workers (with their pools)"
        time.sleep(0.5)
        left = _still_running(seen.values())
        assert not left, f"left running: {left}"
    finally:
        if bench.poll() is None:
            bench.kill()
