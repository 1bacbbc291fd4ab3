"""`glmrepl serve`'s connection policy against idle, slow and non-reading clients: idle sockets
never turn a request away, a request body has a deadline, an answer its client leaves unread is
cut off (its reply leaving the scheduler), and idle connections past the ceiling make room.

Real servers on free loopback ports: a `glmrepl serve` process, and uvicorn in this process with
the same guards where the test holds the model's steps (tests/gated.py)."""

from __future__ import annotations

import errno
import http.client
import json
import socket
import statistics
import time

import pytest
from gated import StepGate
from scripted import build_scripted_qwen2
from serving import InProcessServer, error_of, open_chat_stream, request, started_server

pytest.importorskip("fastapi")

IDLE_TIMEOUT = 2.0  # the server process's --idle-timeout: long enough to see idle sockets still open
MAX_CONNECTIONS = 3  # and its --max-connections
PIECE_CHARACTERS = 10_000  # each scripted token is this long: a few fill a connection's buffers
PIECES = [f"<{index:02d}>" + "ab" * (PIECE_CHARACTERS // 2) for index in range(60)]


@pytest.fixture(scope="module")
def server(gpt2_checkpoint, tmp_path_factory):
    args = ["--idle-timeout", str(IDLE_TIMEOUT), "--max-connections", str(MAX_CONNECTIONS)]
    log = tmp_path_factory.mktemp("serve") / "connections.log"
    process = started_server([str(gpt2_checkpoint), "--device", "cpu", *args], log)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def scripted_backend(tmp_path_factory):
    """A backend on a tiny chat model whose reply is ``PIECES``, 600 KB in 60 tokens."""
    from glmrepl.engine.backend import LocalBackend
    from glmrepl.engine.models.loading import LoadOptions

    folder = build_scripted_qwen2(tmp_path_factory.mktemp("checkpoints") / "tiny-long-pieces", PIECES)
    backend = LocalBackend()
    backend.load_and_wait(LoadOptions(mode="cpu").for_model(folder, "tiny-long-pieces"))
    yield backend
    backend.stop()


def guarded(backend, idle_timeout: float, max_connections: int) -> InProcessServer:
    """``glmrepl serve``'s app and guards over ``backend``, in this process."""
    from glmrepl.server.app import create_app
    from glmrepl.server.listening import guarded_settings
    from glmrepl.server.state import ServerState

    app = create_app(ServerState(backend), body_timeout=idle_timeout)
    return InProcessServer(app, **guarded_settings(idle_timeout, max_connections))


def still_open(sock: socket.socket) -> bool:
    """Whether the server has left ``sock`` open (nothing to read, no end, no reset)."""
    sock.setblocking(False)
    try:
        return sock.recv(1) != b""
    except BlockingIOError:
        return True
    except ConnectionResetError:
        return False
    finally:
        sock.setblocking(True)


def read_answer(sock: socket.socket, limit: float) -> bytes:
    """Everything the server sends on ``sock`` until it closes it, within ``limit`` seconds."""
    sock.settimeout(limit)
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def read_stream(sock: socket.socket, limit: float) -> bytes:
    """A chunked answer's remaining bytes, to its last (empty) chunk, within ``limit`` seconds."""
    sock.settimeout(limit)
    received = b""
    while not received.endswith(b"\r\n0\r\n\r\n"):
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the stream before its end: {received[-300:]!r}"
        received += chunk
    return received


def status_and_body(raw: bytes) -> tuple[int, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


# -- idle sockets and the cap ----------------------------------------------------------------------


def test_idle_sockets_past_the_cap_turn_no_request_away(server):
    port = server.port
    first = socket.create_connection(("127.0.0.1", port), timeout=30)  # there before the idle ones
    silent = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(4 * MAX_CONNECTIONS)]
    halfway = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(MAX_CONNECTIONS)]
    try:
        for sock in halfway:  # a head that never ends (slowloris)
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        first.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert status_and_body(read_answer(first, 30))[0] == 200
        body = {"model": "tiny-gpt2", "prompt": "hello", "max_tokens": 2}
        for method, path, payload in (("POST", "/v1/completions", body), ("GET", "/health", None)):
            status, _, raw = request(port, method, path, payload)
            assert status == 200, raw[:300]
        # The idle sockets were open all along: the requests were made beside them.
        assert all(still_open(sock) for sock in silent + halfway)
    finally:
        for sock in [first, *silent, *halfway]:
            sock.close()


def test_answers_on_a_kept_alive_connection_go_out_at_once(server):
    # Held by Nagle's algorithm, each answer's body would wait for the client to acknowledge its
    # head, which clients delay by up to 40 ms: every request after a connection's first.
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    took = []
    try:
        for _ in range(15):
            started = time.perf_counter()
            connection.request("GET", "/health")
            assert connection.getresponse().read()
            took.append(time.perf_counter() - started)
    finally:
        connection.close()
    assert statistics.median(took[1:]) < 0.02, took


def test_requests_over_the_cap_get_a_json_503_and_health_still_answers(scripted_backend):
    cap = 2
    with StepGate(scripted_backend.manager.current.model) as gate, guarded(scripted_backend, 30, cap) as server:
        # Two streamed replies held at the model's first step: both requests are being answered.
        streams = [open_chat_stream(server.port, "hi", 3, events=1, model="tiny-long-pieces") for _ in range(cap)]
        gate.wait_for(lambda: gate.waiting > 0)
        status, headers, raw = request(server.port, "GET", "/v1/models")
        assert status == 503 and int(headers["retry-after"]) >= 1 and headers["connection"] == "close"
        error = error_of(raw)
        assert error["code"] == "too_many_connections" and "--max-connections" in error["message"]
        assert request(server.port, "GET", "/health")[0] == 200  # a balancer still sees the server
        gate.release(100)
        for sock in streams:  # the requests that came first are answered whole
            answer = read_stream(sock, 60)
            assert b"data: [DONE]" in answer, answer[-300:]
            sock.close()
        assert request(server.port, "GET", "/v1/models")[0] == 200


# -- the request body's deadline -------------------------------------------------------------------


@pytest.mark.parametrize("trickle", [False, True], ids=["stops", "trickles"])
def test_a_body_must_arrive_within_the_idle_timeout_of_its_head(server, trickle):
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    try:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 200\r\n\r\n{"
        )
        started = time.monotonic()
        sock.settimeout(0.2)
        answer = b""
        while not answer and time.monotonic() - started < IDLE_TIMEOUT + 8:
            try:
                answer = sock.recv(65536)
            except TimeoutError:
                if trickle:
                    sock.sendall(b" ")  # a byte every 0.2 s: the slow client
        took = time.monotonic() - started
        answer += read_answer(sock, 10)  # and then the server closes the connection
    finally:
        sock.close()
    assert answer, f"no answer {took:.1f} s after the head"
    status, body = status_and_body(answer)
    assert status == 408 and IDLE_TIMEOUT * 0.8 < took < IDLE_TIMEOUT + 4, (status, took)
    error = error_of(body)
    assert error["code"] == "request_timeout" and "--idle-timeout" in error["message"]
    assert request(server.port, "GET", "/health")[0] == 200


# -- an answer its client does not read ------------------------------------------------------------


def reset_by_server(sock: socket.socket, limit: float) -> bool:
    """Whether the server resets ``sock`` within ``limit`` seconds (its error, read without reading data)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNRESET:
            return True
        time.sleep(0.05)
    return False


def test_a_stream_its_client_does_not_read_is_cancelled_and_its_connection_reset(scripted_backend):
    idle_timeout = 1.0
    backend = scripted_backend
    before = backend.replies_status()["tokens_generated"]
    with StepGate(backend.manager.current.model) as gate, guarded(backend, idle_timeout, 8) as server:
        body = json.dumps(
            {"model": "tiny-long-pieces", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        ).encode()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window, fixed before connecting
        sock.connect(("127.0.0.1", server.port))
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        # 40 of the 60 tokens, 400 KB: more than the buffers hold. The reply then waits at the gate.
        gate.release(40)
        gate.wait_for(lambda: gate.steps >= 40 and gate.waiting > 0)
        assert backend.replies_status()["running"] == 1
        assert reset_by_server(sock, idle_timeout + 10), "the server still holds the unread stream"
        sock.close()
        gate.release(100)  # the model's next step finds the reply cancelled
        deadline = time.monotonic() + 60
        while backend.replies_status()["running"]:
            assert time.monotonic() < deadline, "the cancelled reply still runs"
            time.sleep(0.02)
        generated = backend.replies_status()["tokens_generated"] - before
        assert generated < 45, f"{generated} tokens: the reply ran on after its client was cut off"
        assert request(server.port, "GET", "/health")[0] == 200


# -- the ceiling on open connections ---------------------------------------------------------------


def test_past_the_ceiling_the_longest_idle_connection_makes_room():
    from glmrepl.server.app import create_app
    from glmrepl.server.listening import guarded_settings, open_ceiling
    from glmrepl.server.state import ServerState

    ceiling = open_ceiling(1)
    with InProcessServer(create_app(ServerState(backend=None)), **guarded_settings(30, 1)) as server:
        idle = [socket.create_connection(("127.0.0.1", server.port), timeout=30) for _ in range(ceiling)]
        try:
            # One more: the connection that has waited longest for a request head is closed for it.
            status, _, _ = request(server.port, "GET", "/favicon.ico")
            assert status == 204
            assert read_answer(idle[0], 10) == b""
            assert all(still_open(sock) for sock in idle[1:])
        finally:
            for sock in idle:
                sock.close()
