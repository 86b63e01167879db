"""Test only: worker processes on a GPU that fails as IDENT_TEST_GPU_FAILURE says (tests/gpu_standin.py).

On PYTHONPATH for the workers of tests/integration/test_gpu_fallback.py. The
driver's facts say a working GPU is there, so the worker plans CUDA; sessions
asked for CUDA are real CPU sessions that report CUDA until the staged failure.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from tests.gpu_standin import FailingGpu, cuda_host_facts  # noqa: E402

_failing = FailingGpu.from_env()
if _failing is not None:
    import os

    import models.cuda

    # IDENT_TEST_GPU_CC: the card's compute capability, e.g. 6.1 (default: an H100's 9.0).
    _cc = tuple(int(part) for part in os.environ.get("IDENT_TEST_GPU_CC", "9.0").split("."))
    models.cuda.probe_cuda = lambda: cuda_host_facts(_cc)
    _failing.install()
