"""Parsers: pure functions over recorded command output.

nvidia-smi's header, ``ldconfig -p``, the shared libraries an onnxruntime
build's CUDA EP loads, and ONNX Runtime's verbose node-placement log.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable

from models.cuda import CPU_EP, CUDA_EP


def parse_smi_cuda_version(text: str) -> str | None:
    """The 'CUDA Version: 13.0' of plain nvidia-smi's header: the newest CUDA the driver supports."""
    match = re.search(r"CUDA Version:\s*([0-9]+(?:\.[0-9]+)?)", text or "")
    return match.group(1) if match else None


def parse_ldconfig(text: str) -> dict[str, list[str]]:
    """``ldconfig -p`` -> soname -> paths (a soname may be cached for several ABIs)."""
    found: dict[str, list[str]] = {}
    for line in (text or "").splitlines():
        match = re.match(r"^\s*(\S+)\s+\(([^)]*)\)\s+=>\s+(\S+)", line)
        if match:
            found.setdefault(match.group(1), []).append(match.group(3))
    return found


def _major(version: str | None) -> int | None:
    match = re.match(r"^\s*(\d+)", version or "")
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class LibSpec:
    soname: str
    role: str
    required: bool = True


def cuda_library_sonames(build_cuda: str) -> list[LibSpec]:
    """The shared libraries the CUDA EP of an onnxruntime built for ``build_cuda`` loads.

    The sonames follow the CUDA major (libcublasLt.so.13 for CUDA 13); cuRAND
    has kept major 10 and cuFFT runs one behind the toolkit. cuFFT is only
    loaded for FFT operators, so its absence does not stop the EP.
    """
    major = _major(build_cuda)
    if major is None:
        return []
    cudart = "libcudart.so.11.0" if major == 11 else f"libcudart.so.{major}"
    cudnn = "8" if major == 11 else "9"
    return [
        LibSpec("libcuda.so.1", "NVIDIA driver"),
        LibSpec(cudart, "CUDA runtime"),
        LibSpec(f"libcublas.so.{major}", "cuBLAS"),
        LibSpec(f"libcublasLt.so.{major}", "cuBLASLt"),
        LibSpec("libcurand.so.10", "cuRAND"),
        LibSpec(f"libcudnn.so.{cudnn}", "cuDNN"),
        LibSpec(f"libcufft.so.{major - 1}", "cuFFT (FFT operators only)", required=False),
    ]


# ORT colours its warnings with ANSI escapes even when stderr is a file.
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_LOG_LINE = re.compile(
    r"^\S+\s+\S+\s+\[(?P<severity>[VIWEF]):onnxruntime:[^,\]]*,\s*(?P<where>[^\]]*)\]\s?(?P<message>.*)$"
)
_ALL_PLACED = re.compile(r"All nodes placed on \[(?P<ep>[^\]]+)\]\. Number of nodes: (?P<n>\d+)")
_SOME_PLACED = re.compile(r"Node\(s\) placed on \[(?P<ep>[^\]]+)\]\. Number of nodes: (?P<n>\d+)")
_NODE_ENTRY = re.compile(r"^(?P<op>[A-Za-z0-9_.:]+) \((?P<name>.*)\)$")
_NO_KERNEL = re.compile(r"CUDA kernel not found in registries for Op type: (?P<op>\S+) node name: (?P<name>.*?)\s*$")
_FORCED_CPU = re.compile(r"Force fallback to CPU execution for node: (?P<name>.+?)(?: because .*)?\s*$")
_MEMCPY = re.compile(r"(?P<n>\d+) Memcpy nodes are added to the graph (?P<graph>\S+) for (?P<ep>[A-Za-z]+)")
_PLACEMENT_RELEVANT = re.compile(
    r"VerifyEachNodeIsAssignedToAnEp|Node placements|placed on \[|kernel not found in registries"
    r"|Force fallback to CPU execution|Memcpy nodes are added|Failed to create CUDAExecutionProvider"
)


@dataclass
class NodePlacement:
    """Where ONNX Runtime put each node of one session, from its verbose log."""

    counts: dict[str, int] = field(default_factory=dict)
    nodes: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    no_cuda_kernel: list[tuple[str, str]] = field(default_factory=list)
    forced_cpu: list[str] = field(default_factory=list)
    memcpy_nodes: int = 0

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def on(self, provider: str) -> int:
        return self.counts.get(provider, 0)

    def cpu_nodes(self) -> list[tuple[str, str]]:
        return self.nodes.get(CPU_EP, [])

    def unexplained_cpu_nodes(self) -> list[tuple[str, str]]:
        known = {name for _, name in self.no_cuda_kernel} | set(self.forced_cpu)
        return [(op, name) for op, name in self.cpu_nodes() if name not in known]


def placement_lines(lines: Iterable[str]) -> list[str]:
    """Only the lines the placement parser reads: a verbose session log runs to
    thousands of lines, and the probes dict is meant to be saved and shared."""
    kept = []
    for line in lines:
        stripped = _ANSI.sub("", line).strip()
        if _PLACEMENT_RELEVANT.search(stripped) or (
            stripped and not _LOG_LINE.match(stripped) and _NODE_ENTRY.match(stripped)
        ):
            kept.append(stripped)
    return kept


def parse_node_placements(lines: Iterable[str]) -> NodePlacement | None:
    """Parse ORT's verbose session-creation log (severity 0).

    ``VerifyEachNodeIsAssignedToAnEp`` in onnxruntime/core/framework/session_state.cc
    logs "Node placements", then either " All nodes placed on [EP]. Number of nodes: N"
    or, per EP, " Node(s) placed on [EP]. Number of nodes: N" followed by one
    "  OpType (node name)" line per node. The CUDA EP's GetCapability logs
    "CUDA kernel not found in registries for Op type: X node name: Y" for nodes it
    cannot run, and ORT's CPU-preference pass logs "Force fallback to CPU execution
    for node: Y" for shape computations it keeps on the CPU on purpose. Returns
    None when the log has no placement block (minimal build, or not verbose).
    """
    placement = NodePlacement()
    seen_block = False
    in_block = False
    provider: str | None = None
    for raw in lines:
        line = _ANSI.sub("", raw).strip()
        if not line or line.startswith("#"):
            continue
        match = _LOG_LINE.match(line)
        where = match.group("where") if match else ""
        message = (match.group("message") if match else line).strip()
        if match and in_block and "VerifyEachNodeIsAssignedToAnEp" not in where:
            in_block, provider = False, None
        if message == "Node placements":
            # A later block (a second session in the same log) replaces the first.
            placement.counts, placement.nodes = {}, {}
            seen_block, in_block, provider = True, True, None
            continue
        if in_block:
            found = _ALL_PLACED.search(message)
            if found:
                placement.counts[found.group("ep")] = int(found.group("n"))
                provider = None
                continue
            found = _SOME_PLACED.search(message)
            if found:
                provider = found.group("ep")
                placement.counts[provider] = int(found.group("n"))
                placement.nodes.setdefault(provider, [])
                continue
            entry = _NODE_ENTRY.match(message)
            if entry and provider is not None:
                placement.nodes[provider].append((entry.group("op"), entry.group("name")))
                continue
            in_block, provider = False, None
        found = _NO_KERNEL.search(message)
        if found:
            item = (found.group("op"), found.group("name"))
            if item not in placement.no_cuda_kernel:
                placement.no_cuda_kernel.append(item)
            continue
        found = _FORCED_CPU.search(message)
        if found:
            if found.group("name") not in placement.forced_cpu:
                placement.forced_cpu.append(found.group("name"))
            continue
        found = _MEMCPY.search(message)
        if found and found.group("ep") == CUDA_EP:
            placement.memcpy_nodes += int(found.group("n"))
    return placement if seen_block else None
