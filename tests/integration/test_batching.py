"""Micro-batching: jobs waiting together run as one batch, each keeping its own result."""

from __future__ import annotations

import pytest

from ident.fleet import start_worker, wait_until_ready

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def batching_worker(fleet_env, client, logs_dir, fleet):
    env = {**fleet_env, "IDENT_MAX_BATCH": "4", "IDENT_MAX_WAIT_MS": "50"}
    # Its own queue consumer competes with the session's vision worker, so the
    # session worker is paused for the duration of this module.
    client.app.control.cancel_consumer("vision", destination=[fleet["vision"].name], reply=True)
    worker = start_worker("vision", env, concurrency=1, name="vision-batch@itest", log_dir=logs_dir)
    try:
        wait_until_ready(client.app, [worker], timeout=180)
        yield worker
    finally:
        worker.stop()
        client.app.control.add_consumer("vision", destination=[fleet["vision"].name], reply=True)


def test_jobs_are_batched_and_fail_alone(batching_worker, client, data_path):
    faces = sorted((data_path / "images" / "faces").glob("*.jpg"))[:6]
    payloads = [f.read_bytes() for f in faces]
    payloads.insert(3, b"definitely not an image")
    pending = [client.analyze_image(p) for p in payloads]
    outcomes = []
    for result in pending:
        try:
            outcomes.append(result.get(timeout=120))
        except Exception as exc:  # the bad job's own error
            outcomes.append(exc)
    assert type(outcomes[3]).__name__ == "InvalidInput"
    good = [o for i, o in enumerate(outcomes) if i != 3]
    assert all(isinstance(o, dict) and o["faces"] for o in good), "every other job got its own result"
    assert all(o["worker"]["hostname"] == "vision-batch@itest" for o in good)
    # Jobs of one batch share the batch's start time: some batch held several jobs.
    starts = [o["worker"]["started_at"] for o in good]
    assert len(set(starts)) < len(starts)
    log = batching_worker.log_path.read_text()
    assert "vision.analyze batch of" in log


def test_status_reports_the_workers_batching(batching_worker, client):
    processes = [process for reply in client.model_status(timeout=5) for body in reply.values()
                 for process in body.get("processes", []) if process.get("hostname") == "vision-batch@itest"]
    assert processes and all((p["max_batch"], p["max_wait_ms"]) == (4, 50.0) for p in processes)


def test_a_batch_whose_process_dies_is_requeued_and_finished(batching_worker, client):
    import os
    import signal
    import time

    from tests.integration.fleetkit import slow_image

    photo = slow_image(tiles=5)
    pending = [client.analyze_image(photo) for _ in range(4)]
    time.sleep(1.0)  # the batch is collected within 50 ms and runs for several seconds
    replies = client.app.control.broadcast("model_status", reply=True, timeout=3, limit=1,
                                           destination=["vision-batch@itest"])
    pids = [p["pid"] for reply in replies for body in reply.values() for p in body["processes"]]
    assert len(pids) == 1
    os.kill(pids[0], signal.SIGKILL)
    answers = [p.get(timeout=180) for p in pending]
    assert all(a["faces"] for a in answers)
    assert {a["worker"]["pid"] for a in answers} != {pids[0]}, "another process finished the batch"
