"""Image payload decoding: bytes from a client -> BGR uint8 HxWx3.

What it is
    The one door through which image bytes enter the vision worker. Accepts
    JPEG, PNG, WebP and BMP, recognised from their first bytes (never from a
    file name), and returns what every model here expects: an 8-bit, 3-channel,
    BGR array in display orientation.

Source / licence
    Our own code on top of OpenCV's ``cv2.imdecode`` (Apache-2.0).

Input / output
    ``decode_image(data, max_pixels)`` -> ``np.ndarray`` (H, W, 3) uint8 BGR.
    Raises :class:`~tasks.errors.InvalidInput` for empty, unknown, corrupt or
    truncated payloads and :class:`~tasks.errors.LimitExceeded` (a subclass)
    when the header announces more than ``max_pixels`` pixels.

Behaviour decided here
    * The pixel limit is enforced from the container header, parsed by the
      small pure functions below, BEFORE cv2 sees the bytes: cv2 allocates the
      full frame from the header before it reads a single row, so a 661-byte
      PNG claiming 100000x100000 would otherwise cost 30 GB.
    * EXIF orientation is applied: ``cv2.IMREAD_COLOR`` (without
      ``IMREAD_IGNORE_ORIENTATION``) rotates JPEGs per their Orientation tag in
      imdecode as well as imread (tests/vision/test_imaging.py synthesises an
      Orientation=6 JPEG to pin this).
    * Grayscale, palette, 16-bit (scaled to 8-bit) and CMYK/YCCK JPEGs are
      converted by ``IMREAD_COLOR``. An alpha channel is dropped: the colour
      stored under transparent pixels is used as-is, which is what detectors
      trained on photos expect.
    * Truncated files are refused with "truncated ..." rather than decoded:
      some cv2 builds return a partly grey JPEG with only a libjpeg warning, and
      half a face must not reach the embedding model. JPEG completeness is
      judged by the EOI marker after the first scan (entropy-coded data cannot
      contain 0xFFD9), PNG by its IEND chunk, WebP by its RIFF length and
      uncompressed BMP by its pixel-array size. Bytes after the end marker are
      tolerated (some cameras append them).
"""

from __future__ import annotations

import struct

import cv2
import numpy as np

from tasks.errors import InvalidInput, LimitExceeded
from workers.formats import describe

JPEG = "JPEG"
PNG = "PNG"
WEBP = "WebP"
BMP = "BMP"
SUPPORTED = (JPEG, PNG, WEBP, BMP)

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# libpng refuses wider rows by default, and OpenCV any side over 2**20: such a
# file is valid, so it gets this message rather than "corrupt".
MAX_SIDE = 1_000_000

# JPEG SOFn markers carry the frame size; C4 (DHT), C8 (JPG) and CC (DAC) share
# the range but are not frames.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers that stand alone, without a length field.
_JPEG_STANDALONE = frozenset([0x01, 0xD8, *range(0xD0, 0xD8)])


def sniff_format(data: bytes) -> str:
    """The container format from the magic bytes; InvalidInput when not supported."""
    if not data:
        raise InvalidInput("payload is empty (0 bytes): send the image file's bytes")
    if data[:3] == b"\xff\xd8\xff":
        return JPEG
    if data[:8] == _PNG_SIGNATURE:
        return PNG
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return WEBP
    if data[:2] == b"BM":
        return BMP
    raise InvalidInput(
        f"not a JPEG, PNG, WebP or BMP image ({describe(data)}); "
        "send the image in one of those formats"
    )


def image_size(data: bytes) -> tuple[str, int, int]:
    """(format, width, height) read from the header alone, without decoding."""
    fmt = sniff_format(data)
    parse = {JPEG: jpeg_size, PNG: png_size, WEBP: webp_size, BMP: bmp_size}[fmt]
    width, height = parse(data)
    if width <= 0 or height <= 0:
        raise InvalidInput(f"corrupt {fmt} header: it declares a {width}x{height} image")
    return fmt, width, height


def png_size(data: bytes) -> tuple[int, int]:
    # IHDR must be the first chunk: 8 signature + 4 length + 4 type + 8 size.
    if len(data) < 24:
        raise InvalidInput(f"truncated PNG: {len(data)} bytes end inside the header")
    if data[12:16] != b"IHDR":
        raise InvalidInput("corrupt PNG: the first chunk is not IHDR")
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def jpeg_size(data: bytes) -> tuple[int, int]:
    width, height, _ = _jpeg_walk(data)
    return width, height


def _jpeg_walk(data: bytes) -> tuple[int, int, int]:
    """Walk the marker segments up to the first scan: (width, height, SOS offset)."""
    n = len(data)
    i = 2
    size: tuple[int, int] | None = None
    while True:
        if i >= n:
            raise InvalidInput("truncated JPEG: the file ends inside its header segments")
        if data[i] != 0xFF:
            raise InvalidInput(f"corrupt JPEG: expected a marker at byte {i}")
        while i < n and data[i] == 0xFF:  # fill bytes may pad any marker
            i += 1
        if i >= n:
            raise InvalidInput("truncated JPEG: the file ends inside its header segments")
        marker = data[i]
        i += 1
        if marker in _JPEG_STANDALONE:
            continue
        if marker == 0xD9:
            raise InvalidInput("corrupt JPEG: the image ends before any picture data")
        if i + 2 > n:
            raise InvalidInput("truncated JPEG: the file ends inside its header segments")
        (length,) = struct.unpack(">H", data[i : i + 2])
        if length < 2:
            raise InvalidInput(f"corrupt JPEG: segment at byte {i - 2} has length {length}")
        if marker in _JPEG_SOF:
            if i + 7 > n:
                raise InvalidInput("truncated JPEG: the file ends inside its frame header")
            height, width = struct.unpack(">HH", data[i + 3 : i + 7])
            if size is None:
                size = (width, height)
        elif marker == 0xDA:
            if size is None:
                raise InvalidInput("corrupt JPEG: picture data comes before the frame header")
            return size[0], size[1], i + length
        i += length


def webp_size(data: bytes) -> tuple[int, int]:
    if len(data) < 30:
        raise InvalidInput(f"truncated WebP: {len(data)} bytes end inside the header")
    chunk = data[12:16]
    if chunk == b"VP8X":
        # Canvas size, 24-bit little-endian, stored minus one.
        width = 1 + int.from_bytes(data[24:27], "little")
        height = 1 + int.from_bytes(data[27:30], "little")
        return width, height
    if chunk == b"VP8L":
        if data[20] != 0x2F:
            raise InvalidInput("corrupt WebP: bad lossless signature")
        bits = int.from_bytes(data[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    if chunk == b"VP8 ":
        if data[23:26] != b"\x9d\x01\x2a":
            raise InvalidInput("corrupt WebP: bad lossy frame start code")
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    raise InvalidInput(f"corrupt WebP: unknown first chunk {chunk!r}")


def bmp_size(data: bytes) -> tuple[int, int]:
    if len(data) < 26:
        raise InvalidInput(f"truncated BMP: {len(data)} bytes end inside the header")
    (dib_size,) = struct.unpack("<I", data[14:18])
    if dib_size == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
        width, height = struct.unpack("<HH", data[18:22])
        return width, height
    if dib_size < 40:
        raise InvalidInput(f"corrupt BMP: unknown info header size {dib_size}")
    width, height = struct.unpack("<ii", data[18:26])
    # A negative height marks a top-down bitmap, not a negative size.
    return width, abs(height)


def _check_complete(fmt: str, data: bytes, width: int, height: int) -> None:
    if fmt == JPEG:
        _, _, scan = _jpeg_walk(data)
        if data.find(b"\xff\xd9", scan) < 0:
            raise InvalidInput("truncated JPEG: the end-of-image marker is missing; send the whole file")
    elif fmt == PNG:
        if data.rfind(b"IEND") < 0:
            raise InvalidInput("truncated PNG: the IEND chunk is missing; send the whole file")
    elif fmt == WEBP:
        (riff_size,) = struct.unpack("<I", data[4:8])
        if len(data) < 8 + riff_size:
            raise InvalidInput(
                f"truncated WebP: the header announces {8 + riff_size} bytes, got {len(data)}; send the whole file"
            )
    elif fmt == BMP and len(data) >= 34 and struct.unpack("<I", data[14:18])[0] >= 40:
        (offset,) = struct.unpack("<I", data[10:14])
        bits, compression = struct.unpack("<HI", data[28:34])
        if compression == 0 and bits in (1, 4, 8, 16, 24, 32):
            stride = ((width * bits + 31) // 32) * 4
            needed = offset + stride * height
            if len(data) < needed:
                raise InvalidInput(
                    f"truncated BMP: the pixel data needs {needed} bytes, got {len(data)}; send the whole file"
                )


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Decode ``data`` to a BGR uint8 (H, W, 3) array in display orientation.

    ``max_pixels`` is IDENT_MAX_PIXELS; it is checked against the header before
    any pixel memory is allocated.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidInput(f"image payload must be bytes, got {type(data).__name__}")
    data = bytes(data)
    fmt, width, height = image_size(data)
    LimitExceeded.check(f"{fmt} image of {width}x{height}", width * height, max_pixels, "IDENT_MAX_PIXELS", "pixels")
    if max(width, height) > MAX_SIDE:
        raise InvalidInput(
            f"{fmt} image of {width}x{height} has a side over {MAX_SIDE:,} px, more than the image "
            "decoder reads; scale it down"
        )
    _check_complete(fmt, data, width, height)
    try:
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    except cv2.error:
        image = None
    if image is None or image.size == 0:
        raise InvalidInput(f"corrupt {fmt}: the header is readable but the picture data cannot be decoded")
    return _as_bgr8(image)


def _as_bgr8(image: np.ndarray) -> np.ndarray:
    # IMREAD_COLOR already yields uint8 BGR; this guards against builds that
    # hand back other layouts rather than letting the models see them.
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        image = cv2.normalize(image, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    elif image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    elif image.shape[2] == 1:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    return np.ascontiguousarray(image)
