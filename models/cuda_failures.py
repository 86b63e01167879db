"""What an ONNX Runtime CUDA error means, and what the operator can do about it.

ORT reports a failing GPU call as text inside its own exception types: ``CUDA
failure 209: no kernel image is available …``, ``CUDNN failure 5003:
CUDNN_STATUS_EXECUTION_FAILED_CUDART …``, ``Failed to allocate memory for
requested buffer …``. ``classify`` reads that text into a short code (the same
codes the status reports as ``reason``) and ``explain`` turns a code into a
sentence: ORT's own words first, then what they mean here. Pure functions, so
every recorded error text is a unit test (tests/ops/fixtures/ort_cuda_errors.json).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from models.cuda_builds import CUDNN_LAST_FOR_PRE_TURING, TURING, architecture, no_code_reason, sm

# Most specific first: an arch mismatch may also say "execution failed".
_PATTERNS = (
    ("no_kernel_for_arch", r"no kernel image is available|cudaErrorNoKernelImageForDevice|CUDA failure 209\b"),
    ("unsupported_ptx", r"unsupported toolchain|cudaErrorUnsupportedPtxVersion|CUDA failure 222\b"),
    ("cudnn_arch_mismatch", r"CUDNN_STATUS_(?:NOT_SUPPORTED_)?ARCH_MISMATCH"),
    ("cublas_arch_mismatch", r"CUBLAS_STATUS_ARCH_MISMATCH"),
    ("out_of_memory", r"Failed to allocate memory|Available memory of \d+ is smaller|out of memory"
                      r"|CUDNN_STATUS_ALLOC_FAILED|CUBLAS_STATUS_ALLOC_FAILED|cudaErrorMemoryAllocation"),
    ("insufficient_driver", r"driver version is insufficient|cudaErrorInsufficientDriver|CUDA failure 35\b"),
    ("no_device", r"no CUDA-capable device|cudaErrorNoDevice|CUDA failure 100\b"),
    ("cudnn_missing", r"libcudnn[^:\s]*: cannot open shared object file"),
    ("provider_library_missing", r"Failed to load library \S*libonnxruntime_providers_cuda"),
    ("cudnn_execution_failed", r"CUDNN_STATUS_EXECUTION_FAILED|CUDNN_STATUS_INTERNAL_ERROR|CUDNN(?:_FE)? failure"
                               r"|CUDNN error|CUDNN Frontend"),
    ("cublas_failed", r"CUBLAS failure|CUBLAS error|CUBLAS_STATUS_"),
    ("cuda_error", r"CUDA failure \d+|cudaError\w+|CUDA error|CUDAExecutionProvider"),
)
ARCH_CODES = ("no_kernel_for_arch", "unsupported_ptx", "cudnn_arch_mismatch", "cublas_arch_mismatch")

# Where ORT's message says what failed; what comes before it is ORT's source
# paths and C++ signatures, and after it the source location and this host's
# name: the operator needs the error, not ORT's build tree.
_WHAT_FAILED = re.compile(
    r"CUDA failure \d+|CUDNN(?:_FE)? failure \d+|CUBLAS failure \d+|CUDA error \w+|CUDNN error|CUBLAS error"
    r"|Failed to allocate memory|Available memory of|Failed to load library|Failed to initialize CUDNN Frontend"
    r"|no CUDA-capable device"
)
_NODE = re.compile(r"running (\w+) node\. Name:'([^']*)'")
_ORT_LOCATION = re.compile(r"\s*;\s*(?:hostname|file|line|expr)=[^;]*", re.IGNORECASE)
_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")
_WORDS_LIMIT = 400


@dataclass(frozen=True)
class CudaFailure:
    code: str
    words: str  # ORT's message, trimmed of its source locations


def classify(text: str) -> CudaFailure | None:
    """The failure an ORT message reports, or None when it is not about the GPU (a bad input, say)."""
    for code, pattern in _PATTERNS:
        if re.search(pattern, text):
            return CudaFailure(code, ort_words(text))
    return None


def ort_words(text: str) -> str:
    """The part of ORT's message that says what failed, and in which node."""
    first_paragraph = text.strip().split("\n\n", 1)[0]  # ORT may append a JSON dump after a blank line
    words = " ".join((first_paragraph if _WHAT_FAILED.search(first_paragraph) else text).split())
    # The last one: an error ORT wraps in another ("Failed to initialize CUDNN Frontend ... CUDNN_FE failure 8")
    # is told best by the innermost.
    found = list(_WHAT_FAILED.finditer(words))
    if found:
        node = _NODE.search(words[: found[-1].start()])
        words = (f"{node.group(1)} node {node.group(2)!r}: " if node else "") + words[found[-1].start():]
    words = _ORT_PREFIX.sub("", _ORT_LOCATION.sub("", words)).strip().rstrip(";").strip()
    return words if len(words) <= _WORDS_LIMIT else words[: _WORDS_LIMIT - 1] + "…"


def meaning(code: str, ort_version: str | None, cc: tuple[int, int] | None, mem_limit_mib: int | None) -> str:
    """What a failure code means on this host, and the way out."""
    if code in ARCH_CODES:
        card = f"{sm(cc)} ({architecture(cc)})" if cc else "this GPU's architecture"
        if code == "cudnn_arch_mismatch" and cc is not None and cc < TURING:
            return (f"the installed cuDNN has no kernels for {card}: cuDNN 9.11 dropped Maxwell, Pascal and Volta; "
                    f"`scripts/setup.sh --cuda 12` installs onnxruntime-gpu's CUDA 12 line with nvidia-cudnn-cu12 "
                    f"{CUDNN_LAST_FOR_PRE_TURING}")
        if cc is not None:
            from_table = no_code_reason(ort_version, cc)
            if from_table:
                return from_table
        library = {"cudnn_arch_mismatch": "cuDNN", "cublas_arch_mismatch": "cuBLAS"}.get(code, f"onnxruntime-gpu {ort_version or ''}".strip())
        return (f"the installed {library} has no kernels for {card}: run `scripts/setup.sh`, which picks the build "
                "for the card from nvidia-smi (`scripts/setup.sh --cuda 12` on Pascal and Volta cards)")
    if code == "out_of_memory":
        limit = f" (this session may use {mem_limit_mib} MiB: IDENT_GPU_MEM_LIMIT_MB)" if mem_limit_mib else ""
        return (f"the GPU ran out of memory{limit}: run fewer pool processes per GPU, keep models on the CPU "
                "with IDENT_CPU_MODELS, or raise the limit; `ident doctor` weighs the models against the card")
    if code == "no_device":
        return "the driver sees no CUDA device: `ident doctor` checks the driver, CUDA_VISIBLE_DEVICES and the container"
    if code == "insufficient_driver":
        return "the NVIDIA driver is older than this onnxruntime-gpu's CUDA: upgrade it, or run `scripts/setup.sh`"
    if code in ("cudnn_missing", "provider_library_missing"):
        return "a CUDA library is missing: run `scripts/setup.sh` (it installs the pinned CUDA and cuDNN wheels), then `ident doctor`"
    if code == "cudnn_execution_failed":
        return ("cuDNN could not run a kernel on this GPU, most often a cuDNN without code for the card or one the "
                "driver is too old for: `ident doctor` checks both")
    return "a CUDA call failed: `ident doctor` checks the driver, the libraries and the card"


def explain(failure: CudaFailure, model: str, stage: str, ort_version: str | None, cc: tuple[int, int] | None,
            mem_limit_mib: int | None) -> str:
    return (f"{model} failed on CUDA while {stage} ({failure.words}): "
            f"{meaning(failure.code, ort_version, cc, mem_limit_mib)}")
