"""Export a gallery to a file and import one: JSON Lines, one template a line.

.. warning::
   An export file holds **biometric templates**: every line is an embedding
   of a person's face or voice, with the subject id it belongs to. Templates
   can be matched against other photos or recordings of the same people, so
   treat the file as the gallery itself: keep it encrypted at rest, move it
   over encrypted channels only, and delete it once it has been imported.
   Files are written with permissions 0600.

The format, version 1 (UTF-8, one JSON object a line, ``\\n`` line ends)::

    {"format": "identification-gallery", "version": 1, "name": "staff", "modality": "vision",
     "model": "arcface_mobilefacenet", "model_sha256": "<64 hex>", "dimensions": 128, "threshold": null}
    {"subject_id": "alice", "source": "sha256:<64 hex>", "enrolled_at": "2025-01-02T03:04:05.678+00:00",
     "embedding": "<base64 of the little-endian float32 values>"}
    ...

The first line is the header; then one line per template, in the order they
were enrolled. Embeddings travel as raw float32, so an import holds exactly
the vectors that were exported.

Importing into NAME creates it for the header's model when it does not exist
(and takes the header's threshold); a NAME that holds another modality's or
another model's templates is refused (GalleryMismatch), since templates of
different models cannot be compared. The whole file is checked before
anything is written: a bad line refuses the import (InvalidInput naming the
line number) and leaves the database as it was. Templates are then loaded in
chunks of :data:`CHUNK_TEMPLATES`, each committed on its own, and a
(subject, source) already in the gallery is skipped: importing a file again,
after a crash or on purpose, adds only what is missing.

``enrolled_at`` travels with each template: an import keeps the time the
subject was enrolled, not the time of the import.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import os
import re
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from tasks.errors import GalleryMismatch, GalleryNotFound, InvalidInput

from .names import checked_name
from .store import MODALITIES, EmbeddingModel, Gallery, GalleryStore

FORMAT = "identification-gallery"
VERSION = 1
HEADER_KEYS = ("format", "version", "name", "modality", "model", "model_sha256", "dimensions", "threshold")
ROW_KEYS = ("subject_id", "source", "enrolled_at", "embedding")
# pgvector's limit on a vector column's dimensions.
MAX_DIMENSIONS = 16_000
# A line longer than this cannot be a template (16,000 dimensions in base64 are ~85 KB).
MAX_LINE_BYTES = 1 << 20
MAX_SOURCE_LENGTH = 256
# Templates per committed chunk of an import: what a rerun after a crash does not redo.
CHUNK_TEMPLATES = 50_000
_SHA256 = re.compile(r"[0-9a-f]{64}")

Progress = Callable[[int], None]


@dataclass(frozen=True)
class Header:
    name: str
    modality: str
    model: str
    model_sha256: str
    dimensions: int
    threshold: float | None

    @property
    def embedding_model(self) -> EmbeddingModel:
        return EmbeddingModel(self.model, self.model_sha256, self.dimensions, self.modality)

    def as_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "name": self.name, "modality": self.modality,
                "model": self.model, "model_sha256": self.model_sha256, "dimensions": self.dimensions,
                "threshold": self.threshold}


@dataclass(frozen=True)
class Checked:
    """What :func:`check_file` found: the header and how many templates follow it."""

    header: Header
    templates: int


@dataclass(frozen=True)
class Imported:
    gallery: str
    templates: int  # in the file
    added: int
    skipped: int  # already in the gallery (or twice in the file)
    created: bool  # the import created the gallery


# -- export -------------------------------------------------------------------


def export_gallery(store: GalleryStore, name: str, path: Path | str, progress: Progress | None = None) -> int:
    """Write gallery ``name`` to ``path`` (replaced whole, or not at all); the number of templates written.

    The file is written beside ``path`` under a temporary name with
    permissions 0600 and renamed into place once complete, so an export cut
    short never leaves a file that looks whole.
    """
    path = Path(path)
    gallery, rows = store.export_rows(name)
    header = _header_of(gallery)
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    except OSError as exc:
        rows.close()
        raise InvalidInput(f"cannot write {path}: {exc.strerror or exc}") from None
    written = 0
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="\n") as out:
            out.write(json.dumps(header.as_json(), ensure_ascii=False) + "\n")
            for subject_id, source, embedding, enrolled_at in rows:
                vector = np.asarray(embedding, dtype="<f4").reshape(-1)
                out.write(json.dumps({
                    "subject_id": subject_id, "source": source, "enrolled_at": enrolled_at,
                    "embedding": base64.b64encode(vector.tobytes()).decode("ascii"),
                }, ensure_ascii=False) + "\n")
                written += 1
                if progress is not None:
                    progress(1)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except OSError as exc:
        _remove(temporary)
        raise InvalidInput(f"cannot write {path}: {exc.strerror or exc}") from None
    except BaseException:
        _remove(temporary)
        raise
    finally:
        rows.close()  # ends the export's transaction if the file could not be written
    return written


def _header_of(gallery: Gallery) -> Header:
    return Header(gallery.name, gallery.modality, gallery.model, gallery.model_sha256, gallery.dimensions,
                  gallery.threshold)


# -- import -------------------------------------------------------------------


def check_file(path: Path | str, progress: Progress | None = None) -> Checked:
    """Read the whole file and check every line; InvalidInput naming the first bad line."""
    count = 0
    header, rows = _read(Path(path))
    with rows:
        for _ in rows:
            count += 1
            if progress is not None:
                progress(1)
    return Checked(header, count)


def read_header(path: Path | str) -> Header:
    header, rows = _read(Path(path))
    rows.close()
    return header


def import_gallery(store: GalleryStore, name: str, path: Path | str, progress: Progress | None = None,
                   checked: Checked | None = None) -> Imported:
    """Add the templates of file ``path`` to gallery ``name``, creating it for the file's model if missing.

    ``checked`` is :func:`check_file`'s answer when the caller has already
    checked the file (to show a progress bar of its own); otherwise the file
    is checked here first. Either way the rows are checked again as they are
    loaded, in case the file changed in between.
    """
    path = Path(path)
    checked = checked or check_file(path)
    header = checked.header
    model = header.embedding_model
    try:
        existing = store.gallery(name)
    except GalleryNotFound:
        existing = None
    if existing is not None:
        _check_target(existing, header, path)
    added = 0
    created = False
    header_again, rows = _read(path)
    if header_again != header:
        rows.close()
        raise InvalidInput(f"{path} changed while it was imported (its header is not the one checked): import it again")
    with rows:
        loaded = 0

        def counted(chunk: Iterator[tuple[str, str, np.ndarray]]) -> Iterator[tuple[str, str, np.ndarray]]:
            nonlocal loaded
            for row in chunk:
                loaded += 1
                yield row
                if progress is not None:
                    progress(1)

        while True:
            before = loaded
            chunk = ((subject, source, embedding, datetime.fromisoformat(enrolled_at))
                     for subject, source, embedding, enrolled_at in itertools.islice(rows, CHUNK_TEMPLATES))
            added += store.bulk_load(name, model, counted(chunk), index_when_due=False)
            if existing is None and not created:
                created = True
                if header.threshold is not None:
                    store.set_threshold(name, header.threshold)
            if loaded - before < CHUNK_TEMPLATES:
                break
    store.index_if_due(name)
    if loaded != checked.templates:
        raise InvalidInput(f"{path} changed while it was imported ({checked.templates} templates when checked, "
                           f"{loaded} when loaded): import it again; templates already added are kept")
    return Imported(name, loaded, added, loaded - added, created)


def _check_target(gallery: Gallery, header: Header, path: Path) -> None:
    if gallery.modality != header.modality:
        raise GalleryMismatch(
            f"gallery {gallery.name!r} holds {gallery.modality} templates and {path} holds {header.modality} "
            f"ones: import it under another gallery name"
        )
    if (gallery.model, gallery.model_sha256, gallery.dimensions) != (header.model, header.model_sha256,
                                                                    header.dimensions):
        raise GalleryMismatch(
            f"gallery {gallery.name!r} holds templates of {gallery.model} (sha256 {gallery.model_sha256[:12]}), "
            f"and {path} holds templates of {header.model} (sha256 {header.model_sha256[:12]}); templates of "
            "different models cannot be compared: import it under another gallery name"
        )


# -- reading ------------------------------------------------------------------


class _Rows:
    """The template lines of an open file, parsed and checked: (subject_id, source, embedding, enrolled_at)."""

    def __init__(self, handle, path: Path, header: Header) -> None:
        self._handle = handle
        self._path = path
        self._header = header
        self._number = 1

    def __iter__(self) -> "_Rows":
        return self

    def __next__(self) -> tuple[str, str, np.ndarray, str]:
        line = _line(self._handle, self._path, self._number + 1)
        if line is None:
            raise StopIteration
        self._number += 1
        return _row(line, self._header.dimensions, self._path, self._number)

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> "_Rows":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read(path: Path) -> tuple[Header, _Rows]:
    try:
        handle = open(path, "rb")
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        line = _line(handle, path, 1)
        if line is None:
            raise InvalidInput(f"{path} is empty: a gallery file starts with a header line "
                               f'{{"format": "{FORMAT}", ...}}')
        header = _header(line, path)
    except BaseException:
        handle.close()
        raise
    return header, _Rows(handle, path, header)


def _line(handle, path: Path, number: int) -> bytes | None:
    """Line ``number`` without its line end; None at the end of the file."""
    try:
        line = handle.readline(MAX_LINE_BYTES + 1)
    except OSError as exc:
        raise InvalidInput(f"{path}, line {number}: cannot read it: {exc.strerror or exc}") from None
    if not line:
        return None
    if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
        raise InvalidInput(f"{path}, line {number}: longer than {MAX_LINE_BYTES} bytes; no template is that long")
    line = line[:-1] if line.endswith(b"\n") else line
    return line[:-1] if line.endswith(b"\r") else line


def _object(line: bytes, path: Path, number: int, what: str) -> dict:
    where = f"{path}, line {number}"
    if not line.strip():
        raise InvalidInput(f"{where}: empty; every line of a gallery file is one JSON object ({what})")
    try:
        value = json.loads(line.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"{where}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except ValueError as exc:  # json.JSONDecodeError, and the NaN/Infinity refused below
        raise InvalidInput(f"{where}: not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise InvalidInput(f"{where}: a JSON {type(value).__name__} where {what} (an object) was expected")
    return value


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _keys(value: dict, keys: tuple[str, ...], where: str, what: str) -> None:
    missing = [key for key in keys if key not in value]
    unknown = [str(key)[:40] for key in value if key not in keys]
    if missing:
        raise InvalidInput(f"{where}: {what} lacks {', '.join(map(repr, missing))}")
    if unknown:
        raise InvalidInput(f"{where}: {what} has unknown field(s) {', '.join(map(repr, unknown))}; "
                           f"known: {', '.join(keys)}")


def _header(line: bytes, path: Path) -> Header:
    where = f"{path}, line 1"
    value = _object(line, path, 1, "the header")
    if value.get("format") != FORMAT:
        raise InvalidInput(f"{where}: not a gallery file (its first line's \"format\" is "
                           f"{str(value.get('format'))[:60]!r}, not {FORMAT!r}); export one with "
                           "`ident gallery export`")
    version = value.get("version")
    if version != VERSION or isinstance(version, bool):
        raise InvalidInput(f"{where}: format version {str(version)[:20]!r} is not one this ident reads "
                           f"(it reads version {VERSION}); import it with the ident that exported it, or a newer one")
    _keys(value, HEADER_KEYS, where, "the header")
    name = _name(value["name"], where, "the header's name")
    modality = value["modality"]
    if modality not in MODALITIES:
        raise InvalidInput(f"{where}: modality {str(modality)[:40]!r} is not one of {', '.join(MODALITIES)}")
    model = value["model"]
    if not isinstance(model, str) or not model.strip() or len(model) > 200:
        raise InvalidInput(f"{where}: model must be the embedding model's catalog key (a string), got "
                           f"{str(model)[:60]!r}")
    sha256 = value["model_sha256"]
    if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
        raise InvalidInput(f"{where}: model_sha256 must be 64 lowercase hex digits, got {str(sha256)[:80]!r}")
    dimensions = value["dimensions"]
    if isinstance(dimensions, bool) or not isinstance(dimensions, int) or not 1 <= dimensions <= MAX_DIMENSIONS:
        raise InvalidInput(f"{where}: dimensions must be a whole number from 1 to {MAX_DIMENSIONS}, "
                           f"got {str(dimensions)[:40]!r}")
    threshold = value["threshold"]
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not -1 <= threshold <= 1:
            raise InvalidInput(f"{where}: threshold must be null or a cosine similarity from -1 to 1, "
                               f"got {str(threshold)[:40]!r}")
        threshold = float(threshold)
    return Header(name, modality, model, sha256, dimensions, threshold)


def _row(line: bytes, dimensions: int, path: Path, number: int) -> tuple[str, str, np.ndarray, str]:
    where = f"{path}, line {number}"
    value = _object(line, path, number, "a template")
    _keys(value, ROW_KEYS, where, "the template")
    subject_id = _name(value["subject_id"], where, "subject_id")
    source = value["source"]
    if not isinstance(source, str) or not source or len(source) > MAX_SOURCE_LENGTH \
            or not source.isprintable():
        raise InvalidInput(f"{where}: source must be 1 to {MAX_SOURCE_LENGTH} printable characters "
                           f"(\"sha256:\" and the enrolled media's hash), got {str(source)[:80]!r}")
    enrolled_at = value["enrolled_at"]
    try:
        if not isinstance(enrolled_at, str):
            raise ValueError
        datetime.fromisoformat(enrolled_at)
    except ValueError:
        raise InvalidInput(f"{where}: enrolled_at must be an ISO 8601 time such as 2025-01-02T03:04:05+00:00, "
                           f"got {str(enrolled_at)[:60]!r}") from None
    encoded = value["embedding"]
    if not isinstance(encoded, str):
        raise InvalidInput(f"{where}: embedding must be a base64 string, got {type(encoded).__name__}")
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput(f"{where}: embedding is not valid base64 ({exc})") from None
    if len(raw) != dimensions * 4:
        raise InvalidInput(f"{where}: embedding holds {len(raw)} bytes; the header's {dimensions} dimensions "
                           f"of float32 take {dimensions * 4}")
    embedding = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    if not np.isfinite(embedding).all():
        raise InvalidInput(f"{where}: embedding holds NaN or infinite values")
    if not embedding.any():
        raise InvalidInput(f"{where}: embedding is all zeros, which has no cosine similarity to anything")
    return subject_id, source, embedding, enrolled_at


def _name(value: object, where: str, what: str) -> str:
    try:
        return checked_name(value, what)
    except InvalidInput as exc:
        raise InvalidInput(f"{where}: {exc}") from None


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
