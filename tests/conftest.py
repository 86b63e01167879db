"""Shared fixtures: where the real models and data live.

Tests read models and data from ``../shared`` beside the checkout, or from
``IDENT_SHARED_DIR`` / ``IDENT_MODELS_DIR`` / ``IDENT_SAMPLES_DIR`` when set. They
are never copied into the repository.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_dir() -> Path:
    return Path(os.environ.get("IDENT_SHARED_DIR", REPO_ROOT.parent / "shared")).resolve()


def models_dir() -> Path:
    return Path(os.environ.get("IDENT_TEST_MODELS_DIR", shared_dir() / "models")).resolve()


def data_dir() -> Path:
    return Path(os.environ.get("IDENT_SAMPLES_DIR", shared_dir() / "data")).resolve()


def driver_present() -> bool:
    """Whether an NVIDIA driver can be loaded here (tests of the CPU fallback skip where it can)."""
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


@pytest.fixture(scope="session")
def models_path() -> Path:
    path = models_dir()
    if not path.is_dir():
        pytest.fail(f"real models not found at {path}: set IDENT_SHARED_DIR or IDENT_TEST_MODELS_DIR")
    return path


@pytest.fixture(scope="session")
def data_path() -> Path:
    path = data_dir()
    if not path.is_dir():
        pytest.fail(f"real data not found at {path}: set IDENT_SHARED_DIR or IDENT_SAMPLES_DIR")
    return path


@pytest.fixture(scope="session")
def labels(data_path: Path) -> dict:
    return json.loads((data_path / "labels.json").read_text())


@pytest.fixture(scope="session")
def labelled_files(labels: dict) -> dict[str, dict]:
    """labels.json's file entries keyed by their path relative to the data folder."""
    return {entry["path"]: entry for entry in labels["files"]}


@pytest.fixture(scope="session")
def worker_parts(models_path: Path, cpu_session_factory):
    """(sessions, specs, settings) of a worker kind, on plain CPU sessions: what a pipeline is built from."""
    from models.catalog import selected_models
    from tasks.settings import Settings

    settings = Settings(models_dir=models_path)

    def parts(kind: str):
        specs = selected_models(settings, kind)
        return {role: cpu_session_factory(spec.filename) for role, spec in specs.items()}, specs, settings

    return parts


@pytest.fixture(scope="session")
def cpu_session_factory(models_path: Path):
    """Plain CPU ONNX Runtime sessions for unit tests of one model's wrapper."""
    import onnxruntime as ort

    cache = {}

    def open_session(filename: str):
        if filename not in cache:
            options = ort.SessionOptions()
            options.log_severity_level = 3
            options.intra_op_num_threads = 1
            cache[filename] = ort.InferenceSession(
                str(models_path / filename), options, providers=["CPUExecutionProvider"]
            )
        return cache[filename]

    return open_session
