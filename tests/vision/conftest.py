"""Fixtures for the vision pipeline tests: real models, real photos, no Redis.

Expensive things (sessions, the pipeline, one analysis of every photo) are
session-scoped so the whole folder stays within about a minute on one core.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# pyproject's pythonpath puts the checkout on sys.path, not this folder; the
# shared helper `face_pairs` lives here.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from models.catalog import get_spec  # noqa: E402
from tasks.settings import Settings  # noqa: E402

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@pytest.fixture(scope="session")
def vision_parts(worker_parts):
    return worker_parts("vision")


@pytest.fixture(scope="session")
def vision_sessions(vision_parts) -> dict:
    return vision_parts[0]


@pytest.fixture(scope="session")
def vision_specs(vision_parts) -> dict:
    return vision_parts[1]


@pytest.fixture(scope="session")
def vision_settings(vision_parts) -> Settings:
    return vision_parts[2]


@pytest.fixture(scope="session")
def pipeline(vision_sessions, vision_specs, vision_settings):
    from workers.vision.pipeline import VisionPipeline

    return VisionPipeline(vision_sessions, vision_specs, vision_settings)


@pytest.fixture(scope="session")
def image_files(labelled_files: dict) -> list[str]:
    """Every labelled photo under images/ (relative paths)."""
    return sorted(p for p in labelled_files if p.startswith("images/") and p.lower().endswith(IMAGE_SUFFIXES))


@pytest.fixture(scope="session")
def analyses(pipeline, image_files, data_path: Path) -> dict[str, dict]:
    """One batched analysis of every photo, shared by the tests that only read results."""
    payloads = [(data_path / p).read_bytes() for p in image_files]
    results = pipeline.analyze_many(payloads, [None] * len(payloads))
    failed = {p: r for p, r in zip(image_files, results) if isinstance(r, Exception)}
    assert not failed, f"photos that failed to analyse: {failed}"
    return dict(zip(image_files, results))


@pytest.fixture(scope="session")
def decoded(image_files, data_path: Path, vision_settings) -> dict:
    from workers.vision.imaging import decode_image

    return {p: decode_image((data_path / p).read_bytes(), vision_settings.max_pixels) for p in image_files}


@pytest.fixture(scope="session")
def embedding_spec():
    return get_spec("arcface_mobilefacenet")
