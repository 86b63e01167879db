"""AudioPipeline: result shape, options, batching, and every bad/ audio file's labelled behaviour."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import msgpack
import numpy as np
import pytest

from tasks.errors import InvalidInput, LimitExceeded
from workers.audio.pipeline import OPTIONS, parse_options, speech_audio

RESULT_KEYS = {
    "duration_s", "sample_rate_in", "speech_segments", "speech_ratio", "spoof", "embedding",
    "no_speech_reason", "timings_ms",
}
BAD_AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".opus", ".ogg")
REJECT = "reject with a clear client error"


@pytest.fixture(scope="module")
def bad_audio(labelled_files) -> dict[str, dict]:
    return {p: e["labels"] for p, e in labelled_files.items() if p.startswith("bad/") and p.endswith(BAD_AUDIO_SUFFIXES)}


def test_bad_files_get_their_labelled_behaviour(audio_pipeline, bad_audio, data_path):
    assert len(bad_audio) == 9
    for path, labels in sorted(bad_audio.items()):
        payload = (data_path / path).read_bytes()
        started = time.perf_counter()
        try:
            result = audio_pipeline.analyze(payload)
        except InvalidInput as exc:
            result = exc
        elapsed = time.perf_counter() - started
        assert elapsed < 10.0, f"{path} took {elapsed:.1f} s"
        expected = labels["expected"]
        if expected.startswith(REJECT):
            assert isinstance(result, InvalidInput), f"{path}: expected a rejection, got {result}"
            assert not isinstance(result, LimitExceeded)
            continue
        if expected.startswith("decode the readable prefix or reject cleanly"):
            assert isinstance(result, (dict, InvalidInput)), path
            continue
        # "decode+resample/downmix and process normally, OR reject cleanly": we decode them all.
        assert isinstance(result, dict), f"{path}: {result}"
        assert set(result) == RESULT_KEYS
        if labels.get("has_speech") is True:
            assert result["speech_segments"] and result["embedding"] is not None, path
        if labels.get("has_speech") == "probably_not":
            assert result["speech_segments"] == [] and result["no_speech_reason"], path


def test_bad_file_messages_say_what_is_wrong(audio_pipeline, data_path):
    messages = {}
    for name in ("empty.wav", "text_named.wav", "wav_header_only.wav", "truncated.flac"):
        with pytest.raises(InvalidInput) as caught:
            audio_pipeline.analyze((data_path / "bad" / name).read_bytes())
        messages[name] = str(caught.value)
    assert "empty" in messages["empty.wav"]
    assert "not a readable audio file" in messages["text_named.wav"]
    assert "no audio samples" in messages["wav_header_only.wav"]
    assert "truncated" in messages["truncated.flac"]


def test_result_is_plain_json_and_msgpack(analyses):
    result = analyses["audio/speakers/librispeech_1688_01.wav"]
    assert set(result) == RESULT_KEYS
    assert json.loads(json.dumps(result)) == result
    assert msgpack.unpackb(msgpack.packb(result)) == result
    assert all(type(v) is float for v in result["embedding"])
    assert result["no_speech_reason"] is None
    assert 0.0 < result["speech_ratio"] <= 1.0
    assert set(result["timings_ms"]) >= {"decode", "vad", "spoof", "embed", "total"}
    segments = result["speech_segments"]
    assert all(0 <= s["start_s"] < s["end_s"] <= result["duration_s"] for s in segments)
    assert all(a["end_s"] <= b["start_s"] for a, b in zip(segments, segments[1:]))


def test_options(audio_pipeline, data_path):
    payload = (data_path / "audio/speakers/fsdd_jackson_02.wav").read_bytes()
    only_vad = audio_pipeline.analyze(payload, {"spoof": False, "embed": False})
    assert only_vad["spoof"] is None and only_vad["embedding"] is None and only_vad["speech_segments"]
    assert "spoof" not in only_vad["timings_ms"] and "embed" not in only_vad["timings_ms"]
    with pytest.raises(InvalidInput, match="unknown audio option"):
        audio_pipeline.analyze(payload, {"spoof": True, "diarize": True})
    with pytest.raises(InvalidInput, match="true or false"):
        audio_pipeline.analyze(payload, {"spoof": "yes"})
    assert parse_options(None) == OPTIONS and parse_options({}) == OPTIONS
    # msgpack lets bytes keys through beside str ones; they must not break the message.
    with pytest.raises(InvalidInput, match=r"unknown audio option\(s\) b'spoof', 'Spoof'"):
        parse_options({b"spoof": True, "Spoof": True})


def test_analyze_many_isolates_bad_items(audio_pipeline, data_path):
    good = (data_path / "audio/speakers/fsdd_george_02.wav").read_bytes()
    silence = (data_path / "audio/nonspeech/digital_silence_3s_16k.wav").read_bytes()
    out = audio_pipeline.analyze_many(
        [good, b"", b"not audio", silence, good],
        [None, None, None, None, {"nonsense": 1}],
    )
    assert isinstance(out[0], dict) and out[0]["embedding"] is not None
    assert isinstance(out[1], InvalidInput) and isinstance(out[2], InvalidInput)
    assert isinstance(out[3], dict) and out[3]["no_speech_reason"]
    assert isinstance(out[4], InvalidInput)
    single = audio_pipeline.analyze(good)
    np.testing.assert_allclose(out[0]["embedding"], single["embedding"], atol=1e-5)
    assert out[0]["spoof"]["score"] == pytest.approx(single["spoof"]["score"], abs=1e-4)
    with pytest.raises(InvalidInput, match="option sets"):
        audio_pipeline.analyze_many([good, good], [None])


def test_limits(audio_sessions, audio_specs, audio_settings, data_path):
    from workers.audio.pipeline import AudioPipeline

    payload = (data_path / "audio/antispoof/spoof/trump_fake_6xxGIDfe5BU_16k_first10s.wav").read_bytes()
    small = replace(audio_settings, max_payload_bytes=100_000)
    with pytest.raises(LimitExceeded, match="IDENT_MAX_PAYLOAD_BYTES"):
        AudioPipeline(audio_sessions, audio_specs, small).analyze(payload)
    short = replace(audio_settings, max_audio_seconds=5.0)
    with pytest.raises(LimitExceeded, match="IDENT_MAX_AUDIO_SECONDS"):
        AudioPipeline(audio_sessions, audio_specs, short).analyze(payload)


def test_very_short_audio_is_no_speech_not_an_error(audio_pipeline):
    import io

    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.zeros(3200, dtype=np.float32), 16000, format="WAV", subtype="PCM_16")
    result = audio_pipeline.analyze(buf.getvalue())
    assert result["duration_s"] == 0.2 and result["speech_segments"] == []
    assert result["no_speech_reason"].startswith("no speech found")


def test_speech_audio_concatenates_segments():
    wave = np.arange(16000, dtype=np.float32)
    out = speech_audio(wave, [(0.0, 0.1), (0.5, 0.6)])
    np.testing.assert_array_equal(out, np.concatenate([wave[:1600], wave[8000:9600]]))
    assert speech_audio(wave, []).shape == (0,)


def test_a_decoder_bug_fails_its_own_payload_with_a_contract_error(audio_pipeline, data_path, monkeypatch):
    from workers.audio import pipeline as audio_module

    good = (data_path / "audio/speakers/fsdd_george_02.wav").read_bytes()
    real_decode = audio_module.decode

    def decode_with_a_bug(payload, max_seconds):
        if payload.startswith(b"trigger"):
            raise IndexError("a bug in the decoder")
        return real_decode(payload, max_seconds)

    monkeypatch.setattr(audio_module, "decode", decode_with_a_bug)
    out = audio_pipeline.analyze_many([b"trigger the bug", good])
    # A producer gets a type from the contract's error table, not the worker's internal one.
    assert type(out[0]) is InvalidInput and "IndexError" in str(out[0])
    assert isinstance(out[1], dict) and out[1]["embedding"] is not None


def test_a_time_limit_while_decoding_is_not_called_bad_input(audio_pipeline, data_path, monkeypatch):
    """The catch-all for decoder bugs must let the job's soft time limit through: the
    recording may be fine, and InvalidInput would tell its producer never to retry it."""
    from billiard.exceptions import SoftTimeLimitExceeded

    from workers.audio import pipeline as module

    def out_of_time(*args, **kwargs):
        raise SoftTimeLimitExceeded()

    monkeypatch.setattr(module, "decode", out_of_time)
    with pytest.raises(SoftTimeLimitExceeded):
        audio_pipeline.analyze_many([(data_path / "audio/speakers/fsdd_george_02.wav").read_bytes()])
