"""The gateway process imports no model code: it starts fast and scales apart from the workers."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO_ROOT

FORBIDDEN = ("numpy", "cv2", "onnxruntime", "onnx", "soundfile", "workers", "models", "galleries", "psycopg")

PROBE = """
import json, sys
from gateway.app import make_gateway
import ident.serve
from tasks.settings import Settings
app = make_gateway(Settings.from_env({"IDENT_API_KEYS": "k" * 32, "IDENT_API_RATE_LIMIT": "10/second"}))
app.openapi()
print(json.dumps(sorted(sys.modules)))
"""


def test_the_gateway_app_imports_no_model_numpy_opencv_or_worker_module():
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                          check=True)
    modules = json.loads(done.stdout.strip().splitlines()[-1])
    loaded = sorted(m for m in modules if m.split(".")[0] in FORBIDDEN)
    assert loaded == []
    # What it does need, so that the check above is not vacuous.
    assert {"fastapi", "limits", "celery", "gateway.app", "ident.serve"} <= set(modules)
