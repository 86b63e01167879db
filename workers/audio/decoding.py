"""Turn an uploaded audio file into the 16 kHz mono float32 waveform every audio model wants.

The container and codec are recognised from the bytes, never from a file name:
libsndfile (through ``soundfile``) reads WAV (PCM 8/16/24/32 bit, float,
mu-law, A-law, WAVEX, RF64), FLAC, Ogg Vorbis, Ogg Opus, MP3 and the rest of
its formats. Channels are averaged to mono and the result is resampled with
soxr's high-quality filter.

Limits are enforced before the work they protect:

* the duration the header announces is checked against ``max_seconds`` before
  a single sample is decoded, and decoding stops as soon as the decoded audio
  passes the limit, so a header that understates the length cannot get around
  it either. An MP3 has no such header (libsndfile estimates its length from
  the first frame's bitrate), so only the decoded duration counts for it;
* samples are decoded a quarter of a second at a time and resampled as they
  come, so memory stays proportional to the 16 kHz output (MP3 is the
  exception: it is read in one call, up to its estimated length or just past
  the limit, to step around a libsndfile bug, see ``_read_mono_16k``).

Truncated streams: WAV and MP3 readers stop quietly at the end of the bytes, so
a cut-off WAV simply decodes shorter. FLAC and Ogg raise a decoding error at
the cut; the audio decoded before it is kept when it is at least
``MIN_TRUNCATED_SECONDS`` long (``info["truncated"]`` is then True), otherwise
the payload is rejected as truncated beyond use.

Very short audio: less than ``MIN_SECONDS`` (0.1 s) of decoded audio is
rejected with :class:`InvalidInput`. Nothing that short can hold a word (the
voice activity detector needs 0.25 s of speech for a segment), so it is almost
always a broken upload, and saying so helps the client more than an empty
analysis would. Between 0.1 s and 0.25 s the audio decodes and the analysis
reports that no speech was found.
"""

from __future__ import annotations

import io
import logging
import math
from typing import Any

import numpy as np
import soundfile as sf
import soxr

from tasks.errors import InvalidInput, LimitExceeded
from workers.formats import describe

log = logging.getLogger(__name__)

TARGET_RATE = 16000
MIN_SECONDS = 0.1
MIN_TRUNCATED_SECONDS = 1.0
# Rates outside this range are either corrupt headers or not speech recordings
# a 16 kHz model could use; soxr also refuses extreme ratios.
MIN_RATE = 4000
MAX_RATE = 768000
MAX_CHANNELS = 64
# libsndfile reports this frame count for a stream whose length it cannot tell.
_UNKNOWN_FRAMES = 2**62
# What a writer streaming to a pipe puts in a WAV's data size, unable to seek
# back and fill in the length: 0, 2**32 - 1, or 2**31 (arecord).
_WAV_UNKNOWN_SIZES = frozenset({0, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF})

_DECODER_ERRORS = (sf.LibsndfileError, RuntimeError, ValueError, TypeError, OverflowError)

SUPPORTED = "WAV (PCM, float, mu-law/A-law), FLAC, Ogg Vorbis, Ogg Opus or MP3"


def decode(payload: bytes, max_seconds: float, *, min_seconds: float = MIN_SECONDS) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode ``payload`` to a mono float32 waveform at 16 kHz.

    Returns ``(waveform, info)`` where ``info`` holds ``sample_rate_in``,
    ``channels``, ``duration_s`` (of the decoded audio), ``format``,
    ``subtype`` and ``truncated``.

    Raises :class:`LimitExceeded` when the audio is longer than
    ``max_seconds`` (``IDENT_MAX_AUDIO_SECONDS``) and :class:`InvalidInput`
    when it is empty, not audio, holds no samples, is truncated beyond use or
    is shorter than ``min_seconds``.
    """
    if not payload:
        raise InvalidInput(f"the audio payload is empty (0 bytes); send the bytes of a {SUPPORTED} file")
    payload = wav_with_streamed_length(payload)
    claimed = wav_claimed_seconds(payload)
    if claimed is not None:
        LimitExceeded.check(
            "the audio duration the WAV header claims", claimed, max_seconds, "IDENT_MAX_AUDIO_SECONDS", "s"
        )
    try:
        handle = sf.SoundFile(io.BytesIO(payload))
    except _DECODER_ERRORS as exc:
        raise InvalidInput(
            f"the payload ({len(payload)} bytes) is not a readable audio file: {_reason(exc)} "
            f"({describe(payload)}); send a {SUPPORTED} file"
        ) from None
    with handle:
        rate, channels, frames = handle.samplerate, handle.channels, handle.frames
        info = {
            "sample_rate_in": int(rate),
            "channels": int(channels),
            "format": handle.format,
            "subtype": handle.subtype,
        }
        _check_header(rate, channels)
        # Without a Xing/Info tag an MP3 has no length, and libsndfile estimates one from
        # the first frame's bitrate: a low-bitrate intro makes it many times too long.
        # The decode loop enforces the limit on what is actually decoded.
        if handle.format != "MP3" and 0 < frames < _UNKNOWN_FRAMES:
            LimitExceeded.check(
                "the audio duration announced by the file header", frames / rate, max_seconds,
                "IDENT_MAX_AUDIO_SECONDS", "s",
            )
        wave, frames_read, error = _read_mono_16k(handle, rate, channels, max_seconds)

    seconds_read = frames_read / rate
    announced = frames / rate if 0 < frames < _UNKNOWN_FRAMES else None
    if error is not None:
        of_total = f" of the {announced:.2f} s the header announces" if announced else ""
        if seconds_read < MIN_TRUNCATED_SECONDS:
            raise InvalidInput(
                f"the {info['format']} audio is truncated or corrupt: only {seconds_read:.2f} s{of_total} "
                f"could be decoded before the decoder failed ({error}); resend the complete file"
            )
        log.warning(
            "audio stream truncated or corrupt after %.2f s%s (%s); analysing the decoded part",
            seconds_read, of_total, error,
        )
    if frames_read == 0:
        raise InvalidInput(
            f"the {info['format']} file holds no audio samples (a header without data); resend the complete file"
        )
    if seconds_read < min_seconds:
        raise InvalidInput(
            f"the audio is {seconds_read:.3f} s long; at least {min_seconds:g} s is needed to analyse it"
        )
    # Of the 16 kHz output, so that speech segment ends never pass it.
    info["duration_s"] = round(len(wave) / TARGET_RATE, 4)
    info["truncated"] = error is not None
    return wave, info


def _wav_data_chunk(payload: bytes) -> tuple[int, int, int | None] | None:
    """(offset, claimed size, byte rate) of a RIFF/WAVE file's data chunk, or None.

    Only the chunk headers are walked: nothing is decoded or allocated.
    """
    if len(payload) < 12 or payload[:4] != b"RIFF" or payload[8:12] != b"WAVE":
        return None
    byte_rate = None
    offset = 12
    while offset + 8 <= len(payload):
        chunk_id = payload[offset:offset + 4]
        size = int.from_bytes(payload[offset + 4:offset + 8], "little")
        if chunk_id == b"fmt " and offset + 20 <= len(payload):
            byte_rate = int.from_bytes(payload[offset + 16:offset + 20], "little")
        elif chunk_id == b"data":
            return offset, size, byte_rate
        offset += 8 + size + (size & 1)
    return None


def wav_claimed_seconds(payload: bytes) -> float | None:
    """The length a RIFF/WAVE header's data chunk claims, in seconds, or None.

    libsndfile sizes a WAV by the bytes actually present, so a header that
    claims hours over a second of samples would pass unnoticed; a claim that
    absurd marks a forged or broken file, and is refused before any reading.
    A streaming writer's placeholder is no claim: the length is unknown.
    """
    chunk = _wav_data_chunk(payload)
    if chunk is None:
        return None
    _, size, byte_rate = chunk
    if not byte_rate or size in _WAV_UNKNOWN_SIZES:
        return None
    return size / byte_rate


def wav_with_streamed_length(payload: bytes) -> bytes:
    """``payload`` with a data size of 0 replaced by the bytes that follow it.

    libsndfile reads a data chunk of size 0 as empty, but a writer streaming to
    a pipe, or one stopped before it went back to fill in the size, leaves 0
    there with the samples after it.
    """
    chunk = _wav_data_chunk(payload)
    if chunk is None or chunk[1] != 0:
        return payload
    offset = chunk[0]
    present = len(payload) - (offset + 8)
    if present <= 0:
        return payload
    return payload[:offset + 4] + present.to_bytes(4, "little") + payload[offset + 8:]


def _check_header(rate: int, channels: int) -> None:
    if not MIN_RATE <= rate <= MAX_RATE:
        raise InvalidInput(
            f"the audio header gives a sample rate of {rate} Hz; rates from {MIN_RATE} to {MAX_RATE} Hz are "
            "supported (the file may be corrupt)"
        )
    if not 1 <= channels <= MAX_CHANNELS:
        raise InvalidInput(
            f"the audio header gives {channels} channels; 1 to {MAX_CHANNELS} are supported (the file may be corrupt)"
        )


def _read_mono_16k(handle: sf.SoundFile, rate: int, channels: int, max_seconds: float):
    """Decode block by block; returns (waveform, input frames read, decoder error or None)."""
    block = max(1, rate // 4)
    limit_frames = math.floor(max_seconds * rate)
    # libsndfile 1.2's MP3 reader returns corrupted samples for ~1000 frames
    # after the boundary between two read calls on some files (measured on
    # audio/antispoof/spoof/trump_fake_*.mp3: block reads correlate 0.998 with
    # ffmpeg's decode, one whole read 0.99999). So an MP3 is read in one call
    # up to the frame count libsndfile announces (or just past the limit, so
    # that a longer one is refused); blocks only pick up anything past that.
    first = block
    if handle.format == "MP3" and 0 < handle.frames < _UNKNOWN_FRAMES:
        first = min(handle.frames, limit_frames + 1)
    resampler = None if rate == TARGET_RATE else soxr.ResampleStream(rate, TARGET_RATE, 1, dtype="float32", quality="HQ")
    pieces: list[np.ndarray] = []
    frames_read = 0
    error = None
    while True:
        try:
            data = handle.read(first if frames_read == 0 else block, dtype="float32", always_2d=True)
        except _DECODER_ERRORS as exc:
            error = _reason(exc)
            break
        if len(data) == 0:
            break
        frames_read += len(data)
        if frames_read > limit_frames:
            # The header understated the length (or could not state it).
            LimitExceeded.check(
                "the decoded audio duration", frames_read / rate, max_seconds, "IDENT_MAX_AUDIO_SECONDS", "s"
            )
        mono = data[:, 0] if channels == 1 else data.mean(axis=1, dtype=np.float32)
        if not np.isfinite(mono).all():
            raise InvalidInput("the audio holds NaN or infinite sample values; the file is corrupt")
        pieces.append(resampler.resample_chunk(mono) if resampler else mono)
    if resampler is not None:
        pieces.append(resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True))
    wave = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)
    return np.ascontiguousarray(wave, dtype=np.float32), frames_read, error


def _reason(exc: BaseException) -> str:
    """libsndfile's own words, without the BytesIO repr soundfile puts in front of them."""
    text = getattr(exc, "error_string", None) or str(exc)
    text = text.strip().rstrip(".")
    if text.lower().startswith("error :"):
        text = text[len("error :"):].strip()
    return text or type(exc).__name__
