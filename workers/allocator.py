"""glibc's malloc, told to keep the memory a job frees for the next job.

Every job allocates and frees the same few large buffers: the decoded image or
audio, its resized and float copies. glibc serves each buffer over its mmap
threshold (128 KiB at first, raised on the fly up to 32 MiB) with a fresh
mmap and hands it back to the kernel when freed, so the next job page-faults
the same megabytes in again, each page zeroed by the kernel: 1,200 to 1,600
page faults and ~3 ms of system time per photo in a vision pool process, about
a tenth of its CPU (docs/benchmarks.md). A fixed threshold of 32 MiB (glibc's
largest) keeps those buffers on the heap, and a trim threshold of 64 MiB keeps
freed heap memory for reuse: ~50 page faults per photo, resident memory +4 MB.
Buffers over 32 MiB (very large images) are still mapped and returned at once.

Python's ``ctypes`` is enough: ``mallopt`` is glibc's documented interface for
these settings, and there is no package for it. An operator who configures the
allocator (glibc's ``MALLOC_*`` variables or ``GLIBC_TUNABLES``, or another
allocator in ``LD_PRELOAD``) keeps that configuration.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

log = logging.getLogger(__name__)

# From glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD_BYTES = 32 << 20
TRIM_THRESHOLD_BYTES = 64 << 20


# glibc's own ways to set the same thresholds: its environment variables and tunables.
THRESHOLD_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
THRESHOLD_TUNABLES = ("glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold", "glibc.malloc.top_pad",
                      "glibc.malloc.mmap_max")


def operator_configured(environ=os.environ) -> str | None:
    """The variable through which the operator already configured the allocator, if any."""
    for name in THRESHOLD_VARIABLES:
        if name in environ:
            return name
    if any(tunable in environ.get("GLIBC_TUNABLES", "") for tunable in THRESHOLD_TUNABLES):
        return "GLIBC_TUNABLES"
    if environ.get("LD_PRELOAD", "").strip():  # jemalloc, tcmalloc, mimalloc...
        return "LD_PRELOAD"
    return None


def keep_freed_memory(environ=os.environ) -> str:
    """Set this process's malloc thresholds; returns what was done, for the log and for status."""
    configured = operator_configured(environ)
    if configured:
        return f"left as configured by {configured}"
    if platform.libc_ver()[0] != "glibc":
        return "left alone: not glibc"
    libc = ctypes.CDLL(None)
    # mallopt returns 1 on success and 0 when glibc rejects the value.
    accepted = (libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
                and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    if not accepted:
        log.warning("glibc rejected the malloc thresholds; every job will page-fault its buffers in again")
        return "left alone: glibc rejected the thresholds"
    return f"glibc: mmap threshold {MMAP_THRESHOLD_BYTES >> 20} MiB, trim threshold {TRIM_THRESHOLD_BYTES >> 20} MiB"
