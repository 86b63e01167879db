"""API keys: who may call the gateway, and the id each caller's jobs are recorded under.

Keys come from IDENT_API_KEYS (comma-separated) and IDENT_API_KEYS_FILE (the
sha256 hex digest of each key, one a line, ``#`` comments): the file lets an
operator hand out keys without storing them on the gateway's host. Only
digests are kept in memory, and a caller is known by its key's digest, which
is what the job-ownership records in Redis hold: never a key.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from tasks.errors import ConfigurationError
from tasks.settings import Settings

_HEX = frozenset("0123456789abcdef")


def key_digest(key: str) -> str:
    """The sha256 hex digest of a key: its id in records and the form IDENT_API_KEYS_FILE holds."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def read_key_file(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigurationError(f"IDENT_API_KEYS_FILE={str(path)!r} cannot be read: {exc.strerror or exc}") from None
    digests = []
    for number, line in enumerate(lines, start=1):
        text = line.split("#", 1)[0].strip().lower()
        if not text:
            continue
        if len(text) != 64 or not set(text) <= _HEX:
            raise ConfigurationError(
                f"IDENT_API_KEYS_FILE={str(path)!r}, line {number}: not a sha256 hex digest (64 hex digits). Write "
                "each key's digest, e.g. `printf %s \"$KEY\" | sha256sum | cut -d' ' -f1`, not the key itself"
            )
        digests.append(text)
    return digests


class KeyRing:
    """The digests of the accepted keys; :meth:`caller` says whose a request is."""

    def __init__(self, digests: list[str]) -> None:
        self._digests = [bytes.fromhex(d) for d in dict.fromkeys(digests)]

    @classmethod
    def from_settings(cls, settings: Settings) -> "KeyRing":
        digests = [key_digest(key) for key in settings.api_keys]
        if settings.api_keys_file:
            digests += read_key_file(Path(settings.api_keys_file).expanduser())
        if not digests:
            raise ConfigurationError(
                "the gateway has no API key: set IDENT_API_KEYS to one or more keys (comma-separated; make each with "
                "`openssl rand -hex 32`) or IDENT_API_KEYS_FILE to a file of their sha256 digests"
            )
        return cls(digests)

    def __len__(self) -> int:
        return len(self._digests)

    def caller(self, authorization: str | None) -> str | None:
        """The digest of the key in an ``Authorization: Bearer KEY`` header, or None when it is no accepted key."""
        if not authorization:
            return None
        scheme, _, key = authorization.strip().partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            return None
        offered = hashlib.sha256(key.encode("utf-8")).digest()
        # Every digest is compared, in constant time each, so the answer's
        # timing says neither which key matched nor how much of one did.
        found = False
        for digest in self._digests:
            found |= hmac.compare_digest(offered, digest)
        return offered.hex() if found else None
