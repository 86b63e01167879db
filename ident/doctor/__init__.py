"""``ident doctor``: the "why is it on CPU?" checklist, run on this host.

Two halves, kept apart on purpose:

* ``collect()`` probes the host (nvidia-smi, the dynamic loader, ``ldconfig -p``,
  /sys, /proc, the environment, onnxruntime, a verbose CUDA session per model)
  and records what it saw as plain data: the *probes* dict.
* ``evaluate(probes)`` is a pure function from that dict to a list of
  :class:`Check`. Every broken host we know of is therefore a unit test over
  recorded outputs, and a user's ``--save-probes`` file reproduces their
  verdict on any machine.

The order of the checks is the order in which to fix things: a missing driver
first, a slow operator last.

The modules, each importing only those before it: ``parsers`` (pure functions
over recorded command output), ``checks`` (pure functions over the probes dict),
``probes`` (the only part that touches the host) and ``cli`` (``ident doctor``).
"""

from __future__ import annotations

from ident.doctor.checks import (
    CONTAINER_POINTER,
    FAIL,
    NO_GPU_POINTER,
    NVIDIA_VENDOR,
    OK,
    SKIP,
    WARN,
    Check,
    build_report,
    check_placements,
    evaluate,
)
from ident.doctor.cli import add_arguments, main, render, run
from ident.doctor.parsers import (
    cuda_library_sonames,
    parse_ldconfig,
    parse_node_placements,
    parse_smi_cuda_version,
    placement_lines,
)
from ident.doctor.probes import (
    gpu_memory_estimate,
    probe_container,
    probe_env,
    probe_gpus_sysfs,
    probe_nvidia_module,
    probe_nvidia_smi,
    probe_pci_devices,
    probe_placements,
)
from models.cuda import CudaFacts
from models.cuda_builds import parse_smi_query

# What the rest of the project and its tests use as ``ident.doctor.X``.
__all__ = [
    "CONTAINER_POINTER", "FAIL", "NO_GPU_POINTER", "NVIDIA_VENDOR", "OK", "SKIP", "WARN", "Check", "CudaFacts",
    "add_arguments", "build_report", "check_placements", "cuda_library_sonames", "evaluate", "gpu_memory_estimate",
    "main", "parse_ldconfig", "parse_node_placements", "parse_smi_cuda_version", "parse_smi_query",
    "placement_lines", "probe_container", "probe_env", "probe_gpus_sysfs", "probe_nvidia_module",
    "probe_nvidia_smi", "probe_pci_devices", "probe_placements", "render", "run",
]
