"""ASGI middleware: the Host check, the API keys, the body size limit, one access-log line per
request, and a one-line answer for any exception a route lets through.

Plain ASGI (not BaseHTTPMiddleware) so streamed responses pass straight
through and a client's disconnect reaches the route at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import socket
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any, TextIO

from starlette.exceptions import HTTPException

from .errors import error_body, log_unexpected, loggable

OPEN_PATHS = ("/health",)  # answered without a key: load balancers and `curl /health` need no secret
# The chat page holds no data and asks for the key itself; POST / (api.py) still needs the key.
OPEN_PAGES = ("/", "/favicon.ico")


def needs_key(method: str, path: str) -> bool:
    """Whether a request needs the key, where the server has keys."""
    return path not in OPEN_PATHS and not (method in ("GET", "HEAD") and path in OPEN_PAGES)


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


def host_name(value: str) -> str:
    """The name of a Host header or address: lower case, without port, brackets or final dot."""
    value = value.strip().lower()
    if value.startswith("["):  # [::1] or [::1]:8000
        return value[1 : value.find("]")] if "]" in value else value
    name, colon, port = value.rpartition(":")
    if colon and port.isdigit() and ":" not in name:
        value = name
    return value.rstrip(".")


def _address(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


class HostRule:
    """The Host names the server answers to.

    A page on a name its owner re-points at this address (DNS rebinding) would be same-origin
    with the server and could use all of it, so only names that cannot be re-pointed pass:
    localhost, ``*.localhost`` and loopback addresses, the name or address the server is bound
    to, and ``allowed``. Bound to any other address (which needs an API key), the server also
    answers to every IP address, since an address cannot be re-pointed, and to the machine's
    own host name.
    """

    def __init__(self, bound: str, allowed: Iterable[str] = ()):
        bound_name = host_name(bound)
        address = _address(bound_name)
        self.public = bound_name != "localhost" and not (address is not None and address.is_loopback)
        self.names = {"localhost", bound_name, *(host_name(name) for name in allowed)}
        if self.public:
            self.names.add(host_name(socket.gethostname()))

    def allows(self, host: str | None) -> bool:
        if host is None:
            return True  # HTTP/1.0 without Host: a browser always sends one, so no rebound page can
        name = host_name(host)
        if name in self.names or name.endswith(".localhost"):
            return True
        address = _address(name)
        return address is not None and (self.public or address.is_loopback)


class CheckHost:
    """Answer 403 to a Host name the rule refuses, on every path (the page and /health too)."""

    def __init__(self, app, rule: HostRule):
        self.app = app
        self.rule = rule

    async def __call__(self, scope, receive, send):
        host = header(scope, b"host")
        if scope["type"] != "http" or self.rule.allows(host):
            return await self.app(scope, receive, send)
        name = loggable(host_name(host or ""))[:200]
        return await send_error(
            send,
            403,
            f"this server does not answer to the host name '{name}'; to allow it, start glmrepl serve "
            f"with --allow-host {name}",
            "host_not_allowed",
        )


class RequireApiKey:
    """With keys set, every path but /health needs ``Authorization: Bearer KEY`` (the scheme in any
    case) with one of them; which one (its index) goes to ``scope["state"]["api_key_index"]``, so
    that each key's requests get caches of their own (see ``state.cache_namespace``)."""

    def __init__(self, app, api_keys: Sequence[str] = ()):
        self.app = app
        # Compared as digests: equal lengths, so the comparison cannot even tell a key's length.
        self.expected = [_digest(key.encode()) for key in api_keys if key]

    async def __call__(self, scope, receive, send):
        if not self.expected or scope["type"] != "http" or not needs_key(scope["method"], scope["path"]):
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
        scheme, _, token = given.partition(" ")
        index = self._matching(token.strip().encode("latin-1")) if scheme.lower() == "bearer" else None
        if index is None:
            return await send_error(
                send, 401, "Incorrect API key provided", "invalid_api_key", {"WWW-Authenticate": "Bearer"}
            )
        scope.setdefault("state", {})["api_key_index"] = index
        return await self.app(scope, receive, send)

    def _matching(self, token: bytes) -> int | None:
        """The index of the key ``token`` is, or None. Constant time: every key is compared, to the
        end, so the time tells neither how much of a guess was right nor which key it was near."""
        given = _digest(token)
        found = None
        for index, expected in enumerate(self.expected):
            if hmac.compare_digest(given, expected) and found is None:
                found = index
        return found


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than {limit} bytes")


class BodyTooSlow(HTTPException):
    def __init__(self, seconds: float):
        message = f"the request body did not all arrive within {seconds:g} s of its head (--idle-timeout)"
        # The rest of the body may still be coming: the connection cannot carry another request.
        super().__init__(408, message, headers={"Connection": "close"})


class LimitBody:
    """Refuse bodies over ``limit`` bytes (at once from Content-Length, else while reading), and
    bodies not all arrived ``timeout`` seconds after their head.

    The deadline is for the whole body, not for each gap in it: a client trickling a byte now
    and then cannot hold its request, and its connection, any longer than one that stops.
    """

    def __init__(self, app, limit: int, timeout: float | None = None):
        self.app = app
        self.limit = limit
        self.timeout = timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await send_error(
                send, 413, f"the request body is larger than {self.limit} bytes", "request_too_large"
            )
        received = 0
        # The app is called as soon as the head has arrived (uvicorn): the body's clock starts now.
        deadline = None if self.timeout is None else asyncio.get_running_loop().time() + self.timeout

        async def counted_receive():
            nonlocal received, deadline
            message = await self._before(deadline, receive)
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
                if not message.get("more_body", False):
                    deadline = None  # the body is whole: later receives wait for a disconnect
            return message

        return await self.app(scope, counted_receive, send)

    async def _before(self, deadline: float | None, receive):
        if deadline is None:
            return await receive()
        try:
            async with asyncio.timeout_at(deadline):
                return await receive()
        except TimeoutError:
            raise BodyTooSlow(self.timeout or 0) from None


class AccessLog:
    """One line per request on stderr: method, path, status, tokens (of a reply), seconds."""

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
            counted = f" {tokens} tokens" if tokens is not None else ""  # only replies make tokens
            line = (
                f"{loggable(scope['method'])} {loggable(scope['path'])} {status or 'disconnected'}"
                f"{counted} {time.perf_counter() - started:.3f}s"
            )
            print(line, file=self.stream or sys.stderr, flush=True)


class ContainErrors:
    """An exception a route lets through: one log line and a JSON 500, not uvicorn's traceback.

    Starlette answers such an exception itself but raises it again for the server to log, with
    its whole traceback; here it ends. Once a reply has begun, returning without finishing it
    makes uvicorn close the connection, which is all a client can still be told.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def noted_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, noted_send)
        except Exception as error:
            message = log_unexpected(scope["method"], scope["path"], error)
            if not started:
                await send_error(send, 500, message)
