"""Fixtures for the audio pipeline tests: real models, real recordings, no Redis.

The expensive part, one analysis of every labelled recording, is done once per
session (batched through ``analyze_many``, as a worker would) and shared by the
tests that only read results. Measured numbers (speaker AUC, spoof score
tables) are collected in ``REPORT`` and printed at the end of the run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.settings import Settings
from tests.audio.helpers import REPORT

AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".opus")


def pytest_terminal_summary(terminalreporter) -> None:
    if REPORT:
        terminalreporter.write_sep("-", "audio measurements")
        for line in REPORT:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def audio_parts(worker_parts):
    return worker_parts("audio")


@pytest.fixture(scope="session")
def audio_sessions(audio_parts) -> dict:
    return audio_parts[0]


@pytest.fixture(scope="session")
def audio_specs(audio_parts) -> dict:
    return audio_parts[1]


@pytest.fixture(scope="session")
def audio_settings(audio_parts) -> Settings:
    return audio_parts[2]


@pytest.fixture(scope="session")
def audio_pipeline(audio_sessions, audio_specs, audio_settings):
    from workers.audio.pipeline import AudioPipeline

    return AudioPipeline(audio_sessions, audio_specs, audio_settings)


@pytest.fixture(scope="session")
def vad(audio_sessions, audio_specs):
    from workers.audio.silero_vad import SileroVAD

    return SileroVAD(audio_sessions["vad"], audio_specs["vad"])


@pytest.fixture(scope="session")
def audio_files(labelled_files: dict) -> list[str]:
    """Every labelled recording under audio/ (relative paths)."""
    return sorted(p for p in labelled_files if p.startswith("audio/") and p.lower().endswith(AUDIO_SUFFIXES))


@pytest.fixture(scope="session")
def analyses(audio_pipeline, audio_files, data_path: Path, audio_settings) -> dict[str, dict]:
    """One analysis of every labelled recording, in batches of IDENT_MAX_BATCH."""
    results: dict[str, dict] = {}
    step = audio_settings.max_batch
    for i in range(0, len(audio_files), step):
        names = audio_files[i : i + step]
        out = audio_pipeline.analyze_many([(data_path / n).read_bytes() for n in names])
        results.update(zip(names, out))
    failed = {p: repr(r) for p, r in results.items() if isinstance(r, Exception)}
    assert not failed, f"recordings that failed to analyse: {failed}"
    return results


@pytest.fixture(scope="session")
def decode_file(data_path: Path):
    from workers.audio.decoding import decode

    def _decode(relative: str, max_seconds: float = 600.0):
        return decode((data_path / relative).read_bytes(), max_seconds)

    return _decode
