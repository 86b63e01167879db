"""Checks: pure functions over the probes dict.

``evaluate(probes)`` turns what the probes recorded into the checklist; nothing
here touches the host.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterable, Mapping, Sequence

from ident.doctor.parsers import (
    _ANSI,
    _LOG_LINE,
    _major,
    cuda_library_sonames,
    parse_ldconfig,
    parse_node_placements,
    parse_smi_cuda_version,
)
from models import cuda_builds
from models.catalog import CUDA_CONTEXT_MIB
from models.cuda import (
    CPU_EP,
    CUDA_EP,
    CUDA_ERROR_NO_DEVICE,
    CUDA_SUCCESS,
    CudaFacts,
    explain_cpu_fallback,
    format_cuda_version,
)
from models.cuda_builds import MIN_DRIVER_BRANCH, architecture, parse_compute_cap, parse_smi_query
from tasks.errors import IdentError

OK = "ok"
WARN = "warn"
FAIL = "fail"
SKIP = "skip"
STATUSES = (OK, WARN, FAIL, SKIP)

# cuInit's answer when the loader found the CUDA toolkit's link-time stub
# (…/lib64/stubs/libcuda.so) instead of the driver's libcuda.
CUDA_ERROR_STUB_LIBRARY = 34

NVIDIA_VENDOR = "0x10de"
VENDORS = {NVIDIA_VENDOR: "NVIDIA", "0x1002": "AMD", "0x8086": "Intel", "0x1a03": "ASPEED", "0x102b": "Matrox"}
# The GPUs a laptop pairs with an NVIDIA dGPU; a server's BMC display adapter
# (ASPEED, Matrox) sits beside its NVIDIA GPUs without making it "hybrid".
INTEGRATED_VENDORS = {"0x1002", "0x8086"}

ORT_GPU_SPEC = "onnxruntime-gpu[cuda,cudnn]"
# For an onnxruntime-gpu that models/cuda_builds.json does not list: the lowest
# compute capability each CUDA major still compiles for.
MIN_COMPUTE_CAPABILITY = {11: (3, 5), 12: (5, 0), 13: (7, 5)}

# Distributions that all install the one ``onnxruntime`` Python module; two of
# them together overwrite each other's files.
ORT_RUNTIME_DISTS = {
    "onnxruntime",
    "onnxruntime-gpu",
    "onnxruntime-directml",
    "onnxruntime-openvino",
    "onnxruntime-qnn",
    "onnxruntime-training",
    "ort-nightly",
    "ort-nightly-gpu",
}

PRIME_VARIABLES = (
    "__NV_PRIME_RENDER_OFFLOAD",
    "__NV_PRIME_RENDER_OFFLOAD_PROVIDER",
    "__GLX_VENDOR_LIBRARY_NAME",
    "__VK_LAYER_NV_optimus",
    "DRI_PRIME",
)
HIDING_VISIBLE_DEVICES = ("", "-1", "none", "NoDevFiles")

DRIVER_FIX = (
    "install the NVIDIA driver (Ubuntu: `sudo ubuntu-drivers install`; Debian: `sudo apt install "
    "nvidia-driver`) and reboot; inside a container, start it with GPU access (`docker run --gpus all`, "
    "or compose.gpu.yml's deploy.resources.reservations.devices)"
)
TOOLKIT_FIX = (
    "on the host, install the NVIDIA Container Toolkit and register it with Docker (`sudo nvidia-ctk runtime "
    "configure --runtime=docker && sudo systemctl restart docker`); then run the container with `docker run "
    "--gpus all …`, or in Compose reserve the GPU under deploy.resources.reservations.devices "
    "(driver: nvidia, capabilities: [gpu]) as compose.gpu.yml does"
)

CONTAINER_POINTER = "give the container GPU access: see the 'container GPU access' check"
GPU_SELECTION = "GPU selection (hybrid graphics)"
NO_GPU_POINTER = f"none: this machine has no NVIDIA GPU (see the '{GPU_SELECTION}' check)"


class DoctorError(IdentError):
    """The doctor could not do its job: unreadable probes file, or a bug (exit code 2)."""


@dataclass(frozen=True)
class Check:
    """One line of the checklist."""

    name: str
    status: str
    detail: str
    fix: str | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise DoctorError(f"check {self.name!r} has unknown status {self.status!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DoctorReport:
    checks: list[Check]
    cuda_usable: bool
    verdict: str
    probes: dict = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return 0 if self.cuda_usable else 1

    def to_dict(self, include_probes: bool = False) -> dict:
        data = {
            "cuda_usable": self.cuda_usable,
            "verdict": self.verdict,
            "checks": [c.to_dict() for c in self.checks],
        }
        if include_probes:
            data["probes"] = self.probes
        return data


def _facts(probes: Mapping) -> CudaFacts:
    return CudaFacts(**(probes.get("cuda_facts") or {}))


def _smi_gpus(probes: Mapping) -> list[dict]:
    query = (probes.get("nvidia_smi") or {}).get("query") or {}
    if query.get("rc") != 0:
        return []
    return parse_smi_query(query.get("stdout", ""))


def _smi_cuda(probes: Mapping) -> str | None:
    header = (probes.get("nvidia_smi") or {}).get("header") or {}
    return parse_smi_cuda_version(header.get("stdout", "")) if header.get("rc") == 0 else None


def _driver_cuda(probes: Mapping) -> str | None:
    """The newest CUDA the driver supports, from the driver itself or from nvidia-smi."""
    facts = _facts(probes)
    if facts.driver_cuda_version:
        return format_cuda_version(facts.driver_cuda_version)
    return _smi_cuda(probes)


def _gpu_ids(probes: Mapping) -> list[int]:
    ids = (probes.get("settings") or {}).get("gpu_ids") or [0]
    return [int(i) for i in ids]


def _in_container(probes: Mapping) -> bool:
    return bool((probes.get("container") or {}).get("in_container"))


def _first_line(text: str) -> str:
    for line in (text or "").splitlines():
        if line.strip():
            return line.strip()
    return ""


def _join(items: Iterable[str], limit: int = 8) -> str:
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def check_onnxruntime(probes: Mapping) -> Check:
    name = "onnxruntime packages"
    ort = probes.get("ort") or {}
    packages: dict = ort.get("packages") or {}
    listed = _join(f"{p} {v}" for p, v in sorted(packages.items())) or "none"
    if ort.get("import_error"):
        return Check(
            name,
            FAIL,
            f"onnxruntime cannot be imported: {ort['import_error']} (installed: {listed})",
            f"`pip install '{ORT_GPU_SPEC}'`",
        )
    runtimes = sorted(p for p in packages if p in ORT_RUNTIME_DISTS)
    if len(runtimes) > 1:
        return Check(
            name,
            FAIL,
            f"{' and '.join(runtimes)} are all installed: they share one `onnxruntime` module and the one "
            f"installed last overwrote the others' files, so the CPU build usually wins",
            f"`pip uninstall -y {' '.join(runtimes)} && pip install '{ORT_GPU_SPEC}'`",
        )
    providers = ort.get("providers") or []
    version = ort.get("version") or "?"
    if CUDA_EP not in providers:
        return Check(
            name,
            FAIL,
            f"a CPU-only build of onnxruntime {version} is installed ({listed}); providers: "
            f"{', '.join(providers) or 'none'}",
            f"`pip uninstall -y {' '.join(runtimes) or 'onnxruntime'} && pip install '{ORT_GPU_SPEC}'`",
        )
    build = ort.get("build_cuda") or "unknown"
    return Check(name, OK, f"{listed}; built for CUDA {build}; providers: {', '.join(providers)}")


def check_nvidia_smi(probes: Mapping) -> Check:
    name = "nvidia-smi"
    smi = probes.get("nvidia_smi") or {}
    facts = _facts(probes)
    driver_ok = facts.libcuda_error is None and facts.cu_init_result == CUDA_SUCCESS
    if not smi.get("path"):
        if driver_ok:
            return Check(
                name,
                WARN,
                "nvidia-smi is not on PATH, but the driver's libcuda works",
                "inside a container, add the 'utility' capability (NVIDIA_DRIVER_CAPABILITIES=compute,utility) "
                "to get nvidia-smi; otherwise nothing to do",
            )
        return Check(
            name,
            FAIL,
            "nvidia-smi is not on PATH: no NVIDIA driver on this host, or none mounted into this container",
            CONTAINER_POINTER if _in_container(probes) else DRIVER_FIX,
        )
    query = smi.get("query") or {}
    if query.get("rc") != 0:
        said = _first_line(query.get("stdout", "")) or _first_line(query.get("stderr", "")) or query.get("error", "")
        return Check(
            name,
            FAIL,
            f"nvidia-smi failed (exit {query.get('rc')}): {said}",
            "the driver is installed but its kernel module is not running: reboot after installing it, or "
            "`sudo modprobe nvidia`; see `sudo dmesg | grep -i nvidia` (with Secure Boot on, an unsigned module is "
            "refused: `mokutil --sb-state`)",
        )
    gpus = _smi_gpus(probes)
    if not gpus:
        return Check(name, FAIL, "nvidia-smi lists no GPU", DRIVER_FIX)
    driver = gpus[0]["driver_version"]
    cuda = _smi_cuda(probes) or "unknown"
    listed = "; ".join(
        f"GPU {g['index']} {g['name']} (compute {g['compute_cap']}, {g['memory_total']}, {g['pci_bus_id']})"
        for g in gpus
    )
    return Check(name, OK, f"{listed}; driver {driver}, supports CUDA up to {cuda}")


def check_kernel_module(probes: Mapping) -> Check:
    name = "nvidia kernel module"
    module = probes.get("nvidia_module") or {}
    loaded = set(module.get("modules") or [])
    version = _first_line(module.get("proc_version") or "")
    if version:
        return Check(name, OK, re.sub(r"\s+", " ", version))
    if "nouveau" in loaded:
        return Check(
            name,
            FAIL,
            "the open-source nouveau driver is loaded instead of NVIDIA's; CUDA needs the nvidia module",
            "install NVIDIA's driver (it blacklists nouveau) and reboot: Ubuntu `sudo ubuntu-drivers install`, "
            "Debian `sudo apt install nvidia-driver`",
        )
    if "nvidia" in loaded:
        return Check(
            name,
            WARN,
            "the nvidia module is listed in /proc/modules but /proc/driver/nvidia/version is missing",
            "reload it: `sudo rmmod nvidia_uvm nvidia_drm nvidia_modeset nvidia && sudo modprobe nvidia`",
        )
    fix = "`sudo modprobe nvidia`; if that fails, see `sudo dmesg | grep -i nvidia` (Secure Boot: `mokutil --sb-state`)"
    if _hybrid(probes):
        fix += "; on a hybrid laptop switched to the integrated GPU, `sudo prime-select on-demand` and reboot"
    if _in_container(probes):
        fix = "the host has no NVIDIA driver loaded (or this container hides /proc/driver): " + fix
    return Check(name, FAIL, "the nvidia kernel module is not loaded (/proc/driver/nvidia/version is missing)", fix)


def check_container(probes: Mapping) -> Check:
    name = "container GPU access"
    container = probes.get("container") or {}
    if not container.get("in_container"):
        return Check(name, SKIP, "not running in a container")
    evidence = ", ".join(container.get("evidence") or []) or "container markers"
    devices = container.get("dev_nvidia") or []
    if devices:
        return Check(name, OK, f"in a container ({evidence}) with {', '.join(devices)}")
    env = probes.get("env") or {}
    detail = f"in a container ({evidence}) with no /dev/nvidia* device: it was started without GPU access"
    if env.get("NVIDIA_VISIBLE_DEVICES") in ("void", "none", ""):
        detail += f" (NVIDIA_VISIBLE_DEVICES={env['NVIDIA_VISIBLE_DEVICES']!r})"
    return Check(name, FAIL, detail, TOOLKIT_FIX)


def _gpus_sysfs(probes: Mapping) -> list[dict]:
    return list(probes.get("gpus_sysfs") or [])


def _no_nvidia_gpu(probes: Mapping) -> bool:
    """Whether the PCI bus was read and holds no NVIDIA GPU, and nothing else saw one.

    Every NVIDIA GPU is a display-class PCI device, which the sysfs probe lists
    with or without a driver; a container sees its host's bus there too.
    """
    return (
        bool(probes.get("pci_devices"))
        and not any(g.get("vendor") == NVIDIA_VENDOR for g in _gpus_sysfs(probes))
        and not _smi_gpus(probes)
        and not _facts(probes).device_count
    )


def _no_gpu_fix(probes: Mapping) -> str:
    if (probes.get("settings") or {}).get("device") == "cpu":
        return "nothing to do for IDENT_DEVICE=cpu; for CUDA, run the worker on a host with an NVIDIA GPU"
    return "run the worker on a host with an NVIDIA GPU, or set IDENT_DEVICE=cpu to make CPU the stated choice"


def _hybrid(probes: Mapping) -> bool:
    vendors = {g.get("vendor") for g in _gpus_sysfs(probes)}
    return NVIDIA_VENDOR in vendors and bool(vendors & INTEGRATED_VENDORS)


def _describe_gpu(gpu: Mapping) -> str:
    vendor = VENDORS.get(gpu.get("vendor", ""), gpu.get("vendor", "?"))
    where = gpu.get("card") or "no DRM card"
    parts = [f"driver {gpu.get('driver') or 'none'}"]
    if gpu.get("boot_vga") is not None:
        parts.append(f"boot_vga={gpu['boot_vga']}")
    if gpu.get("runtime_status"):
        parts.append(f"power {gpu['runtime_status']}")
    return f"{vendor} {where} [{gpu.get('pci') or '?'}] ({', '.join(parts)})"


def check_gpu_selection(probes: Mapping) -> Check:
    """Hybrid graphics: an NVIDIA (often MX) dGPU beside an Intel/AMD iGPU."""
    name = GPU_SELECTION
    gpus = _gpus_sysfs(probes)
    if not gpus and _no_nvidia_gpu(probes):
        return Check(
            name,
            FAIL,
            f"no NVIDIA GPU in this machine: none of its {probes['pci_devices']} PCI devices is a display device; "
            "CUDA needs an NVIDIA GPU, so ONNX Runtime runs on the CPU",
            _no_gpu_fix(probes),
        )
    if not gpus:
        return Check(name, SKIP, "no display-class PCI device or /sys/class/drm card visible (server, VM or container)")
    nvidia = [g for g in gpus if g.get("vendor") == NVIDIA_VENDOR]
    others = [g for g in gpus if g.get("vendor") in INTEGRATED_VENDORS]
    listed = "; ".join(_describe_gpu(g) for g in gpus)
    if not nvidia:
        status = FAIL if not _smi_gpus(probes) else WARN
        return Check(
            name,
            status,
            f"no NVIDIA GPU here, only {listed}: CUDA needs an NVIDIA GPU, so ONNX Runtime runs on the CPU",
            _no_gpu_fix(probes),
        )
    unbound = [g for g in nvidia if g.get("driver") != "nvidia"]
    if unbound:
        bound_to = ", ".join(f"{g.get('pci')} → {g.get('driver') or 'no driver'}" for g in unbound)
        return Check(
            name,
            FAIL,
            f"NVIDIA GPU not bound to the nvidia driver ({bound_to}); {listed}",
            "install NVIDIA's driver (it replaces nouveau) and reboot, or `sudo modprobe nvidia`",
        )
    if not others:
        return Check(name, OK, f"{listed}: no integrated GPU to confuse with the NVIDIA one")
    env = probes.get("env") or {}
    display = next((g for g in others if g.get("boot_vga") == "1"), others[0])
    offload = env.get("__NV_PRIME_RENDER_OFFLOAD") == "1" and env.get("__GLX_VENDOR_LIBRARY_NAME") == "nvidia"
    prime = ", ".join(f"{k}={env[k]}" for k in PRIME_VARIABLES if k in env) or "no PRIME variables set"
    gl = (
        "NVIDIA (PRIME render offload requested)"
        if offload
        else f"{VENDORS.get(display.get('vendor'), '?')} {display.get('card') or display.get('pci')} "
        "(the boot VGA device)"
    )
    detail = (
        f"hybrid graphics: {listed}. CUDA talks to the NVIDIA GPU directly, so ONNX Runtime gets "
        f"{nvidia[0].get('card') or nvidia[0].get('pci')}; PRIME variables ({prime}) only steer OpenGL/Vulkan, "
        f"which would get {gl}"
    )
    suspended = [g for g in nvidia if g.get("runtime_status") == "suspended"]
    facts = _facts(probes)
    cuda_failed = facts.cu_init_result not in (None, CUDA_SUCCESS) or facts.device_count == 0
    if suspended and cuda_failed:
        pci = suspended[0].get("pci") or "<pci-id>"
        return Check(
            name,
            FAIL,
            detail + "; the NVIDIA GPU is runtime-suspended and cuInit did not find it",
            f"keep the dGPU powered: `echo on | sudo tee /sys/bus/pci/devices/{pci}/power/control`, "
            "or select it with `sudo prime-select nvidia` (or on-demand) and reboot",
        )
    if suspended:
        detail += "; the NVIDIA GPU is runtime-suspended now, which is normal: the first CUDA call wakes it"
    return Check(name, OK, detail)


def check_driver_library(probes: Mapping) -> Check:
    name = "driver library (libcuda.so.1)"
    facts = _facts(probes)
    cached = parse_ldconfig(probes.get("ldconfig") or "").get("libcuda.so.1", [])
    if facts.libcuda_error:
        where = f"; ldconfig lists {', '.join(cached)}" if cached else "; not in `ldconfig -p` either"
        fix = CONTAINER_POINTER if _in_container(probes) else DRIVER_FIX
        return Check(
            name,
            FAIL,
            f"libcuda.so.1 cannot be loaded ({facts.libcuda_error}){where}. It ships with the NVIDIA driver, "
            "not with the CUDA toolkit or any pip wheel",
            fix,
        )
    driver_cuda = format_cuda_version(facts.driver_cuda_version)
    if facts.cu_init_result == CUDA_ERROR_STUB_LIBRARY:
        return Check(
            name,
            FAIL,
            "the loader found the CUDA toolkit's stub libcuda (cuInit: CUDA_ERROR_STUB_LIBRARY), not the driver's",
            "remove the toolkit's lib64/stubs directory from LD_LIBRARY_PATH, and install the NVIDIA driver",
        )
    if facts.cu_init_result == CUDA_ERROR_NO_DEVICE or facts.device_count == 0:
        return Check(
            name,
            FAIL,
            f"libcuda loads (driver supports CUDA {driver_cuda}) but cuInit finds no CUDA device",
            "check CUDA_VISIBLE_DEVICES and, in a container, the GPU reservation; see `nvidia-smi`",
        )
    if facts.cu_init_result not in (None, CUDA_SUCCESS):
        return Check(
            name,
            FAIL,
            f"libcuda loads but cuInit returned CUresult {facts.cu_init_result}",
            "see `sudo dmesg | grep -i nvrm`; a driver/module version mismatch after an upgrade needs a reboot",
        )
    return Check(
        name,
        OK,
        f"libcuda.so.1 loads; driver supports CUDA {driver_cuda}; "
        f"{facts.device_count if facts.device_count is not None else '?'} CUDA device(s)",
    )


def check_cuda_libraries(probes: Mapping) -> Check:
    name = "CUDA/cuDNN libraries"
    ort = probes.get("ort") or {}
    build = ort.get("build_cuda") or ""
    if not build:
        return Check(name, SKIP, "onnxruntime is not a CUDA build: there are no CUDA libraries for it to load")
    libraries = probes.get("libraries") or {}
    cache = parse_ldconfig(probes.get("ldconfig") or "")
    pip = (probes.get("pip") or {}).get("nvidia_libs") or {}
    wheels = (probes.get("pip") or {}).get("nvidia") or {}
    missing, optional_missing, broken, found = [], [], [], []
    for lib in cuda_library_sonames(build):
        if lib.soname == "libcuda.so.1":
            continue  # the driver's own check says why and how
        probe = libraries.get(lib.soname) or {}
        if probe.get("loaded"):
            where = probe.get("path") or (pip.get(lib.soname) or (cache.get(lib.soname) or ["loader path"])[0])
            found.append(f"{lib.soname} ({where})")
        elif cache.get(lib.soname) or pip.get(lib.soname):
            broken.append(f"{lib.soname}: {probe.get('error') or 'found on disk but not loadable'}")
        elif lib.required:
            missing.append(lib.soname)
        else:
            optional_missing.append(lib.soname)
    facts = _facts(probes)
    wheel_text = (
        f"; nvidia wheels: {_join(f'{n} {v}' for n, v in sorted(wheels.items()))}"
        if wheels
        else "; no nvidia-* pip wheels"
    )
    major = _major(build)
    fix = (
        f"`pip install '{ORT_GPU_SPEC}'` (its extras bring the nvidia-*-cu{major} wheels, which onnxruntime preloads), "
        f"or install CUDA {major} and cuDNN 9 from NVIDIA's apt repository (cuda-libraries-{major}-0, "
        f"cudnn9-cuda-{major}) and run `sudo ldconfig`, or put their lib directory on LD_LIBRARY_PATH"
    )
    if missing or broken:
        parts = []
        if missing:
            parts.append(f"cannot find {', '.join(missing)} (not loadable, not in `ldconfig -p`, in no nvidia-* wheel)")
        if broken:
            parts.append("present but failing to load: " + "; ".join(broken))
        if found:
            parts.append(f"found: {_join(found)}")
        return Check(name, FAIL, f"onnxruntime's CUDA {build} EP " + "; ".join(parts) + wheel_text, fix)
    if facts.provider_library_error and not facts.libcuda_error:
        return Check(
            name,
            FAIL,
            f"libonnxruntime_providers_cuda.so does not load: {facts.provider_library_error}{wheel_text}",
            fix,
        )
    detail = f"all found: {_join(found)}{wheel_text}"
    if optional_missing:
        return Check(
            name,
            WARN,
            detail + f"; not found: {', '.join(optional_missing)} (needed only by FFT operators)",
            f"`pip install nvidia-cufft-cu{major}` if a model uses DFT/STFT on the GPU",
        )
    return Check(name, OK, detail)


def _host_choice(probes: Mapping, override: str | None = None) -> cuda_builds.Choice:
    """The install line scripts/setup.sh would pick for this host's GPUs."""
    return cuda_builds.choose(_smi_gpus(probes), override=override)


def check_versions(probes: Mapping) -> Check:
    """onnxruntime's build CUDA vs the driver's CUDA vs the code its wheel carries for each GPU."""
    name = "CUDA versions (build / driver / GPU)"
    ort = probes.get("ort") or {}
    build = ort.get("build_cuda") or ""
    build_major = _major(build)
    if build_major is None:
        return Check(name, SKIP, "onnxruntime is not a CUDA build")
    version = ort.get("version") or "?"
    package = f"onnxruntime-gpu {version}"
    driver_cuda = _driver_cuda(probes)
    gpus = _smi_gpus(probes)
    if driver_cuda is None and not gpus:
        return Check(name, SKIP, f"{package} is built for CUDA {build}; no NVIDIA driver to compare it with")
    problems, fixes = [], []
    driver_text = ""
    if driver_cuda is not None:
        driver_version = gpus[0]["driver_version"] if gpus else "?"
        driver_text = f"driver {driver_version} supports CUDA up to {driver_cuda}"
        driver_major = _major(driver_cuda)
        if driver_major is not None and driver_major < build_major:
            problems.append(f"{package} is built for CUDA {build} but the {driver_text}")
            fix = f"upgrade the NVIDIA driver to branch {MIN_DRIVER_BRANCH.get(build_major, '?')} or newer"
            if gpus:
                choice = _host_choice(probes)
                if choice.line != "cpu":
                    fix += f", or install the line built for this driver: {choice.advice()}"
            fixes.append(fix)
    known = cuda_builds.build(version)
    minimum = MIN_COMPUTE_CAPABILITY.get(build_major)
    wanted = set(_gpu_ids(probes))
    too_old, fine = [], []
    for gpu in gpus:
        cc = parse_compute_cap(gpu["compute_cap"])
        if cc is None:
            continue
        label = f"GPU {gpu['index']} {gpu['name']} is sm_{cc[0]}{cc[1]} ({architecture(cc)})"
        runs = known.runs_on(cc) if known else not (minimum and cc < minimum)
        (fine if runs else too_old).append((gpu["index"], label, cc, gpu))
    status = FAIL if problems else OK
    if too_old:
        labels = "; ".join(label for _, label, _, _ in too_old)
        if known:
            carried = f"{package} (CUDA {known.cuda_version}) carries {known.code_listing()}: nothing that runs on these cards"
        else:
            carried = (f"{package} is not in models/cuda_builds.json; CUDA {build_major} builds run only on "
                       f"sm_{minimum[0]}{minimum[1]} ({architecture(minimum)}) and newer")
        problems.append(f"{labels}: {carried}"
                        + (" — CUDA 13 dropped Maxwell, Pascal and Volta" if build_major >= 13 else ""))
        # Only a GPU the worker is configured to use blocks it; with no usable
        # GPU at all, the configured index falls back to the first one.
        blocked = [i for i, *_ in too_old if i in wanted] or ([] if fine else [too_old[0][0]])
        _, _, cc, gpu = min(too_old, key=lambda row: row[2])
        fix = cuda_builds.choose_for(cc, cuda_builds.driver_branch(gpu["driver_version"]),
                                     card=f"GPU {gpu['index']} {gpu['name']}").advice()
        if blocked:
            status = FAIL
        else:
            status = max(status, WARN, key=_severity)
            fix = f"keep IDENT_GPU_IDS on the supported GPU(s) ({', '.join(str(i) for i, *_ in fine)}), or " + fix
        fixes.append(fix)
    if problems:
        return Check(name, status, "; ".join(problems), "; ".join(fixes))
    parts = [f"{package} is built for CUDA {build}"]
    if driver_text:
        parts.append(driver_text)
    if fine:
        carries = f", which {package} carries code for ({known.code_listing()})" if known else ""
        parts.append("; ".join(label for _, label, _, _ in fine) + carries)
    return Check(name, OK, "; ".join(parts))


def _mib(text: str) -> int | None:
    match = re.match(r"^\s*(\d+)\s*MiB", text or "")
    return int(match.group(1)) if match else None


def check_gpu_memory(probes: Mapping) -> Check:
    """The configured models x pool processes, as estimated in the catalog, against the card's memory."""
    name = "GPU memory"
    settings = probes.get("settings") or {}
    gpus = _smi_gpus(probes)
    if not gpus or settings.get("error") or settings.get("device") == "cpu":
        return Check(name, SKIP, "no NVIDIA GPU to weigh the models against" if not gpus else
                     "the workers do not use the GPU (IDENT_DEVICE=cpu or a settings error)")
    ids = _gpu_ids(probes)
    gpu = next((g for g in gpus if g["index"] == ids[0]), gpus[0])
    total = _mib(gpu["memory_total"])
    estimate = settings.get("gpu_memory") or {}
    if total is None or not estimate:
        return Check(name, SKIP, f"GPU {gpu['index']} reports memory.total {gpu['memory_total']!r}, "
                                 "or no model estimate was probed")
    need = estimate["total_mib"]
    parts = "; ".join(f"{kind}: {row['processes']} process(es) x ({CUDA_CONTEXT_MIB} MiB CUDA context + "
                      + " + ".join(f"{model} {mib}" for model, mib in row["models"].items()) + " MiB)"
                      for kind, row in estimate["workers"].items())
    detail = (f"GPU {gpu['index']} {gpu['name']} has {total} MiB; the workers need about {need} MiB "
              f"({need * 100 // total} %): {parts}; on the CPU: {', '.join(estimate['on_cpu']) or 'nothing'}")
    fix = ("run fewer pool processes on this GPU (`-c`, IDENT_VISION_CONCURRENCY / IDENT_AUDIO_CONCURRENCY in "
           "compose), keep models on the CPU with IDENT_CPU_MODELS (e.g. spoof,speaker_embedding), or lower "
           "IDENT_MAX_BATCH; a session that still runs out moves to the CPU and says so")
    if need > total:
        return Check(name, FAIL, detail, fix)
    if need * 10 > total * 9:
        return Check(name, WARN, detail + "; little is left for the display or other programs", fix)
    return Check(name, OK, detail)


def check_environment(probes: Mapping) -> Check:
    name = "environment"
    env: dict = dict(probes.get("env") or {})
    shown = "; ".join(f"{k}={v!r}" for k, v in sorted(env.items()) if not k.startswith("IDENT_"))
    problems, fixes, status = [], [], OK
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in HIDING_VISIBLE_DEVICES:
        status = FAIL
        problems.append(f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU from CUDA")
        fixes.append("unset CUDA_VISIBLE_DEVICES, or set it to the GPU index or UUID this worker may use")
    capabilities = env.get("NVIDIA_DRIVER_CAPABILITIES")
    if capabilities is not None and not ({"compute", "all"} & {c.strip() for c in capabilities.split(",")}):
        status = FAIL if _in_container(probes) else max(status, WARN, key=_severity)
        problems.append(
            f"NVIDIA_DRIVER_CAPABILITIES={capabilities!r} lacks 'compute', so the container toolkit mounts no libcuda"
        )
        fixes.append("set NVIDIA_DRIVER_CAPABILITIES=compute,utility")
    library_path = env.get("LD_LIBRARY_PATH") or ""
    stubs = [p for p in library_path.split(":") if p.rstrip("/").endswith("stubs")]
    if stubs:
        status = max(status, WARN, key=_severity)
        problems.append(
            f"LD_LIBRARY_PATH has a CUDA stubs directory ({', '.join(stubs)}): its libcuda.so is a link-time stub"
        )
        fixes.append("remove the stubs directory from LD_LIBRARY_PATH")
    absent = [p for p in (probes.get("ld_library_path_missing") or [])]
    if absent:
        status = max(status, WARN, key=_severity)
        problems.append(f"LD_LIBRARY_PATH names directories that do not exist: {', '.join(absent)}")
        fixes.append("fix or drop those LD_LIBRARY_PATH entries")
    if len(_smi_gpus(probes)) > 1 and env.get("CUDA_DEVICE_ORDER") != "PCI_BUS_ID":
        status = max(status, WARN, key=_severity)
        problems.append(
            "several GPUs and CUDA_DEVICE_ORDER is not PCI_BUS_ID: CUDA numbers GPUs fastest-first, "
            "nvidia-smi by PCI bus, so IDENT_GPU_IDS may not mean the GPU nvidia-smi shows under that index"
        )
        fixes.append("export CUDA_DEVICE_ORDER=PCI_BUS_ID")
    prime = [k for k in PRIME_VARIABLES if k in env]
    note = f" ({', '.join(prime)} only affect OpenGL/Vulkan; CUDA ignores them)" if prime else ""
    if problems:
        return Check(name, status, "; ".join(problems) + (f". Set: {shown}" if shown else "") + note, "; ".join(fixes))
    if not shown:
        return Check(name, OK, "no CUDA_*, LD_LIBRARY_PATH, ORT*, NVIDIA_* or PRIME variables set")
    return Check(name, OK, f"set: {shown}{note}")


def _severity(status: str) -> int:
    return {SKIP: 0, OK: 1, WARN: 2, FAIL: 3}[status]


def check_settings(probes: Mapping) -> Check:
    name = "IDENT_* settings"
    settings = probes.get("settings") or {}
    if settings.get("error"):
        return Check(name, FAIL, settings["error"], "fix the variable named above (see tasks/settings.py)")
    device = settings.get("device", "auto")
    ids = _gpu_ids(probes)
    detail = (
        f"IDENT_DEVICE={device}, IDENT_GPU_IDS={','.join(map(str, ids))}, "
        f"IDENT_MODELS_DIR={settings.get('models_dir', '?')}"
    )
    facts = _facts(probes)
    count = facts.device_count if facts.device_count is not None else (len(_smi_gpus(probes)) or None)
    if count is not None and count > 0:
        beyond = [i for i in ids if i >= count]
        if beyond:
            return Check(
                name,
                FAIL,
                f"{detail}: GPU(s) {', '.join(map(str, beyond))} asked for but this process sees " f"{count}",
                f"set IDENT_GPU_IDS to indices below {count} (inside a container, "
                "the reserved GPUs are renumbered from 0)",
            )
    if device == "cpu":
        # A stated choice, right on a host without a GPU; the verdict says when CUDA would work.
        return Check(name, OK, f"{detail}: the worker uses the CPU, as chosen")
    return Check(name, OK, detail)


def check_cuda_provider(probes: Mapping) -> Check:
    """The lead's own explanation (models.cuda), the one the worker reports at run time."""
    name = "CUDA execution provider"
    ids = _gpu_ids(probes)
    reason = explain_cpu_fallback(_facts(probes), ids[0])
    if reason is None:
        return Check(name, OK, f"ONNX Runtime can load the CUDA EP and use GPU {ids[0]}")
    return Check(name, FAIL, reason, "fix the failed checks above, top to bottom")


def check_placements(probes: Mapping) -> list[Check]:
    placements = probes.get("placements") or {}
    if placements.get("skipped"):
        return [Check("node placement", SKIP, f"not probed: {placements['skipped']}")]
    models = placements.get("models") or []
    if not models:
        return [
            Check(
                "node placement", SKIP, f"no catalog model file in {placements.get('models_dir') or 'IDENT_MODELS_DIR'}"
            )
        ]
    return [_placement_check(model) for model in models]


def _placement_check(model: Mapping) -> Check:
    name = f"node placement: {model.get('key')}"
    if model.get("error"):
        return Check(
            name,
            WARN,
            f"a CUDA session for {model.get('file')} could not be created: {model['error']}",
            "run the model with IDENT_DEVICE=cuda to see the full error",
        )
    lines = model.get("lines") or []
    refused = next((_ANSI.sub("", l) for l in lines if "Failed to create CUDAExecutionProvider" in l), None)
    if refused:
        said = _LOG_LINE.match(refused.strip())
        return Check(
            name,
            WARN,
            "ONNX Runtime declined the CUDA EP for this session: " + (said.group("message") if said else refused),
            "see the CUDA execution provider and CUDA/cuDNN libraries checks",
        )
    placement = parse_node_placements(lines)
    if placement is None:
        return Check(name, WARN, "ONNX Runtime logged no node placement (a minimal build, or verbose logging is off)")
    total, on_cuda = placement.total, placement.on(CUDA_EP)
    if on_cuda == total:
        return Check(name, OK, f"all {total} nodes on {CUDA_EP}")
    if on_cuda == 0:
        return Check(
            name,
            WARN,
            f"all {total} nodes on {', '.join(placement.counts)}: the CUDA EP took none of them",
            "check the CUDA execution provider line above; ORT's log names no unsupported node",
        )
    parts = [f"{on_cuda} of {total} nodes on CUDA, {placement.on(CPU_EP)} on CPU"]
    status = OK
    if placement.no_cuda_kernel:
        status = WARN
        parts.append("no CUDA kernel for: " + _join(f"{op} ({node})" for op, node in placement.no_cuda_kernel))
    if placement.forced_cpu:
        parts.append(
            f"{len(placement.forced_cpu)} kept on CPU by ORT on purpose (shape computations: "
            f"{_join(placement.forced_cpu, 4)})"
        )
    unexplained = [n for n in placement.unexplained_cpu_nodes() if n[1] not in {x for _, x in placement.no_cuda_kernel}]
    if unexplained:
        status = WARN
        parts.append("also on CPU: " + _join(f"{op} ({node})" for op, node in unexplained))
    if placement.memcpy_nodes:
        parts.append(f"{placement.memcpy_nodes} Memcpy node(s) copy tensors between GPU and CPU")
    fix = None
    if status == WARN:
        fix = (
            "re-export the model so these ops become ones the CUDA EP implements (e.g. keep float MatMul instead "
            "of dynamic int8 quantisation, or a newer opset), or accept the CPU hop; the list is ORT's own"
        )
    return Check(name, status, "; ".join(parts), fix)


CHECKS: tuple[Callable[[Mapping], Check], ...] = (
    check_onnxruntime,
    check_nvidia_smi,
    check_kernel_module,
    check_container,
    check_gpu_selection,
    check_driver_library,
    check_cuda_libraries,
    check_versions,
    check_gpu_memory,
    check_environment,
    check_settings,
    check_cuda_provider,
)


def evaluate(probes: Mapping) -> list[Check]:
    """The checklist for a host, from its probes alone. Pure: no host access."""
    checks = [check(probes) for check in CHECKS]
    checks.extend(check_placements(probes))
    if _no_nvidia_gpu(probes):
        # A driver, the container toolkit or CUDA libraries cannot help a machine without the GPU.
        checks = [
            replace(c, fix=NO_GPU_POINTER) if c.fix and c.name not in (GPU_SELECTION, "IDENT_* settings") else c
            for c in checks
        ]
    return checks


def verdict(checks: Sequence[Check], probes: Mapping) -> tuple[bool, str]:
    """Would the CUDA EP work here, and the one sentence that says why not."""
    failed = [c for c in checks if c.status == FAIL]
    if not failed:
        gpus = _smi_gpus(probes)
        ids = _gpu_ids(probes)
        ort = probes.get("ort") or {}
        gpu = next((g for g in gpus if g["index"] == ids[0]), gpus[0] if gpus else None)
        target = f"GPU {ids[0]}" + (
            f" {gpu['name']} (compute {gpu['compute_cap']}), driver {gpu['driver_version']}" if gpu else ""
        )
        build = f"onnxruntime-gpu {ort.get('version', '?')} (CUDA {ort.get('build_cuda', '?')})"
        text = f"CUDA would work: {build} on {target}"
        if (probes.get("settings") or {}).get("device") == "cpu":
            text += "; but IDENT_DEVICE=cpu keeps the worker on the CPU"
        return True, text
    if _no_nvidia_gpu(probes):
        chosen = (probes.get("settings") or {}).get("device") == "cpu"
        return False, (
            "CUDA cannot be used, the worker would run on CPU: no NVIDIA GPU in this machine; "
            + ("IDENT_DEVICE=cpu already says so" if chosen else "set IDENT_DEVICE=cpu")
        )
    reason = explain_cpu_fallback(_facts(probes), _gpu_ids(probes)[0])
    if reason is None:
        first = next((c for c in failed if c.name != "CUDA execution provider"), failed[0])
        reason = first.detail
    text = f"CUDA cannot be used, the worker would run on CPU: {reason}"
    libraries = next((c for c in failed if c.name == "CUDA/cuDNN libraries"), None)
    facts = _facts(probes)
    missing = (["libcuda.so.1"] if facts.libcuda_error else []) + _missing_libraries(probes)
    if libraries is not None or facts.libcuda_error:
        if missing:
            text += f". Missing libraries: {', '.join(missing)}"
    others = [c.name for c in failed if c.name != "CUDA execution provider"]
    if others:
        text += f". Failed checks: {', '.join(others)}"
    return False, text


def _missing_libraries(probes: Mapping) -> list[str]:
    build = (probes.get("ort") or {}).get("build_cuda") or ""
    libraries = probes.get("libraries") or {}
    cache = parse_ldconfig(probes.get("ldconfig") or "")
    pip = (probes.get("pip") or {}).get("nvidia_libs") or {}
    return [
        lib.soname
        for lib in cuda_library_sonames(build)
        if lib.required
        and lib.soname != "libcuda.so.1"
        and not (libraries.get(lib.soname) or {}).get("loaded")
        and not cache.get(lib.soname)
        and not pip.get(lib.soname)
    ]


def build_report(probes: dict) -> DoctorReport:
    checks = evaluate(probes)
    usable, text = verdict(checks, probes)
    return DoctorReport(checks=checks, cuda_usable=usable, verdict=text, probes=probes)
