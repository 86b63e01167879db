"""The FPIR-calibrated open-set threshold: pure arithmetic, checked against its own definition."""

from __future__ import annotations

import random

import pytest

from galleries.thresholds import default_threshold, fpir_at, fpir_threshold
from models.catalog import get_spec
from tasks.settings import Settings

FACE = get_spec("arcface_mobilefacenet").params


@pytest.mark.parametrize("templates", [10, 100, 1000, 10**6])
def test_the_threshold_holds_fpir_at_the_target(templates):
    mean, sd = FACE["impostor_scores"]
    threshold = fpir_threshold(mean, sd, templates, 0.01, floor=-1.0)
    assert fpir_at(threshold, mean, sd, templates) == pytest.approx(0.01, rel=1e-6)


def test_it_rises_with_the_gallery_and_never_drops_below_the_1_to_1_threshold():
    mean, sd = FACE["impostor_scores"]
    values = [fpir_threshold(mean, sd, n, 0.01, FACE["match_threshold"]) for n in (1, 5, 100, 1000, 10**6)]
    assert values == sorted(values)
    assert values[0] == FACE["match_threshold"] and values[-1] > 0.6


def test_the_model_matches_a_simulation_of_strangers():
    """Draw strangers' best scores from the impostor model itself: the share over the threshold is the FPIR."""
    mean, sd, templates = 0.0, 0.1, 200
    threshold = fpir_threshold(mean, sd, templates, 0.05, floor=-1.0)
    rng = random.Random(7)
    searches = 4000
    false = sum(max(rng.gauss(mean, sd) for _ in range(templates)) >= threshold for _ in range(searches))
    assert false / searches == pytest.approx(0.05, abs=0.012)


def test_what_sets_the_default():
    settings = Settings()
    value, basis = default_threshold(FACE, "vision", settings, 1000)
    assert basis == {"source": "target_fpir", "target_fpir": 0.01, "templates": 1000} and 0.45 < value < 0.55
    fixed = Settings(face_identify_threshold=0.6)
    assert default_threshold(FACE, "vision", fixed, 1000) == (0.6, {"source": "IDENT_FACE_IDENTIFY_THRESHOLD"})
    uncalibrated = dict(get_spec("arcface_w600k_mbf").params)
    value, basis = default_threshold(uncalibrated, "vision", settings, 1000)
    assert value == uncalibrated["match_threshold"] and "no 1:N calibration" in basis["source"]
