"""ASGI middleware: API key, body size limit, one access-log line per request.

Plain ASGI (not BaseHTTPMiddleware) so streamed responses pass straight
through and a client's disconnect reaches the route at once.
"""

from __future__ import annotations

import hmac
import json
import sys
import time
from typing import Any, TextIO

from starlette.exceptions import HTTPException

from .errors import error_body

OPEN_PATHS = ("/health",)  # answered without a key: load balancers and `curl /health` need no secret
# The chat page holds no data and asks for the key itself; POST / (api.py) still needs the key.
OPEN_PAGES = ("/",)


async def send_error(send, status: int, message: str, code: str | None = None, headers: dict | None = None) -> None:
    body = json.dumps(error_body(status, message, code=code)).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


def header(scope: dict, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


class RequireApiKey:
    """With a key set, every path but /health needs ``Authorization: Bearer KEY``."""

    def __init__(self, app, api_key: str | None):
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if (
            self.expected is None
            or scope["type"] != "http"
            or scope["path"] in OPEN_PATHS
            or (scope["method"] in ("GET", "HEAD") and scope["path"] in OPEN_PAGES)
        ):
            return await self.app(scope, receive, send)
        given = header(scope, b"authorization")
        if given is None:
            return await send_error(
                send,
                401,
                "You didn't provide an API key: send 'Authorization: Bearer KEY'",
                "invalid_api_key",
                {"WWW-Authenticate": "Bearer"},
            )
        # Constant time: the comparison must not tell how much of a guess was right.
        if not hmac.compare_digest(given.encode("latin-1"), self.expected):
            return await send_error(
                send, 401, "Incorrect API key provided", "invalid_api_key", {"WWW-Authenticate": "Bearer"}
            )
        return await self.app(scope, receive, send)


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than {limit} bytes")


class LimitBody:
    """Refuse bodies over ``limit`` bytes: at once from Content-Length, else while reading."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await send_error(
                send, 413, f"the request body is larger than {self.limit} bytes", "request_too_large"
            )
        received = 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        return await self.app(scope, counted_receive, send)


class AccessLog:
    """One line per request on stderr: method, path, status, tokens, seconds."""

    def __init__(self, app, stream: TextIO | None = None):
        self.app = app
        self.stream = stream

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        state: dict[str, Any] = scope.setdefault("state", {})
        status = 0

        async def noted_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, noted_send)
        finally:
            tokens = state.get("tokens")
            line = (
                f"{scope['method']} {scope['path']} {status or 'disconnected'} "
                f"{tokens if tokens is not None else '-'} tokens {time.perf_counter() - started:.3f}s"
            )
            print(line, file=self.stream or sys.stderr, flush=True)
