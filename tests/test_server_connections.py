"""`glmrepl serve`'s connection policy against slow clients: a request body has a deadline.

A real `glmrepl serve` process on a free loopback port, driven by raw sockets."""

from __future__ import annotations

import socket
import time

import pytest
from serving import error_of, request, started_server

pytest.importorskip("fastapi")

IDLE_TIMEOUT = 2.0  # the server process's --idle-timeout


@pytest.fixture(scope="module")
def server(gpt2_checkpoint, tmp_path_factory):
    args = ["--idle-timeout", str(IDLE_TIMEOUT)]
    log = tmp_path_factory.mktemp("serve") / "connections.log"
    process = started_server([str(gpt2_checkpoint), "--device", "cpu", *args], log)
    yield process
    process.stop()


def read_answer(sock: socket.socket, limit: float) -> bytes:
    """Everything the server sends on ``sock`` until it closes it, within ``limit`` seconds."""
    sock.settimeout(limit)
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def status_and_body(raw: bytes) -> tuple[int, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


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
