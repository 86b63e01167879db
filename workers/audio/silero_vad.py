"""Silero VAD v6.2: where in a recording someone is speaking.

Model: ``silero_vad.onnx`` from silero-vad 6.2.3 (snakers4/silero-vad, MIT),
byte-identical to the upstream file (catalog key ``silero_vad``). A small
stateful network that gives, for every 32 ms chunk of 16 kHz audio, the
probability that it holds speech.

I/O, per call: ``input`` float32 [B, 576] = 64 samples of context (the last 64
samples of the previous call's input, zeros at the start of a stream) followed
by 512 new samples in [-1, 1]; ``state`` float32 [2, B, 128] (zeros at the start
of a stream, then the ``stateN`` of the previous call); ``sr`` int64 scalar
16000. Outputs: probability [B, 1] and the new state [2, B, 128]. The B rows are
independent streams.

As in upstream's ``OnnxWrapper``, the stream state (context and recurrent
state) is kept explicitly in :class:`StreamState` and reset explicitly.

:func:`get_speech_segments` turns the probabilities into speech segments. It is
our reimplementation of upstream's ``get_speech_timestamps`` post-processing
(silero-vad 6.2.3 ``utils_vad.get_speech_timestamps_from_probs``), hysteresis
with an entry threshold and a lower exit threshold, minimum speech and
silence durations, padding, and the split of over-long segments, and it is
tested against the upstream package's output on a real recording
(tests/audio/fixtures/silero_upstream_silero_test_60s.json).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from tasks.errors import ConfigurationError

SAMPLE_RATE = 16000
CHUNK_SAMPLES = 512
CONTEXT_SAMPLES = 64
STATE_SHAPE = (2, 128)


@dataclass
class StreamState:
    """What a VAD stream carries from one chunk to the next, for B independent streams."""

    context: np.ndarray  # [B, context_samples] float32
    state: np.ndarray  # [2, B, 128] float32

    @classmethod
    def zeros(cls, batch: int = 1, context_samples: int = CONTEXT_SAMPLES) -> "StreamState":
        return cls(
            context=np.zeros((batch, context_samples), dtype=np.float32),
            state=np.zeros((STATE_SHAPE[0], batch, STATE_SHAPE[1]), dtype=np.float32),
        )

    @property
    def batch(self) -> int:
        return self.context.shape[0]


class SileroVAD:
    """Speech probabilities per 512-sample chunk of 16 kHz audio."""

    def __init__(self, session: Any, spec: Any = None) -> None:
        params: Mapping[str, Any] = spec.params if spec is not None else {}
        self.session = session
        self.sample_rate = int(params.get("sample_rate", SAMPLE_RATE))
        self.chunk_samples = int(params.get("chunk_samples", CHUNK_SAMPLES))
        self.context_samples = int(params.get("context_samples", CONTEXT_SAMPLES))
        self.segment_params = {
            "threshold": float(params.get("threshold", 0.5)),
            "neg_threshold": params.get("neg_threshold"),
            "min_speech_ms": float(params.get("min_speech_ms", 250)),
            "min_silence_ms": float(params.get("min_silence_ms", 100)),
            "speech_pad_ms": float(params.get("speech_pad_ms", 30)),
        }
        self._audio_name, self._state_name, self._rate_name = self._input_names(session)
        self._rate = np.array(self.sample_rate, dtype=np.int64)
        self.reset()

    @staticmethod
    def _input_names(session: Any) -> tuple[str, str, str]:
        # The three inputs differ in rank: audio [B, T], state [2, B, 128], rate [].
        by_rank = {len(inp.shape): inp.name for inp in session.get_inputs()}
        try:
            return by_rank[2], by_rank[3], by_rank[0]
        except KeyError:
            found = ", ".join(f"{inp.name}{list(inp.shape)}" for inp in session.get_inputs())
            raise ConfigurationError(
                "the VAD session does not look like Silero VAD v5/v6 (expected inputs audio [B, T], "
                f"state [2, B, 128] and a scalar sample rate; found {found}); check IDENT models / silero_vad.onnx"
            ) from None

    def reset(self) -> None:
        """Start a new stream: zero context and zero recurrent state."""
        self.stream = StreamState.zeros(1, self.context_samples)

    def __call__(self, chunk: np.ndarray) -> float:
        """Probability that the next ``chunk_samples`` samples of the current stream are speech."""
        chunk = np.asarray(chunk, dtype=np.float32)
        if chunk.shape != (self.chunk_samples,):
            raise ValueError(f"a VAD chunk is {self.chunk_samples} samples, got shape {chunk.shape}")
        return float(self.step(chunk[None, :], self.stream)[0])

    def step(self, chunks: np.ndarray, stream: StreamState) -> np.ndarray:
        """Advance B independent streams by one chunk each; updates ``stream`` in place.

        ``chunks`` is [B, chunk_samples]; returns the B speech probabilities.
        """
        frame = np.concatenate([stream.context, chunks.astype(np.float32, copy=False)], axis=1)
        prob, new_state = self.session.run(
            None, {self._audio_name: frame, self._state_name: stream.state, self._rate_name: self._rate}
        )
        stream.state = np.asarray(new_state, dtype=np.float32)
        stream.context = frame[:, -self.context_samples :].copy()
        return np.asarray(prob, dtype=np.float32).reshape(-1)

    def speech_probabilities(self, wave: np.ndarray) -> np.ndarray:
        """Per-chunk probabilities of a whole 16 kHz recording; resets the stream first.

        The last partial chunk is zero-padded, as upstream does.
        """
        self.reset()
        chunks = _chunked(np.asarray(wave, dtype=np.float32), self.chunk_samples)
        probs = np.empty(len(chunks), dtype=np.float32)
        for i, chunk in enumerate(chunks):
            probs[i] = self.step(chunk[None, :], self.stream)[0]
        return probs

    def speech_probabilities_many(self, waves: Sequence[np.ndarray]) -> list[np.ndarray]:
        """:meth:`speech_probabilities` for several recordings, run as one batch of streams.

        Each recording is its own stream with its own state; the result for a
        recording equals what :meth:`speech_probabilities` gives for it alone.
        Streams are sorted longest first so that the rows still running are
        always a prefix of the batch and finished ones simply drop off.
        """
        chunked = [_chunked(np.asarray(w, dtype=np.float32), self.chunk_samples) for w in waves]
        if not chunked:
            return []
        order = sorted(range(len(chunked)), key=lambda i: -len(chunked[i]))
        lengths = [len(chunked[i]) for i in order]
        out = [np.empty(len(c), dtype=np.float32) for c in chunked]
        stream = StreamState.zeros(len(order), self.context_samples)
        active = len(order)
        for t in range(lengths[0]):
            while active and lengths[active - 1] <= t:
                active -= 1
            if active < stream.batch:
                stream = StreamState(stream.context[:active], np.ascontiguousarray(stream.state[:, :active]))
            batch = np.stack([chunked[order[r]][t] for r in range(active)])
            probs = self.step(batch, stream)
            for r in range(active):
                out[order[r]][t] = probs[r]
        return out

    def segments(self, probs: np.ndarray, num_samples: int, **overrides: Any) -> list[tuple[float, float]]:
        """Speech segments in seconds with this model's catalog parameters (overridable)."""
        params = {**self.segment_params, **overrides}
        return get_speech_segments(
            probs, sample_rate=self.sample_rate, window_samples=self.chunk_samples, audio_samples=num_samples, **params
        )


def _chunked(wave: np.ndarray, size: int) -> np.ndarray:
    if wave.ndim != 1:
        raise ValueError(f"expected a mono waveform, got shape {wave.shape}")
    count = -(-len(wave) // size)
    padded = np.zeros(count * size, dtype=np.float32)
    padded[: len(wave)] = wave
    return padded.reshape(count, size)


def speech_spans(
    probs: Sequence[float] | np.ndarray,
    *,
    sample_rate: int = SAMPLE_RATE,
    window_samples: int = CHUNK_SAMPLES,
    threshold: float = 0.5,
    neg_threshold: float | None = None,
    min_speech_ms: float = 250,
    min_silence_ms: float = 100,
    speech_pad_ms: float = 30,
    max_speech_s: float = math.inf,
    min_silence_at_max_speech_ms: float = 98,
    use_max_possible_silence: bool = True,
    audio_samples: int | None = None,
) -> list[tuple[int, int]]:
    """Speech spans as ``(start, end)`` sample offsets from per-chunk speech probabilities.

    Same rules and defaults as silero-vad's ``get_speech_timestamps``:

    * a span opens at the first chunk with probability >= ``threshold`` and
      closes when the probability has stayed below ``neg_threshold`` (default
      ``threshold - 0.15``) for ``min_silence_ms``; it ends where that silence
      began;
    * spans not longer than ``min_speech_ms`` are dropped;
    * a span reaching ``max_speech_s`` is cut, at the longest silence of more
      than ``min_silence_at_max_speech_ms`` seen inside it (or, with
      ``use_max_possible_silence=False``, at the latest such silence), and
      otherwise right where it is;
    * every span is padded by ``speech_pad_ms`` on each side; where two spans
      are closer than twice that, the gap between them is split evenly.
    """
    if audio_samples is None:
        audio_samples = len(probs) * window_samples
    if neg_threshold is None:
        neg_threshold = max(threshold - 0.15, 0.01)
    min_speech = sample_rate * min_speech_ms / 1000
    pad = sample_rate * speech_pad_ms / 1000
    # The cut point must leave room for the padding and the chunk in progress.
    max_speech = sample_rate * max_speech_s - window_samples - 2 * pad
    min_silence = sample_rate * min_silence_ms / 1000
    min_silence_at_max = sample_rate * min_silence_at_max_speech_ms / 1000

    spans: list[list[int]] = []
    start: int | None = None  # start of the open span, None while outside speech
    silence_start = 0  # where the current dip below neg_threshold began; 0 = none
    # For max-speech cuts: silences seen inside the open span, and (legacy mode)
    # the latest long-enough silence and where speech resumed after it.
    silences: list[tuple[int, int]] = []
    last_silence_end = 0
    resume_at = 0

    for i, prob in enumerate(probs):
        here = window_samples * i
        if prob >= threshold and silence_start:
            gap = here - silence_start
            if gap > min_silence_at_max:
                silences.append((silence_start, gap))
            silence_start = 0
            if resume_at < last_silence_end:
                resume_at = here

        if prob >= threshold and start is None:
            start = here
            continue

        if start is not None and here - start > max_speech:
            if use_max_possible_silence and silences:
                cut, gap = max(silences, key=lambda s: s[1])
                spans.append([start, cut])
                # Upstream reopens the span right after that silence: the
                # silence ended before the current chunk by construction.
                start = cut + gap
                last_silence_end = resume_at = silence_start = 0
                silences = []
            elif last_silence_end:
                spans.append([start, last_silence_end])
                start = resume_at if resume_at >= last_silence_end else None
                last_silence_end = resume_at = silence_start = 0
                silences = []
            else:
                spans.append([start, here])
                start = None
                last_silence_end = resume_at = silence_start = 0
                silences = []
                continue

        if prob < neg_threshold and start is not None:
            if not silence_start:
                silence_start = here
            silent_for = here - silence_start
            if not use_max_possible_silence and silent_for > min_silence_at_max:
                last_silence_end = silence_start
            if silent_for < min_silence:
                continue
            if silence_start - start > min_speech:
                spans.append([start, silence_start])
            start = None
            last_silence_end = resume_at = silence_start = 0
            silences = []
            continue

    if start is not None and audio_samples - start > min_speech:
        spans.append([start, audio_samples])

    for i, span in enumerate(spans):
        if i == 0:
            span[0] = int(max(0, span[0] - pad))
        if i + 1 < len(spans):
            nxt = spans[i + 1]
            gap = nxt[0] - span[1]
            if gap < 2 * pad:
                span[1] += int(gap // 2)
                nxt[0] = int(max(0, nxt[0] - gap // 2))
            else:
                span[1] = int(min(audio_samples, span[1] + pad))
                nxt[0] = int(max(0, nxt[0] - pad))
        else:
            span[1] = int(min(audio_samples, span[1] + pad))
    return [(int(s), int(e)) for s, e in spans]


def get_speech_segments(
    probs: Sequence[float] | np.ndarray, *, sample_rate: int = SAMPLE_RATE, **options: Any
) -> list[tuple[float, float]]:
    """:func:`speech_spans` in seconds: a list of ``(start_s, end_s)``."""
    return [(s / sample_rate, e / sample_rate) for s, e in speech_spans(probs, sample_rate=sample_rate, **options)]
