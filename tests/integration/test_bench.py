"""`ident bench` runs against a live fleet and writes a complete, consistent report.

Speed itself is measured in docs/benchmarks.md, not asserted here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("kind, jobs", [("vision", 8), ("audio", 3)])
def test_bench_report_is_complete_and_consistent(fleet, fleet_env, tmp_path, kind, jobs):
    report_path = tmp_path / f"{kind}.json"
    chart_path = tmp_path / f"{kind}.png"
    completed = subprocess.run(
        [sys.executable, "-m", "ident.cli", "bench", "--kind", kind, "--jobs", str(jobs), "--concurrency", "2",
         "--json", str(report_path), "--chart", str(chart_path)],
        env=fleet_env, capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(report_path.read_text())
    for key in ("throughput_per_s", "baseline_per_s", "ratio_to_baseline", "overhead_ms_p50", "latency_ms",
                "settings", "wire", "machine", "fleet", "baseline"):
        assert key in report, key
    assert report["fleet"]["failed"] == 0
    assert report["throughput_per_s"] > 0 and report["baseline_per_s"] > 0
    assert report["ratio_to_baseline"] == pytest.approx(report["throughput_per_s"] / report["baseline_per_s"], abs=0.01)
    latency = report["latency_ms"]
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"]
    assert report["overhead_ms_p50"] >= 0
    assert report["settings"]["fleet"]["processes"] == (2 if kind == "vision" else 1)
    assert report["baseline"]["processes"] == report["settings"]["fleet"]["processes"]
    # The fleet does not batch, so neither does the baseline.
    assert report["settings"]["fleet"]["max_batch"] == report["settings"]["batch"] == report["baseline"]["batch"] == 1
    # Both sides warm up alike, by default with the timed workload once.
    assert report["settings"]["warm_up_jobs"] == report["baseline"]["warm_up_jobs"] == jobs
    assert report["wire"]["redis_bytes_in_per_job"] > 0
    assert chart_path.stat().st_size > 1000 and chart_path.read_bytes()[:4] == b"\x89PNG"


def test_bad_inputs_fail_alone_and_count_alike_on_both_sides(fleet, fleet_env, data_path, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name in ("alex_lacamoire_01.jpg", "angelina_jolie_01.jpg"):
        shutil.copy(data_path / "images" / "faces" / name, inputs / name)
    shutil.copy(data_path / "bad" / "random_bytes.jpg", inputs / "random_bytes.jpg")
    report_path = tmp_path / "report.json"
    completed = subprocess.run(
        [sys.executable, "-m", "ident.cli", "bench", "--kind", "vision", "--jobs", "6", "--concurrency", "2",
         "--warmup", "0", "--inputs", str(inputs), "--json", str(report_path)],
        env=fleet_env, capture_output=True, text=True, timeout=600,
    )
    # A run with failed jobs is not a clean measurement: the exit status says so.
    assert completed.returncode == 1, completed.stderr[-3000:]
    report = json.loads(report_path.read_text())
    # Six jobs cycle through three inputs: the two random_bytes.jpg jobs fail, on each side.
    assert report["fleet"]["failed"] == report["baseline"]["failed"] == 2
    assert report["fleet"]["errors"] == ["InvalidInput"]
    assert "InvalidInput" in completed.stdout
    # Throughput counts the jobs that succeeded, on both sides alike.
    for side in (report["fleet"], report["baseline"]):
        assert side["throughput_per_s"] == pytest.approx(4 / side["wall_s"], rel=0.01)


@pytest.mark.parametrize("by_reference", [False, True])
def test_the_outside_client_script_pushes_real_photos(fleet, fleet_env, tmp_path, by_reference):
    """scripts/outside_client.py, the Done-when's outside client, run from outside the repository."""
    script = Path(__file__).resolve().parents[2] / "scripts" / "outside_client.py"
    command = [sys.executable, str(script), "--jobs", "6", "--concurrency", "3"]
    completed = subprocess.run(
        command + (["--by-reference"] if by_reference else []), cwd=tmp_path,
        env={**fleet_env, "PYTHONPATH": ""}, capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(completed.stdout)
    assert report["failures"] == {} and report["by_reference"] is by_reference
    assert report["throughput_per_s"] > 0 and report["latency_ms_p50"] > 0


def test_the_outside_client_gives_up_clearly_when_no_worker_answers(tmp_path):
    """A Redis with no worker on it: one clear message after --answer-timeout, not hours of waiting."""
    from ident.fleet import EmbeddedRedis

    script = Path(__file__).resolve().parents[2] / "scripts" / "outside_client.py"
    redis = EmbeddedRedis().start()
    try:
        env = {**os.environ, "IDENT_REDIS_URL": redis.url, "PYTHONPATH": ""}
        started = time.monotonic()
        completed = subprocess.run(
            [sys.executable, str(script), "--jobs", "6", "--concurrency", "3", "--answer-timeout", "2"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
        )
        assert time.monotonic() - started < 60
        assert completed.returncode == 1
        assert "no answer for 2 s with 3 jobs in flight" in completed.stderr, completed.stderr[-2000:]
    finally:
        redis.cleanup()
