"""Helpers shared by the audio tests (plain functions, no fixtures)."""

from __future__ import annotations

import json
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures"

# Lines for the terminal summary, filled by the tests that measure something.
REPORT: list[str] = []


def load_fixture(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


def report(line: str) -> None:
    REPORT.append(line)


def auc(positives, negatives) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))
