"""AASIST: is this recording a live human voice or a synthetic / replayed one?

Model: AASIST (Jung et al., ICASSP 2022), clovaai/aasist ``AASIST.pth`` trained
on ASVspoof 2019 LA (upstream EER 0.83 %), converted to ONNX here; MIT licence
(NAVER Corp.). Catalog keys ``aasist`` and the lighter ``aasist_l`` (same I/O).

I/O: ``waveform`` float32 [B, 64600] (4.04 s of 16 kHz mono audio in [-1, 1];
the graph normalises nothing); outputs ``logits`` [B, 2] (class 1 = bona fide) and a 160-d
``embedding`` we do not use. The length is fixed: the graph's pooling sizes
were traced for 64600 samples.

Scoring, as upstream's evaluation: the score is the bona-fide logit
``logits[:, 1]``; higher is more genuine; ``is_bonafide = score >= threshold``
with the threshold calibrated per model in the catalog (docs/audio.md).

Level (our choice, upstream feeds the file as it is): the speech is scaled
to an RMS of ``speech_level_dbfs`` (catalog, -26 dB relative to full scale,
the active speech level that ITU-T P.56 normalises to) before windowing. The
model's score follows the input's level: measured on our labelled set, the
same spoof turned down by 20 dB scored 2 to 6 logits more genuine, enough to
pass as bona fide, and a loud genuine recording lost up to 3 logits. Scaled
to one level, the decision depends on the voice, not the volume control
(docs/audio.md, "Level"). There is no cap on the gain: a cap would leave
quieter-than-the-cap recordings to the volume shortcut again. Instead, speech
quieter than ``min_speech_level_dbfs`` (catalog, -55 dBFS) is too quiet to
judge: raised that far, the recording's own noise floor dominates what the
model sees, and noise scores as genuine (white noise leveled: -1.7). Fakes
began to pass from about -65 dBFS; the pipeline never calls such speech bona
fide, whatever its score.

Windows (our choice, upstream only scores the first 4 s of a file):

* audio shorter than a window is tiled (repeated) to 64600 samples, exactly
  as upstream ``data_utils.pad`` does;
* longer audio is cut into ``ceil(len / 64600)`` windows, at most
  ``max_windows`` (default 4), spread evenly from the start to the end (the
  last one ends at the last sample; with more audio than ``max_windows``
  windows cover, evenly spaced windows sample it instead);
* the recording's score is the mean of its windows' bona-fide logits. The
  mean is steadier than the minimum on genuine speech with a noisy stretch,
  and a synthetic recording is synthetic throughout, so it loses little.

The windows of every recording passed to :meth:`AASIST.score_many` are run
together in batches of ``batch_size``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

WINDOW_SAMPLES = 64600
MAX_WINDOWS = 4
BATCH_SIZE = 8
SPEECH_LEVEL_DBFS = -26.0
MIN_SPEECH_LEVEL_DBFS = -55.0


@dataclass(frozen=True)
class SpoofScore:
    score: float  # mean bona-fide logit over the windows
    window_scores: tuple[float, ...]
    speech_level_dbfs: float  # RMS of the speech as it came, before leveling; -inf for digital silence
    loud_enough: bool  # speech_level_dbfs >= the model's min_speech_level_dbfs: the score can be trusted


def tile(wave: np.ndarray, length: int = WINDOW_SAMPLES) -> np.ndarray:
    """Repeat ``wave`` until it fills ``length`` samples (upstream ``pad``), or cut it to ``length``."""
    wave = np.asarray(wave, dtype=np.float32)
    if len(wave) == 0:
        raise ValueError("cannot tile an empty waveform")
    repeats = length // len(wave) + 1
    return np.tile(wave, repeats)[:length]


def level_dbfs(wave: np.ndarray) -> float:
    """RMS of ``wave`` in dB relative to full scale (1.0); -inf for silence."""
    rms = float(np.sqrt(np.mean(np.square(wave, dtype=np.float64)))) if len(wave) else 0.0
    return 20.0 * math.log10(rms) if rms > 0.0 else -math.inf


def at_level(
    wave: np.ndarray, target_dbfs: float = SPEECH_LEVEL_DBFS, current_dbfs: float | None = None
) -> np.ndarray:
    """``wave`` scaled so that its RMS is ``target_dbfs``; silence stays silence.

    ``current_dbfs``: the wave's :func:`level_dbfs`, when the caller has it already.
    """
    wave = np.asarray(wave, dtype=np.float32)
    current = level_dbfs(wave) if current_dbfs is None else current_dbfs
    if current == -math.inf:
        return wave
    return (wave * np.float32(10.0 ** ((target_dbfs - current) / 20.0))).astype(np.float32, copy=False)


def window_starts(num_samples: int, window: int = WINDOW_SAMPLES, max_windows: int = MAX_WINDOWS) -> list[int]:
    """Start offsets of the scoring windows of a recording ``num_samples`` long (see module doc)."""
    if num_samples <= window:
        return [0]
    count = min(max_windows, math.ceil(num_samples / window))
    return [int(round(s)) for s in np.linspace(0, num_samples - window, count)]


def windows(wave: np.ndarray, window: int = WINDOW_SAMPLES, max_windows: int = MAX_WINDOWS) -> np.ndarray:
    """The [N, window] float32 windows that are scored for ``wave``."""
    wave = np.asarray(wave, dtype=np.float32)
    if len(wave) <= window:
        return tile(wave, window)[None, :]
    return np.stack([wave[s : s + window] for s in window_starts(len(wave), window, max_windows)])


class AASIST:
    """Spoofing countermeasure score of 16 kHz speech; higher = more likely bona fide."""

    def __init__(
        self, session: Any, spec: Any = None, *, max_windows: int = MAX_WINDOWS, batch_size: int = BATCH_SIZE
    ) -> None:
        params = spec.params if spec is not None else {}
        self.session = session
        self.window_samples = int(params.get("window_samples", WINDOW_SAMPLES))
        self.bonafide_class = int(params.get("bonafide_class", 1))
        self.speech_level_dbfs = float(params.get("speech_level_dbfs", SPEECH_LEVEL_DBFS))
        self.min_speech_level_dbfs = float(params.get("min_speech_level_dbfs", MIN_SPEECH_LEVEL_DBFS))
        self.max_windows = max_windows
        self.batch_size = batch_size
        inputs = session.get_inputs()
        # One input; its name differs between exports ("waveform" here).
        self._input_name = inputs[0].name

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Raw [N, 2] logits for [N, window_samples] windows, run in batches of ``batch_size``."""
        out = []
        for i in range(0, len(batch), self.batch_size):
            result = self.session.run(None, {self._input_name: np.ascontiguousarray(batch[i : i + self.batch_size])})
            out.append(np.asarray(result[0], dtype=np.float32))
        return np.concatenate(out) if out else np.zeros((0, 2), dtype=np.float32)

    def score_many(self, waves: Sequence[np.ndarray]) -> list[SpoofScore]:
        """Scores of several recordings, all their windows batched together."""
        levels = [level_dbfs(w) for w in waves]
        per_wave = [
            windows(at_level(w, self.speech_level_dbfs, level), self.window_samples, self.max_windows)
            for w, level in zip(waves, levels)
        ]
        if not per_wave:
            return []
        logits = self.logits(np.concatenate(per_wave))
        bonafide = logits[:, self.bonafide_class]
        scores, offset = [], 0
        for wins, level in zip(per_wave, levels):
            mine = bonafide[offset : offset + len(wins)]
            offset += len(wins)
            scores.append(SpoofScore(
                float(np.mean(mine)), tuple(float(v) for v in mine), level, level >= self.min_speech_level_dbfs
            ))
        return scores

    def score(self, wave: np.ndarray) -> SpoofScore:
        return self.score_many([wave])[0]
