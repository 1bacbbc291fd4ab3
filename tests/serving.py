"""Helpers for the server tests: a real `glmrepl serve` process on a free loopback port, raw HTTP."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).parent.parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def request(
    port: int,
    method: str,
    path: str,
    body: bytes | dict | None = None,
    headers: dict | None = None,
    timeout: float = 120,
) -> tuple[int, dict, bytes]:
    """One HTTP request; (status, lower-cased headers, body bytes)."""
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def error_of(body: bytes) -> dict:
    """The OpenAI error object of a response body (asserting the shape)."""
    data = json.loads(body)
    assert set(data) == {"error"} and {"message", "type", "param", "code"} <= set(data["error"]), data
    assert "Traceback" not in data["error"]["message"] and "\n" not in data["error"]["message"]
    return data["error"]


class ServerProcess:
    """`python -m glmrepl serve ARGS --port P`, its stderr in a file, stopped at the end."""

    def __init__(self, args: list[str], log_path: Path, env: dict | None = None):
        self.port = free_port()
        self.log_path = log_path
        environment = {**os.environ, "PYTHONPATH": str(ROOT)}
        environment.pop("GLMREPL_API_KEY", None)  # only the key a test gives
        environment.update(env or {})
        self.log = open(log_path, "w", encoding="utf-8")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "glmrepl", "serve", *args, "--port", str(self.port)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=environment,
        )

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited with {self.process.returncode}:\n{self.output()}")
            try:
                status, _, body = request(self.port, "GET", "/health", timeout=5)
                if status == 200 and json.loads(body)["status"] == "ready":
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"the server did not become ready:\n{self.output()}")

    def health(self) -> dict:
        return json.loads(request(self.port, "GET", "/health")[2])

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


class InProcessServer:
    """uvicorn in a thread of this process, for tests that also drive the backend directly;
    ``settings`` go to uvicorn.Config (``listening.guarded_settings`` for glmrepl serve's guards)."""

    def __init__(self, app, **settings):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False, **settings)
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(15)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def sse_events(port: int, path: str, body: dict, headers: dict | None = None) -> list[str]:
    """The `data:` payloads of a streamed response, in order."""
    status, _, raw = request(port, "POST", path, body, headers)
    assert status == 200, raw
    return [line[len("data: ") :] for line in raw.decode().split("\n\n") if line.startswith("data: ")]


def openai_client(server, key: str = "unused"):
    """The openai client for a server these tests started: no retries, so a test sees every answer."""
    import openai

    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=key, max_retries=0, timeout=120)


def started_server(args: list[str], log_path: Path, env: dict | None = None) -> ServerProcess:
    """A `glmrepl serve` process that answers /health ready (stopped again if it never does)."""
    server = ServerProcess(args, log_path, env)
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server


def wait_idle(server: ServerProcess, timeout: float = 60) -> dict:
    """/health once no reply runs or waits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = server.health()
        if health["replies"]["running"] == 0 and health["replies"]["waiting"] == 0:
            return health
        time.sleep(0.02)
    raise AssertionError(f"replies still running: {server.health()}")


def open_chat_stream(
    port: int, content: str, max_tokens: int, events: int = 2, model: str = "tiny-qwen2-chat"
) -> socket.socket:
    """A streamed chat request on a raw socket, its first ``events`` chunks read (the role, content)."""
    body = json.dumps(
        {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "stream": True}
    ).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=120)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    received = b""
    while received.count(b"data: ") < events:
        received += sock.recv(65536)
    assert received.startswith(b"HTTP/1.1 200"), received[:200]
    return sock
