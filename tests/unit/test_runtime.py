"""The per-process runtime's pure parts: GPU pinning, thread sizing, warm-up feeds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.catalog import CATALOG
from models.runtime import CPU_EP, DevicePlan, cpu_threads_per_session, open_session, warmup_feed
from tasks.errors import ModelUnavailable
from workers.runtime import gpu_for_process


def test_pool_process_k_uses_gpu_k_mod_n():
    assert [gpu_for_process((0, 1), k) for k in range(5)] == [0, 1, 0, 1, 0]
    assert [gpu_for_process((3,), k) for k in range(3)] == [3, 3, 3]


def test_threads_never_oversubscribe_the_cores(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    assert cpu_threads_per_session(0, 1) == 8
    assert cpu_threads_per_session(0, 2) == 4
    assert cpu_threads_per_session(0, 3) == 2
    assert cpu_threads_per_session(0, 16) == 1
    assert cpu_threads_per_session(5, 16) == 5, "IDENT_CPU_THREADS wins"


CPU_ONLY = DevicePlan([CPU_EP], None, "IDENT_DEVICE=cpu asks for the CPU only")


@pytest.mark.parametrize("key", [k for k, s in CATALOG.items() if s.sha256 and s.size_bytes])
def test_every_shared_model_opens_warms_and_reports(models_path, key):
    spec = CATALOG[key]
    if not (models_path / spec.filename).exists():
        pytest.skip(f"{spec.filename} is not in {models_path}")
    session = open_session(spec, models_path, CPU_ONLY, threads=1)
    status = session.status()
    assert status["provider"] == CPU_EP and status["device_id"] is None
    assert status["sha256"] == spec.sha256 and status["message"] == CPU_ONLY.cpu_reason
    runs = session.runs
    session.run(None, warmup_feed(session))
    assert session.runs == runs + 1 and session.provider == CPU_EP


def test_idle_intra_op_threads_sleep_instead_of_spinning(models_path):
    """A process runs its sessions in turn; a finished session's threads must give the cores back."""
    session = open_session(CATALOG["minifasnet_v2"], models_path, CPU_ONLY, threads=2)
    options = session._session.get_session_options()
    assert options.intra_op_num_threads == 2
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_a_missing_or_corrupt_model_is_named(tmp_path, models_path):
    spec = CATALOG["arcface_mobilefacenet"]
    with pytest.raises(ModelUnavailable, match="ident models fetch"):
        open_session(spec, tmp_path, CPU_ONLY, threads=1)
    (tmp_path / spec.filename).write_bytes(b"\0" * 64)
    with pytest.raises(ModelUnavailable, match="sha256"):
        open_session(spec, tmp_path, CPU_ONLY, threads=1)
    # `ident models fetch` refuses a file with no pinned sha256: the advice must not send the operator there.
    unpinned = CATALOG["arcface_w600k_mbf"]
    assert unpinned.sha256 is None
    with pytest.raises(ModelUnavailable, match="place the file there yourself") as missing:
        open_session(unpinned, tmp_path, CPU_ONLY, threads=1)
    assert "run `ident models fetch`" not in str(missing.value)


def test_warmup_feed_follows_the_catalog_shapes(models_path):
    session = open_session(CATALOG["silero_vad"], models_path, CPU_ONLY, threads=1)
    feed = warmup_feed(session)
    assert feed["input"].shape == (1, 576) and feed["state"].shape == (2, 1, 128)
    assert feed["sr"].dtype == np.int64 and int(feed["sr"]) == 16000


class _SessionThatFallsBack:
    """Stands in for an ORT session whose CUDA EP fails at run time (no GPU exists here)."""

    def __init__(self):
        self.providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]

    def get_providers(self):
        return list(self.providers)

    def run(self, output_names, feed):
        self.providers = ["CPUExecutionProvider"]
        return [np.zeros(1, np.float32)]


def test_a_fallback_at_run_time_is_read_back_and_explained():
    from models.runtime import ModelSession

    session = ModelSession(CATALOG["arcface_mobilefacenet"], Path("arcface.onnx"), "0" * 64,
                           _SessionThatFallsBack(), threads=1, device_id=0, cpu_reason=None)
    assert session.provider == "CUDAExecutionProvider" and session.device_id == 0
    session.run(None, {})
    status = session.status()
    assert status["provider"] == CPU_EP and status["device"] == "CPU" and status["device_id"] is None
    assert "at run time" in status["message"]


# Recorded from onnxruntime-gpu 1.31.1: a machine without the CUDA libraries (fd 2),
# and a GPU that is full when the session is built (ORT's Python layer prints it).
LIBRARY_MISSING = (
    "\x1b[1;31m2026-11-25 01:54:59.128330546 [E:onnxruntime:Default, provider_bridge_ort.cc:2458 operator()] "
    "/onnxruntime_src/onnxruntime/core/session/provider_bridge_ort.cc:2043 onnxruntime::Provider& "
    "onnxruntime::ProviderLibrary::Get() [ONNXRuntimeError] : 1 : FAIL : Failed to load library "
    "/site-packages/onnxruntime/capi/libonnxruntime_providers_cuda.so with error: libcublasLt.so.13: "
    "cannot open shared object file: No such file or directory\x1b[m"
)
OUT_OF_MEMORY = (
    "EP Error /onnxruntime_src/onnxruntime/core/providers/cuda/cuda_call.cc:129 CUDA failure 2: out of memory ; "
    "GPU=0 when using [('CUDAExecutionProvider', {'device_id': 0}), 'CPUExecutionProvider']"
)


def test_the_reason_ort_gives_for_declining_cuda_is_kept_in_its_own_words():
    from models.runtime import decline_reason

    assert decline_reason(["Falling back to ['CPUExecutionProvider'] and retrying.", LIBRARY_MISSING]) == (
        "Failed to load library /site-packages/onnxruntime/capi/libonnxruntime_providers_cuda.so with error: "
        "libcublasLt.so.13: cannot open shared object file: No such file or directory"
    )
    assert decline_reason([OUT_OF_MEMORY, LIBRARY_MISSING]).startswith("EP Error ")
    assert "out of memory" in decline_reason([OUT_OF_MEMORY])
    assert decline_reason(["nothing about the GPU"]) is None


def test_a_cuda_session_that_ort_declines_says_why(models_path):
    """A CUDA plan with no reason known beforehand, on a machine where ORT cannot take CUDA."""
    from models.cuda import CUDA_EP

    plan = DevicePlan([(CUDA_EP, {"device_id": 0}), CPU_EP], 0, None)
    session = open_session(CATALOG["silero_vad"], models_path, plan, threads=1)
    if session.provider == CUDA_EP:
        pytest.skip("this machine runs CUDA")
    message = session.status()["message"]
    assert message.startswith("ONNX Runtime declined the CUDA execution provider: ")
    assert len(message) > len("ONNX Runtime declined the CUDA execution provider: ") + 20, message
