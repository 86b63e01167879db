"""Prometheus metrics and health endpoints of a real worker (IDENT_METRICS_PORT): nothing mocked.

One vision worker with two pool processes (``-c 2``) on a redis-server of its
own, scraped over HTTP as Prometheus scrapes it:

* exact job counters and histogram counts after known good and bad jobs,
  summed over both pool processes into one series each (no pid label);
* ``ident_model_info`` once per model, on the CPU with its reason code;
* ``ident_queue_length`` counting the jobs queued while the worker does not
  consume (its consumer cancelled, deterministic), in kombu's priority
  sub-lists and in the hand-over list too, and ``ident_jobs_in_progress``
  counting what it holds once it consumes again;
* a SIGKILLed pool process: /readyz says so until its replacement has loaded
  its models, and its live series go while the counters keep its jobs;
* a second worker on the same port refuses to start, naming IDENT_METRICS_PORT;
* /readyz 503 naming Redis while the worker's redis-server is down, 200 once
  it is back on the same port, and /healthz 200 all along.
"""

from __future__ import annotations

import os
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ident.fleet import EmbeddedRedis, free_port, start_worker
from tasks.app import make_app
from tasks.settings import Settings
from tests.integration.fleetkit import Fleet, make_env, outcome, slow_image, wait_for
from workers import status as status_files

pytestmark = pytest.mark.integration

NAME = "metrics-a@itest"
VISION_MODELS = {"yunet_2023mar", "arcface_mobilefacenet", "minifasnet_v2", "minifasnet_v1se"}


@pytest.fixture(scope="module")
def metered(models_path, tmp_path_factory):
    """(fleet, port): a vision worker with -c 2 and IDENT_METRICS_PORT on a free port, on its own Redis."""
    redis = EmbeddedRedis().start()
    port = free_port()
    # IDENT_DEVICE=cpu: the same models and reason code on every host, GPU or not.
    env = make_env(redis, models_path, metrics_port=port, device="cpu",
                   data_dir=tmp_path_factory.mktemp("metrics-data"))
    fleet = Fleet(redis, env, tmp_path_factory.mktemp("metrics-logs"))
    try:
        fleet.start("vision", NAME, concurrency=2)
        yield fleet, port
    finally:
        fleet.stop_all()
        redis.cleanup()


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """Every sample of /metrics: (name, its labels) -> value."""
    status, text = get(port, "/metrics")
    assert status == 200, text
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def scrape_until(port: int, predicate, timeout: float, what: str) -> dict:
    """The first scrape for which ``predicate(samples)`` holds."""
    found = {}

    def check():
        found["samples"] = scrape(port)
        return predicate(found["samples"])

    wait_for(check, timeout=timeout, interval=0.05, what=what)
    return found["samples"]


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def named(samples: dict, name: str) -> dict[frozenset, float]:
    return {labels: v for (sample, labels), v in samples.items() if sample == name}


def image(data_path: Path) -> bytes:
    return (data_path / "images" / "faces" / "barack_obama_01.jpg").read_bytes()


def test_health_endpoints_answer_once_the_worker_is_ready(metered):
    fleet, port = metered
    assert get(port, "/healthz") == (200, "ok\n")
    assert get(port, "/readyz") == (200, "ready\n")
    assert get(port, "/nothing")[0] == 404


def test_model_info_names_each_model_once_per_worker_with_its_reason(metered):
    fleet, port = metered
    info = named(scrape(port), "ident_model_info")
    rows = [dict(labels) for labels in info]
    assert {row["model"] for row in rows} == VISION_MODELS
    assert len(rows) == len(VISION_MODELS), "one series per model, not one per pool process"
    assert all(v == 1.0 for v in info.values())
    for row in rows:
        assert (row["provider"], row["device"], row["reason"]) == ("CPUExecutionProvider", "CPU", "device_cpu")
        assert "pid" not in row
    # The same reason code model_status reports for every pool process.
    processes = fleet.processes(NAME)
    assert len(processes) == 2
    assert {model["reason"] for p in processes for model in p["models"].values()} == {"device_cpu"}


def test_gpu_series_only_where_nvml_answers(metered):
    fleet, port = metered
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        has_nvml = False
    else:
        has_nvml = pynvml.nvmlDeviceGetCount() > 0
        pynvml.nvmlShutdown()
    gpu_series = {name for name, _ in scrape(port) if name.startswith("ident_gpu_")}
    if has_nvml:
        assert {"ident_gpu_memory_used_bytes", "ident_gpu_utilization_ratio"} <= gpu_series
    else:
        assert gpu_series == set(), "a host without NVML has no GPU series, and no error"


def test_job_counters_and_histograms_sum_over_the_pool(metered, data_path):
    fleet, port = metered
    good, bad = 5, 4
    before = scrape(port)
    pending = [fleet.client.analyze_image(image(data_path)) for _ in range(good)]
    pending += [fleet.client.analyze_image(b"this is not an image") for _ in range(bad)]
    # A plain send_task carries no ident_sent_at header: its wait is measured from the worker's receipt.
    pending.append(fleet.app.send_task("vision.analyze", args=[image(data_path), None]))
    outcomes = [outcome(result, timeout=60) for result in pending]
    assert [ok for ok, _ in outcomes] == [True] * good + [False] * bad + [True]
    assert {type(exc).__name__ for ok, exc in outcomes if not ok} == {"InvalidInput"}

    def delta(samples, name, **labels):
        return value(samples, name, **labels) - value(before, name, **labels)

    task, queue = {"task": "vision.analyze"}, {"queue": "vision"}
    # A job's counters move just after its result is stored, which the producer may see first.
    scrape_until(port, lambda s: delta(s, "ident_job_seconds_count", **task) >= good + bad + 1, timeout=10,
                 what="every job's end recorded")
    time.sleep(0.3)
    after = scrape(port)
    assert delta(after, "ident_jobs_total", task="vision.analyze", outcome="success", error="") == good + 1
    assert delta(after, "ident_jobs_total", task="vision.analyze", outcome="failure", error="InvalidInput") == bad
    failures = {dict(labels)["error"] for labels in named(after, "ident_jobs_total")
                if dict(labels)["outcome"] == "failure"}
    assert failures == {"InvalidInput"}
    assert delta(after, "ident_job_seconds_count", **task) == good + bad + 1
    assert delta(after, "ident_queue_wait_seconds_count", **queue) == good + bad + 1
    assert delta(after, "ident_queue_wait_unstamped_total", **queue) == 1
    assert delta(after, "ident_job_seconds_bucket", le="+Inf", **task) == good + bad + 1
    # Every good photo is detected at least once (a second look may add runs); bad input runs no model.
    detect = {"model": "yunet_2023mar", "provider": "CPUExecutionProvider"}
    runs = delta(after, "ident_model_inference_seconds_count", **detect)
    assert runs >= good + 1
    assert delta(after, "ident_batch_size_count", model="yunet_2023mar") == runs
    assert delta(after, "ident_model_inference_seconds_count", model="arcface_mobilefacenet",
                 provider="CPUExecutionProvider") >= good + 1
    assert not any("pid" in dict(labels) for _, labels in after), "summed over the pool, never one series per pid"


def test_queue_length_counts_what_no_worker_holds_and_in_progress_what_this_one_does(metered):
    fleet, port = metered
    control = fleet.app.control
    redis = fleet.backend
    assert value(scrape(port), "ident_queue_length", queue="vision") == 0
    control.cancel_consumer("vision", destination=[NAME], reply=True)
    consuming = False
    try:
        photo = slow_image(3)
        pending = [fleet.client.analyze_image(photo) for _ in range(4)]
        # A stock kombu producer that sends a priority puts its job in kombu's sub-list "vision\x06\x163".
        stock = make_app("stock-producer", Settings.from_env(fleet.env))
        stock.conf.broker_transport_options = {**stock.conf.broker_transport_options, "priority_steps": [0, 3, 6, 9]}
        pending.append(stock.send_task("vision.analyze", args=[photo, None], priority=5))
        assert redis.llen("vision\x06\x163") == 1
        samples = scrape_until(port, lambda s: value(s, "ident_queue_length", queue="vision") == 5, timeout=10,
                               what="5 queued jobs counted")
        assert value(samples, "ident_jobs_in_progress", queue="vision") == 0
        # A job a consumer moved into the hand-over list (and died before recording it) is still queued.
        assert redis.lmove("vision", "unacked:handover:vision", "RIGHT", "LEFT") is not None
        assert value(scrape(port), "ident_queue_length", queue="vision") == 5
        # Back where this worker reads them (the sweep would take a visibility timeout).
        redis.lmove("unacked:handover:vision", "vision", "LEFT", "RIGHT")
        redis.lmove("vision\x06\x163", "vision", "LEFT", "LEFT")
        assert value(scrape(port), "ident_queue_length", queue="vision") == 5

        control.add_consumer("vision", destination=[NAME], reply=True)
        consuming = True
        # Busy: two pool processes, each holding up to IDENT_PREFETCH_MULTIPLIER (2) jobs; the rest stays queued.
        seen = []

        def busy():
            samples = scrape(port)
            pair = (value(samples, "ident_jobs_in_progress", queue="vision"),
                    value(samples, "ident_queue_length", queue="vision"))
            seen.append(pair)
            return pair == (4, 1)

        wait_for(busy, timeout=30, interval=0.05, what=f"4 jobs held and 1 queued (seen {seen[-5:]})")
        assert all(held <= 4 for held, _ in seen), seen
        assert all(ok for ok, _ in (outcome(result, timeout=120) for result in pending))
        scrape_until(port, lambda s: value(s, "ident_jobs_in_progress", queue="vision") == 0
                     and value(s, "ident_queue_length", queue="vision") == 0, timeout=10, what="nothing held or queued")
    finally:
        if not consuming:
            control.add_consumer("vision", destination=[NAME], reply=True)


def test_a_killed_pool_process_takes_its_live_series_and_leaves_its_counts(metered):
    fleet, port = metered
    worker = fleet.workers[NAME]
    before = scrape(port)
    victim = psutil.Process(worker.process.pid).children()[0].pid
    folder = status_files.STATUS_ROOT / f"{NAME}.{worker.process.pid}" / "metrics"
    assert (folder / f"gauge_livemax_{victim}.db").exists()
    os.kill(victim, signal.SIGKILL)

    reasons = []

    def not_ready():
        status, body = get(port, "/readyz")
        assert get(port, "/healthz")[0] == 200
        reasons.append(body)
        return status == 503

    wait_for(not_ready, timeout=10, interval=0.02, what="/readyz 503 for the lost pool process")
    # Which one is seen depends on how fast the pool replaces the process: gone, not yet
    # started, or started and loading. Each says why the worker is not ready.
    said = ("loading its models", "has exited", "has not started yet")
    assert any(reason in body for body in reasons for reason in said), reasons
    wait_for(lambda: get(port, "/readyz")[0] == 200, timeout=120, what="/readyz 200 once replaced")
    after = scrape(port)
    assert not (folder / f"gauge_livemax_{victim}.db").exists(), "mark_process_dead for the killed process"
    info = named(after, "ident_model_info")
    assert len(info) == len(VISION_MODELS) and all(v == 1.0 for v in info.values())
    for name in ("ident_jobs_total", "ident_job_seconds_count", "ident_model_inference_seconds_count"):
        assert named(after, name) == named(before, name), f"{name} keeps the dead process's jobs"


def test_a_worker_whose_port_is_taken_refuses_to_start_and_says_why(metered):
    fleet, port = metered
    second = start_worker("vision", fleet.env, concurrency=1, name="metrics-b@itest", log_dir=fleet.logs_dir)
    try:
        assert second.process.wait(timeout=120) != 0
    finally:
        second.stop()
    said = second.log_path.read_text(errors="replace")
    assert f"IDENT_METRICS_PORT={port}: the worker cannot listen on that port" in said, said[-2000:]
    assert get(port, "/readyz") == (200, "ready\n"), "the first worker keeps its port"


def test_readyz_follows_redis_and_healthz_does_not(metered):
    fleet, port = metered
    redis = fleet.redis
    assert get(port, "/readyz") == (200, "ready\n")
    redis.stop(kill=True)
    try:
        def unready():
            assert get(port, "/healthz") == (200, "ok\n"), "a Redis outage must not fail /healthz"
            status, body = get(port, "/readyz")
            return body if status == 503 else None

        body = wait_for(unready, timeout=10, interval=0.1, what="/readyz 503 with Redis down")
        assert body.startswith("redis unreachable: "), body
        status, text = get(port, "/metrics")
        assert status == 200 and "ident_model_info{" in text, "a scrape works without Redis"
        assert "ident_queue_length{" not in text
    finally:
        redis.start()  # the same port, as a restarted Redis service comes back

    def ready():
        assert get(port, "/healthz")[0] == 200
        return get(port, "/readyz")[0] == 200

    wait_for(ready, timeout=30, interval=0.1, what="/readyz 200 with Redis back")
    assert value(scrape(port), "ident_queue_length", queue="vision") == 0
