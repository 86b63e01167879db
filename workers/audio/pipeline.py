"""The audio analysis of issue #4: decode, find the speech, score spoofing, embed the speaker.

:class:`AudioPipeline` glues the model wrappers of this package together for
one or many payloads. It holds no Celery or Redis code, so the worker tasks
and the tests drive the same object. Every stage after decoding runs over the
speech only: the VAD segments (upstream padding included) are concatenated,
and the anti-spoofing and speaker models see that audio.

Results are plain JSON/msgpack types. A payload in which no speech was found
is not an error: its result says so in ``no_speech_reason`` and carries no
spoof score and no embedding. :meth:`AudioPipeline.verify` does raise
:class:`NoSpeechFound`, because a comparison without speech has no answer.

Logs carry durations, segment counts and timings, never embeddings, scores of
a person's voice beyond the spoof decision, or payload bytes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
from billiard.exceptions import SoftTimeLimitExceeded

from tasks.errors import IdentError, InvalidInput, LimitExceeded, NoSpeechFound

from .aasist import AASIST
from .decoding import TARGET_RATE, decode
from .silero_vad import SileroVAD
from .speaker import SpeakerEmbedder

log = logging.getLogger(__name__)

# analyze() options and their defaults.
OPTIONS: dict[str, bool] = {
    "spoof": True,  # score the speech with the anti-spoofing model
    "embed": True,  # compute the speaker embedding of the speech
}


def parse_options(options: Mapping[str, Any] | None) -> dict[str, bool]:
    """Validate analyze() options; unknown keys and non-boolean values are :class:`InvalidInput`."""
    if options is None:
        return dict(OPTIONS)
    if not isinstance(options, Mapping):
        raise InvalidInput(f"options must be an object/dict, got {type(options).__name__}")
    # Not sorted: msgpack lets bytes keys through beside str ones, and those do not compare.
    unknown = [key for key in options if key not in OPTIONS]
    if unknown:
        shown = ", ".join(repr(key)[:40] for key in unknown[:5])
        raise InvalidInput(f"unknown audio option(s) {shown}; known options: {', '.join(OPTIONS)}")
    parsed = dict(OPTIONS)
    for key, value in options.items():
        if not isinstance(value, bool):
            raise InvalidInput(f"audio option {key!r} must be true or false, got a {type(value).__name__}")
        parsed[key] = value
    return parsed


def speech_audio(wave: np.ndarray, segments: Sequence[tuple[float, float]], rate: int = TARGET_RATE) -> np.ndarray:
    """The samples inside ``segments`` (seconds), concatenated in order."""
    parts = [wave[int(round(s * rate)) : int(round(e * rate))] for s, e in segments]
    return np.concatenate(parts).astype(np.float32, copy=False) if parts else np.zeros(0, dtype=np.float32)


@dataclass
class _Job:
    index: int
    options: dict[str, bool]
    wave: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)
    probs: np.ndarray | None = None
    segments: list[tuple[float, float]] = field(default_factory=list)
    speech: np.ndarray | None = None
    spoof: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    started: float = 0.0


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 2)


class AudioPipeline:
    """Voice activity, anti-spoofing and speaker embedding for audio payloads.

    ``sessions`` and ``specs`` are keyed by role (``vad``, ``spoof``,
    ``speaker_embedding``), as :func:`models.catalog.selected_models` returns
    them; ``settings`` is a :class:`tasks.settings.Settings`.
    """

    def __init__(self, sessions: Mapping[str, Any], specs: Mapping[str, Any], settings: Any) -> None:
        self.settings = settings
        self.specs = dict(specs)
        self.vad = SileroVAD(sessions["vad"], specs["vad"])
        self.spoof = AASIST(sessions["spoof"], specs["spoof"])
        self.speaker = SpeakerEmbedder(sessions["speaker_embedding"], specs["speaker_embedding"])
        self.spoof_threshold = (
            float(settings.spoof_threshold) if settings.spoof_threshold is not None
            else float(specs["spoof"].params["threshold"])
        )
        self.match_threshold = (
            float(settings.speaker_match_threshold) if settings.speaker_match_threshold is not None
            else float(specs["speaker_embedding"].params["match_threshold"])
        )

    def analyze(self, audio: bytes, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Analyse one payload; raises what :meth:`analyze_many` would put in its slot."""
        (result,) = self.analyze_many([audio], options)
        if isinstance(result, Exception):
            raise result
        return result

    def analyze_many(
        self,
        payloads: Sequence[bytes],
        options: Mapping[str, Any] | Sequence[Mapping[str, Any] | None] | None = None,
    ) -> list[dict[str, Any] | Exception]:
        """Analyse several payloads, batching the models across them.

        ``options`` is one dict for all payloads or one per payload. Each slot
        of the result is the analysis dict or the exception that payload
        raised (InvalidInput, LimitExceeded); one bad payload fails only its
        own slot.
        """
        per_item = self._options_per_item(payloads, options)
        results: list[dict[str, Any] | Exception | None] = [None] * len(payloads)
        jobs: list[_Job] = []
        for i, (payload, opts) in enumerate(zip(payloads, per_item)):
            started = time.perf_counter()
            try:
                if isinstance(opts, Exception):
                    raise opts
                job = _Job(index=i, options=opts, started=started)
                self._decode(job, payload)
                jobs.append(job)
            except InvalidInput as exc:
                results[i] = exc
            except SoftTimeLimitExceeded:
                raise  # the job ran out of time; its bytes may be fine
            except Exception as exc:  # a decoder bug must not fail the other payloads
                log.exception("audio payload %d failed to decode with an unexpected error", i)
                results[i] = InvalidInput(f"the audio could not be decoded ({type(exc).__name__})")
        self._run_vad(jobs)
        self._run_spoof([j for j in jobs if j.options["spoof"] and j.speech is not None])
        embeddings = self._run_embedding([j for j in jobs if j.options["embed"] and j.speech is not None])
        for job in jobs:
            results[job.index] = self._result(job, embeddings.get(job.index))
        return results  # type: ignore[return-value]

    def verify(self, audio_a: bytes, audio_b: bytes) -> dict[str, Any]:
        """Are the two recordings the same speaker? Cosine similarity of their embeddings."""
        started = time.perf_counter()
        options = {"spoof": False, "embed": True}
        results = self.analyze_many([audio_a, audio_b], options)
        for name, result in zip(("audio_a", "audio_b"), results):
            if isinstance(result, IdentError):
                raise type(result)(f"{name}: {result}") from result
            if isinstance(result, Exception):
                raise result
            if result["embedding"] is None:
                raise NoSpeechFound(f"{name} has no speech to compare: {result['no_speech_reason']}")
        a = np.asarray(results[0]["embedding"], dtype=np.float32)
        b = np.asarray(results[1]["embedding"], dtype=np.float32)
        similarity = float(np.dot(a, b))
        return {
            "similarity": similarity,
            "same_speaker": similarity >= self.match_threshold,
            "threshold": self.match_threshold,
            "model": self.specs["speaker_embedding"].key,
            # Under ~2.5 s of speech a side, same and different speakers overlap
            # (docs/audio.md, "Held out"): the caller needs this to judge the verdict.
            "speech_s": {
                name: round(sum(s["end_s"] - s["start_s"] for s in result["speech_segments"]), 3)
                for name, result in zip(("audio_a", "audio_b"), results)
            },
            "timings_ms": {
                "audio_a": results[0]["timings_ms"],
                "audio_b": results[1]["timings_ms"],
                "total": _ms(time.perf_counter() - started),
            },
        }

    # -- stages ------------------------------------------------------------

    @staticmethod
    def _options_per_item(payloads: Sequence[bytes], options: Any) -> list[dict[str, bool] | Exception]:
        if isinstance(options, Sequence) and not isinstance(options, (str, bytes)):
            if len(options) != len(payloads):
                raise InvalidInput(f"got {len(options)} option sets for {len(payloads)} payloads")
            raw = list(options)
        else:
            raw = [options] * len(payloads)
        parsed: list[dict[str, bool] | Exception] = []
        for item in raw:
            try:
                parsed.append(parse_options(item))
            except InvalidInput as exc:
                parsed.append(exc)
        return parsed

    def _decode(self, job: _Job, payload: bytes) -> None:
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise InvalidInput(f"the audio payload must be bytes, got {type(payload).__name__}")
        LimitExceeded.check(
            "the audio payload", len(payload), self.settings.max_payload_bytes, "IDENT_MAX_PAYLOAD_BYTES", "bytes"
        )
        t = time.perf_counter()
        job.wave, job.info = decode(bytes(payload), self.settings.max_audio_seconds)
        job.timings["decode"] = _ms(time.perf_counter() - t)

    def _run_vad(self, jobs: list[_Job]) -> None:
        if not jobs:
            return
        t = time.perf_counter()
        probs = self.vad.speech_probabilities_many([j.wave for j in jobs])
        for job, p in zip(jobs, probs):
            job.probs = p
            job.segments = self.vad.segments(p, len(job.wave))
            if job.segments:
                job.speech = speech_audio(job.wave, job.segments)
        elapsed = _ms(time.perf_counter() - t)
        for job in jobs:
            job.timings["vad"] = elapsed

    def _run_spoof(self, jobs: list[_Job]) -> None:
        if not jobs:
            return
        t = time.perf_counter()
        scores = self.spoof.score_many([j.speech for j in jobs])
        elapsed = _ms(time.perf_counter() - t)
        for job, score in zip(jobs, scores):
            # Floored: digital silence measures -inf, which JSON cannot carry to a client.
            level = round(max(score.speech_level_dbfs, -200.0), 1)
            job.spoof = {
                "score": score.score,
                "is_bonafide": bool(score.loud_enough and score.score >= self.spoof_threshold),
                "threshold": self.spoof_threshold,
                "speech_level_dbfs": level,
                "min_speech_level_dbfs": self.spoof.min_speech_level_dbfs,
            }
            if not score.loud_enough:
                log.info("speech at %.1f dBFS is below %.1f dBFS: too quiet to judge, not called bona fide",
                         level, self.spoof.min_speech_level_dbfs)
            job.timings["spoof"] = elapsed

    def _run_embedding(self, jobs: list[_Job]) -> dict[int, list[float]]:
        if not jobs:
            return {}
        t = time.perf_counter()
        vectors = self.speaker.embed_many([j.speech for j in jobs])
        elapsed = _ms(time.perf_counter() - t)
        out = {}
        for job, vector in zip(jobs, vectors):
            out[job.index] = [float(v) for v in vector]
            job.timings["embed"] = elapsed
        return out

    def _result(self, job: _Job, embedding: list[float] | None) -> dict[str, Any]:
        duration = len(job.wave) / TARGET_RATE
        speech_s = sum(e - s for s, e in job.segments)
        reason = None
        if not job.segments:
            peak = float(job.probs.max()) if job.probs is not None and len(job.probs) else 0.0
            reason = (
                f"no speech found: the voice activity detector found no stretch of speech of at least "
                f"{self.vad.segment_params['min_speech_ms'] / 1000:g} s in {duration:.2f} s of audio "
                f"(highest speech probability {peak:.2f}, threshold {self.vad.segment_params['threshold']:g})"
            )
        job.timings["total"] = _ms(time.perf_counter() - job.started)
        log.info(
            "audio analysed: %.2f s at %d Hz, %d speech segment(s), %.2f s of speech, spoof=%s, timings_ms=%s",
            duration, job.info["sample_rate_in"], len(job.segments), speech_s,
            job.spoof["is_bonafide"] if job.spoof else None, job.timings,
        )
        return {
            "duration_s": job.info["duration_s"],
            "sample_rate_in": int(job.info["sample_rate_in"]),
            "speech_segments": [
                {"start_s": round(s, 3), "end_s": min(round(e, 3), job.info["duration_s"])} for s, e in job.segments
            ],
            "speech_ratio": round(min(1.0, speech_s / duration), 4) if duration > 0 else 0.0,
            "spoof": job.spoof,
            "embedding": embedding,
            "no_speech_reason": reason,
            "timings_ms": dict(job.timings),
        }
