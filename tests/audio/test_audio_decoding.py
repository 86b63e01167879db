"""decode(): formats, channels, rates, limits, and robustness against hostile bytes."""

from __future__ import annotations

import faulthandler
import io
import wave as wavelib

import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tasks.errors import InvalidInput, LimitExceeded
from workers.audio import decoding
from workers.audio.decoding import decode


def sine(rate: int, seconds: float = 1.0, freq: float = 440.0, amp: float = 0.3, channels: int = 1) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    x = (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return x if channels == 1 else np.stack([x] * channels, axis=1)


def encode(samples: np.ndarray, rate: int, fmt: str, subtype: str) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def peak_hz(x: np.ndarray, rate: int = 16000) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum) * rate / len(x))


FORMATS = [
    ("WAV", "PCM_U8", 16000, 1),
    ("WAV", "PCM_16", 16000, 1),
    ("WAV", "PCM_24", 22050, 2),
    ("WAV", "PCM_32", 48000, 1),
    ("WAV", "FLOAT", 16000, 2),
    ("WAV", "DOUBLE", 16000, 1),
    ("WAV", "ULAW", 8000, 1),
    ("WAV", "ALAW", 8000, 1),
    ("WAV", "IMA_ADPCM", 16000, 1),
    ("RF64", "PCM_16", 16000, 1),
    ("FLAC", "PCM_16", 44100, 2),
    ("FLAC", "PCM_24", 16000, 1),
    ("OGG", "VORBIS", 16000, 1),
    ("OGG", "OPUS", 48000, 2),
    ("MP3", "MPEG_LAYER_III", 44100, 2),
]


@pytest.mark.parametrize("fmt,subtype,rate,channels", FORMATS, ids=[f"{f}-{s}-{r}" for f, s, r, _ in FORMATS])
def test_formats_decode_to_16k_mono(fmt, subtype, rate, channels):
    payload = encode(sine(rate, channels=channels), rate, fmt, subtype)
    wave, info = decode(payload, 600.0)
    assert wave.dtype == np.float32 and wave.ndim == 1
    # Lossy codecs add encoder delay / padding of a few ms.
    assert abs(len(wave) - 16000) < 16000 * 0.1
    assert info["sample_rate_in"] == rate and info["channels"] == channels
    assert info["format"] == fmt and info["subtype"] == subtype
    assert abs(peak_hz(wave) - 440.0) < 5.0
    rms = float(np.sqrt(np.mean(wave[2000:-2000] ** 2)))
    assert rms == pytest.approx(0.3 / np.sqrt(2), rel=0.1)


def test_type_comes_from_content_not_name(data_path):
    # soundfile sees only bytes; a FLAC would decode the same under any name.
    payload = (data_path / "audio/speakers/librispeech_1688_02.flac").read_bytes()
    wave, info = decode(payload, 600.0)
    assert info["format"] == "FLAC" and len(wave) == 71600


def test_channels_are_averaged():
    left = sine(16000)
    stereo = np.stack([left, -left], axis=1)
    wave, info = decode(encode(stereo, 16000, "WAV", "FLOAT"), 600.0)
    assert info["channels"] == 2
    assert np.abs(wave).max() < 1e-6


def test_resampling_keeps_duration_and_pitch():
    wave, info = decode(encode(sine(44100, seconds=2.0, freq=1000.0), 44100, "WAV", "PCM_16"), 600.0)
    assert len(wave) == 32000 and info["duration_s"] == 2.0
    assert abs(peak_hz(wave) - 1000.0) < 2.0


def test_empty_payload():
    with pytest.raises(InvalidInput, match="empty"):
        decode(b"", 600.0)


@pytest.mark.parametrize("payload", [b"hello, this is not audio at all\n" * 3, bytes(range(256)) * 8, b"RIFF"])
def test_not_audio(payload):
    with pytest.raises(InvalidInput, match="not a readable audio file"):
        decode(payload, 600.0)


def test_header_without_samples():
    buf = io.BytesIO()
    with wavelib.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
    with pytest.raises(InvalidInput, match="no audio samples"):
        decode(buf.getvalue(), 600.0)


def test_too_short_is_rejected_and_short_enough_is_not():
    with pytest.raises(InvalidInput, match="at least 0.1 s"):
        decode(encode(sine(16000, seconds=0.05), 16000, "WAV", "PCM_16"), 600.0)
    wave, info = decode(encode(sine(16000, seconds=0.2), 16000, "WAV", "PCM_16"), 600.0)
    assert len(wave) == 3200 and info["duration_s"] == 0.2


def test_long_audio_over_the_limit():
    payload = encode(sine(16000, seconds=3.0), 16000, "WAV", "PCM_16")
    with pytest.raises(LimitExceeded, match="IDENT_MAX_AUDIO_SECONDS"):
        decode(payload, 2.0)
    assert len(decode(payload, 3.0)[0]) == 48000


def _flac_claiming_samples(total: int) -> bytes:
    data = bytearray(encode(sine(16000), 16000, "FLAC", "PCM_16"))
    # STREAMINFO's total-samples field: the low 36 bits of bytes 18..25.
    field = int.from_bytes(data[18:26], "big")
    field = (field & ~(2**36 - 1)) | total
    data[18:26] = field.to_bytes(8, "big")
    return bytes(data)


def test_absurd_header_length_is_refused_before_reading(monkeypatch):
    payload = _flac_claiming_samples(2**36 - 1)  # 4.3 million seconds at 16 kHz

    def must_not_read(*args, **kwargs):
        raise RuntimeError("samples were read before the header's duration was checked")

    monkeypatch.setattr(decoding, "_read_mono_16k", must_not_read)
    with pytest.raises(LimitExceeded, match=r"announced by the file header .* IDENT_MAX_AUDIO_SECONDS"):
        decode(payload, 600.0)


def test_understated_length_is_still_capped():
    # The header check cannot see past a header that lies low; the decode loop
    # stops on the decoded duration instead.
    handle = sf.SoundFile(io.BytesIO(encode(sine(16000, seconds=3.0), 16000, "WAV", "PCM_16")))
    with pytest.raises(LimitExceeded, match="decoded audio duration"):
        decoding._read_mono_16k(handle, 16000, 1, 1.0)


def test_nan_samples_are_rejected():
    x = sine(16000)
    x[100] = np.nan
    with pytest.raises(InvalidInput, match="NaN"):
        decode(encode(x, 16000, "WAV", "FLOAT"), 600.0)


def test_truncated_flac_keeps_a_usable_prefix_or_says_truncated():
    full = encode(np.tile(sine(16000, seconds=1.0, freq=300.0), 6), 16000, "FLAC", "PCM_16")
    wave, info = decode(full[: len(full) // 2], 600.0)
    assert info["truncated"] is True
    assert 1.0 <= info["duration_s"] < 6.0
    with pytest.raises(InvalidInput, match="truncated"):
        decode(full[:2000], 600.0)


# --- fuzzing ----------------------------------------------------------------

SEED_FILES = [
    "audio/speakers/fsdd_george_01.wav",
    "audio/speakers/librispeech_1998_02.flac",
    "bad/silero_test.opus",
    "bad/silero_test.mp3",
    "bad/speech_float32_16k.wav",
    "bad/speech_24bit_16k.wav",
]


@pytest.fixture(scope="module")
def seeds(data_path) -> list[bytes]:
    generated = [
        encode(sine(16000, seconds=0.5), 16000, "OGG", "VORBIS"),
        encode(sine(8000, seconds=0.5), 8000, "WAV", "ULAW"),
        encode(sine(16000, seconds=0.5, channels=2), 16000, "WAV", "IMA_ADPCM"),
    ]
    return [(data_path / p).read_bytes() for p in SEED_FILES] + generated


@pytest.fixture
def watchdog():
    """A hang in native decoder code would never return to Python: kill the run loudly instead."""
    faulthandler.dump_traceback_later(120, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def check_decode_outcome(payload: bytes, max_seconds: float) -> None:
    try:
        wave, info = decode(payload, max_seconds)
    except InvalidInput as exc:  # LimitExceeded is an InvalidInput
        assert str(exc), "an error without a message"
        return
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert len(wave) >= 16000 * decoding.MIN_SECONDS - 1
    assert np.isfinite(wave).all()
    assert info["duration_s"] <= max_seconds + 1e-6


FUZZ = settings(
    max_examples=120,
    deadline=5000,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@FUZZ
@given(payload=st.binary(min_size=0, max_size=4096))
def test_fuzz_random_bytes(payload, watchdog):
    check_decode_outcome(payload, 600.0)


@FUZZ
@given(data=st.data(), max_seconds=st.sampled_from([0.5, 5.0, 600.0]))
def test_fuzz_truncated_real_files(seeds, data, max_seconds, watchdog):
    source = data.draw(st.sampled_from(seeds))
    cut = data.draw(st.integers(0, len(source)))
    check_decode_outcome(source[:cut], max_seconds)


@FUZZ
@given(
    data=st.data(),
    edits=st.lists(st.tuples(st.integers(0, 127), st.integers(0, 255)), min_size=1, max_size=8),
)
def test_fuzz_corrupted_headers(seeds, data, edits, watchdog):
    payload = bytearray(data.draw(st.sampled_from(seeds)))
    for pos, value in edits:
        if pos < len(payload):
            payload[pos] = value
    check_decode_outcome(bytes(payload), 600.0)


@FUZZ
@given(data=st.data(), flips=st.lists(st.floats(0, 1, exclude_max=True), min_size=1, max_size=16))
def test_fuzz_corrupted_bodies(seeds, data, flips, watchdog):
    payload = bytearray(data.draw(st.sampled_from(seeds)))
    for where in flips:
        payload[int(where * len(payload))] ^= 0xFF
    check_decode_outcome(bytes(payload), 600.0)


def test_mp3_decodes_like_one_whole_read(data_path):
    # Guards the one-call MP3 read: libsndfile 1.2 corrupts ~1000 frames after
    # each read-call boundary on this file when it is read in blocks.
    import soxr

    payload = (data_path / "audio/antispoof/spoof/trump_fake_6xxGIDfe5BU.mp3").read_bytes()
    whole, rate = sf.read(io.BytesIO(payload), dtype="float32", always_2d=True)
    expected = soxr.resample(whole.mean(axis=1), rate, 16000, quality="HQ")
    wave, info = decode(payload, 600.0)
    assert info["format"] == "MP3" and len(wave) == len(expected)
    assert np.abs(wave - expected).max() < 1e-3


def _mp3_frames_only(samples: np.ndarray, quality: float) -> bytes:
    """An MP3 of ``samples`` without its Xing/Info frame, as a stream capture or a join has."""
    buf = io.BytesIO()
    sf.write(buf, samples, 16000, format="MP3", subtype="MPEG_LAYER_III", compression_level=quality)
    mp3 = buf.getvalue()
    tag = max(mp3.find(b"Info", 0, 300), mp3.find(b"Xing", 0, 300))
    frame = mp3.find(b"\xff", tag)
    while mp3[frame + 1] & 0xE0 != 0xE0:
        frame = mp3.find(b"\xff", frame + 1)
    return mp3[frame:]


def test_an_mp3_length_estimate_is_not_taken_for_a_claim():
    """Without a tag, libsndfile guesses an MP3's length from its first frame's bitrate: a
    low-bitrate intro before loud audio makes the guess ~5x too long. Only decoded audio counts."""
    noise = (0.3 * np.random.default_rng(0).standard_normal(16000 * 20)).astype(np.float32)
    payload = _mp3_frames_only(np.zeros(32000, np.float32), 0.99) + _mp3_frames_only(noise, 0.0)
    estimated = sf.info(io.BytesIO(payload)).duration
    wave, info = decode(payload, max_seconds=60)
    assert estimated > 60 > info["duration_s"] > 20
    with pytest.raises(LimitExceeded, match="decoded audio duration"):
        decode(payload, max_seconds=10)


def test_a_wav_header_claiming_hours_is_refused_before_reading():
    import struct

    from tasks.errors import LimitExceeded
    from workers.audio.decoding import decode, wav_claimed_seconds

    rate = 16000
    samples = b"\x00\x01" * rate
    claimed = 37 * 3600 * rate * 2
    forged = (b"RIFF" + struct.pack("<I", 0xFFFFFFF0) + b"WAVE" + b"fmt " + struct.pack("<I", 16)
              + struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
              + b"data" + struct.pack("<I", min(claimed, 0xFFFFFFF0)) + samples)
    assert wav_claimed_seconds(forged) > 3600
    with pytest.raises(LimitExceeded, match="WAV header claims"):
        decode(forged, max_seconds=30)
    honest = forged[:40] + struct.pack("<I", len(samples)) + samples
    assert wav_claimed_seconds(honest) == pytest.approx(1.0)
    streaming = forged[:40] + struct.pack("<I", 0xFFFFFFFF) + samples
    assert wav_claimed_seconds(streaming) is None


@pytest.mark.parametrize("placeholder", [0, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF])
def test_a_streamed_wav_decodes_whole(placeholder):
    """A writer streaming to a pipe cannot go back to fill in the data size (arecord leaves
    2**31 there, others 0 or 2**32 - 1): its placeholder is no claim, and every sample is read."""
    import struct

    rate = 16000
    recording = encode(sine(rate, seconds=5.0), rate, "WAV", "PCM_16")
    at = recording.index(b"data")
    streamed = recording[:at + 4] + struct.pack("<I", placeholder) + recording[at + 8:]
    wave, info = decode(streamed, max_seconds=30)
    assert info["duration_s"] == pytest.approx(5.0)
    header_only = streamed[:at + 8]
    with pytest.raises(InvalidInput, match="holds no audio samples"):
        decode(header_only, max_seconds=30)


def test_refusal_names_what_was_sent():
    m4a = b"\x00\x00\x00\x18ftypM4A \x00\x00\x00\x00M4A isom" + b"\x00" * 256
    with pytest.raises(InvalidInput, match=r"not a readable audio file: .*M4A audio file.*; send a WAV"):
        decode(m4a, 600.0)
