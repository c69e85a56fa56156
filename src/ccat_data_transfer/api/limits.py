"""Request-body bound (API layer): no request body is read past API_MAX_BODY_BYTES.

A pure ASGI middleware, so it acts before anything parses the body: a declared
``Content-Length`` over the limit is answered 413 at once, without reading; a body sent
without one (chunked) is counted as it streams, and the request fails with 413 as soon as
the count passes the limit -- the parser never holds more than the limit.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import HTTPException

from ccat_data_transfer.core.config import settings

Scope = dict[str, Any]
Receive = Any
Send = Any


def max_body_bytes() -> int:
    return int(settings.get("API_MAX_BODY_BYTES", 16 * 1024 * 1024))


def _too_large(limit: int) -> str:
    return f"request body exceeds the limit of {limit} bytes (API_MAX_BODY_BYTES)"


class BodyLimitMiddleware:
    """Answer 413 to request bodies larger than :func:`max_body_bytes`."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = max_body_bytes()
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _send_413(send, limit)
            return
        received = 0

        async def counted() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # FastAPI re-raises an HTTPException met while reading the body, so
                    # this becomes a 413 answer, not a parse error.
                    raise HTTPException(status_code=413, detail=_too_large(limit))
            return message

        await self.app(scope, counted, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _send_413(send: Send, limit: int) -> None:
    body = json.dumps({"detail": _too_large(limit)}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
