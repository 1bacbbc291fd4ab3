"""`glmrepl serve` against hostile clients: foreign Host names (DNS rebinding), terminal escapes in
the access log, idle and trickling request heads, and the small HTTP details (the auth scheme's
case, Allow, HEAD, the documented 400, a chunked 413); the connection policy has its own file,
test_server_connections.py. Real server processes on free loopback ports, driven by http.client
and raw sockets so any Host and any path can be sent."""

from __future__ import annotations

import http.client
import json
import re
import socket
import subprocess
import sys
import time

import pytest
from serving import ROOT, ServerProcess, error_of, started_server

pytest.importorskip("fastapi")

KEY = "hardening-key-41c2"
AUTH = {"Authorization": f"Bearer {KEY}"}
IDLE_TIMEOUT = 1.0  # the guarded server's --idle-timeout
ANSI_AND_FORGERY = (
    "/%1b%5b2J%1b%5d0;pwned%07%1b%5d52;c;ZXZpbA==%07%0d%0a"
    "POST%20/v1/forged%20200%201%20tokens%200.001s%e2%80%a8%e2%80%ae%c2%9b"
)


@pytest.fixture(scope="module")
def keyed_server(gpt2_checkpoint, tmp_path_factory):
    server = started_server(
        [str(gpt2_checkpoint), "--device", "cpu", "--api-key", KEY], tmp_path_factory.mktemp("serve") / "keyed.log"
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def guarded_server(gpt2_checkpoint, tmp_path_factory):
    server = started_server(
        [
            str(gpt2_checkpoint),
            "--device",
            "cpu",
            "--allow-host",
            "glmrepl.test",
            "--idle-timeout",
            str(IDLE_TIMEOUT),
        ],
        tmp_path_factory.mktemp("serve") / "guarded.log",
    )
    yield server
    server.stop()


def ask(
    port: int,
    method: str,
    path: str,
    host: str | None = None,
    headers: dict | None = None,
    body: bytes | None = None,
    address: str = "127.0.0.1",
) -> tuple[int, dict, bytes]:
    """One request with exactly the Host given (default: the address and port); (status, headers, body)."""
    connection = http.client.HTTPConnection(address, port, timeout=60)
    try:
        connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        connection.putheader("Host", host if host is not None else f"{address}:{port}")
        for name, value in (headers or {}).items():
            connection.putheader(name, value)
        if body is not None:
            connection.putheader("Content-Type", "application/json")
            connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def exchange(port: int, data: bytes, timeout: float = 60) -> bytes:
    """Send raw bytes, read until the server closes (send `Connection: close`)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


def seconds_until_closed(sock: socket.socket, trickle: bytes = b"", limit: float = 10) -> float:
    """Seconds until the server closes ``sock``, sending one byte of ``trickle`` every 0.2 s meanwhile."""
    started = time.monotonic()
    sock.settimeout(0.2)
    while time.monotonic() - started < limit:
        try:
            if sock.recv(65536) == b"":
                return time.monotonic() - started
        except TimeoutError:
            pass
        except ConnectionResetError:
            return time.monotonic() - started
        if trickle:
            try:
                sock.sendall(trickle[:1])
            except (BrokenPipeError, ConnectionResetError):
                return time.monotonic() - started
            trickle = trickle[1:] or trickle
    raise AssertionError(f"the connection was still open after {limit} s")


def log_lines_after(server: ServerProcess, mark: int, pattern: str, timeout: float = 10) -> list[str]:
    """The server's log lines after ``mark`` characters that match ``pattern`` (waiting for one)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [line for line in server.output()[mark:].splitlines() if re.search(pattern, line)]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


# -- Host (DNS rebinding) --------------------------------------------------------------------------


def test_a_foreign_host_is_refused_on_every_path_even_with_the_key(keyed_server):
    port = keyed_server.port
    for method, path in (("GET", "/"), ("GET", "/health"), ("GET", "/v1/models"), ("GET", "/openapi.json")):
        for host in (f"rebound.example:{port}", "rebound.example", f"localhost.rebound.example:{port}"):
            status, _, raw = ask(port, method, path, host=host, headers=AUTH)
            assert status == 403, (path, host, raw[:200])
            error = error_of(raw)
            assert error["code"] == "host_not_allowed" and "--allow-host" in error["message"], error
        assert ask(port, method, path, headers=AUTH)[0] == 200, path  # the same request by its address
    body = json.dumps({"model": "tiny-gpt2", "prompt": "hi", "max_tokens": 1}).encode()
    status, _, raw = ask(port, "POST", "/v1/completions", host="rebound.example", headers=AUTH, body=body)
    assert status == 403 and error_of(raw)["code"] == "host_not_allowed"


def test_loopback_names_with_or_without_a_port_are_served(keyed_server):
    port = keyed_server.port
    for host in ("localhost", f"localhost:{port}", "LocalHost.", "127.0.0.1", f"127.0.0.5:{port}", f"[::1]:{port}"):
        assert ask(port, "GET", "/health", host=host)[0] == 200, host
    assert ask(port, "GET", "/health", host=f"chat.localhost:{port}")[0] == 200  # *.localhost is loopback too
    # HTTP/1.0 without Host: no browser sends that, so it cannot be a rebound page.
    assert exchange(port, b"GET /health HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.1 200")


def test_allow_host_serves_one_more_name(guarded_server):
    port = guarded_server.port
    for host in ("glmrepl.test", f"GLMREPL.test:{port}"):
        assert ask(port, "GET", "/health", host=host)[0] == 200, host
    for host in ("other.test", "glmrepl.test.rebound.example", "x.glmrepl.test"):
        assert ask(port, "GET", "/health", host=host)[0] == 403, host


def test_the_host_rule_of_a_public_address():
    from glmrepl.server.middleware import HostRule

    public = HostRule("0.0.0.0", allowed=("api.example.org",))
    for host in ("192.0.2.7:8000", "[2001:db8::1]:8000", "127.0.0.1", "api.example.org", socket.gethostname()):
        assert public.allows(host), host  # an address cannot be re-pointed; the names are the server's own
    assert not public.allows("rebound.example") and not public.allows("api.example.org.rebound.example")
    loopback = HostRule("127.0.0.1")
    assert not loopback.allows("192.0.2.7:8000") and not loopback.allows(socket.gethostname() + ".rebound.example")
    assert HostRule("gpu-box.lan").allows("GPU-BOX.lan:8000")


# -- the access log --------------------------------------------------------------------------------


def test_control_characters_in_a_path_reach_the_log_escaped(keyed_server):
    mark = len(keyed_server.output())
    status, _, raw = ask(keyed_server.port, "GET", ANSI_AND_FORGERY, headers=AUTH)
    assert status == 404 and "\x1b" not in error_of(raw)["message"]  # the answer names the path escaped too
    lines = log_lines_after(keyed_server, mark, r" 404 ")
    log = keyed_server.output()[mark:]
    for character in ("\x1b", "\x07", "\r", "\u2028", "\u202e", "\x9b"):
        assert character not in log, repr(character)
    assert not re.search(r"^POST /v1/forged", log, re.M)  # no forged line
    assert len(lines) == 1 and lines[0].startswith(r"GET /\x1b[2J\x1b]0;pwned\x07"), lines
    assert r"\r\nPOST /v1/forged 200 1 tokens 0.001s\u2028\u202e\x9b 404 " in lines[0]


def test_an_unexpected_error_is_one_escaped_line_and_a_json_500(caplog):
    """Any exception a route raises: a 500 in the error shape, one log line, no traceback anywhere."""
    import logging

    from serving import InProcessServer

    from glmrepl.server.app import create_app
    from glmrepl.server.state import ServerState

    app = create_app(ServerState(backend=None))

    async def explode(rest: str):
        raise RuntimeError(f"bad {rest}")

    app.add_api_route("/explode/{rest}", explode)
    uvicorn_records: list[logging.LogRecord] = []
    collector = logging.Handler()
    collector.emit = uvicorn_records.append  # type: ignore[method-assign]
    logging.getLogger("uvicorn.error").addHandler(collector)
    try:
        with caplog.at_level(logging.ERROR, logger="glmrepl.server"), InProcessServer(app) as server:
            status, _, raw = ask(server.port, "GET", "/explode/%1b%5d0;pwned%07")
    finally:
        logging.getLogger("uvicorn.error").removeHandler(collector)
    assert status == 500 and error_of(raw)["message"] == "internal error: RuntimeError: bad \\x1b]0;pwned\\x07"
    lines = [record.getMessage() for record in caplog.records if record.name == "glmrepl.server"]
    assert lines == [r"GET /explode/\x1b]0;pwned\x07 failed: RuntimeError: bad \x1b]0;pwned\x07"]
    assert not [record for record in uvicorn_records if record.exc_info], "uvicorn logged a traceback"


# -- idle connections -------------------------------------------------------------------------------


def test_idle_and_trickling_connections_are_closed_within_the_idle_timeout(guarded_server):
    port = guarded_server.port
    with socket.create_connection(("127.0.0.1", port)) as silent:
        assert IDLE_TIMEOUT * 0.8 < seconds_until_closed(silent) < IDLE_TIMEOUT + 4
    # A header a byte at a time (slowloris) gets no more time than silence.
    with socket.create_connection(("127.0.0.1", port)) as trickling:
        trickling.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        assert seconds_until_closed(trickling, trickle=b"X-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa") < IDLE_TIMEOUT + 4
    # After an answer, a kept-alive connection that asks nothing more is closed as well.
    with socket.create_connection(("127.0.0.1", port)) as kept:
        kept.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert kept.recv(65536).startswith(b"HTTP/1.1 200")
        assert seconds_until_closed(kept) < IDLE_TIMEOUT + 4
    assert ask(port, "GET", "/health")[0] == 200


# -- HTTP details ----------------------------------------------------------------------------------


def test_the_bearer_scheme_is_case_insensitive(keyed_server):
    port = keyed_server.port
    for scheme in ("Bearer", "bearer", "BEARER"):
        assert ask(port, "GET", "/v1/models", headers={"Authorization": f"{scheme} {KEY}"})[0] == 200, scheme
    for value in (f"Basic {KEY}", KEY, f"Bearer {KEY}x", "Bearer"):
        assert ask(port, "GET", "/v1/models", headers={"Authorization": value})[0] == 401, value


def test_a_405_names_the_allowed_methods(keyed_server):
    port = keyed_server.port
    for method, path, allowed in (
        ("DELETE", "/", {"GET", "HEAD", "POST"}),  # the chat page and ChatGLM's api.py share the path
        ("GET", "/v1/chat/completions", {"POST"}),
        ("PUT", "/health", {"GET", "HEAD"}),
    ):
        status, headers, raw = ask(port, method, path, headers=AUTH)
        assert status == 405 and error_of(raw)["code"] == "method_not_allowed", (method, path)
        assert set(headers.get("allow", "").replace(" ", "").split(",")) == allowed, (path, headers)


def test_head_answers_like_get_without_a_body(keyed_server):
    port = keyed_server.port
    for path in ("/", "/health"):
        got, get_headers, body = ask(port, "GET", path)
        raw = exchange(port, f"HEAD {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        head, _, rest = raw.partition(b"\r\n\r\n")
        assert got == 200 and head.startswith(b"HTTP/1.1 200") and rest == b"", (path, raw[:300])
        headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:])
        assert headers["content-type"] == get_headers["content-type"], path
        if path == "/":
            assert int(headers["content-length"]) == len(body)


def test_the_openapi_document_says_400_in_the_error_shape_where_422_was(keyed_server):
    port = keyed_server.port
    status, _, raw = ask(port, "GET", "/openapi.json", headers=AUTH)
    assert status == 200
    document = json.loads(raw)
    operations = [op for path in document["paths"].values() for op in path.values()]
    assert operations and not [op for op in operations if "422" in op["responses"]]
    assert "HTTPValidationError" not in raw.decode()
    chat = document["paths"]["/v1/chat/completions"]["post"]["responses"]["400"]
    reference = chat["content"]["application/json"]["schema"]["$ref"]
    schema = document["components"]["schemas"][reference.rsplit("/", 1)[1]]
    fields = schema["properties"]["error"]["properties"]
    assert set(fields) == {"message", "type", "param", "code"} and schema["required"] == ["error"]
    # The document describes what the server does answer.
    status, _, raw = ask(port, "POST", "/v1/chat/completions", headers=AUTH, body=b'{"model": 1}')
    assert status == 400 and set(json.loads(raw)["error"]) == set(fields)


def test_the_openapi_document_asks_for_the_key_where_the_server_does(keyed_server):
    document = json.loads(ask(keyed_server.port, "GET", "/openapi.json", headers=AUTH)[2])
    (scheme,) = document["components"]["securitySchemes"]
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            needed = operation["security"] == [{scheme: []}]
            assert needed == ("401" in operation["responses"]), (method, path)
            assert ask(keyed_server.port, method.upper(), path)[0] != 401 or needed, (method, path)
    assert document["paths"]["/health"]["get"]["security"] == [] and document["paths"]["/"]["get"]["security"] == []


def test_a_chunked_body_over_the_limit_is_413_request_too_large(keyed_server):
    port = keyed_server.port
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        # No Content-Length: the limit can only be found while the body is read.
        connection.request(
            "POST",
            "/v1/chat/completions",
            body=(b" " * 65536 for _ in range(5 * 16)),  # 5 MiB, over the 4 MiB limit
            headers={**AUTH, "Content-Type": "application/json"},
            encode_chunked=True,
        )
        response = connection.getresponse()
        status, body = response.status, response.read()
    finally:
        connection.close()
    assert status == 413 and error_of(body)["code"] == "request_too_large"
    assert "larger than" in error_of(body)["message"]
    assert ask(port, "GET", "/v1/models", headers=AUTH)[0] == 200


@pytest.mark.parametrize("media", ["application/x-www-form-urlencoded", "text/plain", None])
def test_a_json_body_sent_without_its_content_type_is_told_the_header(keyed_server, media):
    """curl -d sends a form's type; the header is required, not guessed (a page on another site
    can send forms and plain text to a local server without asking, but not JSON)."""
    body = json.dumps({"model": "x", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
    connection = http.client.HTTPConnection("127.0.0.1", keyed_server.port, timeout=60)
    try:
        headers = {**AUTH, **({"Content-Type": media} if media else {})}
        connection.request("POST", "/v1/chat/completions", body=body.encode(), headers=headers)
        response = connection.getresponse()
        status, raw = response.status, response.read()
    finally:
        connection.close()
    assert status == 400, raw
    message = error_of(raw)["message"]
    assert "'Content-Type: application/json'" in message and (media or "none") in message


# -- starting up -----------------------------------------------------------------------------------


def _environment() -> dict:
    import os

    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    environment.pop("GLMREPL_API_KEY", None)
    return environment


def test_a_taken_port_is_one_line_without_the_start_line(gpt2_checkpoint):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "glmrepl", "serve", str(gpt2_checkpoint), "--device", "cpu", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=240,
            env=_environment(),
        )
    assert result.returncode != 0 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(port) in lines[0], result.stderr
    assert "in use" in lines[0]


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
def test_an_ipv6_loopback_host_in_brackets_binds_and_is_shown_in_brackets(gpt2_checkpoint, tmp_path):
    server = ServerProcess([str(gpt2_checkpoint), "--device", "cpu", "--host", "[::1]"], tmp_path / "v6.log")
    try:
        deadline = time.monotonic() + 240
        while True:
            assert server.process.poll() is None, server.output()
            try:
                if ask(server.port, "GET", "/health", address="::1", host=f"[::1]:{server.port}")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, server.output()
            time.sleep(0.2)
        assert f"on http://[::1]:{server.port} " in server.output()
    finally:
        server.stop()
