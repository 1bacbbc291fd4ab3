"""The listening sockets, what guards each connection below the ASGI app, and the start line.

uvicorn closes a kept-alive connection that stays silent, but not one that never sends
a request, nor one that sends its request head a byte at a time (each byte restarts its
timer), and its connection cap answers in plain text. The protocol here gives each
request head a deadline that no trickle extends, and answers over the cap in JSON.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .middleware import send_error


def bind(host: str, port: int) -> list[socket.socket]:
    """Sockets bound, not yet listening, on each address ``host`` names; OSError when one cannot be."""
    sockets: list[socket.socket] = []
    try:
        for family, address in _addresses(host, port):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            if os.name == "posix":  # a restart need not wait for the last run's closed connections
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # as asyncio does: each family on its own socket
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _addresses(host: str, port: int) -> list[tuple[socket.AddressFamily, Any]]:
    found = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    unique = {address: family for family, _, _, _, address in found}
    return [(family, address) for address, family in unique.items()]


class GuardedProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request head and a cap on connections."""

    idle_timeout = 10.0  # seconds from connecting, or from the last answer, to a whole request head
    max_connections = 64
    refusal: Any = None  # the ASGI app that answers a request over the cap

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._drop_deadline()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        # uvicorn runs self.app for each request it parses here: over the cap, the refusal instead.
        over = len(self.connections) > self.max_connections
        self.app = self.refusal if over else self.config.loaded_app
        super().handle_events()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._await_head()

    def _await_head(self) -> None:
        self._drop_deadline()
        self.head_deadline = self.loop.call_later(self.idle_timeout, self._close_if_waiting)

    def _close_if_waiting(self) -> None:
        self.head_deadline = None
        # A request whose head has come is being answered: the queue and the client's disconnect
        # govern it, not this deadline.
        if self.conn.our_state not in (h11.SEND_RESPONSE, h11.SEND_BODY):
            self.transport.close()

    def _drop_deadline(self) -> None:
        if self.head_deadline is not None:
            self.head_deadline.cancel()
            self.head_deadline = None


def guarded_protocol(idle_timeout: float, max_connections: int, refusal) -> type[GuardedProtocol]:
    settings = {"idle_timeout": idle_timeout, "max_connections": max_connections, "refusal": staticmethod(refusal)}
    return type("GuardedProtocol", (GuardedProtocol,), settings)


def too_many_connections(limit: int):
    """The ASGI app that answers a request over the connection cap."""

    async def refuse(scope, receive, send):
        await send_error(
            send,
            503,
            f"the server already has {limit} connections open (--max-connections); retry shortly",
            "too_many_connections",
            {"Retry-After": "1", "Connection": "close"},
        )

    return refuse


class AnnouncedServer(uvicorn.Server):
    """uvicorn's server, printing the start line once it accepts connections, not before."""

    def __init__(self, config: uvicorn.Config, start_line: str):
        super().__init__(config)
        self.start_line = start_line

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            print(self.start_line, file=sys.stderr, flush=True)
