"""The listening sockets, what guards each connection below the ASGI app, and the start line.

uvicorn closes a kept-alive connection that stays silent, but not one that never sends
a request, nor one that sends its request head a byte at a time (each byte restarts its
timer), nor one that never reads its answer; and its connection cap counts idle sockets,
so that a few dozen silent ones would turn every other client away. The protocol here gives
each request head a deadline that no trickle extends, cuts off a client that leaves its
answer unread, caps only the requests being answered (answering over the cap in JSON), and
bounds the idle connections by closing the one that has waited longest for a request.
"""

from __future__ import annotations

import asyncio
import math
import os
import socket
import struct
import sys
from typing import Any, ClassVar

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .middleware import AccessLog, send_error


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


# A connection's answer waits in the server (uvicorn's buffer) once the system's buffer is full.
# Kept small, so that a client that stops reading is noticed after a few replies' worth of bytes,
# not after the megabytes the system would otherwise take on loopback.
SEND_BUFFER_BYTES = 64 * 1024
OPEN_PER_ANSWERED = 16  # idle connections held open for each request that may be answered at once
FILES_KEPT_FOR_THE_PROCESS = 128  # of the file limit: model files, threads' pipes, logs
ALWAYS_ANSWERED = ("/health",)  # over the cap too: it is cheap, and how a balancer sees the server


class GuardedProtocol(H11Protocol):
    """uvicorn's h11 protocol with deadlines, a cap on requests being answered and a ceiling on connections.

    - A request head must arrive within ``idle_timeout`` of connecting or of the last answer.
    - An answer the client leaves unread (the buffers full) for ``idle_timeout`` is cut off: the
      connection is reset, so a streamed reply is cancelled and leaves the scheduler.
    - A request is answered over the cap only on ``ALWAYS_ANSWERED`` paths; the others get 503.
      A request counts from its whole arrival (head and body) to the end of its answer, so idle
      connections and slow senders never count (the body's own deadline is ``LimitBody``'s).
    - With ``max_open`` connections open, a new one closes the connection that has waited longest
      for a request head (the newest may be a client about to ask); only when none waits is the
      new one closed.
    """

    idle_timeout = 10.0
    max_connections = 64  # requests answered at once
    max_open = 1024  # connections open at once, idle ones included
    refusal: Any = None  # the ASGI app that answers a request over the cap
    # Each server's subclass (guarded_protocol) has its own: the connections of one server.
    answering: ClassVar[set[GuardedProtocol]] = set()
    awaiting_head: ClassVar[dict[GuardedProtocol, None]] = {}  # oldest first

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.head_deadline: asyncio.TimerHandle | None = None
        self.write_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
            # Each write goes out at once (asyncio sets this only on the sockets it makes, not on
            # bind's): else Nagle's algorithm holds an answer's body, written after its head, and each
            # chunk of a stream until the client acknowledges the last, up to 40 ms on a kept-alive connection.
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if len(self.connections) > self.max_open:
            self._make_room()
        if not transport.is_closing():
            self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting()
        self._drop_write_deadline()
        self.answering.discard(self)
        super().connection_lost(exc)

    def handle_events(self) -> None:
        # uvicorn runs self.app for each request it parses here: over the cap, the refusal instead.
        over = len(self.answering) >= self.max_connections
        self.app = self._over_the_cap if over else self.config.loaded_app
        super().handle_events()
        self._note_request()

    def on_response_complete(self) -> None:
        self.answering.discard(self)
        # Armed even when the connection is closing: a close waits for the client to read what is
        # left, and the deadline resets a connection whose client never does.
        self._await_head()
        super().on_response_complete()  # may parse a pipelined request, which stops the wait

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.write_deadline is None:
            self.write_deadline = self.loop.call_later(self.idle_timeout, self._reset)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._drop_write_deadline()

    async def _over_the_cap(self, scope, receive, send) -> None:
        answer = self.config.loaded_app if scope.get("path") in ALWAYS_ANSWERED else self.refusal
        await answer(scope, receive, send)

    def _note_request(self) -> None:
        """After parsing: a request head stops the wait for one; a whole request is being answered."""
        if self.conn.our_state not in (h11.SEND_RESPONSE, h11.SEND_BODY):
            return  # no request yet, or the body of one already answered (dropped, as uvicorn does)
        self._stop_waiting()
        if self.conn.their_state in (h11.DONE, h11.MUST_CLOSE):
            self.answering.add(self)

    def _make_room(self) -> None:
        oldest = next(iter(self.awaiting_head), None)
        if oldest is None:
            self.transport.close()
            return
        oldest._stop_waiting()
        oldest.transport.close()

    def _await_head(self) -> None:
        self._stop_waiting()
        self.awaiting_head[self] = None
        self.head_deadline = self.loop.call_later(self.idle_timeout, self._close_if_waiting)

    def _close_if_waiting(self) -> None:
        self.head_deadline = None
        self.awaiting_head.pop(self, None)
        if self.transport.get_write_buffer_size():
            self._reset()  # its last answer is still unread: a close would wait for it
        else:
            self.transport.close()

    def _reset(self) -> None:
        """Close at once, dropping what the client has not read (a close would wait for it to)."""
        self.write_deadline = None
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    def _stop_waiting(self) -> None:
        self.awaiting_head.pop(self, None)
        if self.head_deadline is not None:
            self.head_deadline.cancel()
            self.head_deadline = None

    def _drop_write_deadline(self) -> None:
        if self.write_deadline is not None:
            self.write_deadline.cancel()
            self.write_deadline = None


def open_ceiling(max_connections: int) -> int:
    """Connections held open at once: ``OPEN_PER_ANSWERED`` per request answered, within the file limit."""
    wanted = OPEN_PER_ANSWERED * max_connections
    try:
        import resource
    except ImportError:  # not POSIX: no file limit to read
        return wanted
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(max_connections, min(wanted, soft - FILES_KEPT_FOR_THE_PROCESS))


def guarded_protocol(idle_timeout: float, max_connections: int) -> type[GuardedProtocol]:
    """A protocol class for one server: its settings, and its own sets of connections."""
    settings = {
        "idle_timeout": idle_timeout,
        "max_connections": max_connections,
        "max_open": open_ceiling(max_connections),
        "refusal": staticmethod(AccessLog(too_many_connections(max_connections))),
        "answering": set(),
        "awaiting_head": {},
    }
    return type("GuardedProtocol", (GuardedProtocol,), settings)


def guarded_settings(idle_timeout: float, max_connections: int) -> dict[str, Any]:
    """uvicorn.Config's settings for a guarded server."""
    return {
        "http": guarded_protocol(idle_timeout, max_connections),
        "ws": "none",  # no route is a WebSocket, and an upgrade would leave the guarded protocol
        "timeout_keep_alive": math.ceil(idle_timeout),
    }


def too_many_connections(limit: int):
    """The ASGI app that answers a request over the cap."""

    async def refuse(scope, receive, send):
        await send_error(
            send,
            503,
            f"the server is already answering {limit} requests (--max-connections); retry shortly",
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
