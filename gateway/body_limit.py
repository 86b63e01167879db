"""Refuse a request body over the limit before it is read whole: 413.

A declared Content-Length over the limit is answered at once, before a byte
of the body is read. A body without one (chunked) is counted as it streams in,
and the request is cut off at the first chunk that passes the limit, so a
caller cannot make the gateway buffer more than the limit plus one chunk.
"""

from __future__ import annotations

import json

from gateway.errors import PAYLOAD_TOO_LARGE, ApiError

# Room for multipart boundaries, part headers and the form fields beside the media.
MULTIPART_SLACK_BYTES = 64 * 1024


def body_limit_for(path: str, max_payload_bytes: int) -> int:
    """The largest body a request to ``path`` may send: one payload, two for verify, and the form's framing."""
    payloads = 2 if path.rstrip("/").endswith("/verify") else 1
    return payloads * max_payload_bytes + MULTIPART_SLACK_BYTES


def too_large(limit: int) -> ApiError:
    return ApiError(413, PAYLOAD_TOO_LARGE,
                    f"the request body is over the gateway's limit of {limit} bytes (IDENT_MAX_PAYLOAD_BYTES per "
                    "payload, plus 64 KiB for the form): send a smaller file")


class BodyLimit:
    """ASGI middleware: the size check on every HTTP request's body."""

    def __init__(self, app, max_payload_bytes: int) -> None:
        self.app = app
        self.max_payload_bytes = max_payload_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = body_limit_for(scope["path"], self.max_payload_bytes)
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            return await _answer(send, too_large(limit))
        seen = 0

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    # Raised inside the app's body read: its handler answers 413.
                    raise too_large(limit)
            return message

        return await self.app(scope, counted_receive, send)


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _answer(send, error: ApiError) -> None:
    body = json.dumps(error.body()).encode()
    # The body is left unread: close the connection rather than read it to reuse it.
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
