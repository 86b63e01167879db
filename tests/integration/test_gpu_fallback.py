"""Real worker processes on a GPU that fails (tests/gpu_standin.py): the job is answered, the model
moves to the CPU and status says so; strict IDENT_DEVICE=cuda refuses to start instead.

Only the GPU is stood in: the worker plans CUDA from a working host's driver
facts, and its CUDA sessions are real CPU sessions that raise ORT's recorded
error texts at the staged moment.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ident.fleet import EmbeddedRedis
from models.cuda import CPU_EP, CUDA_EP
from tests.gpu_standin import ENV_VAR
from tests.integration.fleetkit import Fleet, make_env

pytestmark = pytest.mark.integration

STANDIN = str(Path(__file__).parent / "failing_gpu")
FACE = Path("images") / "faces" / "barack_obama_01.jpg"


@pytest.fixture(scope="module")
def failing_fleet(models_path, tmp_path_factory):
    """A vision worker whose GPU fails with cuDNN's execution error on ArcFace's first job."""
    redis = EmbeddedRedis().start()
    env = make_env(redis, models_path, device="auto", cpu_threads=1)
    env.update({"PYTHONPATH": STANDIN, ENV_VAR: "run2:cudnn_execution_failed:arcface"})
    fleet = Fleet(redis, env, tmp_path_factory.mktemp("failing-gpu-logs"))
    try:
        fleet.start("vision", "failing-gpu@itest", concurrency=1)
        yield fleet
    finally:
        fleet.stop_all()
        redis.cleanup()


def models_of(fleet, name="failing-gpu@itest") -> dict:
    (process,) = fleet.processes(name)
    return process["models"]


def test_a_cuda_error_on_a_live_job_is_answered_on_cpu_and_the_model_moves(failing_fleet, data_path):
    before = models_of(failing_fleet)
    assert {m["provider"] for m in before.values()} == {CUDA_EP}, "every model starts on the (stand-in) GPU"
    photo = (data_path / FACE).read_bytes()
    first = failing_fleet.client.analyze_image(photo).get(timeout=120)
    assert len(first["faces"]) == 1 and len(first["faces"][0]["embedding"]) == 128
    assert first["models"]["arcface_mobilefacenet"] == CPU_EP
    assert first["models"]["yunet_2023mar"] == CUDA_EP
    assert first["execution_provider"] == f"{CUDA_EP}+{CPU_EP}" and first["device"] == "CUDA+CPU"
    after = models_of(failing_fleet)["arcface_mobilefacenet"]
    assert after["provider"] == CPU_EP and after["reason"] == "cudnn_execution_failed"
    assert "CUDNN" in after["message"] and "while running a job" in after["message"]
    second = failing_fleet.client.analyze_image(photo).get(timeout=120)
    assert second["models"]["arcface_mobilefacenet"] == CPU_EP
    assert second["faces"][0]["embedding"] == pytest.approx(first["faces"][0]["embedding"], abs=1e-5)
    status = failing_fleet.client.status("vision").get(timeout=30)
    assert status["models"]["arcface_mobilefacenet"]["provider"] == CPU_EP


def run_worker(models_path, tmp_path, **settings) -> subprocess.CompletedProcess:
    redis = EmbeddedRedis().start()
    try:
        failure = settings.pop("failure")
        cc = settings.pop("cc", "9.0")
        env = make_env(redis, models_path, **settings)
        env.update({"PYTHONPATH": STANDIN, ENV_VAR: failure, "IDENT_TEST_GPU_CC": cc})
        command = [sys.executable, "-m", "celery", "-A", "workers.vision", "worker", "-Q", "vision", "-c", "1",
                   "-n", "strict-gpu@itest"]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    finally:
        redis.cleanup()


def test_strict_cuda_on_a_card_the_wheel_has_no_code_for_refuses_before_any_pool_process(models_path, tmp_path):
    done = run_worker(models_path, tmp_path, device="cuda", failure="create:no_kernel_for_arch", cc="6.1")
    said = done.stdout + done.stderr
    assert done.returncode != 0 and "the vision worker refused to start" in said
    assert "has no kernels for sm_61" in said and "scripts/setup.sh --cuda 12" in said
    assert "ForkPoolWorker" not in said


def test_strict_cuda_whose_warm_up_fails_stops_the_worker_with_the_reason(models_path, tmp_path):
    done = run_worker(models_path, tmp_path, device="cuda", failure="warmup:cudnn_arch_mismatch:yunet")
    said = done.stdout + done.stderr
    assert done.returncode != 0
    assert "could not load its models" in said and "CUDNN_STATUS_NOT_SUPPORTED_ARCH_MISMATCH" in said
    assert "IDENT_DEVICE=cuda forbids the CPU fallback" in said
