"""The pure pieces of the metrics and health endpoints: names, aggregation, readiness, the HTTP server.

The whole path (a real worker scraped over HTTP) is tests/integration/test_metrics.py.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import redis as redis_py
from kombu.transport import redis as kombu_redis

from ident.fleet import free_port
from models.runtime import rows_in
from tasks.errors import ConfigurationError, InvalidInput, LimitExceeded
from tasks.settings import Settings
from workers import metrics
from workers.health_server import HealthServer, pool_problems
from workers.kombu_internals import Channel, handover_key, queued_job_lists
from workers.scrape_gauges import GpuReader, WorkerGauges, jobs_by_queue

REPO = Path(__file__).resolve().parents[2]


def test_the_port_is_validated_and_off_by_default():
    assert Settings.from_env({}).metrics_port == 0
    assert Settings.from_env({"IDENT_METRICS_PORT": "9808"}).metrics_port == 9808
    for bad in ("-1", "65536"):
        with pytest.raises(ConfigurationError, match="IDENT_METRICS_PORT"):
            Settings.from_env({"IDENT_METRICS_PORT": bad})
    with pytest.raises(ConfigurationError, match="IDENT_METRICS_PORT"):
        Settings.from_env({"IDENT_METRICS_PORT": "metrics"})


def test_a_local_fleet_gives_each_worker_its_own_port():
    from ident.local_fleet import metrics_ports

    assert metrics_ports(0) == {}
    assert metrics_ports(9808) == {"vision": 9808, "audio": 9809}
    assert metrics_ports(65535) == {"vision": 65535, "audio": 65534}


def test_outcomes_carry_the_exception_type_and_never_its_message():
    assert metrics.outcome_labels(None) == ("success", "")
    assert metrics.outcome_labels(InvalidInput("the face of someone")) == ("failure", "InvalidInput")
    assert metrics.outcome_labels(LimitExceeded("x")) == ("failure", "LimitExceeded")
    assert metrics.outcome_labels("unknown") == ("failure", "unknown")


def test_header_timestamps_are_read_only_when_they_are_finite_numbers():
    assert metrics.seconds_since_epoch(1700000000.5) == 1700000000.5
    assert metrics.seconds_since_epoch("1700000000.5") == 1700000000.5
    for bad in (None, "", "soon", float("nan"), float("inf"), True, [1], {"t": 1}):
        assert metrics.seconds_since_epoch(bad) is None


def test_dead_pids_are_those_with_live_gauge_files_and_no_live_process():
    names = ["counter_10.db", "histogram_10.db", "gauge_livemax_10.db", "gauge_livemax_11.db",
             "gauge_liveall_12.db", "gauge_max_13.db", "gauge_livemax_x.db", "notes.txt"]
    assert metrics.dead_pids(names, live_pids={11}) == {10, 12}
    assert metrics.dead_pids(names, live_pids={10, 11, 12}) == set()


def test_queue_lists_are_named_as_kombu_names_them():
    lists = queued_job_lists("vision")
    # kombu's own naming of a priority sub-list, for each of its steps.
    kombu_channel = SimpleNamespace(sep=kombu_redis.Channel.sep, priority=lambda step: step)
    expected = [kombu_redis.Channel._q_for_pri(kombu_channel, "vision", step) for step in kombu_redis.PRIORITY_STEPS]
    assert lists[:-1] == expected and expected[0] == "vision" and expected[1] == "vision\x06\x163"
    # The hand-over list, as the fleet's transport names it.
    fleet_channel = SimpleNamespace(unacked_key="unacked")
    assert lists[-1] == Channel.handover_key(fleet_channel, "vision") == "unacked:handover:vision"
    renamed = queued_job_lists("audio", {"sep": ":", "unacked_key": "held", "global_keyprefix": "p/"})
    assert renamed == ["p/audio", "p/audio:3", "p/audio:6", "p/audio:9", "p/held:handover:audio"]
    assert handover_key("held", "audio") == "held:handover:audio"


def test_jobs_held_are_counted_per_consumed_queue_with_zeros():
    assert jobs_by_queue(["vision", "vision", None], ["vision"]) == {"vision": 3}
    assert jobs_by_queue([], ["audio", "vision"]) == {"audio": 0, "vision": 0}
    assert jobs_by_queue(["audio", "vision", "elsewhere"], ["audio", "vision"]) == {"audio": 2, "vision": 1}


def test_readiness_names_each_pool_process_that_cannot_take_jobs():
    ready = {"state": "ready"}
    alive = lambda pid: pid != 3  # noqa: E731
    assert pool_problems(None, {}, alive) == [], "a pool without child processes loads on its first job"
    assert pool_problems(([1, 2], 2), {1: ready, 2: ready}, alive) == []
    assert pool_problems(([], 0), {}, alive) == ["the pool has not started its processes yet"]
    assert pool_problems(([1, 2], 2), {1: ready, 2: {"state": "starting"}}, alive) == [
        "pool process 2 of 2 (pid 2) is still loading its models"]
    assert pool_problems(([1, 3], 2), {1: ready, 3: ready}, alive) == [
        "pool process 2 of 2 (pid 3) has exited; the pool is replacing it"]
    assert pool_problems(([1], 2), {1: ready}, alive) == ["pool process 2 of 2 has not started yet"]
    failed = pool_problems(([1], 1), {1: {"state": "failed", "message": "ModelUnavailable: no file"}}, alive)
    assert failed == ["pool process 1 of 1 (pid 1) could not load its models: ModelUnavailable: no file"]


def test_a_run_has_the_rows_of_its_first_input():
    frame, state, rate = np.zeros((3, 576), np.float32), np.zeros((2, 3, 128), np.float32), np.array(16000)
    assert rows_in({"input": frame, "state": state, "sr": rate}, "input") == 3
    assert rows_in({"state": state, "input": frame}, "input") == 3
    assert rows_in({"images": np.zeros((8, 3, 112, 112))}, "") == 8
    assert rows_in({"sr": rate}, "sr") == 1
    assert rows_in({}, None) == 1


def test_without_nvml_there_are_no_gpu_series_and_no_error():
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("this host has NVML: the series are there (tests/integration/test_metrics.py)")
    reader = GpuReader()
    assert reader.readings() == [] and list(reader.collect()) == []
    assert reader.readings() == [], "asked once, then not again"


def test_an_unreachable_redis_leaves_the_queue_length_out_of_the_scrape():
    client = redis_py.Redis(port=free_port(), socket_connect_timeout=0.2, socket_timeout=0.2)
    gauges = WorkerGauges(["vision"], client, lambda: ["vision"], gpus=GpuReader())
    families = {family.name: family for family in gauges.collect()}
    assert "ident_queue_length" not in families
    assert [(s.labels, s.value) for s in families["ident_jobs_in_progress"].samples] == [({"queue": "vision"}, 1)]


def _get(port: int, path: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read().decode()


def test_the_health_server_answers_each_endpoint_and_survives_a_failing_one():
    problems = ["redis unreachable: ConnectionError: refused"]
    scrapes = []

    def metrics_text() -> bytes:
        scrapes.append(1)
        if len(scrapes) == 1:
            raise RuntimeError("a broken collector")
        return b"ident_up 1\n"

    server = HealthServer(0, metrics_text, lambda: list(problems), address="127.0.0.1")
    server.start()
    try:
        port = server.port
        assert _get(port, "/healthz") == (200, "text/plain; charset=utf-8", "ok\n")
        assert _get(port, "/readyz")[::2] == (503, "redis unreachable: ConnectionError: refused\n")
        problems.clear()
        assert _get(port, "/readyz")[::2] == (200, "ready\n")
        assert _get(port, "/metrics")[0] == 500
        status, content_type, body = _get(port, "/metrics")
        assert status == 200 and content_type.startswith("text/plain; version=0.0.4") and body == "ident_up 1\n"
        assert _get(port, "/healthz?probe=1")[0] == 200 and _get(port, "/other")[0] == 404
    finally:
        server.stop()


AGGREGATION = textwrap.dedent('''
    import os, sys, time
    from pathlib import Path
    from types import SimpleNamespace
    from prometheus_client.parser import text_string_to_metric_families
    from workers import metrics

    folder = Path(sys.argv[1])
    metrics.enable(folder)
    metrics.declare(["vision.analyze"], ["vision"])

    def child(jobs, moves_to_cpu=False):
        ready_r, ready_w = os.pipe()
        go_r, go_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            s = SimpleNamespace(spec=SimpleNamespace(key="yunet"), provider="CUDAExecutionProvider", device="CUDA",
                                reason_code="cuda_ok", on_run=None, on_device_change=None)
            metrics.watch_models([s])
            for n in range(jobs):
                metrics.job_started(str(n), "vision", time.time() - 1.0, time.time())
                s.on_run(s, 0.01, 2)
                metrics.job_ended("vision.analyze", str(n), None if n % 2 else ValueError(), time.time() - 0.5)
            if moves_to_cpu:
                s.provider, s.device, s.reason_code = "CPUExecutionProvider", "CPU", "out_of_memory"
                s.on_device_change()
            os.write(ready_w, b"1")
            os.read(go_r, 1)
            os._exit(0)
        os.read(ready_r, 1)
        return pid, go_w

    def scrape():
        text = metrics.exposition(metrics.scrape_registry()).decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(text) for s in f.samples}

    children = [child(3), child(2, moves_to_cpu=True)]
    print(scrape())
    for pid, go in children:
        os.write(go, b"1")
        os.waitpid(pid, 0)
    print(scrape())
    print(sorted(os.listdir(folder)))
''')


def test_every_process_files_are_summed_into_one_series_per_label_set(tmp_path):
    """Real prometheus-client multiprocess mode, in a process of its own (enable() is for good):
    two forked pool processes, alive, then exited."""
    folder = tmp_path / "metrics"
    completed = subprocess.run([sys.executable, "-c", AGGREGATION, str(folder)], cwd=REPO, capture_output=True,
                               text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    live_line, exited_line, files_line = completed.stdout.strip().splitlines()
    live, exited = eval(live_line), eval(exited_line)  # noqa: S307 -- our own script's prints
    files = eval(files_line)  # noqa: S307
    info = {labels: v for (name, labels), v in live.items() if name == "ident_model_info"}
    cuda = (("device", "CUDA"), ("model", "yunet"), ("provider", "CUDAExecutionProvider"), ("reason", "cuda_ok"))
    cpu = (("device", "CPU"), ("model", "yunet"), ("provider", "CPUExecutionProvider"), ("reason", "out_of_memory"))
    # One series per label set, not per process: the first process still has the model on CUDA
    # (max 1, although the second left it, 0); the second has it on the CPU.
    assert info == {cuda: 1.0, cpu: 1.0}
    for samples in (live, exited):
        jobs = {labels: v for (name, labels), v in samples.items() if name == "ident_jobs_total"}
        assert jobs == {
            (("error", ""), ("outcome", "success"), ("task", "vision.analyze")): 2.0,
            (("error", "ValueError"), ("outcome", "failure"), ("task", "vision.analyze")): 3.0,
        }
        assert samples[("ident_job_seconds_count", (("task", "vision.analyze"),))] == 5.0
        assert samples[("ident_queue_wait_seconds_count", (("queue", "vision"),))] == 5.0
        assert samples[("ident_queue_wait_unstamped_total", (("queue", "vision"),))] == 0.0
        inference = ("ident_model_inference_seconds_count", (("model", "yunet"), ("provider", "CUDAExecutionProvider")))
        assert samples[inference] == 5.0
        assert samples[("ident_batch_size_sum", (("model", "yunet"),))] == 10.0
        assert not any("pid" in dict(labels) for _, labels in samples), "never one series per pid"
    # Both have exited: their live series went with them (mark_process_dead), their counts stay.
    assert not any(name.startswith("gauge_live") for name in files), files
    assert not any(name == "ident_model_info" for name, _ in exited)
