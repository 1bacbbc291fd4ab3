"""A small OpenAI-style chat server on 127.0.0.1 whose answers a test scripts.

Real sockets and real HTTP/1.1 (chunked server-sent events, as uvicorn sends
them), so the client library runs its whole path. By default it lists
``models`` and streams ``deltas`` as chat chunks; a test can instead queue
canned answers per path (401, 429 with Retry-After, an HTML page...), drop
the connection after some chunks, reject ``stream_options``, or stream
without end, or refuse requests that do not fit a small context in the words
of OpenAI, vLLM or llama-server; the log keeps every request, and
``disconnected`` is set when the client closed a stream while the server was
still writing.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# How servers refuse a max_tokens that does not fit beside the prompt: the error object of the 400.
TOO_LONG_REPLY = {
    "openai": lambda limit, prompt, asked: {  # OpenAI, older vLLM, glmrepl
        "message": f"This model's maximum context length is {limit} tokens. However, you requested "
        f"{prompt + asked} tokens ({prompt} in the messages, {asked} in the completion). "
        "Please reduce the length of the messages or completion.",
        "type": "invalid_request_error",
        "code": "context_length_exceeded",
    },
    "vllm": lambda limit, prompt, asked: {
        "message": f"'max_tokens' or 'max_completion_tokens' is too large: {asked}. This model's maximum "
        f"context length is {limit} tokens and your request has {prompt} input tokens ({asked} > {limit} - {prompt}).",
        "type": "BadRequestError",
        "code": 400,
    },
    "bare": lambda limit, prompt, asked: {
        "message": "the request does not fit the context",
        "type": "invalid_request_error",
    },
}
# ... and a prompt that alone is longer than the context.
TOO_LONG_PROMPT = {
    "openai": lambda limit, prompt: {
        "message": f"This model's maximum context length is {limit} tokens. However, you requested "
        f"{prompt} tokens in the messages. Please reduce the length of the messages or completion.",
        "type": "invalid_request_error",
        "code": "context_length_exceeded",
    },
    "vllm": lambda limit, prompt: {
        "message": f"This model's maximum context length is {limit} tokens. However, your request has "
        f"{prompt} input tokens. Please reduce the length of the input messages.",
        "type": "BadRequestError",
        "code": 400,
    },
    "llama": lambda limit, prompt: {
        "message": "the request exceeds the available context size, try increasing it",
        "type": "exceed_context_size_error",
        "code": 400,
        "n_prompt_tokens": prompt,
        "n_ctx": limit,
    },
    "bare": lambda limit, prompt: {"message": "the request does not fit the context", "type": "invalid_request_error"},
}


@dataclass
class Canned:
    status: int
    body: str | dict = ""
    headers: dict = field(default_factory=dict)

    def encoded(self) -> tuple[bytes, str]:
        if isinstance(self.body, dict):
            return json.dumps(self.body).encode(), "application/json"
        return self.body.encode(), self.headers.get("Content-Type", "text/html; charset=utf-8")


@dataclass
class Logged:
    method: str
    path: str
    headers: dict
    body: dict | None


@dataclass
class StubServer:
    models: list[str] = field(default_factory=lambda: ["stub-model"])
    deltas: list[str] = field(default_factory=lambda: ["Hello", " there", "!"])
    delay_s: float = 0.0  # between chunks
    endless: bool = False  # repeat the deltas until the client goes away
    drop_after: int | None = None  # close the socket after this many content chunks
    usage: bool = True  # send usage when the request asks for it
    finish_reason: str = "stop"
    reject_stream_options: bool = False  # answer 400 to requests carrying stream_options
    top_logprobs: list[tuple[str, float]] = field(default_factory=list)  # for non-streamed answers asking logprobs
    prompt_tokens: int = 7  # the stub's count for any conversation
    context_length: int | None = None  # refuse requests whose prompt and max_tokens do not fit in it
    refusal_words: str = "openai"  # a key of TOO_LONG_REPLY / TOO_LONG_PROMPT
    card: dict = field(default_factory=dict)  # more fields for every /v1/models entry (max_model_len...)
    canned: dict[str, list[Canned]] = field(default_factory=dict)  # path -> answers, used first
    log: list[Logged] = field(default_factory=list)

    def __post_init__(self):
        self.disconnected = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def queue(self, path: str, *answers: Canned) -> None:
        self.canned.setdefault(path, []).extend(answers)

    def chat_requests(self) -> list[Logged]:
        return [entry for entry in self.log if entry.path.endswith("/chat/completions")]

    def __enter__(self) -> StubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler_for(stub: StubServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep test output clean
            pass

        def do_GET(self):
            self._handle(None)

        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            self._handle(json.loads(raw) if raw else None)

        def _handle(self, body):
            stub.log.append(Logged(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body))
            waiting = stub.canned.get(self.path)
            if waiting:
                return self._send(waiting.pop(0))
            if self.path == "/v1/models" and self.command == "GET":
                data = [
                    {"id": name, "object": "model", "created": 0, "owned_by": "stub", **stub.card}
                    for name in stub.models
                ]
                return self._send(Canned(200, {"object": "list", "data": data}))
            if self.path == "/v1/chat/completions" and self.command == "POST":
                if stub.reject_stream_options and "stream_options" in body:
                    return self._send(
                        Canned(
                            400,
                            {
                                "error": {
                                    "message": "Unrecognized request argument: stream_options",
                                    "type": "invalid_request_error",
                                }
                            },
                        )
                    )
                refusal = self._context_refusal(body)
                if refusal is not None:
                    return self._send(Canned(400, {"error": {"param": None, **refusal}}))
                if not body.get("stream"):
                    return self._send(Canned(200, self._completion(body)))
                return self._stream(body)
            return self._send(Canned(404, {"detail": "Not Found"}))

        def _send(self, canned: Canned):
            payload, content_type = canned.encoded()
            self.send_response(canned.status)
            self.send_header("Content-Type", content_type)
            for name, value in canned.headers.items():
                if name != "Content-Type":
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def _context_refusal(self, body) -> dict | None:
            limit, prompt, asked = stub.context_length, stub.prompt_tokens, body.get("max_tokens")
            if limit is None:
                return None
            if prompt >= limit:
                return TOO_LONG_PROMPT[stub.refusal_words](limit, prompt)
            refuse = TOO_LONG_REPLY.get(stub.refusal_words)  # llama-server does not: it stops at the context
            if refuse and asked is not None and prompt + asked > limit:
                return refuse(limit, prompt, asked)
            return None

        def _completion(self, body) -> dict:
            """A whole (non-streamed) answer: the first delta, with top_logprobs when scripted."""
            logprobs = None
            if body.get("logprobs") and stub.top_logprobs:
                top = [{"token": token, "logprob": logprob, "bytes": None} for token, logprob in stub.top_logprobs]
                logprobs = {"content": [{**top[0], "top_logprobs": top[: body.get("top_logprobs") or 0]}]}
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": stub.deltas[0]},
                "finish_reason": "length",
                "logprobs": logprobs,
            }
            return {
                "id": "chatcmpl-stub",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [choice],
            }

        def _stream(self, body):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                self._events(body)
            except (BrokenPipeError, ConnectionResetError):
                stub.disconnected.set()
            self.close_connection = True

        def _events(self, body):
            base = {"id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": 0, "model": body["model"]}
            self._event({**base, "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]})
            sent = 0
            while True:
                for delta in stub.deltas:
                    if stub.drop_after is not None and sent >= stub.drop_after:
                        self.connection.shutdown(2)  # gone mid-body: no final chunk, no [DONE]
                        return
                    time.sleep(stub.delay_s)
                    self._event({**base, "choices": [{"index": 0, "delta": {"content": delta}, "finish_reason": None}]})
                    sent += 1
                if not stub.endless:
                    break
            self._event({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": stub.finish_reason}]})
            if stub.usage and (body.get("stream_options") or {}).get("include_usage"):
                usage = {
                    "prompt_tokens": stub.prompt_tokens,
                    "completion_tokens": sent,
                    "total_tokens": stub.prompt_tokens + sent,
                }
                self._event({**base, "choices": [], "usage": usage})
            self._chunk(b"data: [DONE]\n\n")
            self._chunk(b"")

        def _event(self, payload: dict):
            self._chunk(b"data: " + json.dumps(payload).encode() + b"\n\n")

        def _chunk(self, data: bytes):
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

    return Handler
