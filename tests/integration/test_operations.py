"""Operating the fleet: scaling over several workers, `ident status`, Flower."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from ident.fleet import free_port, start_worker, wait_until_ready

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def second_vision_worker(fleet, fleet_env, client, logs_dir):
    """A second vision worker with autoscaling, consuming the same queue."""
    worker = start_worker("vision", fleet_env, concurrency=1, name="vision-b@itest", log_dir=logs_dir,
                          extra=["--autoscale=2,2", "-E"])
    try:
        wait_until_ready(client.app, [fleet["vision"], worker], timeout=180)
        yield worker
    finally:
        worker.stop()


def test_jobs_spread_over_two_vision_workers(second_vision_worker, client):
    pending = [client.status("vision") for _ in range(40)]
    answers = [p.get(timeout=60) for p in pending]
    hosts = {a["hostname"] for a in answers}
    assert hosts == {"vision-a@itest", "vision-b@itest"}

    replies = client.model_status(timeout=3)
    workers = {name: body for reply in replies for name, body in reply.items()}
    for name in ("vision-a@itest", "vision-b@itest"):
        processes = workers[name]["processes"]
        assert len(processes) == 2, f"{name} lists each of its pool processes"
        assert all(p["state"] == "ready" and p["models"] for p in processes)


def test_ident_status_lists_every_worker(fleet, fleet_env):
    command = [sys.executable, "-m", "ident.cli", "status", "--json", "--timeout", "3"]
    completed = subprocess.run(command, env=fleet_env, capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    rows = json.loads(completed.stdout)
    workers = {row["worker"] for row in rows}
    assert {"vision-a@itest", "audio-a@itest"} <= workers
    assert all(row["pid"] and row["queue"] in ("vision", "audio") for row in rows)

    table = subprocess.run(command[:-3], env=fleet_env, capture_output=True, text=True, timeout=60)
    assert table.returncode == 0 and "vision-a@itest" in table.stdout


def test_ident_status_fails_when_nobody_answers(fleet_env, redis_server):
    env = {**fleet_env, "IDENT_REDIS_URL": redis_server.url.replace("/0", "/9")}
    completed = subprocess.run([sys.executable, "-m", "ident.cli", "status", "--timeout", "1"],
                               env=env, capture_output=True, text=True, timeout=60)
    assert completed.returncode == 1
    assert "no worker answered" in completed.stderr


def _get(url: str, auth: str | None = None):
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, json.loads(response.read() or b"null")


def test_flower_started_the_standard_way_sees_both_workers(fleet, fleet_env):
    port = free_port()
    flower = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "workers.vision", "flower", f"--port={port}",
         "--address=127.0.0.1", "--basic-auth=ops:s3cret"],
        env=fleet_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        workers = {}
        while time.monotonic() < deadline:
            try:
                status, workers = _get(f"{base}/api/workers?refresh=1", "ops:s3cret")
                if {"vision-a@itest", "audio-a@itest"} <= set(workers):
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.5)
        assert {"vision-a@itest", "audio-a@itest"} <= set(workers)
        queues = {q["name"] for body in workers.values() for q in body.get("active_queues") or []}
        assert {"vision", "audio"} <= queues
        with pytest.raises(urllib.error.HTTPError) as refused:
            _get(f"{base}/api/workers")
        assert refused.value.code == 401
    finally:
        flower.terminate()
        flower.wait(timeout=10)
