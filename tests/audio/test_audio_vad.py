"""Silero VAD: the model wrapper against upstream, the segment logic, and real recordings."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tests.audio.helpers import load_fixture
from workers.audio.silero_vad import StreamState, get_speech_segments, speech_spans

UPSTREAM = "silero_upstream_silero_test_60s.json"

# Upstream keyword -> ours.
UPSTREAM_NAMES = {
    "threshold": "threshold",
    "max_speech_duration_s": "max_speech_s",
    "use_max_poss_sil_at_max_speech": "use_max_possible_silence",
    "min_silence_duration_ms": "min_silence_ms",
    "speech_pad_ms": "speech_pad_ms",
}


@pytest.fixture(scope="module")
def upstream() -> dict:
    return load_fixture(UPSTREAM)


@pytest.fixture(scope="module")
def silero_probs(vad, decode_file, upstream):
    wave, _ = decode_file(upstream["file"])
    return wave, vad.speech_probabilities(wave)


def test_probabilities_equal_upstream_wrapper(silero_probs, upstream):
    wave, probs = silero_probs
    assert len(wave) == upstream["num_samples"]
    np.testing.assert_allclose(probs, upstream["probs"], atol=1e-5)


def test_segments_match_upstream_within_100ms(vad, silero_probs, upstream):
    wave, probs = silero_probs
    ours = vad.segments(probs, len(wave))
    theirs = [(s / 16000, e / 16000) for s, e in upstream["runs"][0]["segments_samples"]]
    assert upstream["runs"][0]["params"] == {}
    assert len(ours) == len(theirs)
    worst = max(max(abs(a[0] - b[0]), abs(a[1] - b[1])) for a, b in zip(ours, theirs))
    assert worst <= 0.1


@pytest.mark.parametrize("run", range(5))
def test_segment_logic_reproduces_upstream_exactly(upstream, run):
    """On upstream's own probabilities, every parameter set gives upstream's sample offsets."""
    case = upstream["runs"][run]
    kwargs = {UPSTREAM_NAMES[k]: v for k, v in case["params"].items()}
    spans = speech_spans(upstream["probs"], audio_samples=upstream["num_samples"], **kwargs)
    assert spans == [tuple(s) for s in case["segments_samples"]]


def test_every_labelled_span_found_and_gaps_silent(analyses, labelled_files):
    path = "audio/vad/speech_with_long_gaps_16k.wav"
    truth = labelled_files[path]["labels"]["speech_segments_truth"]
    found = [(s["start_s"], s["end_s"]) for s in analyses[path]["speech_segments"]]
    for start, end in truth:
        assert any(s < end and e > start for s, e in found), f"speech at {start}-{end} s not found in {found}"
    # The labelled spans include the utterances' own lead-in noise, so every
    # segment must sit inside one (0.1 s of slack for the 30 ms padding).
    for s, e in found:
        assert any(s >= ts - 0.1 and e <= te + 0.1 for ts, te in truth), f"speech reported in a gap: {s}-{e} s"


def test_annotated_speechbrain_sample(analyses, labelled_files):
    path = "audio/vad/speechbrain_vad_valid.wav"
    labels = labelled_files[path]["labels"]
    truth, (_, hi) = labels["speech_segments_truth"], labels["truth_annotated_range"]
    found = [(s["start_s"], s["end_s"]) for s in analyses[path]["speech_segments"]]
    for start, end in truth:
        assert any(s < end and e > start for s, e in found)
    for s, e in found:
        if s < hi:
            assert any(s >= ts - 0.15 and min(e, hi) <= te + 0.15 for ts, te in truth), (s, e)


@pytest.mark.parametrize(
    "path",
    ["audio/nonspeech/digital_silence_3s_16k.wav", "audio/nonspeech/white_noise_4s_16k.wav",
     "audio/nonspeech/speechbrain_noise2.wav"],
)
def test_nonspeech_has_no_speech(analyses, path):
    result = analyses[path]
    assert result["speech_segments"] == []
    assert result["speech_ratio"] == 0.0
    assert result["spoof"] is None and result["embedding"] is None
    assert result["no_speech_reason"].startswith("no speech found")


def test_streaming_equals_whole_and_reset(vad, decode_file):
    wave, _ = decode_file("audio/speakers/librispeech_533_02.flac")
    whole = vad.speech_probabilities(wave)
    vad.reset()
    streamed = [vad(wave[i : i + 512]) for i in range(0, len(wave) - 511, 512)]
    np.testing.assert_array_equal(np.float32(streamed), whole[: len(streamed)])
    # Without a reset the stream carries on from where it was: different numbers.
    carried_on = vad(wave[:512])
    vad.reset()
    assert vad(wave[:512]) == pytest.approx(float(whole[0]), abs=1e-7)
    assert isinstance(carried_on, float)


def test_batched_streams_equal_single_streams(vad, decode_file):
    waves = [
        decode_file("audio/speakers/fsdd_george_01.wav")[0],
        decode_file("audio/speakers/librispeech_1998_02.flac")[0],
        decode_file("audio/nonspeech/white_noise_4s_16k.wav")[0][:20000],
    ]
    batched = vad.speech_probabilities_many(waves)
    for wave, probs in zip(waves, batched):
        assert len(probs) == math.ceil(len(wave) / 512)
        np.testing.assert_allclose(probs, vad.speech_probabilities(wave), atol=1e-6)
    assert vad.speech_probabilities_many([]) == []


def test_step_takes_explicit_state(vad, decode_file):
    wave, _ = decode_file("audio/speakers/librispeech_1688_02.flac")
    chunks = wave[: 512 * 4].reshape(4, 512)
    stream = StreamState.zeros(2)
    first = [vad.step(np.stack([c, c]), stream) for c in chunks]
    assert stream.state.shape == (2, 2, 128) and stream.context.shape == (2, 64)
    assert all(p[0] == p[1] for p in first)
    np.testing.assert_allclose([p[0] for p in first], vad.speech_probabilities(wave[: 512 * 4]), atol=1e-6)


# --- the pure segment logic ---------------------------------------------------

W = 512  # samples per probability at 16 kHz


def probs_of(*runs: tuple[float, int]) -> list[float]:
    out: list[float] = []
    for value, count in runs:
        out += [value] * count
    return out


def test_single_segment_with_padding():
    probs = probs_of((0.0, 10), (0.9, 20), (0.0, 10))
    # Opens at chunk 10, closes where the silence began (chunk 30), 30 ms pad.
    assert speech_spans(probs) == [(10 * W - 480, 30 * W + 480)]
    assert get_speech_segments(probs) == [((10 * W - 480) / 16000, (30 * W + 480) / 16000)]


def test_short_blip_is_dropped():
    assert speech_spans(probs_of((0.0, 10), (0.9, 7), (0.0, 10))) == []  # 7 * 32 ms = 224 ms <= 250 ms


def test_short_pause_does_not_split():
    probs = probs_of((0.0, 5), (0.9, 20), (0.0, 3), (0.9, 20), (0.0, 10))  # 96 ms pause < 100 ms
    assert len(speech_spans(probs)) == 1


def test_long_pause_splits():
    probs = probs_of((0.0, 5), (0.9, 20), (0.0, 10), (0.9, 20), (0.0, 10))
    assert len(speech_spans(probs)) == 2


def test_hysteresis_between_thresholds():
    # 0.4 is below the entry threshold (0.5) but above the exit one (0.35).
    assert speech_spans(probs_of((0.4, 40))) == []
    inside = speech_spans(probs_of((0.0, 5), (0.9, 10), (0.4, 30), (0.0, 10)))
    assert inside == [(5 * W - 480, 45 * W + 480)]
    # With the exit threshold above 0.4 the span closes when the 0.9s end.
    assert speech_spans(probs_of((0.0, 5), (0.9, 10), (0.4, 30), (0.0, 10)), neg_threshold=0.45) == [
        (5 * W - 480, 15 * W + 480)
    ]


def test_close_segments_share_the_gap_when_padding_overlaps():
    probs = probs_of((0.0, 5), (0.9, 20), (0.0, 5), (0.9, 20), (0.0, 10))
    (a0, a1), (b0, b1) = speech_spans(probs, speech_pad_ms=100)
    gap = 30 * W - 25 * W
    assert a1 == 25 * W + gap // 2 and b0 == 30 * W - gap // 2


def test_speech_running_to_the_end_is_closed_at_the_end():
    probs = probs_of((0.0, 5), (0.9, 20))
    assert speech_spans(probs, audio_samples=25 * W - 100) == [(5 * W - 480, 25 * W - 100)]


def test_max_speech_cuts_long_speech():
    spans = speech_spans(probs_of((0.9, 200)), max_speech_s=2.0)
    assert len(spans) >= 3
    assert all(e - s <= 2.0 * 16000 + 2 * 480 for s, e in spans)


def test_max_speech_prefers_the_longest_silence():
    probs = probs_of((0.9, 20), (0.1, 4), (0.9, 10), (0.1, 8), (0.9, 40))
    spans = speech_spans(probs, max_speech_s=2.0, min_silence_ms=1000)
    # At 2 s the span is cut at the longer pause (chunks 34..41), not the
    # first one (20..23), and speech resumes where that pause ended.
    assert spans == [(0, 34 * W + 480), (42 * W - 480, 82 * W)]


def test_empty_and_silent_inputs():
    assert speech_spans([]) == []
    assert speech_spans(np.zeros(100)) == []
    assert get_speech_segments([]) == []
