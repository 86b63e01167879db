"""The open-set threshold of a gallery, calibrated as a false-positive identification rate (FPIR).

A stranger's search compares the probe with every template of the gallery and
reports the best; it is a false positive when that best clears the threshold.
With impostor scores modelled as a normal distribution N(mean, sd) (fitted per
model on ../shared/data, docs/galleries.md) and the T templates of the gallery
as independent tries,

    FPIR(t) = 1 - (1 - FMR(t)) ** T,   FMR(t) = P(impostor score >= t),

so the threshold that holds FPIR at a target rises with the gallery: about
0.35 for a handful of faces, 0.44 at 100 templates, 0.51 at 1000. It never
goes below the model's 1:1 match threshold: a gallery is never looser than
verify. Templates of one subject are correlated, so counting each as a try
overstates FPIR a little; the threshold errs on the strangers' side.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any, Mapping

_STANDARD_NORMAL = NormalDist()


def fpir_threshold(impostor_mean: float, impostor_sd: float, templates: int, target_fpir: float,
                   floor: float) -> float:
    """The lowest cosine threshold at which a gallery of ``templates`` keeps FPIR at ``target_fpir``."""
    tries = max(1, int(templates))
    # The per-comparison false match rate that T tries turn into the target FPIR.
    fmr = -_expm1_log1p(-target_fpir, 1.0 / tries)
    threshold = impostor_mean + impostor_sd * _STANDARD_NORMAL.inv_cdf(1.0 - fmr)
    return max(floor, min(1.0, threshold))


def fpir_at(threshold: float, impostor_mean: float, impostor_sd: float, templates: int) -> float:
    """The model's FPIR of a gallery of ``templates`` at ``threshold``."""
    fmr = 1.0 - NormalDist(impostor_mean, impostor_sd).cdf(threshold)
    return 1.0 - (1.0 - fmr) ** max(1, int(templates))


def _expm1_log1p(x: float, power: float) -> float:
    """(1 + x) ** power - 1, accurate when the result is tiny (a target FPIR over a million templates)."""
    return math.expm1(power * math.log1p(x))


def threshold_variable(modality: str) -> str:
    return "IDENT_FACE_IDENTIFY_THRESHOLD" if modality == "vision" else "IDENT_SPEAKER_IDENTIFY_THRESHOLD"


def default_threshold(model_params: Mapping[str, Any], modality: str, settings: Any,
                      templates: int) -> tuple[float, dict]:
    """A gallery's threshold when neither the call nor the gallery sets one, and what set it.

    The setting for the modality when given; else the FPIR-calibrated value for
    the gallery's size; else, for a model with no 1:N calibration, its 1:1
    match threshold.
    """
    configured = settings.face_identify_threshold if modality == "vision" else settings.speaker_identify_threshold
    if configured is not None:
        return float(configured), {"source": threshold_variable(modality)}
    floor = float(model_params["match_threshold"])
    if "impostor_scores" not in model_params:
        return floor, {"source": "match_threshold (no 1:N calibration for this model)"}
    mean, sd = model_params["impostor_scores"]
    target = settings.gallery_target_fpir
    value = round(fpir_threshold(mean, sd, templates, target, floor), 4)
    return value, {"source": "target_fpir", "target_fpir": target, "templates": int(templates)}
