"""What a payload is, from its first bytes: which worker takes it, and what an unaccepted one looks like.

Both workers use it in their refusals, so that a client that sent a phone's
voice memo to the audio queue, or a GIF to the vision queue, learns what it
sent and not only what is accepted. Only the file's signature is named; no
other payload bytes reach a message or a log.
"""

from __future__ import annotations

from tasks.errors import IdentError

_SIGNATURES = (
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"GIF87a", "a GIF image"),
    (b"GIF89a", "a GIF image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"\x00\x00\x00\x0cjP  ", "a JPEG 2000 image"),
    (b"\xff\x4f\xff\x51", "a JPEG 2000 codestream"),
    (b"\x00\x00\x01\x00", "an ICO icon"),
    (b"%PDF", "a PDF document"),
    (b"ID3", "an MP3 audio file"),
    (b"fLaC", "a FLAC audio file"),
    (b"OggS", "an Ogg media file"),
    (b"#!AMR", "an AMR audio file, the codec of many phones' voice recorders"),
    (b"\x1a\x45\xdf\xa3", "a Matroska/WebM media file, as browsers record with MediaRecorder"),
    (b"PK\x03\x04", "a ZIP archive"),
    (b"\x1f\x8b", "a gzip archive"),
)

_RIFF_FORMS = {b"WAVE": "a WAV audio file", b"WEBP": "a WebP image", b"AVI ": "an AVI video"}

# ISO base media brands (bytes 8..12) of still images; every other brand is MP4-family media.
_IMAGE_BRANDS = {"heic", "heix", "hevc", "heim", "heis", "mif1", "msf1", "avif", "avis"}


def describe(data: bytes) -> str:
    """``"it looks like <format>"``, or the first four bytes in hex when the format is unknown."""
    if not data:
        return "it is empty"
    for magic, name in _SIGNATURES:
        if data.startswith(magic):
            return f"it looks like {name}"
    if data[:4] in (b"RIFF", b"RIFX", b"RF64") and data[8:12] in _RIFF_FORMS:
        return f"it looks like {_RIFF_FORMS[data[8:12]]}"
    if data[4:8] == b"ftyp":
        brand = data[8:12].decode("ascii", "replace")
        if brand.strip().lower() in _IMAGE_BRANDS:
            return f"it looks like a HEIF/AVIF image of brand {brand!r}"
        if brand in ("M4A ", "M4B "):
            return f"it looks like an M4A audio file of brand {brand!r}: AAC, as phones record voice memos"
        return f"it looks like an MP4/3GP media file of brand {brand!r}"
    # An MPEG frame sync with layer bits 00 is AAC in ADTS framing (MP3 has layer 01).
    if len(data) > 1 and data[0] == 0xFF and (data[1] & 0xF6) == 0xF0:
        return "it looks like a raw AAC audio stream in ADTS framing"
    return f"it starts with bytes {data[:4].hex(' ')}"


# What `ident submit` and `ident gallery enroll` tell a photo from a recording by.
IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"BM")
AUDIO_MAGIC = (b"fLaC", b"OggS", b"ID3", b"FORM", b".snd")


def detect_kind(data: bytes) -> str:
    """'vision' or 'audio' from the content's magic bytes, not the file name."""
    if data.startswith(IMAGE_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
        return "vision"
    if data.startswith(AUDIO_MAGIC) or (data[:4] in (b"RIFF", b"RIFX", b"RF64") and data[8:12] == b"WAVE"):
        return "audio"
    if len(data) > 1 and data[0] == 0xFF and (data[1] & 0xE0) == 0xE0:  # MPEG audio frame sync
        return "audio"
    raise IdentError(
        f"cannot tell whether this is an image or audio from its content ({describe(data)}): "
        "pass --kind vision|audio"
    )
