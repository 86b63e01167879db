"""The vision pipeline: image bytes -> faces, embeddings, liveness, 1:1 match.

What it is
    The glue between the models of this package, shaped for the Celery tasks:
    decode (:mod:`.imaging`) -> detect (:mod:`.yunet`) -> align
    (:mod:`.align`) -> embed (:mod:`.arcface`) and liveness
    (:mod:`.minifasnet`). Results are plain dicts of Python floats, lists and
    bools, ready for msgpack.

Batching
    :meth:`VisionPipeline.analyze_many` is the only code path. It decodes each
    image on its own (a bad payload becomes that slot's exception, the others
    go on), detects on all images together (one model run when the detector
    export takes a batch), then runs ArcFace once and the liveness models once
    over the faces of all images. :meth:`analyze` is ``analyze_many`` of one.

Input / output
    ``analyze(image, options)`` -> ``{"faces": [...], "image": {"width",
    "height"}, "timings_ms": {"decode", "detect", "embed", "liveness",
    "total"}}``; each face ``{"bbox": [x1, y1, x2, y2], "score",
    "landmarks": [[x, y] * 5], "embedding", "liveness": {"score",
    "is_live"}}``, largest face first; "embedding" and "liveness" are None
    when the options switch them off. Boxes are clipped to the image;
    coordinates are rounded to 0.01 px, scores and embeddings are not rounded.
    In a batch, "embed" and "liveness" are the time of the shared model run,
    "detect" that of the shared detection, and "total" the whole call.

    ``verify(image_a, image_b)`` compares the largest face of each image.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
from billiard.exceptions import SoftTimeLimitExceeded

from tasks.errors import ConfigurationError, IdentError, InvalidInput, LimitExceeded, NoFaceFound

from .align import align_faces
from .arcface import ArcFace
from .imaging import decode_image
from .minifasnet import LivenessEnsemble, MiniFASNet
from .yunet import Detections, YuNet

log = logging.getLogger(__name__)

REQUIRED_ROLES = ("face_detection", "face_embedding", "liveness")
OPTION_KEYS = ("embed", "liveness", "max_faces", "min_face_size")

# Faces scoring below this get YuNet's second look (see YuNet._second_look):
# on our photos real uncut faces score 0.83-0.96 and face-like texture up to 0.75.
SECOND_LOOK_BELOW = 0.8


@dataclass(frozen=True)
class Options:
    max_faces: int
    min_face_size: float = 0.0
    embed: bool = True
    liveness: bool = True


def parse_options(options: Mapping[str, Any] | None, max_faces_limit: int) -> Options:
    """Validate a client's options; InvalidInput names the offending key."""
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise InvalidInput(f"options must be an object (dict) of {', '.join(OPTION_KEYS)}, got {type(options).__name__}")
    for key in options:
        if key not in OPTION_KEYS:
            raise InvalidInput(f"unknown option {str(key)[:40]!r}; known options: {', '.join(OPTION_KEYS)}")
    max_faces = options.get("max_faces", max_faces_limit)
    if isinstance(max_faces, bool) or not isinstance(max_faces, int) or max_faces < 1:
        raise InvalidInput(f"option 'max_faces' must be a whole number of at least 1, got {_show(max_faces)}")
    min_face_size = _finite_number(options.get("min_face_size", 0.0))
    if min_face_size is None or min_face_size < 0:
        raise InvalidInput(
            f"option 'min_face_size' must be a finite number of pixels >= 0, got {_show(options['min_face_size'])}"
        )
    flags = {}
    for key in ("embed", "liveness"):
        value = options.get(key, True)
        if not isinstance(value, bool):
            raise InvalidInput(f"option {key!r} must be true or false, got {_show(value)}")
        flags[key] = value
    # Asking for more than the fleet allows is not an error: the cap is the answer.
    return Options(min(max_faces, max_faces_limit), min_face_size, flags["embed"], flags["liveness"])


def _finite_number(value: Any) -> float | None:
    """``value`` as a float, or None if it is not a finite number.

    JSON decodes a long run of digits to a Python int that no float can hold.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _show(value: Any) -> str:
    try:
        text = repr(value)
    except ValueError:  # an int of over 4300 digits, which Python refuses to print
        text = "(too long to show)"
    return f"{type(value).__name__} {text[:40]}"


@dataclass
class _Item:
    """One image on its way through the pipeline."""

    options: Options
    image: np.ndarray
    faces: Detections = field(default_factory=Detections.empty)
    clipped: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    embeddings: np.ndarray | None = None
    live: np.ndarray | None = None
    timings: dict[str, float] = field(default_factory=dict)


class VisionPipeline:
    """Face detection, embedding and liveness over the sessions of one worker process."""

    def __init__(self, sessions: Mapping[str, Any], specs: Mapping[str, Any], settings: Any):
        missing = [role for role in REQUIRED_ROLES if role not in sessions or role not in specs]
        if missing:
            raise ConfigurationError(
                f"the vision pipeline needs a session and a catalog spec for {', '.join(missing)}; "
                "check that selected_models(settings, 'vision') was loaded"
            )
        self.settings = settings
        self.detector = YuNet(
            sessions["face_detection"],
            specs["face_detection"],
            score_threshold=settings.det_score_threshold,
            nms_iou=settings.det_nms_iou,
            top_k=settings.det_top_k,
            second_look_below=SECOND_LOOK_BELOW,
        )
        self.embedding_spec = specs["face_embedding"]
        self.embedder = ArcFace(sessions["face_embedding"], self.embedding_spec)
        members = [MiniFASNet(sessions["liveness"], specs["liveness"])]
        if settings.liveness_ensemble and "liveness_ensemble" in sessions and "liveness_ensemble" in specs:
            members.append(MiniFASNet(sessions["liveness_ensemble"], specs["liveness_ensemble"]))
        self.liveness = LivenessEnsemble(members)
        if settings.face_match_threshold is not None:
            self.match_threshold = float(settings.face_match_threshold)
        else:
            self.match_threshold = float(self.embedding_spec.params["match_threshold"])

    # -- public API -------------------------------------------------------

    def analyze(self, image: bytes, options: dict | None = None) -> dict:
        """Faces of one image; raises the image's error instead of returning it."""
        result = self.analyze_many([image], [options])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def analyze_many(
        self, images: Sequence[bytes], options: Sequence[dict | None] | None = None
    ) -> list[dict | Exception]:
        """Faces of several images; a bad image's exception takes its slot in the list."""
        start = time.perf_counter()
        if options is None:
            options = [None] * len(images)
        if len(options) != len(images):
            raise InvalidInput(f"got {len(images)} images but {len(options)} option sets; send one per image")
        parsed: list[Options | Exception] = []
        for opts in options:
            try:
                parsed.append(parse_options(opts, self.settings.max_faces))
            except InvalidInput as exc:
                parsed.append(exc)
        slots = self._run(images, parsed)
        total = _ms(start)
        out: list[dict | Exception] = []
        for slot in slots:
            if isinstance(slot, Exception):
                out.append(slot)
                continue
            slot.timings["total"] = total
            out.append(_to_dict(slot, self.settings.liveness_threshold))
        log.debug(
            "analyzed %d images (%d failed), %d faces in %.1f ms",
            len(images),
            sum(isinstance(s, Exception) for s in slots),
            sum(len(s.faces) for s in slots if not isinstance(s, Exception)),
            total,
        )
        return out

    def verify(self, image_a: bytes, image_b: bytes) -> dict:
        """Is the largest face of ``image_a`` the same person as that of ``image_b``?"""
        start = time.perf_counter()
        largest = Options(max_faces=1, embed=True, liveness=False)
        slots = self._run([image_a, image_b], [largest, largest])
        for name, slot in zip(("image_a", "image_b"), slots):
            if isinstance(slot, IdentError):
                raise type(slot)(f"{name}: {slot}") from slot
            if isinstance(slot, Exception):
                raise slot
        empty = [name for name, slot in zip(("image_a", "image_b"), slots) if len(slot.faces) == 0]
        if empty:
            raise NoFaceFound(
                f"no face found in {' and '.join(empty)}: send a photo in which the face is "
                "unobstructed, reasonably lit and not much smaller than 1/20 of the picture"
            )
        a, b = slots
        similarity = float(np.dot(a.embeddings[0], b.embeddings[0]))
        timings = {
            key: round(sum(s.timings.get(key, 0.0) for s in slots) if key == "decode" else a.timings.get(key, 0.0), 2)
            for key in ("decode", "detect", "embed")
        }
        timings["total"] = _ms(start)
        return {
            "similarity": similarity,
            "same_person": similarity >= self.match_threshold,
            "threshold": self.match_threshold,
            "model": self.embedding_spec.key,
            "face_a": _face_summary(a, 0),
            "face_b": _face_summary(b, 0),
            "timings_ms": timings,
        }

    # -- stages -----------------------------------------------------------

    def _run(self, images: Sequence[bytes], options: Sequence[Options | Exception]) -> list[_Item | Exception]:
        slots: list[_Item | Exception] = []
        for data, opts in zip(images, options):
            if isinstance(opts, Exception):
                slots.append(opts)
                continue
            t0 = time.perf_counter()
            try:
                if isinstance(data, (bytes, bytearray, memoryview)):
                    LimitExceeded.check(
                        "image payload", len(data), self.settings.max_payload_bytes, "IDENT_MAX_PAYLOAD_BYTES", "bytes"
                    )
                image = decode_image(data, self.settings.max_pixels)
            except IdentError as exc:
                slots.append(exc)
                continue
            except SoftTimeLimitExceeded:
                raise  # the job ran out of time; its bytes may be fine
            except Exception as exc:  # one undecodable payload must not fail its batch-mates
                log.warning("image decoder failed unexpectedly: %s", type(exc).__name__)
                slots.append(InvalidInput(f"the image could not be decoded ({type(exc).__name__})"))
                continue
            slots.append(_Item(options=opts, image=image, timings={"decode": _ms(t0)}))
        items = [s for s in slots if isinstance(s, _Item)]
        if not items:
            return slots

        t0 = time.perf_counter()
        found = self.detector.detect_batch([item.image for item in items])
        detect_ms = _ms(t0)
        for item, det in zip(items, found):
            item.faces, item.clipped = _select(det, item.image.shape, item.options)
            item.timings["detect"] = detect_ms

        t0 = time.perf_counter()
        wanted = [item for item in items if item.options.embed and len(item.faces)]
        if wanted:
            template = self.embedding_spec.params["template"]
            size = int(self.embedding_spec.params.get("input_size", (112, 112))[0])
            aligned = np.concatenate([align_faces(item.image, item.faces.landmarks, template, size) for item in wanted])
            for item, vectors in zip(wanted, _per_item(self.embedder.embed(aligned), wanted)):
                item.embeddings = vectors
        embed_ms = _ms(t0) if wanted else 0.0

        t0 = time.perf_counter()
        wanted = [item for item in items if item.options.liveness and len(item.faces)]
        if wanted:
            pairs = [(item.image, box) for item in wanted for box in item.faces.boxes]
            for item, scores in zip(wanted, _per_item(self.liveness.score(pairs), wanted)):
                item.live = scores
        live_ms = _ms(t0) if wanted else 0.0

        for item in items:
            item.timings["embed"] = embed_ms if item.embeddings is not None else 0.0
            item.timings["liveness"] = live_ms if item.live is not None else 0.0
        return slots


def _per_item(rows: np.ndarray, items: Sequence[_Item]) -> list[np.ndarray]:
    """Split one batch's rows (faces of all items, in order) back into each item's faces."""
    bounds = np.cumsum([len(item.faces) for item in items])[:-1]
    return np.split(rows, bounds)


def _select(det: Detections, shape: tuple[int, ...], options: Options) -> tuple[Detections, np.ndarray]:
    """Clip boxes to the image, drop faces under min_face_size, keep the largest max_faces."""
    height, width = shape[:2]
    clipped = det.boxes.copy()
    clipped[:, [0, 2]] = np.clip(clipped[:, [0, 2]], 0, width)
    clipped[:, [1, 3]] = np.clip(clipped[:, [1, 3]], 0, height)
    sides = clipped[:, 2:] - clipped[:, :2]
    keep = np.nonzero((sides.min(axis=1) >= max(options.min_face_size, 1e-6)))[0]
    area = sides[keep, 0] * sides[keep, 1]
    # Stable sort on -area; ties keep the detector's score order.
    order = keep[np.argsort(-area, kind="stable")][: options.max_faces]
    return det.take(order), clipped[order]


def _face_summary(item: _Item, index: int) -> dict:
    return {"bbox": _coords(item.clipped[index]), "score": float(item.faces.scores[index])}


def _coords(values: np.ndarray) -> list:
    return np.round(np.asarray(values, dtype=np.float64), 2).tolist()


def _to_dict(item: _Item, liveness_threshold: float) -> dict:
    faces = []
    for i in range(len(item.faces)):
        face = _face_summary(item, i)
        face["landmarks"] = _coords(item.faces.landmarks[i])
        # null when switched off, as in audio results: every face has the same keys.
        face["embedding"] = None if item.embeddings is None else item.embeddings[i].astype(np.float64).tolist()
        face["liveness"] = None
        if item.live is not None:
            score = float(item.live[i])
            face["liveness"] = {"score": score, "is_live": score >= liveness_threshold}
        faces.append(face)
    height, width = item.image.shape[:2]
    timings = {key: round(item.timings.get(key, 0.0), 2) for key in ("decode", "detect", "embed", "liveness", "total")}
    return {"faces": faces, "image": {"width": int(width), "height": int(height)}, "timings_ms": timings}


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000.0, 2)
