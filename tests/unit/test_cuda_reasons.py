"""The CPU-fallback reason, for every broken host we know of.

Facts are recorded from real hosts: the loader messages are what glibc's
dlopen prints, the versions what cuDriverGetVersion returns (12040 = 12.4).
"""

from __future__ import annotations


import pytest

from models.cuda import CPU_EP, CUDA_EP, CudaFacts, explain_cpu_fallback, format_cuda_version, probe_cuda
from models.runtime import plan_device
from tasks.errors import DeviceUnavailable
from tests.conftest import driver_present

GPU_PROVIDERS = ["TensorrtExecutionProvider", CUDA_EP, CPU_EP]
NO_FILE = "cannot open shared object file: No such file or directory"


def healthy(**changes) -> CudaFacts:
    facts = CudaFacts(
        ort_packages=["onnxruntime-gpu"],
        ort_version="1.31.1",
        ort_build_cuda="13.0",
        available_providers=list(GPU_PROVIDERS),
        driver_cuda_version=13000,
        cu_init_result=0,
        device_count=1,
    )
    for key, value in changes.items():
        setattr(facts, key, value)
    return facts


def test_healthy_host_has_no_reason():
    assert explain_cpu_fallback(healthy()) is None


def test_this_machine_recorded_no_driver_and_missing_cublas():
    facts = healthy(
        libcuda_error=f"libcuda.so.1: {NO_FILE}",
        driver_cuda_version=None,
        cu_init_result=None,
        device_count=None,
        provider_library_error=f"libcublasLt.so.13: {NO_FILE}",
    )
    reason = explain_cpu_fallback(facts)
    assert reason.startswith("no NVIDIA driver")
    assert "libcuda.so.1" in reason and "libcublasLt.so.13" in reason


def test_cpu_only_package():
    reason = explain_cpu_fallback(healthy(ort_packages=["onnxruntime"], available_providers=[CPU_EP]))
    assert "only a CPU build" in reason and "onnxruntime-gpu" in reason


def test_both_packages_installed():
    reason = explain_cpu_fallback(healthy(ort_packages=["onnxruntime", "onnxruntime-gpu"]))
    assert "both onnxruntime and onnxruntime-gpu" in reason and "pip uninstall" in reason


@pytest.mark.parametrize("visible", ["", "-1"])
def test_cuda_visible_devices_hides_every_gpu(visible):
    facts = healthy(cuda_visible_devices=visible, cu_init_result=100, device_count=0)
    assert f"CUDA_VISIBLE_DEVICES={visible!r}" in explain_cpu_fallback(facts)


def test_driver_older_than_the_build():
    reason = explain_cpu_fallback(healthy(driver_cuda_version=12040))
    assert "built for CUDA 13.0" in reason and "supports CUDA 12.4" in reason and "CUDA 12" in reason


def test_missing_cudnn_with_a_working_driver_names_the_library():
    reason = explain_cpu_fallback(healthy(provider_library_error=f"libcudnn.so.9: {NO_FILE}"))
    assert reason.startswith("the CUDA EP library cannot load: libcudnn.so.9")


def test_gpu_id_beyond_the_visible_gpus():
    reason = explain_cpu_fallback(healthy(device_count=1), device_id=1)
    assert "GPU 1" in reason and "only 1" in reason


def test_driver_present_but_no_device():
    assert "no CUDA device" in explain_cpu_fallback(healthy(cu_init_result=100, device_count=0))
    # A value that names a GPU hides none: it may name one this machine lacks.
    reason = explain_cpu_fallback(healthy(cuda_visible_devices="0", cu_init_result=100, device_count=0))
    assert "no CUDA device" in reason and "hides" not in reason and "CUDA_VISIBLE_DEVICES='0'" in reason


def test_strict_cuda_checks_every_gpu_a_process_may_get(monkeypatch):
    """IDENT_GPU_IDS=0,1 on a one-GPU host is refused before the worker starts, not by pool process 1."""
    import models.cuda
    from workers.wiring import cuda_reason as _cuda_reason

    monkeypatch.setattr(models.cuda, "probe_cuda", lambda: healthy(device_count=1))
    assert _cuda_reason((0, 0)) is None
    reason = _cuda_reason((0, 1))
    assert "GPU 1" in reason and "only 1" in reason


def test_kernel_module_older_than_the_driver_library():
    # A driver updated without a reboot: cuInit fails before any device is counted.
    reason = explain_cpu_fallback(healthy(cu_init_result=35, device_count=None))
    assert "CUDA_ERROR_INSUFFICIENT_DRIVER" in reason and "reboot" in reason


def test_an_unknown_cuinit_failure_gives_its_code():
    assert "CUresult 999" in explain_cpu_fallback(healthy(cu_init_result=999, device_count=None))


def test_version_formatting():
    assert format_cuda_version(12040) == "12.4"
    assert format_cuda_version(13000) == "13.0"
    assert format_cuda_version(None) == "unknown"


def test_strict_cuda_refuses_with_the_reason():
    facts = healthy(libcuda_error=f"libcuda.so.1: {NO_FILE}")
    with pytest.raises(DeviceUnavailable, match="libcuda.so.1"):
        plan_device("cuda", 0, facts)


def test_auto_falls_back_and_cpu_needs_no_probe():
    facts = healthy(libcuda_error=f"libcuda.so.1: {NO_FILE}")
    plan = plan_device("auto", 0, facts)
    assert plan.providers == [CPU_EP] and "libcuda.so.1" in plan.cpu_reason
    assert plan_device("cpu", 0).providers == [CPU_EP]
    cuda_plan = plan_device("auto", 0, healthy())
    assert cuda_plan.providers[0] == (CUDA_EP, {"device_id": 0, "cudnn_conv_algo_search": "HEURISTIC",
                                                "arena_extend_strategy": "kSameAsRequested", "use_tf32": "0"})



@pytest.mark.skipif(driver_present(), reason="this host has an NVIDIA driver; the GPU tests cover it")
def test_real_probe_on_this_gpu_less_host_names_the_missing_libraries():
    facts = probe_cuda()
    reason = explain_cpu_fallback(facts)
    assert facts.ort_packages == ["onnxruntime-gpu"]
    assert CUDA_EP in facts.available_providers
    assert "libcuda.so.1" in reason
    # The CUDA EP's own first missing dependency, as the loader names it.
    assert facts.provider_library_error and "cannot open shared object file" in facts.provider_library_error
    assert facts.provider_library_error.split(":")[0] in reason
