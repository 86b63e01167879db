"""The pool processes' malloc settings: jobs reuse the memory the previous job freed."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from workers.allocator import THRESHOLD_VARIABLES, keep_freed_memory, operator_configured

ROOT = Path(__file__).resolve().parents[2]

# A job's allocation pattern in small: a decoded photo, its float copy and a
# transposed copy live together, then all are freed. Prints the page faults
# per job after the first.
PROBE = """
import resource, sys
import numpy as np
sys.path.insert(0, {root!r})
if {tuned}:
    from workers.allocator import keep_freed_memory
    keep_freed_memory()
def job():
    photo = np.ones((1500, 1500, 3), np.uint8)
    as_float = photo.astype(np.float32)
    return float(np.ascontiguousarray(as_float.transpose(2, 0, 1))[0, 0, 0])
job()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    job()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""

ALLOCATOR_VARIABLES = (*THRESHOLD_VARIABLES, "GLIBC_TUNABLES", "LD_PRELOAD")


def page_faults_per_job(tuned: bool, env: dict) -> float:
    out = subprocess.run([sys.executable, "-c", PROBE.format(root=str(ROOT), tuned=tuned)],
                         env=env, capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


@pytest.fixture
def clean_env(monkeypatch):
    for name in ALLOCATOR_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return dict(os.environ)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the thresholds are glibc's")
def test_a_job_reuses_the_memory_the_last_job_freed(clean_env):
    untuned = page_faults_per_job(False, clean_env)
    tuned = page_faults_per_job(True, clean_env)
    assert untuned > 1000, "glibc's defaults should page-fault each job's buffers in again"
    assert tuned < 50, f"{tuned} page faults per job with the thresholds set"


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the thresholds are glibc's")
def test_the_settings_are_reported():
    assert keep_freed_memory({}) == "glibc: mmap threshold 32 MiB, trim threshold 64 MiB"


@pytest.mark.parametrize("environ, named", [
    ({"MALLOC_TRIM_THRESHOLD_": "1048576"}, "MALLOC_TRIM_THRESHOLD_"),
    ({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}, "GLIBC_TUNABLES"),
    ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, "LD_PRELOAD"),
])
def test_an_operators_allocator_settings_win(environ, named):
    assert operator_configured(environ) == named
    assert keep_freed_memory(environ) == f"left as configured by {named}"


def test_unrelated_settings_are_not_taken_for_allocator_settings():
    unrelated = {"MALLOC_ARENA_MAX": "2", "GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX512F", "LD_PRELOAD": " "}
    assert operator_configured(unrelated) is None
