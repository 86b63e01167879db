"""Annotate an image with an ``analyze`` result, for ``ident submit --draw out.jpg``.

What it is
    A picture of what the worker saw: each face's box, its five landmarks in
    YuNet order (right eye, left eye, nose, right and left mouth corner, each
    its own colour) and a label with the detection score and, when present,
    the liveness verdict. Green boxes are live (or not checked), red are spoof.

Source / licence
    Our own code on OpenCV drawing primitives (Apache-2.0).

Input / output
    ``draw_result(image_bgr, result)`` -> a new BGR uint8 array; the input is
    not modified. ``result`` is the dict :meth:`VisionPipeline.analyze`
    returns, for the same (EXIF-rotated) image.
    ``draw_file(image_bytes, result, out_path)`` decodes the payload exactly as
    the worker did (so boxes line up) and writes the picture; the format
    follows the file name's extension (.jpg, .png, .webp, .bmp).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import cv2
import numpy as np

from tasks.errors import InvalidInput

from .imaging import decode_image

# The drawing runs on the client's machine on its own file: the worker's
# pixel limit does not apply, only cv2's own sanity limit.
_DRAW_MAX_PIXELS = 1 << 30

LANDMARK_COLOURS = ((255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 0, 255), (0, 255, 255))
LIVE = (0, 200, 0)
SPOOF = (0, 0, 230)


def draw_result(image_bgr: np.ndarray, result: Mapping[str, Any]) -> np.ndarray:
    out = np.ascontiguousarray(image_bgr.copy())
    # Lines and text scale with the picture so they stay visible on big photos
    # and do not swamp small ones.
    unit = max(1, round(max(out.shape[:2]) / 500))
    for face in result.get("faces", []):
        x1, y1, x2, y2 = (int(round(v)) for v in face["bbox"])
        live = face.get("liveness")
        colour = SPOOF if live is not None and not live.get("is_live", True) else LIVE
        cv2.rectangle(out, (x1, y1), (x2, y2), colour, 2 * unit)
        for (x, y), dot in zip(face.get("landmarks", []), LANDMARK_COLOURS):
            cv2.circle(out, (int(round(x)), int(round(y))), 2 * unit, dot, -1)
        label = f"{face['score']:.2f}"
        if live is not None:
            label += f" {'live' if live.get('is_live') else 'spoof'} {live['score']:.2f}"
        scale = 0.5 * unit
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, unit)
        ty = y1 - base - 2 if y1 - th - base - 2 >= 0 else y2 + th + 2
        tx = max(0, min(x1, out.shape[1] - tw - 2))  # keep labels of edge faces on the picture
        cv2.rectangle(out, (tx, ty - th - 2), (tx + tw + 2, ty + base), colour, -1)
        cv2.putText(out, label, (tx + 1, ty), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), unit, cv2.LINE_AA)
    return out


def draw_file(image: bytes, result: Mapping[str, Any], out_path: str | Path) -> None:
    """Decode ``image`` as the worker did, draw ``result`` on it and write it to ``out_path``."""
    out_path = Path(out_path)
    picture = draw_result(decode_image(image, _DRAW_MAX_PIXELS), result)
    ext = out_path.suffix.lower() or ".jpg"
    try:
        ok, encoded = cv2.imencode(ext, picture)
    except cv2.error:
        ok = False
    if not ok:
        raise InvalidInput(f"cannot write {out_path.name}: name the file .jpg, .png, .webp or .bmp")
    out_path.write_bytes(encoded.tobytes())
