"""Probes: the only part that touches the host.

``collect_probes()`` records what nvidia-smi, the dynamic loader, ``ldconfig -p``,
/sys, /proc, the environment, onnxruntime and a verbose CUDA session per model
say, as the plain-data probes dict that ``evaluate`` reads.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from ident.doctor.checks import DoctorReport, _gpu_ids, build_report
from ident.doctor.parsers import cuda_library_sonames, placement_lines
from models.catalog import CUDA_CONTEXT_MIB
from models.cuda import CPU_EP, CUDA_EP, CudaFacts, explain_cpu_fallback, probe_cuda
from models.cuda_builds import SMI_QUERY_FIELDS
from tasks.errors import ConfigurationError

ENV_PREFIXES = ("CUDA_", "NVIDIA_", "ORT", "ONNXRUNTIME")
ENV_NAMES = (
    "LD_LIBRARY_PATH",
    "LD_PRELOAD",
    "__NV_PRIME_RENDER_OFFLOAD",
    "__NV_PRIME_RENDER_OFFLOAD_PROVIDER",
    "__GLX_VENDOR_LIBRARY_NAME",
    "__VK_LAYER_NV_optimus",
    "DRI_PRIME",
    "IDENT_DEVICE",
    "IDENT_GPU_IDS",
    "IDENT_MODELS_DIR",
)

SMI_TIMEOUT_S = 20

Runner = Callable[..., subprocess.CompletedProcess]


def _run(runner: Runner, argv: list[str]) -> dict:
    try:
        done = runner(argv, capture_output=True, text=True, timeout=SMI_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        return {"rc": None, "stdout": "", "stderr": "", "error": f"timed out after {SMI_TIMEOUT_S} s"}
    except OSError as exc:
        return {"rc": None, "stdout": "", "stderr": "", "error": str(exc)}
    return {"rc": done.returncode, "stdout": done.stdout, "stderr": done.stderr}


def probe_nvidia_smi(runner: Runner = subprocess.run, which: Callable[[str], str | None] = shutil.which) -> dict:
    path = which("nvidia-smi")
    if not path:
        return {"path": None}
    return {
        "path": path,
        "query": _run(runner, [path, f"--query-gpu={SMI_QUERY_FIELDS}", "--format=csv,noheader"]),
        "header": _run(runner, [path]),
    }


def probe_ldconfig(runner: Runner = subprocess.run) -> str | None:
    path = shutil.which("ldconfig") or next(
        (p for p in ("/sbin/ldconfig", "/usr/sbin/ldconfig") if os.path.exists(p)), None
    )
    if not path:
        return None
    result = _run(runner, [path, "-p"])
    return result["stdout"] if result.get("rc") == 0 else None


def probe_libraries(sonames: Iterable[str]) -> dict[str, dict]:
    """dlopen each soname the way the CUDA EP will; the loader's own error says why not."""
    found = {}
    for soname in sonames:
        try:
            handle = ctypes.CDLL(soname)
        except OSError as exc:
            found[soname] = {"loaded": False, "error": str(exc)}
            continue
        found[soname] = {"loaded": True, "error": None, "path": _loaded_path(handle, soname)}
    return found


def _loaded_path(handle: ctypes.CDLL, soname: str) -> str | None:
    """Where the loader found it, from /proc/self/maps (dlinfo is not in ctypes)."""
    del handle
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        path = line.split()[-1] if line.split() else ""
        if path.endswith("/" + soname) or os.path.basename(path).startswith(soname + "."):
            return path
    return None


def probe_pip() -> dict:
    """nvidia-* wheels (onnxruntime-gpu[cuda,cudnn] extras) and the libraries they ship."""
    wheels, libs, ort = {}, {}, {}
    for dist in importlib.metadata.distributions():
        name = (dist.metadata.get("Name") or "").lower()
        if name.startswith("onnxruntime") or name.startswith("ort-nightly"):
            ort[name] = dist.version
        if not name.startswith("nvidia-"):
            continue
        wheels[name] = dist.version
        for file in dist.files or []:
            base = os.path.basename(str(file))
            if base.startswith("lib") and ".so" in base:
                libs.setdefault(base, str(dist.locate_file(file)))
    return {"nvidia": wheels, "nvidia_libs": libs, "ort": ort}


def probe_env(environ: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in environ.items() if k.startswith(ENV_PREFIXES) or k in ENV_NAMES}


def probe_container(root: Path = Path("/")) -> dict:
    evidence = []
    if (root / ".dockerenv").exists():
        evidence.append("/.dockerenv")
    if (root / "run/.containerenv").exists():
        evidence.append("/run/.containerenv")
    for cgroup in ("proc/self/cgroup", "proc/1/cgroup"):
        try:
            text = (root / cgroup).read_text()
        except OSError:
            continue
        match = re.search(r"docker|kubepods|containerd|libpod|lxc", text)
        if match:
            evidence.append(f"/{cgroup} mentions {match.group(0)}")
            break
    devices = sorted(str(p) for p in (root / "dev").glob("nvidia*")) if (root / "dev").is_dir() else []
    return {"in_container": bool(evidence), "evidence": evidence, "dev_nvidia": [_rooted(root, d) for d in devices]}


def _rooted(root: Path, path: str) -> str:
    return "/" + os.path.relpath(path, root)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _uevent(device: Path) -> dict[str, str]:
    text = _read(device / "uevent") or ""
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def _sysfs_gpu(device: Path, card: str | None) -> dict:
    uevent = _uevent(device)
    return {
        "card": card,
        "pci": uevent.get("PCI_SLOT_NAME") or device.resolve().name,
        "vendor": _read(device / "vendor"),
        "device": _read(device / "device"),
        "class": _read(device / "class"),
        # Only VGA-class devices have boot_vga; an MX card is a "3D controller".
        "boot_vga": _read(device / "boot_vga"),
        "driver": uevent.get("DRIVER"),
        "runtime_status": _read(device / "power" / "runtime_status"),
    }


def probe_gpus_sysfs(sys_root: Path = Path("/sys")) -> list[dict]:
    """Display devices: /sys/class/drm/card*, plus PCI display controllers no DRM
    driver claimed (an NVIDIA GPU with no nvidia module has no card* entry)."""
    gpus, seen = [], set()
    drm = sys_root / "class" / "drm"
    if drm.is_dir():
        for card in sorted(drm.iterdir(), key=lambda p: p.name):
            if not re.fullmatch(r"card\d+", card.name) or not (card / "device").exists():
                continue
            gpu = _sysfs_gpu(card / "device", card.name)
            seen.add(gpu["pci"])
            gpus.append(gpu)
    pci = sys_root / "bus" / "pci" / "devices"
    if pci.is_dir():
        for device in sorted(pci.iterdir(), key=lambda p: p.name):
            if not (_read(device / "class") or "").startswith("0x03"):
                continue
            gpu = _sysfs_gpu(device, None)
            if gpu["pci"] not in seen:
                seen.add(gpu["pci"])
                gpus.append(gpu)
    return gpus


def probe_pci_devices(sys_root: Path = Path("/sys")) -> int | None:
    """How many PCI devices this machine shows; None when its bus cannot be read."""
    try:
        return len(list((sys_root / "bus" / "pci" / "devices").iterdir()))
    except OSError:
        return None


def probe_nvidia_module(proc_root: Path = Path("/proc")) -> dict:
    modules = []
    for line in (_read(proc_root / "modules") or "").splitlines():
        name = line.split(" ", 1)[0]
        if name.startswith("nvidia") or name == "nouveau":
            modules.append(name)
    return {"proc_version": _read(proc_root / "driver" / "nvidia" / "version"), "modules": modules}


def probe_settings(environ: Mapping[str, str], pool_processes: Mapping[str, int] | None = None) -> dict:
    from tasks.settings import Settings

    try:
        settings = Settings.from_env(environ)
    except ConfigurationError as exc:
        return {"error": str(exc), "device": None, "gpu_ids": [0], "models_dir": environ.get("IDENT_MODELS_DIR")}
    return {
        "error": None,
        "device": settings.device,
        "gpu_ids": list(settings.gpu_ids),
        "models_dir": str(settings.models_dir),
        "gpu_memory": gpu_memory_estimate(settings, pool_processes or {}),
    }


def gpu_memory_estimate(settings, pool_processes: Mapping[str, int]) -> dict:
    """What the vision and audio workers would hold on one GPU, from the catalog's per-model estimates."""
    from models.catalog import gpu_memory_estimate_mib, selected_models

    workers, on_cpu, total = {}, [], 0
    for kind in ("vision", "audio"):
        processes = pool_processes.get(kind, 1)
        models = {}
        for spec in selected_models(settings, kind).values():
            if spec.key in settings.cpu_models or spec.role in settings.cpu_models:
                on_cpu.append(spec.key)
            else:
                models[spec.key] = gpu_memory_estimate_mib(spec, settings.max_batch)
        workers[kind] = {"processes": processes, "models": models}
        if models and processes:
            total += processes * (CUDA_CONTEXT_MIB + sum(models.values()))
    return {"workers": workers, "on_cpu": on_cpu, "total_mib": total}


def probe_placements(models_dir: Path, device_id: int, facts: CudaFacts) -> dict:
    """One verbose CUDA session per catalog model present, keeping ORT's placement lines."""
    reason = explain_cpu_fallback(facts, device_id)
    if reason is not None:
        return {
            "skipped": "the CUDA EP cannot run on this host (see the 'CUDA execution provider' check)",
            "reason": reason,
            "models_dir": str(models_dir),
            "models": [],
        }
    from models.catalog import CATALOG

    results = []
    for spec in CATALOG.values():
        path = models_dir / spec.filename
        if path.is_file():
            results.append({"key": spec.key, "file": spec.filename, **_placement_log(path, device_id)})
    return {"skipped": None, "models_dir": str(models_dir), "models": results}


def _placement_log(path: Path, device_id: int) -> dict:
    import onnxruntime as ort

    from models.runtime import _captured_native_stderr

    options = ort.SessionOptions()
    options.log_severity_level = 0
    providers = [(CUDA_EP, {"device_id": device_id}), CPU_EP]
    # The CUDA EP's "kernel not found" lines go through ORT's default logger,
    # which models.runtime keeps at ERROR; open it up for this one session only.
    ort.set_default_logger_severity(0)
    try:
        with _captured_native_stderr() as lines:
            try:
                session = ort.InferenceSession(str(path), options, providers=providers)
            except Exception as exc:  # ORT raises its own unexported exception types
                return {"lines": [], "error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__}
        del session
    finally:
        ort.set_default_logger_severity(3)
    return {"lines": placement_lines(lines), "error": None}


def collect_probes(environ: Mapping[str, str] | None = None, *, models: bool = True,
                   pool_processes: Mapping[str, int] | None = None) -> dict:
    """Everything ``evaluate`` needs, read from this host."""
    env = dict(os.environ if environ is None else environ)
    facts = probe_cuda()
    ort_packages = probe_pip()
    ort_info: dict[str, Any] = {
        "packages": ort_packages["ort"],
        "version": facts.ort_version,
        "build_cuda": facts.ort_build_cuda,
        "providers": facts.available_providers,
        "import_error": facts.provider_library_error if not facts.ort_version else None,
    }
    sonames = [lib.soname for lib in cuda_library_sonames(facts.ort_build_cuda or "")] or ["libcuda.so.1"]
    settings = probe_settings(env, pool_processes)
    library_path = env.get("LD_LIBRARY_PATH") or ""
    probes = {
        "ort": ort_info,
        "cuda_facts": facts.to_dict(),
        "nvidia_smi": probe_nvidia_smi(),
        "nvidia_module": probe_nvidia_module(),
        "container": probe_container(),
        "gpus_sysfs": probe_gpus_sysfs(),
        "pci_devices": probe_pci_devices(),
        "libraries": probe_libraries(sonames),
        "ldconfig": probe_ldconfig(),
        "pip": {"nvidia": ort_packages["nvidia"], "nvidia_libs": ort_packages["nvidia_libs"]},
        "env": probe_env(env),
        "ld_library_path_missing": [p for p in library_path.split(":") if p and not os.path.isdir(p)],
        "settings": settings,
    }
    if models:
        models_dir = Path(settings.get("models_dir") or ".")
        probes["placements"] = probe_placements(models_dir, _gpu_ids(probes)[0], facts)
    else:
        probes["placements"] = {"skipped": "--no-models was given", "models": []}
    return probes


def collect(environ: Mapping[str, str] | None = None, *, models: bool = True,
            pool_processes: Mapping[str, int] | None = None) -> DoctorReport:
    """Probe this host and evaluate it."""
    return build_report(collect_probes(environ, models=models, pool_processes=pool_processes))
