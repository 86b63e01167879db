"""The per-key rate limit, IDENT_API_RATE_LIMIT, counted in the fleet's Redis.

The ``limits`` library parses the rates ("50/second", "1000/minute", several
joined by ";") and keeps a moving window per key in Redis, so every gateway
replica counts against one limit. Its Redis client shares the Celery result
backend's connection pool, so it reaches Redis however the fleet does.
"""

from __future__ import annotations

import math
import time

from limits import parse_many
from limits.storage import RedisStorage
from limits.strategies import MovingWindowRateLimiter

from gateway.errors import RATE_LIMITED, ApiError

KEY_PREFIX = "ident:gateway:rate"


class RateLimit:
    def __init__(self, rates: str, connection_pool) -> None:
        self.items = parse_many(rates) if rates.strip() else []
        self._limiter = None
        if self.items:
            # The URL is only a scheme here: the connection pool decides where Redis is.
            storage = RedisStorage("redis://", connection_pool=connection_pool, key_prefix=KEY_PREFIX)
            self._limiter = MovingWindowRateLimiter(storage)

    def check(self, caller: str) -> None:
        """Count one request of ``caller`` (a key digest); ApiError 429 with Retry-After when over a rate."""
        if self._limiter is None:
            return
        for item in self.items:
            if not self._limiter.hit(item, caller):
                reset_at = self._limiter.get_window_stats(item, caller).reset_time
                retry_after = max(1, math.ceil(reset_at - time.time()))
                raise ApiError(429, RATE_LIMITED,
                               f"over this key's rate limit of {item} (IDENT_API_RATE_LIMIT): retry in {retry_after} s",
                               headers={"Retry-After": str(retry_after)})
