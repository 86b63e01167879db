"""``ident doctor`` against recorded hosts, healthy and broken.

Every check is a pure function of a probes dict, so each host below is a dict
built from the recorded command outputs in fixtures/ (see fixtures/README.md for
which were captured and which were written to the commands' formats). One test
runs the real probes on the machine the tests run on.
"""

from __future__ import annotations

import copy
import ctypes
import io
import json
import subprocess
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from ident import doctor
from ident.doctor import FAIL, OK, SKIP, WARN, Check, build_report, evaluate, parse_node_placements

FIXTURES = Path(__file__).parent / "fixtures"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def checks_by_name(probes: dict) -> dict[str, Check]:
    return {c.name: c for c in evaluate(probes)}


def smi(query_file: str, header_file: str) -> dict:
    return {
        "path": "/usr/bin/nvidia-smi",
        "query": {"rc": 0, "stdout": fixture(query_file), "stderr": ""},
        "header": {"rc": 0, "stdout": fixture(header_file), "stderr": ""},
    }


def loaded(*sonames: str, where: str = "/usr/local/cuda-13.0/targets/x86_64-linux/lib") -> dict:
    return {s: {"loaded": True, "error": None, "path": f"{where}/{s}"} for s in sonames}


def not_loaded(*sonames: str) -> dict:
    return {
        s: {"loaded": False, "error": f"{s}: cannot open shared object file: No such file or directory"}
        for s in sonames
    }


CUDA13_LIBS = (
    "libcuda.so.1",
    "libcudart.so.13",
    "libcublas.so.13",
    "libcublasLt.so.13",
    "libcurand.so.10",
    "libcudnn.so.9",
    "libcufft.so.12",
)
PROVIDERS = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def ort_info(version: str = "1.31.1", build: str = "13.0", packages: dict | None = None) -> dict:
    return {
        "packages": packages or {"onnxruntime-gpu": version},
        "version": version,
        "build_cuda": build,
        "providers": list(PROVIDERS),
        "import_error": None,
    }


def facts(version: str = "1.31.1", build: str = "13.0", **overrides) -> dict:
    base = {
        "ort_packages": ["onnxruntime-gpu"],
        "ort_version": version,
        "ort_build_cuda": build,
        "available_providers": list(PROVIDERS),
        "cuda_visible_devices": None,
        "libcuda_error": None,
        "driver_cuda_version": 13000,
        "cu_init_result": 0,
        "device_count": 1,
        "provider_library_error": None,
    }
    base.update(overrides)
    return base


def h100_host() -> dict:
    """A Compose vision worker on an H100 server: driver 580 (CUDA 13.0), CUDA 13
    and cuDNN 9 from the image's apt packages, the GPU reserved for the container."""
    return {
        "ort": ort_info(),
        "cuda_facts": facts(),
        "nvidia_smi": smi("nvidia_smi_h100_query.csv", "nvidia_smi_h100.txt"),
        "nvidia_module": {
            "proc_version": "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.95.05  "
            "Release Build  (dvs-builder@U22-I3-AF03-09-1)  Tue Sep 23 09:51:32 UTC 2025\n"
            "GCC version:  gcc version 12.3.0 (Ubuntu 12.3.0-1ubuntu1~22.04)",
            "modules": ["nvidia_uvm", "nvidia_drm", "nvidia_modeset", "nvidia"],
        },
        "container": {
            "in_container": True,
            "evidence": ["/.dockerenv"],
            "dev_nvidia": ["/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia0", "/dev/nvidiactl"],
        },
        # A server: the BMC's ASPEED display adapter beside the H100.
        "gpus_sysfs": [
            {
                "card": "card0",
                "pci": "0000:03:00.0",
                "vendor": "0x1a03",
                "device": "0x2000",
                "class": "0x030000",
                "boot_vga": "1",
                "driver": "ast",
                "runtime_status": "active",
            },
            {
                "card": "card1",
                "pci": "0000:18:00.0",
                "vendor": "0x10de",
                "device": "0x2330",
                "class": "0x030200",
                "boot_vga": None,
                "driver": "nvidia",
                "runtime_status": "active",
            },
        ],
        "libraries": loaded(*CUDA13_LIBS),
        "ldconfig": fixture("ldconfig_h100.txt"),
        "pip": {"nvidia": {}, "nvidia_libs": {}},
        "env": {
            "NVIDIA_VISIBLE_DEVICES": "GPU-5c1d6a2e-8d0e-7f41-9a3b-2f6c2e1f0a11",
            "NVIDIA_DRIVER_CAPABILITIES": "compute,utility",
            "IDENT_DEVICE": "auto",
            "IDENT_GPU_IDS": "0",
        },
        "ld_library_path_missing": [],
        "settings": {"error": None, "device": "auto", "gpu_ids": [0], "models_dir": "/models"},
        "placements": {
            "skipped": None,
            "models_dir": "/models",
            "models": [
                {
                    "key": "yunet_2023mar",
                    "file": "face_detection_yunet_2023mar.onnx",
                    "error": None,
                    "lines": doctor.placement_lines(fixture("ort_verbose_all_cuda.log").splitlines()),
                },
                {
                    "key": "arcface_int8",
                    "file": "arcface_int8.onnx",
                    "error": None,
                    "lines": doctor.placement_lines(fixture("ort_verbose_mixed.log").splitlines()),
                },
            ],
        },
    }


def mx230_laptop() -> dict:
    """A laptop: Intel UHD 620 drives the display, GeForce MX230 (Pascal, sm_61)
    beside it; driver 580, onnxruntime-gpu 1.31.1 (CUDA 13) with its pip CUDA
    wheels. Everything loads, yet CUDA 13 has no kernels for sm_61."""
    site = "/home/ana/.venv/lib/python3.11/site-packages/nvidia"
    wheel_libs = {s: f"{site}/cu13/lib/{s}" for s in CUDA13_LIBS[1:]}
    wheel_libs["libcudnn.so.9"] = f"{site}/cudnn/lib/libcudnn.so.9"
    return {
        "ort": ort_info(),
        "cuda_facts": facts(),
        "nvidia_smi": smi("nvidia_smi_mx230_query.csv", "nvidia_smi_mx230.txt"),
        "nvidia_module": {
            "proc_version": "NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.95.05  Tue Sep 23 09:55:41 UTC 2025",
            "modules": ["nvidia_uvm", "nvidia_drm", "nvidia_modeset", "nvidia"],
        },
        "container": {"in_container": False, "evidence": [], "dev_nvidia": ["/dev/nvidia0", "/dev/nvidiactl"]},
        "gpus_sysfs": sysfs_probe(sysfs_tree()),
        "libraries": {
            **loaded(*CUDA13_LIBS[1:], where=f"{site}/cu13/lib"),
            **loaded("libcuda.so.1", where="/lib/x86_64-linux-gnu"),
        },
        "ldconfig": "\n".join(
            line
            for line in fixture("ldconfig_h100.txt").splitlines()
            if "cuda-13.0" not in line and "cudnn" not in line
        ),
        "pip": {
            "nvidia": {
                "nvidia-cublas": "13.0.2.14",
                "nvidia-cuda-runtime": "13.0.96",
                "nvidia-cudnn-cu13": "9.14.0.64",
                "nvidia-curand": "10.4.0.35",
                "nvidia-cufft": "12.0.0.61",
            },
            "nvidia_libs": wheel_libs,
        },
        "env": {},
        "ld_library_path_missing": [],
        "settings": {
            "error": None,
            "device": "auto",
            "gpu_ids": [0],
            "models_dir": "/home/ana/.cache/identification/models",
        },
        "placements": {"skipped": None, "models_dir": "/home/ana/.cache/identification/models", "models": []},
    }


# --- the sysfs fixture, written to a tree and read back by the real probe ---------------


def sysfs_tree(overrides: dict | None = None) -> dict:
    tree = json.loads(fixture("sysfs_mx230_laptop.json"))
    tree.pop("_comment")
    tree.update(overrides or {})
    return {k: v for k, v in tree.items() if v is not None}


def sysfs_probe(tree: dict, tmp: Path | None = None) -> list[dict]:
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(tmp or scratch)
        for relative, content in tree.items():
            path = root / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
        return doctor.probe_gpus_sysfs(root)


# --- parsers ---------------------------------------------------------------------------


def test_smi_query_parses_each_gpu():
    (h100,) = doctor.parse_smi_query(fixture("nvidia_smi_h100_query.csv"))
    assert h100 == {
        "index": 0,
        "name": "NVIDIA H100 80GB HBM3",
        "compute_cap": "9.0",
        "driver_version": "580.95.05",
        "pci_bus_id": "00000000:18:00.0",
        "memory_total": "81559 MiB",
    }
    (mx,) = doctor.parse_smi_query(fixture("nvidia_smi_mx230_query.csv"))
    assert (mx["name"], mx["compute_cap"]) == ("NVIDIA GeForce MX230", "6.1")
    assert doctor.parse_smi_query(fixture("nvidia_smi_failed.txt")) == []


def test_smi_header_gives_the_driver_cuda_version():
    assert doctor.parse_smi_cuda_version(fixture("nvidia_smi_h100.txt")) == "13.0"
    assert doctor.parse_smi_cuda_version(fixture("nvidia_smi_rtx3060_driver535.txt")) == "12.2"
    assert doctor.parse_smi_cuda_version(fixture("nvidia_smi_failed.txt")) is None


def test_ldconfig_maps_sonames_to_paths():
    cache = doctor.parse_ldconfig(fixture("ldconfig_h100.txt"))
    assert cache["libcublasLt.so.13"] == ["/usr/local/cuda-13.0/targets/x86_64-linux/lib/libcublasLt.so.13"]
    assert cache["libcuda.so.1"] == ["/lib/x86_64-linux-gnu/libcuda.so.1"]
    assert "libc.so.6" in cache  # the "OS ABI" variant of the line


def test_library_sonames_follow_the_build_cuda_major():
    assert [lib.soname for lib in doctor.cuda_library_sonames("13.0")] == list(CUDA13_LIBS)
    assert "libcublasLt.so.12" in [lib.soname for lib in doctor.cuda_library_sonames("12.8")]
    assert doctor.cuda_library_sonames("") == []


# --- node placement ----------------------------------------------------------------------


def test_placement_parser_reads_an_all_cuda_session():
    placement = parse_node_placements(fixture("ort_verbose_all_cuda.log").splitlines())
    assert placement.counts == {"CUDAExecutionProvider": 100}
    assert placement.cpu_nodes() == [] and placement.no_cuda_kernel == []


def test_placement_parser_reads_a_mixed_session():
    placement = parse_node_placements(fixture("ort_verbose_mixed.log").splitlines())
    assert placement.counts == {"CUDAExecutionProvider": 105, "CPUExecutionProvider": 3}
    assert len(placement.nodes["CUDAExecutionProvider"]) == 105
    assert placement.cpu_nodes() == [
        ("DynamicQuantizeLinear", "/m/arcface/linear/MatMul_quant"),
        ("MatMulInteger", "/m/arcface/linear/MatMul_MatMulInteger"),
        ("Shape", "/m/Shape_1"),
    ]
    assert [op for op, _ in placement.no_cuda_kernel] == ["DynamicQuantizeLinear", "MatMulInteger"]
    assert placement.forced_cpu == ["/m/Shape_1"]
    assert placement.memcpy_nodes == 3
    assert placement.unexplained_cpu_nodes() == []


def test_placement_lines_keep_only_what_the_parser_needs():
    raw = fixture("ort_verbose_mixed.log").splitlines()
    kept = doctor.placement_lines(raw)
    assert len(kept) < len(raw)
    assert parse_node_placements(kept).counts == parse_node_placements(raw).counts


def test_placement_parser_without_a_placement_block():
    assert parse_node_placements(["2025-11-23 21:38:07.1 [I:onnxruntime:, inference_session.cc:1 f] hello"]) is None


def test_cpu_nodes_without_an_explanation_are_reported():
    lines = [
        "Node placements",
        " Node(s) placed on [CUDAExecutionProvider]. Number of nodes: 1",
        "  Conv (conv1)",
        " Node(s) placed on [CPUExecutionProvider]. Number of nodes: 1",
        "  GridSample (warp)",
    ]
    check = doctor.checks._placement_check({"key": "m", "file": "m.onnx", "lines": lines, "error": None})
    assert check.status == WARN and "GridSample (warp)" in check.detail


# --- whole hosts -------------------------------------------------------------------------


def test_healthy_h100_host_would_use_cuda():
    probes = h100_host()
    report = build_report(probes)
    checks = {c.name: c for c in report.checks}
    assert not [c for c in report.checks if c.status == FAIL], report.checks
    assert report.cuda_usable and report.exit_code == 0
    assert "NVIDIA H100 80GB HBM3" in report.verdict and "CUDA 13.0" in report.verdict
    assert checks["nvidia-smi"].status == OK and "supports CUDA up to 13.0" in checks["nvidia-smi"].detail
    assert checks["CUDA versions (build / driver / GPU)"].status == OK
    assert "sm_90 (Hopper)" in checks["CUDA versions (build / driver / GPU)"].detail
    assert checks["container GPU access"].status == OK
    # The BMC's display adapter does not make a server "hybrid".
    assert checks["GPU selection (hybrid graphics)"].status == OK
    assert "hybrid" not in checks["GPU selection (hybrid graphics)"].detail
    assert checks["node placement: yunet_2023mar"].status == OK
    int8 = checks["node placement: arcface_int8"]
    assert int8.status == WARN
    assert "MatMulInteger (/m/arcface/linear/MatMul_MatMulInteger)" in int8.detail
    assert "3 Memcpy" in int8.detail and "/m/Shape_1" in int8.detail


def test_mx230_laptop_with_a_cuda13_build_is_blocked_by_pascal():
    report = build_report(mx230_laptop())
    checks = {c.name: c for c in report.checks}
    versions = checks["CUDA versions (build / driver / GPU)"]
    assert versions.status == FAIL
    assert "GPU 0 NVIDIA GeForce MX230 is sm_61 (Pascal)" in versions.detail
    assert "CUDA 13 dropped Maxwell, Pascal and Volta" in versions.detail
    # The set-up command that installs the CUDA 12 line, with the cuDNN that still has Pascal
    # (a bare `pip install 'onnxruntime-gpu[cuda,cudnn]<1.27'` pulls a cuDNN without it).
    assert "scripts/setup.sh --cuda 12" in versions.fix and "onnxruntime-gpu[cuda,cudnn]==1.26.0" in versions.fix
    assert "nvidia-cudnn-cu12==9.10" in versions.fix
    # Everything else loads: the lead's explanation finds nothing, the doctor does.
    assert checks["CUDA execution provider"].status == OK
    assert checks["CUDA/cuDNN libraries"].status == OK
    assert "nvidia-cudnn-cu13" in checks["CUDA/cuDNN libraries"].detail
    assert not report.cuda_usable and report.exit_code == 1
    assert "sm_61" in report.verdict


def test_mx230_laptop_hybrid_graphics_is_explained():
    check = checks_by_name(mx230_laptop())["GPU selection (hybrid graphics)"]
    assert check.status == OK
    assert "hybrid graphics" in check.detail
    assert "Intel card0 [0000:00:02.0] (driver i915, boot_vga=1" in check.detail
    assert "NVIDIA card1 [0000:02:00.0] (driver nvidia, power suspended)" in check.detail
    assert "ONNX Runtime gets card1" in check.detail and "would get Intel card0" in check.detail
    assert "runtime-suspended now, which is normal" in check.detail


def test_prime_offload_variables_change_opengl_not_cuda():
    probes = mx230_laptop()
    probes["env"] = {"__NV_PRIME_RENDER_OFFLOAD": "1", "__GLX_VENDOR_LIBRARY_NAME": "nvidia"}
    checks = checks_by_name(probes)
    assert "would get NVIDIA (PRIME render offload requested)" in checks["GPU selection (hybrid graphics)"].detail
    assert "CUDA ignores them" in checks["environment"].detail


def test_mx230_laptop_with_the_cuda12_line_passes():
    probes = mx230_laptop()
    probes["ort"] = ort_info("1.26.0", "12.8")
    probes["cuda_facts"] = facts("1.26.0", "12.8")
    cuda12 = (
        "libcudart.so.12",
        "libcublas.so.12",
        "libcublasLt.so.12",
        "libcurand.so.10",
        "libcudnn.so.9",
        "libcufft.so.11",
    )
    probes["libraries"] = {**loaded(*cuda12), **loaded("libcuda.so.1")}
    report = build_report(probes)
    assert {c.name: c for c in report.checks}["CUDA versions (build / driver / GPU)"].status == OK
    assert report.cuda_usable, report.verdict


def test_suspended_dgpu_that_cuinit_cannot_find_fails_with_a_power_fix():
    probes = mx230_laptop()
    probes["cuda_facts"] = facts(cu_init_result=100, device_count=0)
    check = checks_by_name(probes)["GPU selection (hybrid graphics)"]
    assert check.status == FAIL
    assert "echo on | sudo tee /sys/bus/pci/devices/0000:02:00.0/power/control" in check.fix


def test_nouveau_instead_of_nvidia():
    tree = sysfs_tree(
        {
            "class/drm/card1/device/uevent": "DRIVER=nouveau\nPCI_SLOT_NAME=0000:02:00.0\n",
            "bus/pci/devices/0000:02:00.0/uevent": "DRIVER=nouveau\nPCI_SLOT_NAME=0000:02:00.0\n",
        }
    )
    probes = mx230_laptop()
    probes["gpus_sysfs"] = sysfs_probe(tree)
    probes["nvidia_module"] = {"proc_version": None, "modules": ["nouveau"]}
    probes["nvidia_smi"] = {
        "path": "/usr/bin/nvidia-smi",
        "query": {"rc": 9, "stdout": fixture("nvidia_smi_failed.txt"), "stderr": ""},
        "header": {"rc": 9, "stdout": fixture("nvidia_smi_failed.txt"), "stderr": ""},
    }
    probes["cuda_facts"] = facts(
        libcuda_error="libcuda.so.1: cannot open shared object file: No such file or directory",
        driver_cuda_version=None,
        cu_init_result=None,
        device_count=None,
    )
    checks = checks_by_name(probes)
    assert checks["nvidia kernel module"].status == FAIL and "nouveau" in checks["nvidia kernel module"].detail
    assert checks["GPU selection (hybrid graphics)"].status == FAIL
    assert "0000:02:00.0 → nouveau" in checks["GPU selection (hybrid graphics)"].detail
    assert checks["nvidia-smi"].status == FAIL
    assert "couldn't communicate with the NVIDIA driver" in checks["nvidia-smi"].detail


def test_laptop_switched_to_the_igpu_has_no_nvidia_module():
    # prime-select intel: the nvidia module is not loaded, so no DRM card for
    # the MX230; it is still a PCI display controller.
    tree = sysfs_tree({key: None for key in sysfs_tree() if key.startswith("class/drm/card1")})
    tree["bus/pci/devices/0000:02:00.0/uevent"] = "PCI_SLOT_NAME=0000:02:00.0\n"
    probes = mx230_laptop()
    probes["gpus_sysfs"] = sysfs_probe(tree)
    probes["nvidia_module"] = {"proc_version": None, "modules": []}
    checks = checks_by_name(probes)
    assert checks["nvidia kernel module"].status == FAIL
    assert "prime-select on-demand" in checks["nvidia kernel module"].fix
    selection = checks["GPU selection (hybrid graphics)"]
    assert selection.status == FAIL and "NVIDIA no DRM card [0000:02:00.0] (driver none" in selection.detail


def test_old_driver_for_a_cuda13_build():
    probes = h100_host()
    probes["nvidia_smi"] = smi("nvidia_smi_rtx3060_driver535_query.csv", "nvidia_smi_rtx3060_driver535.txt")
    probes["cuda_facts"] = facts(driver_cuda_version=12020)
    report = build_report(probes)
    check = {c.name: c for c in report.checks}["CUDA versions (build / driver / GPU)"]
    assert check.status == FAIL
    assert "built for CUDA 13.0 but the driver 535.183.01 supports CUDA up to 12.2" in check.detail
    assert "branch 580" in check.fix and "scripts/setup.sh --cuda 12" in check.fix
    # models.cuda's explanation says the same, and it leads the verdict.
    assert "driver supports CUDA 12.2" in report.verdict


def test_container_without_gpu_access():
    probes = h100_host()
    probes["container"]["dev_nvidia"] = []
    probes["nvidia_smi"] = {"path": None}
    probes["cuda_facts"] = facts(
        libcuda_error="libcuda.so.1: cannot open shared object file: No such file or directory",
        driver_cuda_version=None,
        cu_init_result=None,
        device_count=None,
    )
    probes["libraries"].update(not_loaded("libcuda.so.1"))
    checks = checks_by_name(probes)
    container = checks["container GPU access"]
    assert container.status == FAIL and "no /dev/nvidia* device" in container.detail
    assert "--gpus all" in container.fix and "deploy.resources.reservations.devices" in container.fix
    assert checks["driver library (libcuda.so.1)"].fix == doctor.CONTAINER_POINTER


def test_both_onnxruntime_packages_installed():
    probes = h100_host()
    probes["ort"]["packages"] = {"onnxruntime": "1.31.1", "onnxruntime-gpu": "1.31.1"}
    probes["cuda_facts"]["ort_packages"] = ["onnxruntime", "onnxruntime-gpu"]
    report = build_report(probes)
    check = {c.name: c for c in report.checks}["onnxruntime packages"]
    assert check.status == FAIL
    assert check.fix == "`pip uninstall -y onnxruntime onnxruntime-gpu && pip install 'onnxruntime-gpu[cuda,cudnn]'`"
    assert "both onnxruntime and onnxruntime-gpu are installed" in report.verdict


def test_cpu_only_onnxruntime():
    probes = h100_host()
    probes["ort"] = {
        "packages": {"onnxruntime": "1.31.1"},
        "version": "1.31.1",
        "build_cuda": "",
        "providers": ["AzureExecutionProvider", "CPUExecutionProvider"],
        "import_error": None,
    }
    probes["cuda_facts"] = facts(
        build="", ort_packages=["onnxruntime"], available_providers=["AzureExecutionProvider", "CPUExecutionProvider"]
    )
    checks = checks_by_name(probes)
    assert checks["onnxruntime packages"].status == FAIL
    assert "CPU-only build" in checks["onnxruntime packages"].detail
    assert checks["CUDA/cuDNN libraries"].status == SKIP
    assert checks["CUDA versions (build / driver / GPU)"].status == SKIP


def test_missing_cuda_libraries_are_named():
    probes = h100_host()
    probes["ldconfig"] = "\n".join(l for l in fixture("ldconfig_h100.txt").splitlines() if "libcublas" not in l)
    probes["libraries"].update(not_loaded("libcublas.so.13", "libcublasLt.so.13"))
    probes["cuda_facts"][
        "provider_library_error"
    ] = "libcublasLt.so.13: cannot open shared object file: No such file or directory"
    report = build_report(probes)
    check = {c.name: c for c in report.checks}["CUDA/cuDNN libraries"]
    assert check.status == FAIL
    assert "cannot find libcublas.so.13, libcublasLt.so.13" in check.detail
    assert "pip install 'onnxruntime-gpu[cuda,cudnn]'" in check.fix
    assert "Missing libraries: libcublas.so.13, libcublasLt.so.13" in report.verdict


def test_a_library_in_the_cache_that_fails_to_load_is_not_called_missing():
    probes = h100_host()
    probes["libraries"]["libcudnn.so.9"] = {"loaded": False, "error": "libcudnn.so.9: wrong ELF class: ELFCLASS32"}
    check = checks_by_name(probes)["CUDA/cuDNN libraries"]
    assert check.status == FAIL and "wrong ELF class" in check.detail and "cannot find" not in check.detail


def test_missing_cufft_only_warns():
    probes = h100_host()
    probes["ldconfig"] = "\n".join(l for l in fixture("ldconfig_h100.txt").splitlines() if "cufft" not in l)
    probes["libraries"].update(not_loaded("libcufft.so.12"))
    report = build_report(probes)
    assert {c.name: c for c in report.checks}["CUDA/cuDNN libraries"].status == WARN
    assert report.cuda_usable


@pytest.mark.parametrize(
    ("env", "status", "words"),
    [
        ({"CUDA_VISIBLE_DEVICES": "-1"}, FAIL, "hides every GPU"),
        ({"NVIDIA_DRIVER_CAPABILITIES": "utility"}, FAIL, "lacks 'compute'"),
        ({"LD_LIBRARY_PATH": "/usr/local/cuda/lib64/stubs:/usr/local/cuda/lib64"}, WARN, "stubs directory"),
        ({"ORT_TENSORRT_ENGINE_CACHE_ENABLE": "1"}, OK, "ORT_TENSORRT_ENGINE_CACHE_ENABLE='1'"),
    ],
)
def test_environment_variables(env, status, words):
    probes = h100_host()
    probes["env"] = env
    check = checks_by_name(probes)["environment"]
    assert check.status == status and words in check.detail


def test_several_gpus_without_pci_bus_order_warn():
    probes = h100_host()
    two = fixture("nvidia_smi_h100_query.csv") + "NVIDIA H100 80GB HBM3, 9.0, 580.95.05, 00000000:2A:00.0, 81559 MiB\n"
    probes["nvidia_smi"]["query"]["stdout"] = two
    check = checks_by_name(probes)["environment"]
    assert check.status == WARN and check.fix == "export CUDA_DEVICE_ORDER=PCI_BUS_ID"


def test_settings_that_keep_the_worker_on_cpu_or_past_the_last_gpu():
    probes = h100_host()
    probes["settings"]["device"] = "cpu"
    report = build_report(probes)
    # A stated choice is not nagged about; the verdict still says CUDA would work.
    settings = {c.name: c for c in report.checks}["IDENT_* settings"]
    assert settings.status == OK and settings.fix is None
    assert report.cuda_usable and "IDENT_DEVICE=cpu keeps the worker on the CPU" in report.verdict
    probes["settings"].update(device="auto", gpu_ids=[0, 1])
    check = checks_by_name(probes)["IDENT_* settings"]
    assert check.status == FAIL and "GPU(s) 1 asked for" in check.detail


def test_placement_check_quotes_ort_declining_the_cuda_ep():
    lines = [
        "\x1b[0;93m2026-11-23 23:13:41.874217540 [W:onnxruntime:Default, onnxruntime_pybind_state.cc:1295 "
        "CreateExecutionProviderFactoryInstance] Failed to create CUDAExecutionProvider. Require cuDNN 9.* and "
        "CUDA 13.*, and the latest MSVC runtime.\x1b[m",
        "2026-11-23 23:13:41.902833606 [V:onnxruntime:, session_state.cc:1578 VerifyEachNodeIsAssignedToAnEp] Node placements",
        "2026-11-23 23:13:41.902838474 [V:onnxruntime:, session_state.cc:1581 VerifyEachNodeIsAssignedToAnEp]  "
        "All nodes placed on [CPUExecutionProvider]. Number of nodes: 100",
    ]
    assert parse_node_placements(lines).counts == {"CPUExecutionProvider": 100}
    check = doctor.checks._placement_check({"key": "yunet_2023mar", "file": "y.onnx", "lines": lines, "error": None})
    assert check.status == WARN
    assert check.detail.startswith(
        "ONNX Runtime declined the CUDA EP for this session: Failed to create CUDAExecutionProvider"
    )


def test_placement_probe_mechanics_on_this_host(models_path):
    """The real capture: a verbose session with [CUDA, CPU] on whatever this host has."""
    result = doctor.probes._placement_log(models_path / "face_detection_yunet_2023mar.onnx", 0)
    assert result["error"] is None
    placement = parse_node_placements(result["lines"])
    assert placement is not None and placement.total > 0
    assert set(placement.counts) <= {"CUDAExecutionProvider", "CPUExecutionProvider"}


def test_placement_is_skipped_with_the_reason_when_cuda_cannot_run():
    probes = h100_host()
    probes["placements"] = {"skipped": "the CUDA EP cannot run on this host (no NVIDIA driver)", "models": []}
    (check,) = doctor.check_placements(probes)
    assert check.status == SKIP and "no NVIDIA driver" in check.detail


def test_placement_probe_skips_without_cuda(tmp_path):
    broken = doctor.CudaFacts(**facts(libcuda_error="libcuda.so.1: cannot open shared object file"))
    result = doctor.probe_placements(tmp_path, 0, broken)
    assert result["models"] == [] and "libcuda.so.1" in result["reason"]
    assert "CUDA execution provider" in result["skipped"]


# --- probes over recorded files ---------------------------------------------------------


def test_sysfs_probe_reads_drm_cards_and_pci_display_devices():
    gpus = sysfs_probe(sysfs_tree())
    assert [(g["card"], g["pci"], g["vendor"], g["driver"], g["boot_vga"], g["runtime_status"]) for g in gpus] == [
        ("card0", "0000:00:02.0", "0x8086", "i915", "1", "active"),
        ("card1", "0000:02:00.0", "0x10de", "nvidia", None, "suspended"),
    ]


def test_container_probe(tmp_path):
    assert doctor.probe_container(tmp_path) == {"in_container": False, "evidence": [], "dev_nvidia": []}
    (tmp_path / ".dockerenv").touch()
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "nvidia0").touch()
    (tmp_path / "dev" / "nvidiactl").touch()
    assert doctor.probe_container(tmp_path) == {
        "in_container": True,
        "evidence": ["/.dockerenv"],
        "dev_nvidia": ["/dev/nvidia0", "/dev/nvidiactl"],
    }


def test_kernel_module_probe(tmp_path):
    (tmp_path / "driver" / "nvidia").mkdir(parents=True)
    (tmp_path / "driver" / "nvidia" / "version").write_text(
        "NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.95.05\n"
    )
    (tmp_path / "modules").write_text(
        "nvidia_uvm 1921024 0 - Live 0x0\nnvidia 14229504 1 nvidia_uvm, Live 0x0\nsnd 1 0 - Live 0x0\n"
    )
    assert doctor.probe_nvidia_module(tmp_path) == {
        "proc_version": "NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.95.05",
        "modules": ["nvidia_uvm", "nvidia"],
    }


def test_nvidia_smi_probe_runs_both_commands():
    calls = []

    def runner(argv, **kwargs):
        calls.append(argv)
        out = fixture("nvidia_smi_mx230_query.csv") if len(argv) > 1 else fixture("nvidia_smi_mx230.txt")
        return subprocess.CompletedProcess(argv, 0, out, "")

    probed = doctor.probe_nvidia_smi(runner, which=lambda _: "/usr/bin/nvidia-smi")
    assert calls == [
        [
            "/usr/bin/nvidia-smi",
            "--query-gpu=name,compute_cap,driver_version,pci.bus_id,memory.total",
            "--format=csv,noheader",
        ],
        ["/usr/bin/nvidia-smi"],
    ]
    assert doctor.parse_smi_cuda_version(probed["header"]["stdout"]) == "13.0"
    assert doctor.probe_nvidia_smi(runner, which=lambda _: None) == {"path": None}


def test_env_probe_keeps_only_the_relevant_variables():
    env = {
        "CUDA_VISIBLE_DEVICES": "0",
        "LD_LIBRARY_PATH": "/x",
        "ORT_LOGGING_LEVEL": "0",
        "NVIDIA_VISIBLE_DEVICES": "all",
        "__NV_PRIME_RENDER_OFFLOAD": "1",
        "__GLX_VENDOR_LIBRARY_NAME": "nvidia",
        "DRI_PRIME": "1",
        "HOME": "/root",
        "IDENT_REDIS_URL": "redis://:secret@redis:6379/0",
    }
    assert set(doctor.probe_env(env)) == set(env) - {"HOME", "IDENT_REDIS_URL"}


# --- the recorded GPU-less container and the live run -------------------------------------


def test_recorded_gpuless_container():
    """Probes saved with `ident doctor --save-probes` on this project's CI machine."""
    report = build_report(json.loads(fixture("gpuless_container.probes.json")))
    assert not report.cuda_usable
    assert report.verdict.startswith("CUDA cannot be used, the worker would run on CPU: no NVIDIA driver: libcuda.so.1")
    assert (
        "Missing libraries: libcuda.so.1, libcublas.so.13, libcublasLt.so.13, libcurand.so.10, libcudnn.so.9"
        in report.verdict
    )


def _has_driver() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def vm_without_gpu(tmp_path: Path, device: str = "auto") -> dict:
    """The recorded GPU-less container with the PCI bus recorded on the development
    machine, a VM with no display device at all, read back by the real sysfs probes."""
    probes = json.loads(fixture("gpuless_container.probes.json"))
    tree = json.loads(fixture("sysfs_vm_no_gpu.json"))
    tree.pop("_comment")
    for relative, content in tree.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(content)
    probes["gpus_sysfs"] = doctor.probe_gpus_sysfs(tmp_path)
    probes["pci_devices"] = doctor.probe_pci_devices(tmp_path)
    probes["settings"]["device"] = device
    return probes


def test_a_machine_without_an_nvidia_gpu_is_told_so_not_to_install_drivers(tmp_path):
    probes = vm_without_gpu(tmp_path)
    assert probes["gpus_sysfs"] == [] and probes["pci_devices"] == 6
    report = build_report(probes)
    checks = {c.name: c for c in report.checks}
    assert not report.cuda_usable and report.exit_code == 1
    assert report.verdict == "CUDA cannot be used, the worker would run on CPU: no NVIDIA GPU in this machine; " \
                             "set IDENT_DEVICE=cpu"
    selection = checks["GPU selection (hybrid graphics)"]
    assert selection.status == FAIL and "none of its 6 PCI devices is a display device" in selection.detail
    assert "IDENT_DEVICE=cpu" in selection.fix
    # The facts stay (no nvidia-smi, no libcuda); the fixes for a machine with a GPU go.
    assert checks["nvidia-smi"].status == checks["driver library (libcuda.so.1)"].status == FAIL
    fixes = " ".join(c.fix or "" for c in report.checks)
    for advice in ("Container Toolkit", "modprobe", "pip install", "install the NVIDIA driver"):
        assert advice not in fixes
    assert checks["container GPU access"].fix == doctor.NO_GPU_POINTER


def test_cpu_chosen_on_a_machine_without_an_nvidia_gpu_is_not_nagged(tmp_path):
    report = build_report(vm_without_gpu(tmp_path, device="cpu"))
    checks = {c.name: c for c in report.checks}
    assert checks["IDENT_* settings"].status == OK and checks["IDENT_* settings"].fix is None
    assert report.verdict.endswith("no NVIDIA GPU in this machine; IDENT_DEVICE=cpu already says so")
    assert not any("IDENT_DEVICE=auto" in (c.fix or "") for c in report.checks)


def test_an_unreadable_pci_bus_proves_nothing(tmp_path):
    assert doctor.probe_pci_devices(tmp_path) is None
    probes = vm_without_gpu(tmp_path / "sys")
    probes["pci_devices"] = None
    report = build_report(probes)
    assert checks_by_name(probes)["GPU selection (hybrid graphics)"].status == SKIP
    assert "no NVIDIA GPU in this machine" not in report.verdict


@pytest.mark.skipif(_has_driver(), reason="this host has an NVIDIA driver; the test is about a GPU-less one")
def test_live_doctor_on_this_gpuless_host():
    out = io.StringIO()
    with redirect_stdout(out):
        code = doctor.main(["--json", "--no-models"])
    report = json.loads(out.getvalue())
    assert code == 1 and report["cuda_usable"] is False
    gpu_on_the_bus = any(g["vendor"] == doctor.NVIDIA_VENDOR for g in doctor.probe_gpus_sysfs())
    if doctor.probe_pci_devices() and not gpu_on_the_bus:
        assert "no NVIDIA GPU in this machine" in report["verdict"]
        return
    assert "no NVIDIA driver: libcuda.so.1 cannot be loaded" in report["verdict"]
    build = next(c for c in report["checks"] if c["name"] == "onnxruntime packages")["detail"]
    if "built for CUDA 13" in build:
        assert "libcublasLt.so.13" in report["verdict"]
    assert {c["status"] for c in report["checks"]} <= {OK, WARN, FAIL, SKIP}


# --- CLI ---------------------------------------------------------------------------------


def test_cli_exit_codes_from_saved_probes(tmp_path):
    healthy, laptop, garbage = tmp_path / "h100.json", tmp_path / "mx230.json", tmp_path / "bad.json"
    healthy.write_text(json.dumps(h100_host()))
    laptop.write_text(json.dumps(mx230_laptop()))
    garbage.write_text("{not json")
    with redirect_stdout(io.StringIO()):
        assert doctor.main(["--from-probes", str(healthy)]) == 0
        assert doctor.main(["--from-probes", str(laptop), "--json"]) == 1
    assert doctor.main(["--from-probes", str(garbage)]) == 2


def test_probes_that_cannot_be_saved_are_a_plain_error(tmp_path, capsys):
    probes = tmp_path / "h100.json"
    probes.write_text(json.dumps(h100_host()))
    target = tmp_path / "no such folder" / "probes.json"
    with redirect_stdout(io.StringIO()):
        code = doctor.main(["--from-probes", str(probes), "--save-probes", str(target)])
    said = capsys.readouterr().err
    assert code == 2 and "internal error" not in said and "Traceback" not in said
    assert "cannot write the probes to" in said and "No such file or directory" in said


def test_internal_error_is_exit_code_2(tmp_path, monkeypatch):
    def broken(probes):
        raise RuntimeError("a probe bug")

    monkeypatch.setattr(doctor.checks, "CHECKS", (broken,))
    path = tmp_path / "h100.json"
    path.write_text(json.dumps(h100_host()))
    assert doctor.main(["--from-probes", str(path)]) == 2


def test_mountable_as_a_subcommand():
    import argparse

    parser = argparse.ArgumentParser(prog="ident")
    sub = parser.add_subparsers(dest="command")
    doctor.add_arguments(sub.add_parser("doctor"))
    args = parser.parse_args(["doctor", "--json", "--no-models"])
    assert (args.json, args.no_models, args.from_probes) == (True, True, None)


def test_table_rendering_shows_every_check_and_the_verdict():
    from rich.console import Console

    report = build_report(mx230_laptop())
    console = Console(record=True, width=400, color_system=None)
    doctor.render(report, console)
    text = console.export_text()
    for check in report.checks:
        assert check.name in text
    assert "sm_61 (Pascal)" in text and report.verdict in " ".join(text.split())


def test_table_on_an_80_column_terminal_cuts_nothing_short():
    from rich.console import Console

    report = build_report(mx230_laptop())
    console = Console(record=True, width=80, color_system=None)
    doctor.render(report, console)
    assert "…" not in console.export_text()


def test_json_is_the_same_report():
    report = build_report(copy.deepcopy(h100_host()))
    data = json.loads(json.dumps(report.to_dict()))
    assert data["cuda_usable"] is True and len(data["checks"]) == len(report.checks)
    assert set(data["checks"][0]) == {"name", "status", "detail", "fix"}
