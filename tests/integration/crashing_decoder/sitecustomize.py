"""Test only: a decoder that kills its process on a marked photo, as a segfault or the OOM killer would.

On PYTHONPATH for the worker of tests/integration/test_batching.py that checks a
batch whose process dies on one job; no real payload crashes a decoder on demand.
"""

import os
import signal

import cv2

CRASH_MARKER = b"IDENT-TEST-CRASH"
_imdecode = cv2.imdecode


def _imdecode_or_die(buffer, flags, *args):
    if CRASH_MARKER in bytes(buffer):
        os.kill(os.getpid(), signal.SIGKILL)
    return _imdecode(buffer, flags, *args)


cv2.imdecode = _imdecode_or_die
