"""`ident bench`'s per-stage times, batch fill, CPU per process and rounds, from made-up results."""

from __future__ import annotations

import json

import pytest

from ident.bench import (
    NOT_LOCAL,
    alternation,
    batch_fill,
    cpu_per_job,
    cpu_report,
    device_line,
    device_report,
    render,
    spread,
    stage_percentiles,
    summarize,
)


def test_stage_percentiles_follow_the_results_own_stages():
    timings = [{"decode": float(i), "detect": 10.0 + i, "embed": 0.0, "liveness": 5.0, "total": 20.0 + i}
               for i in range(1, 11)]
    stages = stage_percentiles(timings)
    assert list(stages) == ["decode", "detect", "embed", "liveness", "total"]
    assert stages["decode"] == {"p50": 5.5, "p90": 9.1, "jobs": 10}
    assert stages["total"]["p50"] == 25.5 and stages["embed"]["p90"] == 0.0


def test_a_stage_that_ran_for_some_jobs_counts_over_those():
    # audio.analyze: spoof and embed only when a recording has speech.
    timings = [{"decode": 1.0, "vad": 2.0, "spoof": 30.0, "embed": 40.0, "total": 75.0},
               {"decode": 1.0, "vad": 2.0, "total": 4.0},
               {"decode": 3.0, "vad": 4.0, "spoof": 50.0, "embed": 60.0, "total": 120.0}]
    stages = stage_percentiles(timings)
    assert list(stages) == ["decode", "vad", "spoof", "embed", "total"]
    assert stages["spoof"] == {"p50": 40.0, "p90": 48.0, "jobs": 2}
    assert stages["vad"]["jobs"] == 3


def test_stages_skip_nested_objects_and_no_jobs_gives_nothing():
    # audio.verify carries one timings object per side.
    assert list(stage_percentiles([{"audio_a": {"decode": 1.0}, "total": 3.0}])) == ["total"]
    assert stage_percentiles([]) == {}


def test_batch_fill_counts_jobs_sharing_a_process_and_start_stamp():
    stamps = [
        ("vision@a", 101, 1000.0), ("vision@a", 101, 1000.0), ("vision@a", 101, 1000.0),  # a batch of 3
        ("vision@a", 102, 1000.0),                                                        # another process
        ("vision@a", 101, 1000.5), ("vision@a", 101, 1000.5),                             # a batch of 2
        ("vision@b", 101, 1000.5),                                                        # another worker
    ]
    assert batch_fill(stamps) == {"1": 2, "2": 1, "3": 1}
    assert sum(int(size) * n for size, n in batch_fill(stamps).items()) == len(stamps)
    assert batch_fill([]) == {}


def test_rounds_take_turns_fleet_first():
    assert alternation(2) == [("fleet", 1), ("baseline", 1), ("fleet", 2), ("baseline", 2)]
    assert alternation(1) == [("fleet", 1), ("baseline", 1)]


def test_spread_is_median_and_range_of_the_known_values():
    assert spread([0.9, 0.8, 1.0]) == {"median": 0.9, "min": 0.8, "max": 1.0}
    assert spread([0.88, 0.92]) == {"median": 0.9, "min": 0.88, "max": 0.92}
    assert spread([None, 0.9]) == {"median": 0.9, "min": 0.9, "max": 0.9}
    assert spread([None]) == {"median": None, "min": None, "max": None}


def side(throughput, p50, failed=0, errors=(), fill=None, cpu_ms=33.0):
    return {
        "wall_s": round(100 / throughput, 3), "throughput_per_s": throughput, "processes": 2,
        "latency_ms": {"p50": p50, "p95": p50 * 2, "p99": None},
        "errors": list(errors), "failed": failed,
        "stages_ms": {"decode": {"p50": p50 / 10, "p90": p50 / 5, "jobs": 100}},
        "batch_fill": fill or {},
        "cpu": {"pool": {"cpu_s": cpu_ms / 10, "ms_per_job": cpu_ms, "processes": 2}, "redis": NOT_LOCAL},
        "window": {"start": 1.0, "end": 2.0},
    }


def test_a_sides_rounds_summarise_as_medians_counts_as_sums():
    summary = summarize([side(50.0, 100.0, failed=1, errors=["InvalidInput"], fill={"1": 3, "2": 5}, cpu_ms=30.0),
                         side(54.0, 120.0, failed=2, errors=["NoFaceFound"], fill={"2": 1, "8": 2}, cpu_ms=34.0)])
    assert summary["throughput_per_s"] == 52.0
    assert summary["latency_ms"] == {"p50": 110.0, "p95": 220.0, "p99": None}
    assert summary["stages_ms"]["decode"] == {"p50": 11.0, "p90": 22.0, "jobs": 100}
    assert summary["cpu"]["pool"] == {"cpu_s": 3.2, "ms_per_job": 32.0, "processes": 2}
    assert summary["cpu"]["redis"] == NOT_LOCAL
    # Settings stay what they were (an int, not 2.0); failures and batches add up, in size order.
    assert summary["processes"] == 2 and isinstance(summary["processes"], int)
    assert summary["failed"] == 3 and summary["errors"] == ["InvalidInput", "NoFaceFound"]
    assert summary["batch_fill"] == {"1": 3, "2": 6, "8": 2}
    assert "window" not in summary
    json.dumps(summary, allow_nan=False)


def test_the_median_of_three_rounds_is_the_middle_one():
    assert summarize([side(50.0, 1.0), side(40.0, 1.0), side(60.0, 1.0)])["throughput_per_s"] == 50.0


def test_cpu_report_per_role_total_and_per_job():
    before = {"pool": {11: 10.0, 12: 20.0}, "worker_main": {10: 1.0}, "redis": "not local", "machine": 100.0}
    after = {"pool": {11: 13.3, 12: 23.4}, "worker_main": {10: 1.26}, "redis": "not local", "machine": 107.2}
    report = cpu_report(before, after, jobs=200)
    assert report["pool"] == {"cpu_s": 6.7, "ms_per_job": 33.5, "processes": 2, "pids": [11, 12]}
    assert report["worker_main"] == {"cpu_s": 0.26, "ms_per_job": 1.3, "processes": 1, "pids": [10]}
    assert report["redis"] == "not local"
    assert report["machine"] == {"cpu_s": 7.2, "ms_per_job": 36.0}
    assert report["others"]["ms_per_job"] == pytest.approx(1.2)
    assert cpu_per_job(report) == {"pool": 33.5, "worker_main": 1.3, "redis": "not local", "machine": 36.0,
                                   "others": pytest.approx(1.2)}


def test_a_process_gone_during_the_window_is_named_not_counted():
    report = cpu_report({"pool": {11: 1.0, 12: 1.0}, "machine": 0.0}, {"pool": {11: 2.0, 12: None}, "machine": 2.0}, 10)
    assert report["pool"] == {"cpu_s": 1.0, "ms_per_job": 100.0, "processes": 1, "pids": [11], "gone": [12]}


def status(device="CPU", provider="CPUExecutionProvider", message="no NVIDIA driver", device_id=None):
    return {"hostname": "vision@local", "pid": 7, "device": device, "execution_provider": provider,
            "message": message, "onnxruntime": "1.31.1",
            "models": {"yunet": {"provider": provider, "device": device, "device_id": device_id},
                       "arcface": {"provider": provider, "device": device, "device_id": device_id}}}


def test_on_cpu_the_device_says_cpu_and_why():
    device = device_report([status(), status()], workers_local=True)
    assert device["device"] == "CPU" and device["gpus"] == [] and device["message"] == "no NVIDIA driver"
    assert device["models"]["yunet"] == {"provider": "CPUExecutionProvider", "device": "CPU", "device_id": None}
    assert device["onnxruntime"] == "1.31.1"
    assert device_line(device) == "CPU (CPUExecutionProvider), onnxruntime 1.31.1: no NVIDIA driver"


def test_on_cuda_the_device_names_the_gpu_from_nvidia_smi(monkeypatch):
    import models.cuda_builds

    gpus = [{"index": 0, "name": "NVIDIA H100 80GB HBM3", "compute_cap": "9.0", "driver_version": "570.1",
             "pci_bus_id": "0", "memory_total": "81559 MiB"},
            {"index": 1, "name": "NVIDIA L4", "compute_cap": "8.9", "driver_version": "570.1",
             "pci_bus_id": "1", "memory_total": "23034 MiB"}]
    monkeypatch.setattr(models.cuda_builds, "query_gpus", lambda: (gpus, None))
    device = device_report([status("CUDA", "CUDAExecutionProvider", None, 0)], workers_local=True)
    assert device["gpus"] == [{"index": 0, "name": "NVIDIA H100 80GB HBM3", "driver_version": "570.1"}]
    assert "gpu_problem" not in device and device["message"] is None
    assert "GPU 0 NVIDIA H100 80GB HBM3 (driver 570.1)" in device_line(device)
    remote = device_report([status("CUDA", "CUDAExecutionProvider", None, 0)], workers_local=False)
    assert "do not run on this host" in remote["gpu_problem"]


def test_the_table_shows_rounds_stages_cpu_batch_fill_and_device():
    from rich.console import Console

    fleet = {**side(50.0, 100.0), "waiting_ms": {"p50": 3.0}, "outside_task_ms": {"p50": 4.0}}
    base = side(55.0, 90.0)
    report = {
        "kind": "vision", "units": "images", "throughput_per_s": 50.0, "units_per_s": 50.0, "baseline_per_s": 55.0,
        "ratio_to_baseline": 0.9, "ratio_rounds": {"median": 0.9, "min": 0.88, "max": 0.92, "each": [0.88, 0.92]},
        "overhead_ms_p50": 1.5, "latency_ms": fleet["latency_ms"], "wire": {"ratio_to_payload": 1.05},
        "cpu_ms_per_job": {"fleet": cpu_per_job(fleet["cpu"]), "baseline": cpu_per_job(base["cpu"])},
        "batch_fill": {"max_batch": 1, "state": "off", "histogram": {}},
        "device": device_report([status()], workers_local=True),
        "fleet": fleet, "baseline": base,
        "rounds": [{"round": 1, "ratio": 0.88, "fleet": fleet, "baseline": base},
                   {"round": 2, "ratio": 0.92, "fleet": fleet, "baseline": base}],
    }
    console = Console(width=250, record=True)
    console.print(render(report))
    text = console.export_text()
    assert "0.9 (0.88-0.92)" in text and "50.00 / 55.00 (0.88); 50.00 / 55.00 (0.92)" in text
    assert "stage decode p50 / p90 (ms): fleet | baseline" in text and "10.0 / 20.0 | 9.0 / 18.0" in text
    assert "pool 33.00" in text and "redis: not local" in text
    assert "batch fill" in text and "off" in text
    assert "CPU (CPUExecutionProvider), onnxruntime 1.31.1: no NVIDIA driver" in text


def test_worker_processes_are_found_here_by_their_status_files(monkeypatch, tmp_path):
    """A pool pid counts as this host's only when its parent's status folder holds that pid's file."""
    import os

    import workers.status
    from ident.bench import local_worker_processes

    monkeypatch.setattr(workers.status, "STATUS_ROOT", tmp_path)
    # This test process plays a pool process, its parent the worker's main process.
    folder = tmp_path / f"vision@local.{os.getppid()}"
    folder.mkdir()
    (folder / f"{os.getpid()}.json").write_text("{}")
    here = {"hostname": "vision@local", "pid": os.getpid()}
    found = local_worker_processes([here])
    assert [p.pid for p in found["pool"]] == [os.getpid()]
    assert [p.pid for p in found["worker_main"]] == [os.getppid()] and found["not_local"] == []
    # The same pid reported by a worker elsewhere (a container's pid 7 is some process here, or none).
    elsewhere = local_worker_processes([{"hostname": "vision@other", "pid": os.getpid()}])
    assert elsewhere == {"worker_main": NOT_LOCAL, "pool": NOT_LOCAL, "not_local": ["vision@other"]}
    mixed = local_worker_processes([here, {"hostname": "vision@gone", "pid": 2 ** 22 + 1}])
    assert len(mixed["pool"]) == 1 and mixed["not_local"] == ["vision@gone"]


def test_a_redis_on_another_host_is_not_measured():
    from ident.bench import local_redis

    assert local_redis("redis://10.11.12.13:6379/0") == "not local (Redis at 10.11.12.13)"


def test_rounds_default_to_two_and_the_queue_bench_refuses_them():
    import argparse

    from ident.bench import DEFAULT_ROUNDS, add_arguments, queue_refused

    parser = argparse.ArgumentParser(prog="ident bench", exit_on_error=False)
    add_arguments(parser)
    args = parser.parse_args(["--kind", "vision"])
    assert args.rounds is None and DEFAULT_ROUNDS == 2 and queue_refused(args) == []
    assert parser.parse_args(["--kind", "vision", "--rounds", "3"]).rounds == 3
    assert queue_refused(parser.parse_args(["--kind", "queue", "--rounds", "3"])) == ["--rounds"]
    with pytest.raises(argparse.ArgumentError, match="whole number of at least 1"):
        parser.parse_args(["--kind", "vision", "--rounds", "0"])
