"""What ``IDENT_REDIS_URL`` may say: one server, or the Sentinels that name the master.

One server is ``redis://`` or ``rediss://``; Sentinels are each
``sentinel://[:PASSWORD@]HOST:PORT[/DB]``, joined by ``;`` (Celery's and
kombu's own form). The password and database in the first address are the
master's (and its replicas'). Only the standard library: tasks/settings.py
checks the URL with this.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

SENTINEL_SCHEME = "sentinel"
SENTINEL_SEPARATOR = ";"
DEFAULT_SENTINEL_PORT = 26379


def is_sentinel_url(url: str) -> bool:
    return url.strip().lower().startswith(f"{SENTINEL_SCHEME}://")


@dataclass(frozen=True)
class SentinelTarget:
    """What a Sentinel URL says: where the Sentinels listen, and how to log in to the master."""

    addresses: tuple[tuple[str, int], ...]
    db: int = 0
    username: str | None = None
    password: str | None = None

    def master_credentials(self) -> dict:
        credentials = {"db": self.db}
        if self.username:
            credentials["username"] = self.username
        if self.password:
            credentials["password"] = self.password
        return credentials


def parse_sentinel_url(url: str) -> SentinelTarget:
    """The Sentinels of ``sentinel://...;sentinel://...``; ValueError says what is wrong with it."""
    addresses = []
    db, username, password = 0, None, None
    for position, chunk in enumerate(part.strip() for part in url.split(SENTINEL_SEPARATOR)):
        if not chunk:
            continue
        parsed = urlsplit(chunk)
        if parsed.scheme.lower() != SENTINEL_SCHEME:
            raise ValueError(f"every address in a Sentinel URL starts with sentinel://, not {parsed.scheme or chunk!r}"
                             " (join them with ;)")
        try:
            port = parsed.port or DEFAULT_SENTINEL_PORT
        except ValueError:
            raise ValueError("a Sentinel's port is not a number from 0 to 65535, or the password holds / # ? or @, "
                             "which must be percent-encoded (%2F %23 %3F %40)") from None
        addresses.append((parsed.hostname or "127.0.0.1", port))
        database = parsed.path.strip("/")
        if database and not database.isdigit():
            raise ValueError(f"the database after a Sentinel's address must be a number, not {database!r}")
        if position == 0:
            # As kombu and Celery read it: the first address carries the master's database and password.
            db = int(database or 0)
            username = unquote(parsed.username) if parsed.username else None
            password = unquote(parsed.password) if parsed.password else None
    if not addresses:
        raise ValueError("it names no Sentinel")
    return SentinelTarget(tuple(addresses), db, username, password)
