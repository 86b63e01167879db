"""How every part of the fleet reaches its Redis: one server, or the master that Sentinel names.

``IDENT_REDIS_URL`` is one server or a list of Sentinels (tasks/redis_urls.py);
``IDENT_REDIS_SENTINEL_PASSWORD`` is the Sentinels' own password, and
``IDENT_REDIS_SENTINEL_MASTER`` names the master they watch
(docs/operations.md, "Redis high availability").

A client made here for Sentinels is redis-py's ``Sentinel.master_for``
client: each new connection asks the Sentinels where the master is, so after
a failover the next command that reconnects reaches the new master; nothing
needs restarting. Redis Cluster is not offered: Celery and kombu do not
support it.
"""

from __future__ import annotations

import redis
from redis.sentinel import Sentinel

from tasks.redis_urls import is_sentinel_url, parse_sentinel_url
from tasks.settings import Settings

# How long a Sentinel may take to answer "where is the master?" before the
# next one is asked; the answer is needed before every new connection.
SENTINEL_SOCKET_TIMEOUT_S = 1.0


def sentinel_kwargs(settings: Settings) -> dict:
    """How to talk to the Sentinels themselves (not the master): their password, and a short timeout."""
    options: dict = {"socket_timeout": SENTINEL_SOCKET_TIMEOUT_S, "socket_connect_timeout": SENTINEL_SOCKET_TIMEOUT_S}
    if settings.redis_sentinel_password:
        options["password"] = settings.redis_sentinel_password
    return options


def sentinel_transport_options(settings: Settings) -> dict:
    """What kombu's and Celery's Sentinel transport and backend need beside the URL; {} for one server."""
    if not is_sentinel_url(settings.redis_url):
        return {}
    return {"master_name": settings.redis_sentinel_master, "sentinel_kwargs": sentinel_kwargs(settings)}


def redis_client(settings: Settings, **connection_kwargs) -> redis.Redis:
    """A redis-py client on the fleet's Redis: the server of the URL, or the master that Sentinel names now.

    ``connection_kwargs`` (timeouts, retries, TLS options) apply to the
    connections to that server or master.
    """
    url = settings.redis_url
    if not is_sentinel_url(url):
        return redis.Redis.from_url(url, **connection_kwargs)
    target = parse_sentinel_url(url)
    sentinels = Sentinel(list(target.addresses), sentinel_kwargs=sentinel_kwargs(settings), **connection_kwargs)
    return sentinels.master_for(settings.redis_sentinel_master, redis_class=redis.Redis,
                                **target.master_credentials())

