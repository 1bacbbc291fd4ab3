"""`glmrepl serve` as users run it: a real server process on a free loopback port, driven by the
official `openai` client, by curl with the seed's api.py command, and by raw HTTP for bad input."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time

import pytest
from serving import ServerProcess, error_of, open_chat_stream, openai_client, request, sse_events, wait_idle

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

KEY = "test-key-7d1f"
SEED_CURL = (
    """curl -X POST http://127.0.0.1:8000 -H 'Content-Type: application/json' """
    """-d '{"prompt": "你好", "history": []}'"""
)
LONG_PROMPT = "Tell me a long story"  # greedy on the tiny chat model: runs to max_tokens (checked below)


@pytest.fixture(scope="module")
def chat_server(qwen_checkpoint, tmp_path_factory):
    server = ServerProcess(
        # One reply at a time (--no-batching): the queue tests count on a single running reply.
        [str(qwen_checkpoint), "--device", "cpu", "--temperature", "0", "--max-queue", "1", "--no-batching"],
        tmp_path_factory.mktemp("serve") / "chat.log",
    )
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def base_server(gpt2_checkpoint, tmp_path_factory):
    server = ServerProcess(
        [str(gpt2_checkpoint), "--device", "cpu", "--api-key", KEY], tmp_path_factory.mktemp("serve") / "base.log"
    )
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def chat(server, text: str, **kwargs):
    return openai_client(server).chat.completions.create(
        model="tiny-qwen2-chat", messages=[{"role": "user", "content": text}], **kwargs
    )


def test_models_and_health(chat_server):
    models = openai_client(chat_server).models.list()
    assert [m.id for m in models.data] == ["tiny-qwen2-chat"]
    health = chat_server.health()
    assert health["status"] == "ready" and health["model"] == "tiny-qwen2-chat" and health["device"] == "cpu float32"
    card = models.data[0].model_dump()  # the context under the names clients read, to fit max_tokens to it
    assert health["context_length"] and card["context_length"] == card["max_model_len"] == health["context_length"]


def test_chat_streamed_and_not_give_the_same_reply(chat_server):
    whole = chat(chat_server, "Hello there", max_tokens=12)
    assert whole.id.startswith("chatcmpl-") and whole.object == "chat.completion" and whole.model == "tiny-qwen2-chat"
    choice = whole.choices[0]
    assert choice.message.role == "assistant" and choice.message.content and choice.finish_reason in ("stop", "length")
    assert whole.usage.prompt_tokens > 3 and 0 < whole.usage.completion_tokens <= 12
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    chunks = list(chat(chat_server, "Hello there", max_tokens=12, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    # The whole reply is the stream, trailing spaces gone as the REPL keeps it.
    assert streamed.rstrip() == choice.message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_stream_chunks_have_exactly_openais_shape(chat_server):
    body = {
        "model": "tiny-qwen2-chat",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
        "stream": True,
    }
    events = sse_events(chat_server.port, "/v1/chat/completions", body)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    for chunk in chunks:
        assert set(chunk) == {"id", "object", "created", "model", "choices"}
        assert chunk["object"] == "chat.completion.chunk"
        assert set(chunk["choices"][0]) == {"index", "delta", "logprobs", "finish_reason"}
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(set(c["choices"][0]["delta"]) == {"content"} for c in chunks[1:-1])
    assert chunks[-1]["choices"][0]["delta"] == {} and chunks[-1]["choices"][0]["finish_reason"] == "length"
    with_usage = [
        json.loads(e)
        for e in sse_events(
            chat_server.port, "/v1/chat/completions", {**body, "stream_options": {"include_usage": True}}
        )[:-1]
    ]
    assert all(c["usage"] is None for c in with_usage[:-1])
    assert with_usage[-1]["choices"] == [] and with_usage[-1]["usage"]["completion_tokens"] == 4


def test_stop_strings_and_seed(chat_server):
    free = chat(chat_server, "Hello there", max_tokens=12).choices[0].message.content
    stop = free.strip()[2:4]
    cut = chat(chat_server, "Hello there", max_tokens=12, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and stop not in cut.message.content
    assert free.strip().startswith(cut.message.content.strip())
    sampled = [
        chat(chat_server, "Hello", max_tokens=8, temperature=1.0, seed=7).choices[0].message.content for _ in range(2)
    ]
    assert sampled[0] == sampled[1]  # the same seed gives the same sample


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_the_chatglm_api_py_curl_command_works_verbatim(chat_server):
    command = shlex.split(SEED_CURL.replace("127.0.0.1:8000", f"127.0.0.1:{chat_server.port}"))
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
    answer = json.loads(result.stdout)
    assert set(answer) == {"response", "history", "status", "time"}
    assert answer["status"] == 200 and answer["history"] == [["你好", answer["response"]]]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", answer["time"])
    history = [["你好", "你好👋！"]]
    follow = json.loads(
        request(
            chat_server.port,
            "POST",
            "/",
            {"prompt": "再说一遍", "history": history, "max_length": 60, "top_p": 0.5, "temperature": 0.1},
        )[2]
    )
    assert follow["history"] == [*history, ["再说一遍", follow["response"]]]
    messages = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好👋！"}]  # ChatGLM3 style
    third = json.loads(
        request(chat_server.port, "POST", "/", {"prompt": "嗯", "history": messages, "max_length": 60})[2]
    )
    assert third["history"] == [
        *messages,
        {"role": "user", "content": "嗯"},
        {"role": "assistant", "content": third["response"]},
    ]


def test_completions_continue_a_base_models_text(base_server):
    base = openai_client(base_server, KEY)
    whole = base.completions.create(model="tiny-gpt2", prompt="Once upon a time", max_tokens=6, temperature=0)
    assert whole.object == "text_completion" and whole.id.startswith("cmpl-")
    assert whole.usage.completion_tokens == 6 and whole.choices[0].finish_reason == "length"
    streamed = list(
        base.completions.create(model="tiny-gpt2", prompt="Once upon a time", max_tokens=6, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text
    assert streamed[-1].choices[0].finish_reason == "length"
    default = base.completions.create(model="tiny-gpt2", prompt="Once upon a time", temperature=0)
    assert default.usage.completion_tokens == 16  # OpenAI's default max_tokens for completions
    auth = {"Authorization": f"Bearer {KEY}"}
    for path, body in (("/v1/completions", {"model": "tiny-gpt2", "prompt": ""}), ("/", {"prompt": ""})):
        status, _, raw = request(base_server.port, "POST", path, body, auth)
        assert status == 400 and "empty" in error_of(raw)["message"], path  # nothing to continue
    status, _, raw = request(
        base_server.port, "POST", "/v1/completions", {"model": "tiny-gpt2", "prompt": "word " * 300}, auth
    )
    assert status == 400 and error_of(raw)["code"] == "context_length_exceeded" and error_of(raw)["param"] == "prompt"


def test_an_api_key_guards_every_endpoint_but_health(base_server):
    body = {"model": "tiny-gpt2", "prompt": "hi", "max_tokens": 1}
    for headers, message in (
        ({}, "didn't provide an API key"),
        ({"Authorization": "Bearer wrong"}, "Incorrect"),
        ({"Authorization": KEY}, "Incorrect"),
    ):
        status, reply_headers, raw = request(base_server.port, "POST", "/v1/completions", body, headers)
        assert status == 401 and message in error_of(raw)["message"] and reply_headers["www-authenticate"] == "Bearer"
    assert request(base_server.port, "GET", "/v1/models")[0] == 401
    assert request(base_server.port, "GET", "/health")[0] == 200
    assert request(base_server.port, "GET", "/favicon.ico")[0] == 204  # no icon: not a 404 in the log per page
    assert request(base_server.port, "POST", "/favicon.ico")[0] == 401
    with pytest.raises(openai.AuthenticationError):
        openai_client(base_server, "nope").models.list()
    assert request(base_server.port, "POST", "/v1/completions", body, {"Authorization": f"Bearer {KEY}"})[0] == 200


def test_binding_a_public_address_without_a_key_refuses_at_once(gpt2_checkpoint):
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "glmrepl", "serve", str(gpt2_checkpoint), "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**_env(), "GLMREPL_API_KEY": ""},
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "without an API key" in result.stderr
    assert time.monotonic() - started < 30  # refused before loading anything


def _env():
    import os

    from serving import ROOT

    return {**os.environ, "PYTHONPATH": str(ROOT)}


GOOD = {"model": "tiny-qwen2-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
BAD_INPUT = [
    # (name, method, path, body, status, code or param, words in the message)
    ("malformed JSON", "POST", "/v1/chat/completions", b'{"model": "tiny', 400, None, "not valid JSON"),
    ("not an object", "POST", "/v1/chat/completions", b"[1, 2]", 400, None, "JSON object"),
    ("wrong type", "POST", "/v1/chat/completions", {**GOOD, "temperature": "hot"}, 400, "temperature", "number"),
    ("messages not a list", "POST", "/v1/chat/completions", {**GOOD, "messages": "hi"}, 400, "messages", "list"),
    ("empty messages", "POST", "/v1/chat/completions", {**GOOD, "messages": []}, 400, "messages", "at least one"),
    (
        "unknown role",
        "POST",
        "/v1/chat/completions",
        {**GOOD, "messages": [{"role": "robot", "content": "x"}]},
        400,
        "messages[0].role",
        "robot",
    ),
    (
        "missing content",
        "POST",
        "/v1/chat/completions",
        {**GOOD, "messages": [{"role": "user"}]},
        400,
        "messages[0].content",
        "missing",
    ),
    ("missing model", "POST", "/v1/chat/completions", {"messages": GOOD["messages"]}, 400, "model", "missing"),
    ("unknown model", "POST", "/v1/chat/completions", {**GOOD, "model": "gpt-4"}, 404, "model_not_found", "gpt-4"),
    ("max_tokens 0", "POST", "/v1/chat/completions", {**GOOD, "max_tokens": 0}, 400, "max_tokens", "greater than"),
    ("negative max_tokens", "POST", "/v1/chat/completions", {**GOOD, "max_tokens": -5}, 400, "max_tokens", ""),
    (
        "huge max_tokens",
        "POST",
        "/v1/chat/completions",
        {**GOOD, "max_tokens": 10**9},
        400,
        "context_length_exceeded",
        "maximum context length is 512",
    ),
    (
        "prompt too long",
        "POST",
        "/v1/chat/completions",
        {**GOOD, "messages": [{"role": "user", "content": "word " * 700}]},
        400,
        "context_length_exceeded",
        "512",
    ),
    (
        "temperature out of range",
        "POST",
        "/v1/chat/completions",
        {**GOOD, "temperature": 3},
        400,
        "temperature",
        "less than or equal to 2",
    ),
    ("top_p out of range", "POST", "/v1/chat/completions", {**GOOD, "top_p": 1.5}, 400, "top_p", "1"),
    ("n > 1", "POST", "/v1/chat/completions", {**GOOD, "n": 3}, 400, "n", "not supported"),
    (
        "unsupported parameter",
        "POST",
        "/v1/chat/completions",
        {**GOOD, "functions": [{"name": "f"}]},  # the legacy spelling of tools
        400,
        "functions",
        "unsupported parameter 'functions'",
    ),
    (
        "tools on a template without them",
        "POST",
        "/v1/chat/completions",
        {**GOOD, "tools": [{"type": "function", "function": {"name": "f"}}]},
        400,
        "tools",
        "has no place for tools",
    ),
    (
        "penalty",
        "POST",
        "/v1/chat/completions",
        {**GOOD, "presence_penalty": 1.0},
        400,
        "presence_penalty",
        "not supported",
    ),
    (
        "image content",
        "POST",
        "/v1/chat/completions",
        {**GOOD, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        400,
        "messages[0].content",
        "text only",
    ),
    ("too many stops", "POST", "/v1/chat/completions", {**GOOD, "stop": list("abcde")}, 400, "stop", "at most 4"),
    (
        "oversized body",
        "POST",
        "/v1/chat/completions",
        b"{" + b" " * (5 * 2**20) + b"}",
        413,
        "request_too_large",
        "larger than",
    ),
    ("unknown route", "GET", "/v1/embeddings", None, 404, "not_found", "/v1/embeddings"),
    ("wrong method", "GET", "/v1/chat/completions", None, 405, "method_not_allowed", "GET"),
    ("api.py without prompt", "POST", "/", {"history": []}, 400, "prompt", "missing"),
    ("api.py bad history", "POST", "/", {"prompt": "x", "history": [["only one"]]}, 400, "history[0]", "pair"),
]


def test_each_bad_input_gets_its_status_and_a_good_request_follows(chat_server):
    for name, method, path, body, status, code_or_param, words in BAD_INPUT:
        got, _, raw = request(chat_server.port, method, path, body)
        assert got == status, f"{name}: {got} {raw[:300]!r}"
        error = error_of(raw)
        assert code_or_param in (None, error["code"], error["param"]), f"{name}: {error}"
        assert words in error["message"], f"{name}: {error}"
        assert request(chat_server.port, "POST", "/v1/chat/completions", GOOD)[0] == 200, name
    log = chat_server.output()
    assert re.search(r"^POST /v1/chat/completions 413 \d+\.\d{3}s$", log, re.M)
    assert re.search(r"^POST /v1/chat/completions 200 1 tokens \d+\.\d{3}s$", log, re.M)
    assert "Traceback" not in log


def _open_stream(port: int, max_tokens: int, events: int = 2) -> socket.socket:
    return open_chat_stream(port, LONG_PROMPT, max_tokens, events)


def test_a_client_that_disconnects_stops_its_generation(chat_server):
    full = chat(chat_server, LONG_PROMPT, max_tokens=300)
    assert full.choices[0].finish_reason == "length"  # this prompt really runs to the end
    before = wait_idle(chat_server)["replies"]["tokens_generated"]
    sock = _open_stream(chat_server.port, 300)
    sock.close()
    after = wait_idle(chat_server)["replies"]["tokens_generated"]
    assert 0 < after - before < 100, f"{after - before} tokens generated after the client left"
    assert chat(chat_server, "hi", max_tokens=2).usage.completion_tokens == 2  # the next one runs


def test_a_full_queue_answers_503_with_retry_after(chat_server):
    wait_idle(chat_server)
    streams = [_open_stream(chat_server.port, 300)]  # --max-queue 1: this one runs ...
    try:
        streams.append(_open_stream(chat_server.port, 300, events=1))  # ... this one waits (its role chunk comes)
        status, headers, raw = request(chat_server.port, "POST", "/v1/chat/completions", GOOD)
        assert status == 503 and int(headers["retry-after"]) >= 1
        assert error_of(raw)["code"] == "queue_full"
    finally:
        for stream in streams:
            stream.close()
    wait_idle(chat_server)
    assert request(chat_server.port, "POST", "/v1/chat/completions", GOOD)[0] == 200


def test_truncate_history_leaves_out_the_oldest_turns_and_says_how_many(chat_server):
    """What the web page sends: a conversation past the context keeps its newest turns, and the
    reply gets the room left, instead of a 400 at every send."""
    long = "tell me about the lighthouse keeper and the sea " * 30
    messages = [
        {"role": "user", "content": long},
        {"role": "assistant", "content": long},
        {"role": "user", "content": "and then?"},
    ]
    asked = {"model": "tiny-qwen2-chat", "messages": messages, "max_tokens": 64}
    refused = request(chat_server.port, "POST", "/v1/chat/completions", asked)
    assert refused[0] == 400 and error_of(refused[2])["code"] == "context_length_exceeded"
    status, _, raw = request(chat_server.port, "POST", "/v1/chat/completions", {**asked, "truncate_history": True})
    assert status == 200, raw
    usage = json.loads(raw)["usage"]
    assert usage["dropped_turns"] == 1 and usage["prompt_tokens"] + usage["completion_tokens"] <= 512
    plain = request(chat_server.port, "POST", "/v1/chat/completions", GOOD)
    assert "dropped_turns" not in json.loads(plain[2])["usage"]  # only for requests that ask for it
    bad = request(chat_server.port, "POST", "/v1/chat/completions", {**GOOD, "truncate_history": "yes"})
    assert bad[0] == 400 and error_of(bad[2])["param"] == "truncate_history"
