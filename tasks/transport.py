"""kombu's Redis transport, with one Redis client per channel instead of one per command.

kombu 5.x builds a new ``redis.Redis`` object every time it publishes a job,
records a job as unacknowledged or acknowledges it (``Channel.conn_or_acquire``).
With redis-py 8 each of those objects copies ~170 response callbacks, about
0.2 ms of CPU: three per job, paid by the producer and by the worker's main
process between two jobs (see docs/benchmarks.md). The client object holds no
connection of its own (it borrows one from the channel's pool for each command),
so one per channel serves every call as well, and is rebuilt if the pool is.

The wire format and the keys in Redis are kombu's own: producers and workers on
stock kombu interoperate with these. :func:`install` makes it what ``redis://``
and ``rediss://`` URLs mean in this process, so URLs, logs and Flower's broker
view keep showing ``redis://``.
"""

from __future__ import annotations

from contextlib import contextmanager

import kombu.transport
from kombu.transport import redis as kombu_redis

SCHEMES = ("redis", "rediss")


class Channel(kombu_redis.Channel):
    _reused_client = None

    @contextmanager
    def conn_or_acquire(self, client=None):
        if client:
            yield client
            return
        reused = self._reused_client
        if reused is None or reused.connection_pool is not self.pool:
            reused = self._reused_client = self._create_client()
        yield reused


class Transport(kombu_redis.Transport):
    Channel = Channel


def install() -> None:
    """Resolve ``redis://`` and ``rediss://`` broker URLs to :class:`Transport` from now on."""
    for scheme in SCHEMES:
        kombu.transport.TRANSPORT_ALIASES[scheme] = f"{__name__}:Transport"
        # kombu caches each alias once resolved; a stale entry would keep the stock class.
        kombu.transport._transport_cache.pop(scheme, None)  # noqa: SLF001
