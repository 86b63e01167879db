"""workers.formats.describe: what a refused payload looks like, from its signature alone."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
import soundfile as sf

from workers.formats import describe


def iso_media(brand: bytes) -> bytes:
    # The ftyp box every ISO base media file (MP4, M4A, 3GP, HEIF) opens with.
    return b"\x00\x00\x00\x18ftyp" + brand + b"\x00\x00\x00\x00" + brand + b"isom" + b"\x00" * 64


def wav() -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, np.zeros(1600, dtype=np.float32), 16000, format="WAV")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "payload,expected",
    [
        (iso_media(b"M4A "), "an M4A audio file of brand 'M4A ': AAC"),
        (iso_media(b"heic"), "a HEIF/AVIF image of brand 'heic'"),
        (iso_media(b"3gp5"), "an MP4/3GP media file of brand '3gp5'"),
        (iso_media(b"M4V "), "an MP4/3GP media file of brand 'M4V '"),
        (b"\xff\xf1\x50\x80\x02\x1f\xfc" + b"\x00" * 64, "a raw AAC audio stream in ADTS framing"),
        (b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01" + b"\x00" * 64, "a Matroska/WebM media file"),
        (b"#!AMR\n" + b"\x3c" * 64, "an AMR audio file"),
        (wav(), "a WAV audio file"),
        (cv2.imencode(".tiff", np.zeros((8, 8, 3), np.uint8))[1].tobytes(), "a TIFF image"),
        (cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))[1].tobytes(), "a JPEG image"),
    ],
)
def test_known_signatures_are_named(payload, expected):
    assert describe(payload).startswith(f"it looks like {expected}")


def test_unknown_payloads_show_only_their_first_four_bytes():
    assert describe(b"hello, this is not audio") == "it starts with bytes 68 65 6c 6c"
    assert describe(b"") == "it is empty"


def test_ident_submit_names_a_payload_it_cannot_route():
    from ident.cli import detect_kind
    from tasks.errors import IdentError

    with pytest.raises(IdentError, match=r"\(it looks like an M4A audio file of brand .*\): pass --kind"):
        detect_kind(iso_media(b"M4A "))
    assert detect_kind(wav()) == "audio"
