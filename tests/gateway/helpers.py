"""Calls to the gateway's ASGI app in this process, without Redis: what needs no fleet.

The app is built but its lifespan is not run, so nothing connects to Redis;
only checks that come before a job is sent (auth, sizes, forms) can be
exercised here. tests/integration/test_gateway.py runs it against a fleet.
"""

from __future__ import annotations

import asyncio

import httpx

from gateway.app import make_gateway
from tasks.settings import Settings

KEY = "unit-test-key-0123456789abcdef"
OTHER_KEY = "another-unit-test-key-9876543210"
AUTH = {"Authorization": f"Bearer {KEY}"}


def settings(**env: str) -> Settings:
    # No rate limit: counting needs Redis.
    base = {"IDENT_API_KEYS": f"{KEY},{OTHER_KEY}", "IDENT_API_RATE_LIMIT": "", "IDENT_REDIS_URL": "redis://127.0.0.1:1/0"}
    return Settings.from_env({**base, **env})


def call(app, method: str, url: str, **kwargs) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            return await client.request(method, url, **kwargs)

    return asyncio.run(go())


def gateway(**env: str):
    return make_gateway(settings(**env))
