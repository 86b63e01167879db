"""Fetch catalog models into IDENT_MODELS_DIR and verify what is there.

A file is written under a temporary name, hashed while it arrives, and renamed
into place only when its sha256 matches the catalog: a failed or tampered
download leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from models.catalog import CATALOG, ModelSpec, selected_models
from models.runtime import file_sha256
from tasks.errors import ConfigurationError, ModelUnavailable
from tasks.settings import Settings

CHUNK = 1 << 20
# A model download that stalls this long is abandoned rather than hanging.
DOWNLOAD_TIMEOUT_S = 60

Progress = Callable[[int, int | None], None]


@dataclass(frozen=True)
class FileCheck:
    spec: ModelSpec
    path: Path
    state: str  # "ok" | "missing" | "mismatch" | "unpinned"
    sha256: str | None = None


def default_models(settings: Settings) -> list[ModelSpec]:
    """The models the current configuration runs, both worker kinds."""
    wanted: dict[str, ModelSpec] = {}
    for kind in ("vision", "audio"):
        for spec in selected_models(settings, kind).values():
            wanted[spec.key] = spec
    ensemble = CATALOG["minifasnet_v1se"]
    if settings.liveness_ensemble:
        wanted[ensemble.key] = ensemble
    return list(wanted.values())


def verify(specs: Iterable[ModelSpec], models_dir: Path) -> list[FileCheck]:
    checks = []
    for spec in specs:
        path = models_dir / spec.filename
        if not path.is_file():
            checks.append(FileCheck(spec, path, "missing"))
            continue
        digest = file_sha256(path)
        if spec.sha256 is None:
            state = "unpinned"
        else:
            state = "ok" if digest == spec.sha256 else "mismatch"
        checks.append(FileCheck(spec, path, state, digest))
    return checks


def fetch_one(
    spec: ModelSpec,
    models_dir: Path,
    source: str | None = None,
    progress: Progress | None = None,
    force: bool = False,
) -> Path:
    """Put ``spec``'s file in ``models_dir``; return its path.

    ``source`` is a mirror: a folder, or an http(s) base URL under which the
    file sits by its catalog file name. Without it, the upstream URL is used.
    """
    target = models_dir / spec.filename
    if spec.sha256 is None:
        raise ModelUnavailable(
            f"{spec.key}: no sha256 is pinned for {spec.filename} ({spec.source}), so it cannot be "
            "fetched safely; place the file in IDENT_MODELS_DIR yourself"
        )
    if not force and target.is_file() and file_sha256(target) == spec.sha256:
        return target
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        models_dir.mkdir(parents=True, exist_ok=True)
        sink = partial.open("wb")
    except OSError as exc:
        raise ConfigurationError(
            f"cannot write model files to {models_dir} (IDENT_MODELS_DIR): {exc.strerror or exc}. Make it "
            "writable, or set IDENT_MODELS_DIR to a folder you can write to"
        ) from exc
    digest = hashlib.sha256()
    try:
        with sink:
            for block in _blocks(spec, source, progress):
                digest.update(block)
                sink.write(block)
            # On disk before the rename, so that a power cut cannot leave a torn file under the final name.
            sink.flush()
            os.fsync(sink.fileno())
        if digest.hexdigest() != spec.sha256:
            raise ModelUnavailable(
                f"{spec.filename} from {_origin(spec, source)} has sha256 {digest.hexdigest()}, "
                f"but the catalog pins {spec.sha256}: nothing was kept. The mirror holds a different "
                "or corrupt file"
            )
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def _origin(spec: ModelSpec, source: str | None) -> str:
    if source is None:
        return spec.url or "(no upstream URL)"
    if _is_url(source):
        return f"{source.rstrip('/')}/{spec.filename}"
    return str(Path(source) / spec.filename)


def _is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def _blocks(spec: ModelSpec, source: str | None, progress: Progress | None):
    if source is not None and not _is_url(source):
        path = Path(source).expanduser() / spec.filename
        if not path.is_file():
            raise ModelUnavailable(f"{spec.filename} is not in the mirror folder {Path(source).expanduser()}")
        total = path.stat().st_size
        with path.open("rb") as handle:
            yield from _reading(handle, total, progress)
        return
    url = _origin(spec, source)
    if source is None and spec.url is None:
        raise ModelUnavailable(
            f"{spec.key}: upstream publishes no ONNX file for {spec.filename} (it was converted from "
            f"PyTorch weights: {spec.source}); fetch it from a mirror with `ident models fetch --from DIR_OR_URL`"
        )
    request = urllib.request.Request(url, headers={"User-Agent": "identification-model-fetch"})
    try:
        response = urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S)
    except OSError as exc:
        raise ModelUnavailable(f"cannot download {url}: {exc}") from exc
    with response:
        length = response.headers.get("Content-Length")
        promised = int(length) if length else None
        received = 0
        # A dropped connection or a timeout mid-body; fetch_one discards the partial file.
        try:
            for block in _reading(response, promised or spec.size_bytes, progress):
                received += len(block)
                yield block
        except (OSError, http.client.HTTPException) as exc:
            raise ModelUnavailable(f"the download of {url} broke off: {exc!r}; run the command again") from exc
        if promised is not None and received < promised:
            # http.client ends a read short, without an error, when the server hangs up early.
            raise ModelUnavailable(
                f"the download of {url} broke off after {received} of {promised} bytes; run the command again"
            )


def _reading(handle, total: int | None, progress: Progress | None):
    done = 0
    while True:
        block = handle.read(CHUNK)
        if not block:
            break
        done += len(block)
        if progress:
            progress(done, total)
        yield block

