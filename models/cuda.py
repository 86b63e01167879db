"""Why is it on CPU? Probe the facts that decide whether ONNX Runtime's CUDA
execution provider can run, then explain them in one specific sentence.

Probing (``probe_cuda``) touches the host: it loads libraries and reads the
environment. Explaining (``explain_cpu_fallback``) is a pure function of the
recorded facts, so every broken host we know of is a unit test.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import io
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from models.cuda_builds import build, no_code_reason

CUDA_EP = "CUDAExecutionProvider"
CPU_EP = "CPUExecutionProvider"

# CUresult codes from cuda.h that the explanation distinguishes.
CUDA_SUCCESS = 0
CUDA_ERROR_NO_DEVICE = 100
CUDA_ERROR_INSUFFICIENT_DRIVER = 35
# CUdevice_attribute values of cuda.h.
CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75
CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76


@dataclass
class CudaFacts:
    """What the host looks like to this process, as plain data."""

    ort_packages: list[str] = field(default_factory=list)
    ort_version: str = ""
    ort_build_cuda: str = ""
    available_providers: list[str] = field(default_factory=list)
    cuda_visible_devices: str | None = None
    libcuda_error: str | None = None
    driver_cuda_version: int | None = None
    cu_init_result: int | None = None
    device_count: int | None = None
    # Per visible device, as the driver reports it: [[6, 1]] for a GeForce MX230.
    compute_capabilities: list[list[int]] = field(default_factory=list)
    provider_library_error: str | None = None

    def compute_capability(self, device_id: int) -> tuple[int, int] | None:
        if 0 <= device_id < len(self.compute_capabilities):
            major, minor = self.compute_capabilities[device_id]
            return major, minor
        return None

    def to_dict(self) -> dict:
        return asdict(self)


def probe_cuda() -> CudaFacts:
    """Gather the facts. Never raises: a failed probe is itself a fact."""
    facts = CudaFacts(cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"))
    facts.ort_packages = installed_ort_packages()
    try:
        import onnxruntime as ort
    except ImportError as exc:
        facts.provider_library_error = f"onnxruntime cannot be imported: {exc}"
        return facts
    facts.ort_version = ort.__version__
    facts.available_providers = list(ort.get_available_providers())
    facts.ort_build_cuda = _ort_build_cuda_version()
    _probe_driver(facts)
    if CUDA_EP in facts.available_providers:
        if facts.libcuda_error and not hasattr(ort, "preload_dlls"):
            # onnxruntime-gpu 1.20 and older: the CUDA provider's static
            # initialiser dlopens libcuda.so.1 and aborts the process without it.
            facts.provider_library_error = "not loaded: this onnxruntime-gpu's CUDA provider needs libcuda.so.1 to load"
        else:
            _preload_pip_cuda_libraries()
            facts.provider_library_error = _probe_provider_library(Path(ort.__file__).parent / "capi")
    return facts


def installed_ort_packages() -> list[str]:
    names = set()
    for dist in importlib.metadata.distributions():
        name = (dist.metadata.get("Name") or "").lower()
        if name.startswith("onnxruntime") and not name.startswith("onnxruntime-extensions"):
            names.add(name)
    return sorted(names)


def _ort_build_cuda_version() -> str:
    try:
        from onnxruntime.capi import build_and_package_info as info
    except ImportError:
        # onnxruntime-gpu 1.20 and older do not say; the build table read it from their cubins.
        import onnxruntime as ort

        known = build(ort.__version__)
        return known.cuda_version if known else ""
    return str(getattr(info, "cuda_version", "") or "")


def _probe_driver(facts: CudaFacts) -> None:
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        facts.libcuda_error = str(exc)
        return
    version = ctypes.c_int(0)
    if libcuda.cuDriverGetVersion(ctypes.byref(version)) == CUDA_SUCCESS:
        facts.driver_cuda_version = version.value
    facts.cu_init_result = libcuda.cuInit(0)
    if facts.cu_init_result == CUDA_SUCCESS:
        count = ctypes.c_int(0)
        if libcuda.cuDeviceGetCount(ctypes.byref(count)) == CUDA_SUCCESS:
            facts.device_count = count.value
            facts.compute_capabilities = [_compute_capability(libcuda, i) for i in range(count.value)]
    elif facts.cu_init_result == CUDA_ERROR_NO_DEVICE:
        facts.device_count = 0


def _compute_capability(libcuda, ordinal: int) -> list[int]:
    device, major, minor = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(0)
    libcuda.cuDeviceGet(ctypes.byref(device), ordinal)
    libcuda.cuDeviceGetAttribute(ctypes.byref(major), CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, device)
    libcuda.cuDeviceGetAttribute(ctypes.byref(minor), CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, device)
    return [major.value, minor.value]


def _preload_pip_cuda_libraries() -> None:
    """Load CUDA/cuDNN from the nvidia-* wheels (onnxruntime-gpu[cuda,cudnn]) when installed.

    ``preload_dlls`` prints its own warnings; they are captured because the
    explanation below reports the same facts more precisely.
    """
    if not any(p.startswith("nvidia-") for p in _distribution_names()):
        return
    import onnxruntime as ort

    if not hasattr(ort, "preload_dlls"):
        _load_nvidia_wheel_libraries()
        return
    with contextlib.redirect_stdout(io.StringIO()):
        with contextlib.suppress(Exception):
            ort.preload_dlls()


# Load order for the nvidia-* wheels' libraries: each after those it links to.
_NVIDIA_WHEEL_DIRS = ("cuda_runtime", "cuda_nvrtc", "nvjitlink", "cublas", "cufft", "curand", "cudnn")


def _dependencies_first(library: Path) -> tuple[bool, str]:
    # libcublasLt before libcublas; cuDNN's engine libraries (libcudnn_*) before libcudnn.
    return not ("Lt." in library.name or "_" in library.name), library.name


def _load_nvidia_wheel_libraries() -> None:
    """What ``preload_dlls`` does, for onnxruntime-gpu before 1.21 (the Maxwell line, 1.20.x).

    Those builds find CUDA only on the loader's path; loaded here first, with
    RTLD_GLOBAL, the wheels' libraries satisfy the CUDA provider's dlopen. A
    library that fails to load is left for the provider probe to name.
    """
    import site

    roots = [Path(p) / "nvidia" for p in (*site.getsitepackages(), site.getusersitepackages())]
    for name in _NVIDIA_WHEEL_DIRS:
        for root in roots:
            for library in sorted((root / name / "lib").glob("lib*.so*"), key=_dependencies_first):
                with contextlib.suppress(OSError):
                    ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)


def _distribution_names() -> set[str]:
    return {(d.metadata.get("Name") or "").lower() for d in importlib.metadata.distributions()}


def _probe_provider_library(capi_dir: Path) -> str | None:
    """dlopen the CUDA EP the way ORT would; the loader names the first missing library."""
    try:
        ctypes.CDLL(str(capi_dir / "libonnxruntime_providers_shared.so"), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(str(capi_dir / "libonnxruntime_providers_cuda.so"))
    except OSError as exc:
        return str(exc).replace(str(capi_dir) + os.sep, "")
    return None


def format_cuda_version(encoded: int | None) -> str:
    """cuDriverGetVersion's 12040 -> '12.4'."""
    if encoded is None:
        return "unknown"
    return f"{encoded // 1000}.{(encoded % 1000) // 10}"


def _major(version: str) -> int | None:
    try:
        return int(version.split(".")[0])
    except (ValueError, IndexError):
        return None


def explain_cpu_fallback(facts: CudaFacts, device_id: int = 0) -> str | None:
    """The specific reason the CUDA EP cannot run here, or None when nothing blocks it.

    Checks run from the most fundamental to the most specific so that the
    first reason given is the one to fix first; a missing driver also lists
    the missing CUDA libraries, since both must be fixed.
    """
    packages = set(facts.ort_packages)
    if "onnxruntime" in packages and any(p.startswith("onnxruntime-gpu") for p in packages):
        return (
            "both onnxruntime and onnxruntime-gpu are installed; they share one module and the "
            "CPU build wins: run `pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu`"
        )
    if CUDA_EP not in facts.available_providers:
        installed = ", ".join(facts.ort_packages) or "no onnxruntime package"
        return (
            f"only a CPU build of onnxruntime is installed ({installed}, providers: "
            f"{', '.join(facts.available_providers) or 'none'}): install onnxruntime-gpu instead"
        )
    if facts.libcuda_error:
        reason = f"no NVIDIA driver: libcuda.so.1 cannot be loaded ({facts.libcuda_error})"
        if facts.provider_library_error:
            reason += f"; the CUDA EP library also fails to load: {facts.provider_library_error}"
        return reason
    visible = facts.cuda_visible_devices
    if visible is not None and visible.strip() in ("", "-1", "none", "NoDevFiles"):
        return f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU from this process"
    if facts.cu_init_result == CUDA_ERROR_NO_DEVICE or facts.device_count == 0:
        # A value that names GPUs may name none this machine has, or there are none.
        names = f" (CUDA_VISIBLE_DEVICES={visible!r}: does it name a GPU of this machine?)" if visible else ""
        return f"the NVIDIA driver is loaded but reports no CUDA device (cuInit: CUDA_ERROR_NO_DEVICE){names}"
    build_major = _major(facts.ort_build_cuda)
    if facts.driver_cuda_version is not None and build_major is not None:
        driver_major = facts.driver_cuda_version // 1000
        if driver_major < build_major:
            return (
                f"onnxruntime-gpu {facts.ort_version} is built for CUDA {facts.ort_build_cuda} but the "
                f"driver supports CUDA {format_cuda_version(facts.driver_cuda_version)}: upgrade the "
                f"NVIDIA driver, or install the onnxruntime-gpu release built for CUDA {driver_major}"
            )
    if facts.cu_init_result == CUDA_ERROR_INSUFFICIENT_DRIVER:
        return (
            "the NVIDIA kernel module is older than the driver library libcuda.so.1 (cuInit: "
            "CUDA_ERROR_INSUFFICIENT_DRIVER): after a driver update, reboot or reload the nvidia module; "
            "in a container, the CUDA forward-compatibility libraries need a newer host driver"
        )
    if facts.cu_init_result not in (None, CUDA_SUCCESS):
        return f"the NVIDIA driver failed to initialise (cuInit returned CUresult {facts.cu_init_result})"
    if facts.provider_library_error:
        return (
            f"the CUDA EP library cannot load: {facts.provider_library_error}; install the CUDA "
            f"{facts.ort_build_cuda or ''} and cuDNN libraries it needs (e.g. "
            "`pip install 'onnxruntime-gpu[cuda,cudnn]'`) or put them on LD_LIBRARY_PATH"
        )
    if facts.device_count is not None and device_id >= facts.device_count:
        return (
            f"GPU {device_id} was asked for (IDENT_GPU_IDS) but only {facts.device_count} "
            f"GPU(s) are visible to this process"
        )
    cc = facts.compute_capability(device_id)
    if cc is not None:
        # What the wheel carries decides, not what its CUDA version could compile for.
        return no_code_reason(facts.ort_version, cc)
    return None
