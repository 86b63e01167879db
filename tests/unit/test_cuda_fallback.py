"""A CUDA failure at any stage moves that model to the CPU with the reason, or, strict, refuses.

The GPU is the only stand-in (tests/gpu_standin.py): real model files, real
CPU sessions, ORT's real exception classes carrying error texts recorded from
real GPUs and ORT's sources.
"""

from __future__ import annotations

import numpy as np
import pytest

from models.catalog import CATALOG
from models.cuda import CPU_EP, CUDA_EP
from models.cuda_failures import classify
from models.runtime import open_session, plan_device, warmup_feed
from tasks.errors import DeviceUnavailable
from tests.gpu_standin import FailingGpu, cuda_host_facts, recorded_error, recorded_errors

MX230 = (6, 1)


def plan(device="auto", cc=(9, 0), ort_version=None):
    """A CUDA plan on a host whose driver reports the card ``cc`` (None: reports no compute capability)."""
    facts = cuda_host_facts(cc or (0, 0))
    if cc is None:
        facts.compute_capabilities = []
    if ort_version:
        facts.ort_version = ort_version
    return plan_device(device, 0, facts).for_model(CATALOG["arcface_mobilefacenet"])


def face_batch(n=3):
    return {"input": np.random.default_rng(7).standard_normal((n, 3, 112, 112)).astype(np.float32)}


# What each recorded kind may be read as: ORT's older texts say less than its newer ones
# (an old cuBLAS failure only says "CUBLAS error executing ...", with the status on stderr).
READ_AS = {
    "no_kernel_for_arch": {"no_kernel_for_arch"},
    "unsupported_ptx": {"unsupported_ptx"},
    "cudnn_execution_failed": {"cudnn_execution_failed"},
    "cudnn_frontend_ep_fail": {"cudnn_execution_failed"},
    "cudnn_arch_mismatch": {"cudnn_arch_mismatch"},
    "cublas_arch_mismatch": {"cublas_arch_mismatch", "cublas_failed"},
    "bfc_alloc_failed": {"out_of_memory"},
    "cuda_out_of_memory": {"out_of_memory"},
    "cublas_alloc_failed": {"out_of_memory"},
    "cudnn_alloc_failed": {"out_of_memory"},
    "provider_library_missing": {"provider_library_missing", "cudnn_missing"},
    "insufficient_driver": {"insufficient_driver"},
    "no_device": {"no_device"},
}


@pytest.mark.parametrize("entry", [e for e in recorded_errors() if e["kind"] in READ_AS],
                         ids=lambda e: f"{e['kind']}-{e['stage']}")
def test_every_recorded_error_text_is_read_as_a_gpu_failure(entry):
    failure = classify(entry["message"] or entry["stderr"])
    assert failure is not None and failure.code in READ_AS[entry["kind"]]
    assert "hostname=" not in failure.words and "file=" not in failure.words
    assert "onnxruntime::CudaCall" not in failure.words, "ORT's C++ signatures are left out"


def test_the_newest_texts_name_the_exact_failure():
    for kind in ("cudnn_arch_mismatch", "cublas_arch_mismatch"):
        assert classify(recorded_error(kind, "run")["message"]).code == kind


def test_bad_input_is_not_taken_for_a_gpu_failure(monkeypatch, models_path):
    """An error the CPU would raise too must reach the caller, with the model left on CUDA."""
    FailingGpu("run99", "cudnn_execution_failed").install(monkeypatch)
    model = open_session(CATALOG["arcface_mobilefacenet"], models_path, plan(), threads=1)
    with pytest.raises(Exception) as raised:
        model.run(None, {"input": np.zeros((1, 3, 50, 50), np.float32)})
    assert classify(str(raised.value)) is None
    assert model.provider == CUDA_EP


@pytest.mark.parametrize("stage", ["create", "warmup"])
def test_a_card_without_kernels_is_moved_to_cpu_at_start_with_the_way_out(monkeypatch, models_path, stage):
    """A card the build table cannot judge beforehand (the driver did not report its compute capability)."""
    FailingGpu(stage, "no_kernel_for_arch").install(monkeypatch)
    model = open_session(CATALOG["arcface_mobilefacenet"], models_path, plan(cc=None), threads=1)
    status = model.status()
    assert status["provider"] == CPU_EP and status["reason"] == "no_kernel_for_arch"
    message = status["message"]
    assert "no kernel image is available for execution on the device" in message, "ORT's own words"
    assert "has no kernels for this GPU's architecture" in message and "scripts/setup.sh --cuda 12" in message
    assert "hostname=" not in message and "/onnxruntime_src/" not in message
    model.run(None, face_batch())


def test_a_card_the_table_rules_out_never_tries_cuda(monkeypatch, models_path):
    """onnxruntime-gpu 1.31.1 on a GeForce MX230: the table knows it carries nothing for sm_61."""
    FailingGpu("create", "no_kernel_for_arch").install(monkeypatch)
    model = open_session(CATALOG["arcface_mobilefacenet"], models_path, plan(cc=MX230, ort_version="1.31.1"),
                         threads=1)
    status = model.status()
    assert status["provider"] == CPU_EP and status["reason"] == "cuda_unavailable"
    assert "has no kernels for sm_61" in status["message"] and "scripts/setup.sh --cuda 12" in status["message"]
    assert "nvidia-cudnn-cu12==9.10" in status["message"], "the set-up command with its cuDNN pin"


def test_a_failure_on_a_live_job_answers_it_on_cpu_and_moves_the_model(monkeypatch, models_path):
    FailingGpu("run3", "cudnn_execution_failed").install(monkeypatch)
    model = open_session(CATALOG["arcface_mobilefacenet"], models_path, plan(), threads=1)
    changes = []
    model.on_device_change = lambda: changes.append(model.provider)
    batch = face_batch()
    on_cuda = model.run(None, batch)[0]
    assert model.provider == CUDA_EP
    on_cpu = model.run(None, batch)[0]  # the third run fails on the GPU
    assert model.provider == CPU_EP and changes == [CPU_EP]
    np.testing.assert_allclose(on_cpu, on_cuda, rtol=1e-4, atol=1e-5)
    assert "CUDNN_STATUS_EXECUTION_FAILED" in model.status()["message"]
    assert "while running a job" in model.status()["message"]
    model.run(None, batch)  # and the jobs after it run on the CPU
    assert model.provider == CPU_EP and len(changes) == 1


def test_an_allocation_failure_names_the_memory_limit(monkeypatch, models_path):
    FailingGpu("run2", "bfc_alloc_failed").install(monkeypatch)
    model = open_session(CATALOG["arcface_mobilefacenet"], models_path, plan(), threads=1)
    model.run(None, face_batch())
    message = model.status()["message"]
    assert "Failed to allocate memory" in message and "IDENT_GPU_MEM_LIMIT_MB" in message
    assert "ran out of memory" in message


def test_cudnn_without_pascal_kernels_is_told_the_pin(monkeypatch, models_path):
    """The CUDA 12 line on an MX230, but with a cuDNN of 9.11 or later (no Pascal kernels)."""
    FailingGpu("warmup", "cudnn_arch_mismatch").install(monkeypatch)
    model = open_session(CATALOG["arcface_mobilefacenet"], models_path, plan(cc=MX230, ort_version="1.26.0"),
                         threads=1)
    message = model.status()["message"]
    assert "ARCH_MISMATCH" in message and "cuDNN 9.11 dropped" in message
    assert "scripts/setup.sh --cuda 12" in message


@pytest.mark.parametrize("stage", ["create", "warmup"])
def test_strict_cuda_refuses_instead_of_falling_back(monkeypatch, models_path, stage):
    FailingGpu(stage, "cublas_arch_mismatch").install(monkeypatch)
    with pytest.raises(DeviceUnavailable, match="CUBLAS_STATUS_ARCH_MISMATCH.*IDENT_DEVICE=cuda forbids"):
        open_session(CATALOG["arcface_mobilefacenet"], models_path, plan("cuda"), threads=1)


def test_strict_cuda_fails_the_live_job_with_a_typed_error(monkeypatch, models_path):
    FailingGpu("run2", "cuda_out_of_memory").install(monkeypatch)
    model = open_session(CATALOG["arcface_mobilefacenet"], models_path, plan("cuda"), threads=1)
    with pytest.raises(DeviceUnavailable, match="out of memory"):
        model.run(None, face_batch())
    assert model.provider == CUDA_EP


def test_models_named_in_ident_cpu_models_never_ask_for_cuda(monkeypatch, models_path):
    FailingGpu("create", "no_kernel_for_arch").install(monkeypatch)
    vad = CATALOG["silero_vad"]
    cuda = plan_device("cuda", 0, cuda_host_facts())
    model = open_session(vad, models_path, cuda.for_model(vad, ("silero_vad",)), threads=1)
    assert model.provider == CPU_EP and model.reason_code == "cpu_models"
    assert model.status()["message"] == "IDENT_CPU_MODELS keeps silero_vad on the CPU"
    model.run(None, warmup_feed(model))


def test_each_cuda_session_gets_its_own_arena_limit_and_the_options_users_expect():
    cuda = plan_device("auto", 0, cuda_host_facts(), conv_algo_search="EXHAUSTIVE", tf32=True)
    arcface = cuda.for_model(CATALOG["arcface_mobilefacenet"])
    options = arcface.providers[0][1]
    assert options["arena_extend_strategy"] == "kSameAsRequested"
    assert options["cudnn_conv_algo_search"] == "EXHAUSTIVE" and options["use_tf32"] == "1"
    assert arcface.gpu_mem_limit_mib == 352, "(8 + 7 x 32 faces) x 1.5, in 32 MiB steps"
    assert cuda.for_model(CATALOG["arcface_mobilefacenet"], gpu_mem_limit_mib=200).gpu_mem_limit_mib == 200
    aasist = CATALOG["aasist"]
    assert cuda.for_model(aasist, max_batch=4).gpu_mem_limit_mib > cuda.for_model(aasist).gpu_mem_limit_mib
