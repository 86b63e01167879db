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


# -- a batch that fails as a whole, on a fleet of its own ----------------------

CRASH_MARKER = b"IDENT-TEST-CRASH"


def crashing_photo(photo: bytes) -> bytes:
    """``photo`` with a JPEG comment that the test decoder (crashing_decoder/) dies on."""
    comment = b"\xff\xfe" + (len(CRASH_MARKER) + 2).to_bytes(2, "big") + CRASH_MARKER
    return photo[:2] + comment + photo[2:]


@pytest.fixture(scope="module")
def strict_fleet(models_path, tmp_path_factory):
    """A batching worker with a 2 s soft limit, two deliveries per job, and a decoder that can crash."""
    from pathlib import Path

    from ident.fleet import EmbeddedRedis
    from tests.integration.fleetkit import Fleet, make_env

    redis = EmbeddedRedis().start()
    env = make_env(redis, models_path, max_batch=4, max_wait_ms=300, task_soft_time_limit=2,
                   task_time_limit=30, max_deliveries=2, max_faces=300, device="cpu", cpu_threads=1)
    env["PYTHONPATH"] = str(Path(__file__).parent / "crashing_decoder")
    fleet = Fleet(redis, env, tmp_path_factory.mktemp("strict-batching-logs"))
    try:
        fleet.start("vision", "strict-batch@itest", concurrency=1)
        yield fleet
    finally:
        fleet.stop_all()
        redis.cleanup()


def job_keys_left(fleet, jobs) -> list[str]:
    from tasks import contract

    left = [k.decode() for k in fleet.backend.scan_iter(f"{contract.PAYLOAD_KEY_PREFIX}*")]
    return left + [f"ident:deliveries:{j.id}" for j in jobs if fleet.backend.exists(f"ident:deliveries:{j.id}")]


def four_outcomes(fleet, payloads):
    from tests.integration.fleetkit import outcome

    jobs = [fleet.client.analyze_image(p) for p in payloads]
    return jobs, [outcome(job, timeout=120) for job in jobs]


def test_a_batch_out_of_time_fails_only_its_slow_job(strict_fleet, data_path):
    from tests.integration.fleetkit import slow_image

    photos = [f.read_bytes() for f in sorted((data_path / "images" / "faces").glob("*.jpg"))[:3]]
    jobs, outcomes = four_outcomes(strict_fleet, [slow_image(tiles=8), *photos])
    (slow_ok, slow_error), *others = outcomes
    assert not slow_ok and type(slow_error).__name__ == "SoftTimeLimitExceeded", repr(slow_error)
    assert all(ok and answer["faces"] for ok, answer in others), others
    assert job_keys_left(strict_fleet, jobs) == []
    log = strict_fleet.workers["strict-batch@itest"].log_path.read_text(errors="replace")
    assert "failed as a whole (SoftTimeLimitExceeded); running each alone" in log


def test_a_job_that_kills_its_batch_process_fails_alone_as_poison(strict_fleet, data_path):
    photos = [f.read_bytes() for f in sorted((data_path / "images" / "faces").glob("*.jpg"))[:4]]
    jobs, outcomes = four_outcomes(strict_fleet, [crashing_photo(photos[0]), *photos[1:]])
    (poison_ok, poison_error), *others = outcomes
    assert not poison_ok and type(poison_error).__name__ == "PoisonMessage", repr(poison_error)
    assert all(ok and answer["faces"] for ok, answer in others), "its batch-mates finished"
    assert job_keys_left(strict_fleet, jobs) == []
    strict_fleet.wait_ready(timeout=120)


def test_countdown_expiry_and_revoke_hold_for_batched_jobs(batching_worker, client, data_path):
    import time

    import uuid

    from tasks import contract

    photo = (data_path / "images" / "faces" / "barack_obama_01.jpg").read_bytes()
    redis = client.app.backend.client

    def by_reference() -> dict:
        key = f"{contract.PAYLOAD_KEY_PREFIX}{uuid.uuid4().hex}"
        redis.set(key, photo, ex=600)
        return {contract.PAYLOAD_REF_FIELD: key}

    sent = time.monotonic()
    later = client.app.send_task("vision.analyze", args=[photo], countdown=4)
    expired_payload, revoked_payload = by_reference(), by_reference()
    expired = client.app.send_task("vision.analyze", args=[expired_payload], expires=-1)
    revoked = client.app.send_task("vision.analyze", args=[revoked_payload], countdown=4)
    revoked.revoke()
    assert later.get(timeout=60)["faces"]
    assert time.monotonic() - sent >= 4, "the countdown was honoured"
    for job, payload in ((expired, expired_payload), (revoked, revoked_payload)):
        deadline = time.monotonic() + 30
        while job.state != "REVOKED" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert job.state == "REVOKED", (job.id, job.state)
        assert not redis.exists(payload[contract.PAYLOAD_REF_FIELD]), "a job that never runs takes its payload along"
