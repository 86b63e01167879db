"""Image decoding: formats, orientation, colour layouts, header limits, bad payloads."""

from __future__ import annotations

import resource
import struct
import time
import tracemalloc
import zlib

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from tasks.errors import InvalidInput, LimitExceeded
from workers.vision import imaging
from workers.vision.imaging import bmp_size, decode_image, image_size, jpeg_size, png_size, sniff_format, webp_size

LIMIT = 50_000_000


def encode(image: np.ndarray, ext: str, params: list[int] | None = None) -> bytes:
    ok, buf = cv2.imencode(ext, image, params or [])
    assert ok
    return buf.tobytes()


def gradient(height: int = 48, width: int = 64) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.dstack([x * 255 // width, y * 255 // height, (x + y) * 127 // (width + height)]).astype(np.uint8)


def with_exif_orientation(jpeg: bytes, orientation: int) -> bytes:
    """Insert a minimal little-endian EXIF APP1 segment holding only Orientation."""
    tiff = b"II*\x00" + struct.pack("<I", 8)
    ifd = struct.pack("<H", 1) + struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack("<I", 0)
    payload = b"Exif\x00\x00" + tiff + ifd
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


# -- header parsers ---------------------------------------------------------


@pytest.mark.parametrize(
    "ext,params,parser",
    [
        (".jpg", [], jpeg_size),
        (".jpg", [cv2.IMWRITE_JPEG_PROGRESSIVE, 1], jpeg_size),
        (".png", [], png_size),
        (".bmp", [], bmp_size),
        (".webp", [cv2.IMWRITE_WEBP_QUALITY, 80], webp_size),
        (".webp", [cv2.IMWRITE_WEBP_QUALITY, 101], webp_size),
    ],
)
def test_header_parsers_read_the_encoded_size(ext, params, parser):
    image = gradient(37, 53)
    data = encode(image, ext, params)
    assert parser(data) == (53, 37)
    fmt, width, height = image_size(data)
    assert (width, height) == (53, 37)
    assert decode_image(data, LIMIT).shape == (37, 53, 3)


def test_webp_extended_header():
    # VP8X canvas: 24-bit little-endian sizes minus one at bytes 24..29.
    header = b"RIFF" + struct.pack("<I", 30) + b"WEBP" + b"VP8X" + struct.pack("<I", 10) + b"\x10\0\0\0"
    data = header + (1999).to_bytes(3, "little") + (2999).to_bytes(3, "little")
    assert webp_size(data) == (2000, 3000)


def test_bmp_top_down_height_is_positive():
    data = bytearray(encode(gradient(10, 12), ".bmp"))
    data[22:26] = struct.pack("<i", -10)
    assert bmp_size(bytes(data)) == (12, 10)


def test_jpeg_size_skips_exif_thumbnail_and_fill_bytes():
    data = with_exif_orientation(encode(gradient(20, 30), ".jpg"), 1)
    # An extra fill byte before a marker is legal.
    data = data[:2] + b"\xff" + data[2:]
    assert jpeg_size(data) == (30, 20)


def test_sniff_uses_content_not_names():
    assert sniff_format(encode(gradient(), ".png")) == "PNG"
    assert sniff_format(encode(gradient(), ".jpg")) == "JPEG"
    with pytest.raises(InvalidInput, match="GIF"):
        sniff_format(b"GIF89a" + b"\0" * 20)
    with pytest.raises(InvalidInput, match="starts with bytes 00 01 02 03"):
        sniff_format(bytes(range(16)))
    with pytest.raises(InvalidInput, match="empty"):
        sniff_format(b"")


# -- orientation and colour layouts -----------------------------------------


@pytest.mark.parametrize(
    "orientation,shape,corner",
    [(1, (40, 60), "top_left"), (3, (40, 60), "bottom_right"), (6, (60, 40), "top_right"), (8, (60, 40), "bottom_left")],
)
def test_exif_orientation_is_applied(orientation, shape, corner):
    stored = np.full((40, 60, 3), 255, np.uint8)
    stored[:10, :10] = (0, 0, 255)  # red block at the stored top-left
    data = with_exif_orientation(encode(stored, ".jpg", [cv2.IMWRITE_JPEG_QUALITY, 95]), orientation)
    out = decode_image(data, LIMIT)
    assert out.shape[:2] == shape
    h, w = shape
    where = {
        "top_left": out[:8, :8],
        "top_right": out[:8, w - 8 :],
        "bottom_right": out[h - 8 :, w - 8 :],
        "bottom_left": out[h - 8 :, :8],
    }[corner]
    assert where[..., 2].mean() > 200 and where[..., 1].mean() < 60


def test_liveness_sample_with_exif_6_comes_out_portrait(data_path):
    out = decode_image((data_path / "images/liveness/live_T1.jpg").read_bytes(), LIMIT)
    assert out.shape == (640, 480, 3)


def test_grayscale_rgba_and_16_bit_become_bgr8():
    gray = gradient()[..., 0]
    rgba = np.dstack([gradient(), np.full(gray.shape, 128, np.uint8)])
    deep = gradient().astype(np.uint16) * 257
    for image, ext in ((gray, ".png"), (gray, ".jpg"), (rgba, ".png"), (rgba, ".webp"), (deep, ".png")):
        out = decode_image(encode(image, ext), LIMIT)
        assert out.dtype == np.uint8 and out.shape == (48, 64, 3), (ext, image.dtype, image.shape)
    out = decode_image(encode(deep, ".png"), LIMIT)
    assert np.array_equal(out, gradient())


def test_cmyk_jpeg_decodes_like_its_rgb_original(data_path):
    cmyk = decode_image((data_path / "bad/cmyk_no_face.jpg").read_bytes(), LIMIT)
    rgb = decode_image((data_path / "images/no_face/rocket.jpg").read_bytes(), LIMIT)
    assert cmyk.shape == rgb.shape == (427, 640, 3)
    assert np.abs(cmyk.astype(int) - rgb.astype(int)).mean() < 8


# -- limits and bad payloads ------------------------------------------------


def test_pixel_limit_names_the_variable():
    data = encode(gradient(100, 100), ".png")
    with pytest.raises(LimitExceeded, match="IDENT_MAX_PIXELS"):
        decode_image(data, 9_999)
    assert decode_image(data, 10_000).shape == (100, 100, 3)


def black_png(width: int, height: int) -> bytes:
    """A valid RGB PNG of any size, built by hand: libpng will not write one over 1,000,000 px wide."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rows = zlib.compress(b"".join(b"\x00" + bytes(width * 3) for _ in range(height)))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def test_a_side_too_long_for_the_decoder_is_not_called_corrupt():
    assert decode_image(black_png(999_999, 2), LIMIT).shape == (2, 999_999, 3)
    with pytest.raises(InvalidInput, match="side over 1,000,000 px") as refused:
        decode_image(black_png(1_000_001, 2), LIMIT)
    assert "corrupt" not in str(refused.value)


def test_huge_dimensions_are_refused_from_the_header(data_path, monkeypatch):
    data = (data_path / "bad/huge_dims_100000x100000.png").read_bytes()

    def must_not_decode(*args, **kwargs):
        raise AssertionError("cv2.imdecode was reached for a 1e10-pixel header")

    with monkeypatch.context() as patch:
        patch.setattr(imaging.cv2, "imdecode", must_not_decode)
        with pytest.raises(LimitExceeded, match="100000x100000"):
            decode_image(data, LIMIT)

    # And unpatched: no memory jump, and fast.
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(LimitExceeded):
        decode_image(data, LIMIT)
    elapsed = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert elapsed < 0.1
    assert peak < 1_000_000
    assert rss_after - rss_before < 50_000  # KiB


@pytest.mark.parametrize(
    "payload,message",
    [
        (b"", "payload is empty"),
        (b"\xff\xd8\xff", "truncated JPEG"),
        (b"\x89PNG\r\n\x1a\n\0\0", "truncated PNG"),
        (b"RIFF\0\0\0\0WEBPVP8 ", "truncated WebP"),
        (b"BM\0\0", "truncated BMP"),
        (b"hello world", "not a JPEG, PNG, WebP or BMP image"),
    ],
)
def test_tiny_payloads_say_what_is_wrong(payload, message):
    with pytest.raises(InvalidInput, match=message):
        decode_image(payload, LIMIT)


@pytest.mark.parametrize("ext", [".jpg", ".png", ".webp", ".bmp"])
def test_truncated_files_are_refused(ext):
    data = encode(gradient(120, 160), ext)
    with pytest.raises(InvalidInput, match="truncated|corrupt"):
        decode_image(data[: len(data) * 2 // 3], LIMIT)


def test_bytes_after_the_end_marker_are_tolerated():
    data = encode(gradient(), ".jpg") + b"\0" * 100
    assert decode_image(data, LIMIT).shape == (48, 64, 3)


def test_non_bytes_payload():
    with pytest.raises(InvalidInput, match="must be bytes"):
        decode_image("not bytes", LIMIT)  # type: ignore[arg-type]


# -- fuzz -------------------------------------------------------------------

_SAMPLES = [
    encode(gradient(24, 32), ".jpg"),
    encode(gradient(24, 32), ".jpg", [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]),
    encode(gradient(24, 32), ".png"),
    encode(gradient(24, 32), ".webp"),
    encode(gradient(24, 32), ".bmp"),
]
# Corrupt headers can claim big frames; a modest limit keeps the fuzz fast.
_FUZZ_LIMIT = 4_000_000


def _decode_or_typed_error(data: bytes) -> None:
    try:
        out = decode_image(data, _FUZZ_LIMIT)
    except InvalidInput as exc:  # LimitExceeded included
        assert str(exc)
        return
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3 and out.size > 0


_fuzz = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_fuzz
@given(st.binary(max_size=512))
def test_fuzz_random_bytes(data):
    _decode_or_typed_error(data)


@_fuzz
@given(st.sampled_from(_SAMPLES), st.floats(0, 1))
def test_fuzz_truncated_files(sample, fraction):
    _decode_or_typed_error(sample[: int(len(sample) * fraction)])


@_fuzz
@given(st.sampled_from(_SAMPLES), st.lists(st.tuples(st.integers(0, 63), st.integers(0, 255)), min_size=1, max_size=6))
def test_fuzz_corrupted_headers(sample, edits):
    data = bytearray(sample)
    for offset, value in edits:
        data[offset % len(data)] = value
    _decode_or_typed_error(bytes(data))


@_fuzz
@given(st.sampled_from(_SAMPLES), st.integers(0, 10_000), st.binary(min_size=1, max_size=16))
def test_fuzz_corrupted_bodies(sample, position, junk):
    position %= len(sample)
    _decode_or_typed_error(sample[:position] + junk + sample[position + len(junk) :])
