"""The fleet spine, end to end: queues, status, the model_status broadcast."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from ident.fleet import EmbeddedRedis
from models.catalog import get_spec
from models.rewrite import cpu_prelu_is_slow
from tests.conftest import driver_present
from tests.integration.fleetkit import Fleet, make_env
from workers.allocator import operator_configured

pytestmark = pytest.mark.integration



@pytest.mark.parametrize("kind", ["vision", "audio"])
def test_get_status_answers_from_its_own_queue(fleet, client, kind):
    status = client.status(kind).get(timeout=30)
    assert status["queue"] == kind
    assert status["execution_provider"] and status["device"] in ("CUDA", "CPU", "CUDA+CPU")
    assert status["onnxruntime"] and "CPUExecutionProvider" in status["available_providers"]
    assert status["models"], "every model of the worker is listed"
    for model in status["models"].values():
        assert model["provider"] and len(model["sha256"]) == 64 and model["file"].endswith(".onnx")
    if not driver_present():
        # The real fallback on this GPU-less host: the message names the library.
        assert status["device"] == "CPU"
        assert "libcuda.so.1" in status["message"]
        assert "cannot open shared object file" in status["message"]
    rewritten = {key for key, model in status["models"].items() if model["rewrites"]}
    on_cpu_with_slow_prelu = status["device"] == "CPU" and cpu_prelu_is_slow(status["onnxruntime"])
    if kind == "vision" and on_cpu_with_slow_prelu:
        assert {"arcface_mobilefacenet", "minifasnet_v2", "minifasnet_v1se"} <= rewritten
    else:
        assert rewritten == set(), "only PReLU models on CPU under onnxruntime >= 1.27 are rewritten"
    if operator_configured(os.environ) is None and platform.libc_ver()[0] == "glibc":
        assert status["allocator"] == "glibc: mmap threshold 32 MiB, trim threshold 64 MiB"


def test_model_status_lists_every_pool_process(fleet, client):
    replies = client.model_status(timeout=3)
    workers = {name: body for reply in replies for name, body in reply.items()}
    assert {"vision-a@itest", "audio-a@itest"} <= set(workers)
    vision = workers["vision-a@itest"]["processes"]
    audio = workers["audio-a@itest"]["processes"]
    assert len(vision) == 2 and len(audio) == 1
    assert len({p["pid"] for p in vision}) == 2
    real_pids = {fleet["vision"].process.pid, fleet["audio"].process.pid}
    for process in vision + audio:
        assert process["state"] == "ready"
        assert process["pid"] not in real_pids, "entries are the pool children, not the main process"
        assert process["models"] and process["device"]


def test_workers_run_the_fleets_prefork_pool(fleet, client):
    """Started as operators start them (no -P), workers use the pool of workers/celery_internals.py."""
    stats = client.app.control.inspect(destination=["vision-a@itest", "audio-a@itest"], timeout=3).stats()
    assert set(stats) == {"vision-a@itest", "audio-a@itest"}
    for body in stats.values():
        assert body["pool"]["implementation"] == "workers.celery_internals:TaskPool"


def test_inspect_command_line_works(fleet, fleet_env):
    completed = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "workers.vision", "inspect", "model_status", "--json", "-t", "3"],
        env=fleet_env, capture_output=True, text=True, timeout=60,
    )
    assert completed.returncode == 0, completed.stderr
    assert "vision-a@itest" in completed.stdout and "audio-a@itest" in completed.stdout


def test_a_client_that_imports_nothing_from_the_repo(fleet, fleet_env, tmp_path):
    """Another service: plain Celery send_task by name, msgpack, no project imports."""
    script = tmp_path / "outside_client.py"
    script.write_text(textwrap.dedent(
        """
        import json, os, sys
        from celery import Celery
        assert not any(m.split('.')[0] in ('tasks', 'workers', 'models', 'ident') for m in sys.modules)
        url = os.environ["IDENT_REDIS_URL"]
        app = Celery("outsider", broker=url, backend=url)
        app.conf.update(task_serializer="msgpack", result_serializer="msgpack",
                        accept_content=["msgpack"], result_accept_content=["msgpack"])
        out = {}
        for kind in ("vision", "audio"):
            result = app.send_task(f"{kind}.get_status", queue=kind)
            out[kind] = result.get(timeout=30)
        out["broadcast"] = app.control.broadcast("model_status", reply=True, timeout=3)
        print(json.dumps(out))
        """
    ))
    completed = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env={**fleet_env, "PYTHONPATH": ""},
        capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    out = json.loads(completed.stdout)
    assert out["vision"]["queue"] == "vision" and out["audio"]["queue"] == "audio"
    for kind in ("vision", "audio"):
        assert out[kind]["execution_provider"] and out[kind]["device"]
        assert all(m["provider"] for m in out[kind]["models"].values())
    names = {name for reply in out["broadcast"] for name in reply}
    assert {"vision-a@itest", "audio-a@itest"} <= names


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"IDENT_DEVICE": "cuda"}, "IDENT_DEVICE=cuda but CUDA cannot be used"),
        ({"IDENT_MODELS_DIR": "/nonexistent/models"}, "ident models fetch"),
        ({"IDENT_DEVICE": "gpu"}, "IDENT_DEVICE='gpu' is not valid"),
    ],
)
def test_a_worker_that_cannot_serve_refuses_to_start(fleet_env, env, expected):
    if "IDENT_DEVICE" in env and env["IDENT_DEVICE"] == "cuda" and driver_present():
        pytest.skip("this host has CUDA")
    completed = _run_vision_worker({**fleet_env, **env}, "refuses@itest")
    assert completed.returncode != 0
    assert expected in completed.stdout + completed.stderr


def test_a_model_file_that_is_not_the_pinned_one_stops_the_worker_before_it_starts(fleet_env, models_path, tmp_path):
    models = linked_models(models_path, tmp_path)
    pinned = get_spec("arcface_mobilefacenet")
    (models / pinned.filename).unlink()
    (models / pinned.filename).write_bytes((models_path / pinned.filename).read_bytes()[:-1000])
    completed = _run_vision_worker({**fleet_env, "IDENT_MODELS_DIR": str(models)}, "corrupt@itest")
    assert completed.returncode != 0
    said = completed.stdout + completed.stderr
    assert "the vision worker refused to start" in said and f"the catalog pins {pinned.sha256}" in said
    assert "ForkPoolWorker" not in said, "refused in the main process, before any pool process started"


def test_a_pool_process_that_cannot_load_its_models_stops_the_worker_and_no_job_is_lost(models_path, data_path,
                                                                                      tmp_path):
    # An unpinned model passes the pre-start checks (its file exists); only
    # ONNX Runtime, in the pool process, finds that it cannot read it.
    unpinned = get_spec("arcface_w600k_mbf")
    assert unpinned.sha256 is None
    models = linked_models(models_path, tmp_path)
    (models / unpinned.filename).unlink(missing_ok=True)
    (models / unpinned.filename).write_bytes(b"not an ONNX model " * 200)
    redis = EmbeddedRedis().start()
    fleet = Fleet(redis, make_env(redis, models_path), tmp_path)
    try:
        job = fleet.client.analyze_image((data_path / "images" / "multi_face" / "two_people.jpg").read_bytes())
        broken = fleet.start("vision", "broken@itest", concurrency=2, wait=False,
                             env=make_env(redis, models, face_embedding_model=unpinned.key))
        assert broken.process.wait(timeout=120) != 0, "a worker that cannot serve exits with a failure status"
        said = broken.log_path.read_text(errors="replace")
        assert "could not load its models, so the worker stops" in said and unpinned.filename in said
        assert not job.ready(), "the job was neither run nor failed by the broken worker"
        fleet.start("vision", "healthy@itest")
        assert len(job.get(timeout=60)["faces"]) == 2
    finally:
        fleet.stop_all()
        redis.cleanup()


def linked_models(models_path, tmp_path):
    """A models folder of links to the real files, for a test to replace one."""
    models = tmp_path / "models"
    models.mkdir()
    for source in models_path.iterdir():
        (models / source.name).symlink_to(source)
    return models


def _run_vision_worker(env: dict[str, str], name: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "celery", "-A", "workers.vision", "worker", "-Q", "vision", "-c", "1", "-n", name]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


def test_two_fleets_with_the_same_worker_name_on_one_host_keep_their_own_status(models_path, tmp_path):
    """Two `ident up` on one machine both name their worker vision@local: one starting or
    stopping must not clear the other's status, which would leave it "starting" for good."""
    first_redis, second_redis = EmbeddedRedis().start(), EmbeddedRedis().start()
    first = Fleet(first_redis, make_env(first_redis, models_path), tmp_path / "first")
    second = Fleet(second_redis, make_env(second_redis, models_path), tmp_path / "second")
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    try:
        first.start("vision", "twin@itest")
        second.start("vision", "twin@itest")
        second.stop_all()
        assert [p["state"] for p in first.processes("twin@itest", timeout=5)] == ["ready"]
    finally:
        first.stop_all()
        second.stop_all()
        first_redis.cleanup()
        second_redis.cleanup()
