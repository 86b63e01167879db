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


# The stages each kind's results may carry (docs/contract.md, timings_ms).
STAGES = {"vision": {"decode", "detect", "embed", "liveness", "total"},
          "audio": {"decode", "vad", "spoof", "embed", "total"}}


@pytest.mark.parametrize("kind, jobs", [("vision", 8), ("audio", 3)])
def test_bench_report_is_complete_and_consistent(fleet, fleet_env, client, tmp_path, kind, jobs):
    report_path = tmp_path / f"{kind}.json"
    chart_path = tmp_path / f"{kind}.png"
    completed = subprocess.run(
        [sys.executable, "-m", "ident.cli", "bench", "--kind", kind, "--jobs", str(jobs), "--concurrency", "2",
         "--json", str(report_path), "--chart", str(chart_path)],
        env={**fleet_env, "COLUMNS": "300"}, capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(report_path.read_text())
    for key in ("throughput_per_s", "baseline_per_s", "ratio_to_baseline", "overhead_ms_p50", "latency_ms",
                "settings", "wire", "machine", "fleet", "baseline"):
        assert key in report, key
    assert report["fleet"]["failed"] == 0
    assert report["throughput_per_s"] > 0 and report["baseline_per_s"] > 0
    # ratio_to_baseline is the median of the rounds' ratios: see check_rounds.
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
    check_rounds(report)
    check_stages(report, kind, client)
    check_cpu(report, fleet[kind].process.pid)
    # Not batched: no histogram.
    assert report["batch_fill"] == {"max_batch": 1, "state": "off", "histogram": {}}
    device = report["device"]
    assert sorted(device["models"]) == report["settings"]["fleet"]["models"]
    assert device["device"] in ("CPU", "CUDA", "CUDA+CPU") and device["onnxruntime"]
    if device["device"] == "CPU":
        assert device["message"] and device["gpus"] == []
    for shown in ("ratio_to_baseline (median of 2 rounds", "stage total p50 / p90", "CPU ms per job, fleet",
                  "batch fill", "onnxruntime"):
        assert shown in completed.stdout, shown


def check_rounds(report: dict) -> None:
    """Two rounds by default, fleet and baseline taking turns; the headline figures are their medians."""
    rounds = report["rounds"]
    assert report["settings"]["rounds"] == len(rounds) == 2
    windows = [r[side]["window"] for r in rounds for side in ("fleet", "baseline")]
    assert all(w["start"] < w["end"] for w in windows)
    # fleet 1, baseline 1, fleet 2, baseline 2: each window starts after the one before it ends.
    assert all(before["end"] <= after["start"] for before, after in zip(windows, windows[1:]))
    for r in rounds:
        assert r["ratio"] == pytest.approx(r["fleet"]["throughput_per_s"] / r["baseline"]["throughput_per_s"],
                                           abs=0.001)
    ratios = sorted(r["ratio"] for r in rounds)
    assert report["ratio_rounds"]["each"] == [r["ratio"] for r in rounds]
    assert (report["ratio_rounds"]["min"], report["ratio_rounds"]["max"]) == (ratios[0], ratios[-1])
    assert report["ratio_to_baseline"] == report["ratio_rounds"]["median"] == pytest.approx(sum(ratios) / 2, abs=0.001)
    assert report["throughput_per_s"] == pytest.approx(
        sum(r["fleet"]["throughput_per_s"] for r in rounds) / 2, abs=0.001)
    assert report["baseline_per_s"] == pytest.approx(
        sum(r["baseline"]["throughput_per_s"] for r in rounds) / 2, abs=0.001)


def check_stages(report: dict, kind: str, client) -> None:
    """Each side reports the stages the results carry, p50 <= p90, the total the longest."""
    from ident.bench import load_inputs

    result = client.analyze(kind, load_inputs(kind, None)[0][1]).get(timeout=120)
    for side in ("fleet", "baseline"):
        stages = report[side]["stages_ms"]
        assert set(result["timings_ms"]) <= set(stages) <= STAGES[kind], (side, stages)
        if kind == "vision":
            assert list(stages) == list(result["timings_ms"])
        for name, stage in stages.items():
            assert 0 <= stage["p50"] <= stage["p90"], (side, name)
        # Every job's total holds its stages; a stage that ran for some jobs only is left out.
        every_job = [s for s in stages.values() if s["jobs"] == stages["total"]["jobs"]]
        assert stages["total"]["p50"] >= max(s["p50"] for s in every_job) - 0.01
        assert stages["total"]["jobs"] == report["settings"]["jobs"]


def check_cpu(report: dict, worker_pid: int) -> None:
    """CPU per job per process: the test fleet runs here, its Redis too."""
    jobs = report["settings"]["jobs"]
    for r in report["rounds"]:
        fleet, baseline = r["fleet"]["cpu"], r["baseline"]["cpu"]
        assert fleet["worker_main"]["pids"] == [worker_pid]
        assert fleet["pool"]["processes"] == report["settings"]["fleet"]["processes"]
        assert fleet["pool"]["ms_per_job"] > 0 and fleet["pool"]["cpu_s"] > 0
        assert fleet["pool"]["ms_per_job"] == pytest.approx(fleet["pool"]["cpu_s"] * 1000 / jobs, abs=0.01)
        assert isinstance(fleet["redis"], dict), fleet["redis"]
        for role in ("worker_main", "redis", "producer"):
            assert fleet[role]["ms_per_job"] >= 0, role
        assert baseline["processes"]["processes"] == report["baseline"]["processes"]
        assert baseline["processes"]["ms_per_job"] > 0 and baseline["producer"]["ms_per_job"] >= 0
        # The whole machine spent at least what the pool processes did (ticks of 10 ms aside).
        assert fleet["machine"]["cpu_s"] >= fleet["pool"]["cpu_s"] - 0.05
    per_job = report["cpu_ms_per_job"]
    assert set(per_job["fleet"]) == {"worker_main", "pool", "redis", "producer", "machine", "others"}
    assert set(per_job["baseline"]) == {"processes", "producer", "machine", "others"}
    assert per_job["fleet"]["pool"] > 0 and per_job["baseline"]["processes"] > 0


def test_a_batching_fleets_batches_are_counted_from_the_results(fleet_env, logs_dir, tmp_path):
    """IDENT_MAX_BATCH=4: every job lands in one batch of the histogram, none larger than 4.

    A fleet of its own (its own Redis), so the session's unbatched vision worker takes none of its jobs.
    """
    from ident.fleet import EmbeddedRedis, start_worker, wait_until_ready
    from tasks.client import IdentClient
    from tasks.settings import Settings

    redis = EmbeddedRedis().start()
    env = {**fleet_env, "IDENT_REDIS_URL": redis.url, "IDENT_MAX_BATCH": "4", "IDENT_MAX_WAIT_MS": "20"}
    worker = start_worker("vision", env, concurrency=1, name="vision-benchbatch@itest", log_dir=logs_dir)
    try:
        wait_until_ready(IdentClient(Settings.from_env(env)).app, [worker], timeout=180)
        report_path = tmp_path / "batched.json"
        completed = subprocess.run(
            [sys.executable, "-m", "ident.cli", "bench", "--kind", "vision", "--jobs", "12", "--concurrency", "8",
             "--warmup", "4", "--json", str(report_path)],
            env=env, capture_output=True, text=True, timeout=600,
        )
        assert completed.returncode == 0, completed.stderr[-3000:]
    finally:
        worker.stop()
        redis.cleanup()
    report = json.loads(report_path.read_text())
    fill = report["batch_fill"]
    assert (fill["max_batch"], fill["state"]) == (4, "on")
    for histogram, jobs in [(r["fleet"]["batch_fill"], 12) for r in report["rounds"]] + [(fill["histogram"], 24)]:
        assert sum(int(size) * n for size, n in histogram.items()) == jobs, histogram
        assert all(1 <= int(size) <= 4 for size in histogram), histogram
    # With 8 in flight and a 20 ms wait, some batch held more than one job.
    assert max(int(size) for size in fill["histogram"]) > 1
    assert report["baseline"]["batch"] == 4


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
    # Six jobs cycle through three inputs: the two random_bytes.jpg jobs fail, on each side, in each round.
    assert [r[side]["failed"] for r in report["rounds"] for side in ("fleet", "baseline")] == [2, 2, 2, 2]
    # The summary adds them up over the two rounds.
    assert report["fleet"]["failed"] == report["baseline"]["failed"] == 4
    assert report["fleet"]["errors"] == ["InvalidInput"]
    assert "InvalidInput" in completed.stdout
    # Throughput counts the jobs that succeeded, on both sides alike.
    for side in (r[s] for r in report["rounds"] for s in ("fleet", "baseline")):
        assert side["throughput_per_s"] == pytest.approx(4 / side["wall_s"], rel=0.01)
    # Stage times come from the jobs that succeeded only.
    assert report["fleet"]["stages_ms"]["total"]["jobs"] == report["baseline"]["stages_ms"]["total"]["jobs"] == 4


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
