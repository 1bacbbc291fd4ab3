"""RemoteBackend against a real HTTP server on 127.0.0.1 (tests/openai_stub.py): streaming,
cancelling, usage, what is sent, and every failure as one line that leaves the backend usable."""

from __future__ import annotations

import dataclasses
import json
import re
import socket
import threading
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from openai_stub import Canned, StubServer
from support import request

from glmrepl.engine.contract import record_reply
from glmrepl.engine.conversation.chat import ChatSession
from glmrepl.engine.errors import GlmreplError
from glmrepl.engine.remote.backend import RemoteBackend, normalize_url
from glmrepl.engine.remote.errors import RemoteError
from glmrepl.engine.settings import Settings
from glmrepl.repl.app import App

CHAT = "/v1/chat/completions"


@pytest.fixture
def stub():
    with StubServer() as server:
        yield server


def conversation(text: str = "hi") -> ChatSession:
    session = ChatSession("be brief")
    session.add_user(text)
    return session


def connected(stub: StubServer, **kwargs) -> RemoteBackend:
    backend = RemoteBackend(stub.url, **kwargs)
    job = backend.select_model(None)
    assert job.wait(30) and job.error is None
    return backend


def test_urls_default_to_the_v1_api():
    assert normalize_url("127.0.0.1:8000") == "http://127.0.0.1:8000/v1"
    assert normalize_url("http://gpubox:8000/") == "http://gpubox:8000/v1"
    assert normalize_url("http://127.0.0.1:11434/v1") == "http://127.0.0.1:11434/v1"
    assert normalize_url("https://host/api/v1/") == "https://host/api/v1"
    for bad in ("ftp://host", "http://", "http://host:port", "not a url", "http://gpu box:8000"):
        with pytest.raises(ValueError):
            normalize_url(bad)


def test_a_reply_streams_records_and_sends_only_what_the_api_has(stub):
    backend = connected(stub)
    session = conversation()
    settings = Settings(
        {"temperature": 0.5, "top_p": 0.8, "top_k": 7, "repetition_penalty": 1.3, "seed": 11, "max_new_tokens": 30}
    )
    reply = backend.generate(request(session, settings))
    assert list(reply) == ["Hello", " there", "!"]
    assert record_reply(session, reply) == "Hello there!"
    assert session.messages[-1].content == "Hello there!" and not session.messages[-1].cut
    assert reply.finish_reason == "stop"
    sent = stub.chat_requests()[-1]
    assert sent.body["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert sent.body["model"] == "stub-model" and sent.body["stream"] is True
    assert {k: sent.body[k] for k in ("max_tokens", "temperature", "top_p", "seed")} == {
        "max_tokens": 30,
        "temperature": 0.5,
        "top_p": 0.8,
        "seed": 11,
    }
    assert "top_k" not in sent.body and "repetition_penalty" not in sent.body
    assert "authorization" not in sent.headers  # no key given: none sent
    assert backend.setting_note("top_k") and backend.setting_note("temperature") is None


def test_greedy_settings_send_temperature_zero_and_a_key_goes_as_bearer(stub):
    backend = connected(stub, api_key="sekrit")
    list(backend.generate(request(conversation(), Settings({"do_sample": False, "temperature": 0.9}))))
    sent = stub.chat_requests()[-1]
    assert sent.body["temperature"] == 0 and "top_p" not in sent.body
    assert sent.headers["authorization"] == "Bearer sekrit"
    assert all(entry.headers.get("authorization") == "Bearer sekrit" for entry in stub.log)


def test_usage_from_the_server_and_client_side_timing(stub):
    stub.delay_s = 0.05
    backend = connected(stub)
    session = conversation()
    reply = backend.generate(request(session, Settings()))
    list(reply)
    stats = reply.stats
    assert stats.usage_from_server and (stats.prompt_tokens, stats.new_tokens) == (7, 3)
    assert stats.first_token_s >= 0.05 and stats.total_s >= stats.first_token_s + 0.09
    assert 0 < stats.decode_tokens_per_s < 40  # 2 tokens over ~0.1 s, measured here
    record_reply(session, reply)
    assert backend.context_usage(session) == (10, None)  # the server's count for the conversation
    session.add_user("more")
    assert backend.context_usage(session) is None  # stale once the conversation changed


def test_without_usage_tokens_are_counted_as_chunks(stub):
    stub.usage = False
    backend = connected(stub)
    reply = backend.generate(request(conversation(), Settings()))
    list(reply)
    assert not reply.stats.usage_from_server
    assert reply.stats.new_tokens == 3 and reply.stats.prompt_tokens is None


def test_a_server_that_rejects_stream_options_is_asked_again_without_them(stub):
    stub.reject_stream_options = True
    backend = connected(stub)
    for _ in range(2):
        assert "".join(backend.generate(request(conversation(), Settings()))) == "Hello there!"
    bodies = [entry.body for entry in stub.chat_requests()]
    assert ["stream_options" in body for body in bodies] == [True, False, False]  # remembered after one refusal


def test_closing_a_reply_closes_the_stream_at_once_and_keeps_the_part(stub):
    stub.endless, stub.delay_s = True, 0.02
    backend = connected(stub)
    session = conversation()
    reply = backend.generate(request(session, Settings()))
    deltas = iter(reply)
    assert [next(deltas) for _ in range(4)] == ["Hello", " there", "!", "Hello"]
    reply.close()
    assert stub.disconnected.wait(5), "the server kept writing to a closed stream"
    assert reply.finish_reason == "cancelled" and reply.stats.stop_reason == "cancelled"
    record_reply(session, reply)
    assert session.messages[-1].cut and session.messages[-1].content == "Hello there!Hello"


def test_cancel_from_another_thread_ends_a_blocked_read(stub):
    stub.endless, stub.delay_s = True, 0.5
    backend = connected(stub)
    reply = backend.generate(request(conversation(), Settings()))
    threading.Timer(0.8, reply.cancel).start()
    started = time.monotonic()
    received = list(reply)  # blocks in the socket read between chunks until cancel closes it
    assert time.monotonic() - started < 1.3
    assert 1 <= len(received) <= 2 and reply.finish_reason == "cancelled"
    assert stub.disconnected.wait(5)


def test_a_connection_lost_mid_reply_is_one_line_and_the_next_reply_works(stub):
    stub.drop_after = 2
    backend = connected(stub)
    reply = backend.generate(request(conversation(), Settings()))
    received = []
    with pytest.raises(
        RemoteError, match=r"^the connection to http://127\.0\.0\.1:\d+/v1 was lost mid-reply \("
    ) as error:
        for delta in reply:
            received.append(delta)
    assert received == ["Hello", " there"] and "\n" not in str(error.value)
    stub.drop_after = None
    assert "".join(backend.generate(request(conversation(), Settings()))) == "Hello there!"


def _http_date(seconds_from_now: int) -> str:
    return format_datetime(datetime.now(UTC) + timedelta(seconds=seconds_from_now), usegmt=True)


AN_HOUR_AHEAD = "an HTTP date an hour from when the test runs"  # the suite may run long after collection


@pytest.mark.parametrize(
    "answer, api_key, expected",
    [
        (
            Canned(401, {"error": {"message": "Invalid API key"}}),
            None,
            r"needs an API key \(401\): pass --api-key KEY or set GLMREPL_API_KEY$",
        ),
        (
            Canned(401, {"error": {"message": "Invalid API key"}}),
            "wrong",
            r"refused the API key \(401: Invalid API key\): check --api-key or \$GLMREPL_API_KEY$",
        ),
        (
            Canned(404, {"error": {"message": "The model `stub-model` does not exist.", "code": "model_not_found"}}),
            None,
            r"^the server has no model 'stub-model' \(404: The model `stub-model` does not exist\.\): /model lists its models$",
        ),
        (
            Canned(429, {"error": {"message": "Rate limit reached"}}, {"Retry-After": "7"}),
            None,
            r"is busy \(429: Rate limit reached\): retry in 7 s$",
        ),
        (
            Canned(503, {"detail": "queue full"}, {"Retry-After": AN_HOUR_AHEAD}),
            None,
            r"is busy \(503: queue full\): retry in (5\d|60) min$",
        ),  # an HTTP date an hour ahead (made when the test runs)
        (Canned(503, ""), None, r"is busy \(503\): retry shortly$"),
        (
            Canned(404, "<!doctype html><title>Not Found</title>"),
            None,
            r"is not an OpenAI-compatible API: it answered 404 with an HTML page",
        ),
        (Canned(200, "<html><body>my blog</body></html>"), None, r"did not stream the reply: .* with an HTML page$"),
        (
            Canned(
                400,
                {
                    "error": {
                        "message": "This model's maximum context length is 2048 tokens. However, your request has 2100 input tokens.",
                        "code": "context_length_exceeded",
                    }
                },
            ),
            None,
            r"refused the conversation: This model's maximum context length is 2048 tokens\. However, your request "
            r"has 2100 input tokens\. \(/clear or /undo makes room\)$",
        ),
        (Canned(500, {"detail": "CUDA out of memory"}), None, r"answered 500: CUDA out of memory$"),
    ],
)
def test_http_failures_are_one_line_and_the_next_message_retries(stub, answer, api_key, expected):
    backend = connected(stub, api_key=api_key)
    if getattr(answer, "headers", None) and answer.headers.get("Retry-After") == AN_HOUR_AHEAD:
        answer = dataclasses.replace(answer, headers={"Retry-After": _http_date(3600)})
    stub.queue(CHAT, answer)
    session = conversation()
    with pytest.raises(RemoteError, match=expected) as error:
        backend.generate(request(session, Settings()))
    assert "\n" not in str(error.value) and "Traceback" not in str(error.value)
    assert "".join(backend.generate(request(session, Settings()))) == "Hello there!"  # the next one goes through


def sent_max_tokens(stub: StubServer) -> list:
    return [entry.body.get("max_tokens", "none") for entry in stub.chat_requests()]


@pytest.mark.parametrize("words", ["openai", "vllm"])
def test_a_reply_too_long_for_the_context_is_asked_again_with_the_room_the_server_says_is_left(stub, words):
    stub.context_length, stub.prompt_tokens, stub.refusal_words, stub.finish_reason = 100, 30, words, "length"
    backend = connected(stub)
    reply = backend.generate(request(conversation(), Settings({"max_new_tokens": 512})))
    assert "".join(reply) == "Hello there!"
    assert sent_max_tokens(stub) == [512, 70]
    assert (reply.max_new_tokens, reply.requested_max_new_tokens) == (70, 512)
    assert reply.hit_context_end  # stopped for length within the room it was given: the context is full


def test_a_refusal_without_numbers_is_asked_again_without_max_tokens(stub):
    stub.context_length, stub.prompt_tokens, stub.refusal_words = 100, 30, "bare"
    backend = connected(stub)
    assert "".join(backend.generate(request(conversation(), Settings({"max_new_tokens": 512})))) == "Hello there!"
    assert sent_max_tokens(stub) == [512, "none"]  # the server picks the reply's length itself


def test_the_context_in_the_model_card_caps_max_tokens(stub):
    stub.card = {"max_model_len": 100}
    stub.context_length, stub.prompt_tokens = 100, 30
    backend = connected(stub)
    assert backend.status().context_length == 100
    for max_new_tokens in (512, 50):
        assert "".join(backend.generate(request(conversation(), Settings({"max_new_tokens": max_new_tokens}))))
    assert sent_max_tokens(stub) == [100, 70, 50]  # never more than the context; a setting that fits as it is


@pytest.mark.parametrize("words, requests", [("openai", 1), ("vllm", 1), ("llama", 1), ("bare", 2)])
def test_a_prompt_longer_than_the_context_is_one_line(stub, words, requests):
    stub.context_length, stub.prompt_tokens, stub.refusal_words = 100, 120, words
    backend = connected(stub)
    with pytest.raises(RemoteError, match=r"^the server refused the conversation: .*\(/clear or /undo makes room\)$"):
        backend.generate(request(conversation(), Settings({"max_new_tokens": 512})))
    assert len(stub.chat_requests()) == requests  # asked again only when the server did not say the prompt's size


@pytest.mark.parametrize(
    "answer, expected",
    [
        (
            Canned(200, "<html><body>router login</body></html>"),
            r"is not an OpenAI-compatible API: GET /models answered with an HTML page",
        ),
        (Canned(404, {"detail": "Not Found"}), r"is not an OpenAI-compatible API \(404 on /v1/models\)"),
        (Canned(200, {"models": ["x"]}), r"GET /models answered with application/json, not a model list"),
    ],
)
def test_a_server_that_is_not_openai_compatible_says_so(stub, answer, expected):
    backend = RemoteBackend(stub.url)
    stub.queue("/v1/models", answer)
    job = backend.select_model(None)
    job.wait(30)
    assert isinstance(job.error, RemoteError)
    assert re.search(expected, str(job.error)), str(job.error)


def test_an_unreachable_server_is_one_line_and_a_later_message_connects(stub):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    down = RemoteBackend(f"http://127.0.0.1:{port}")
    job = down.select_model(None)
    job.wait(30)
    assert str(job.error) == (
        f"cannot reach the server at http://127.0.0.1:{port}/v1 (connection refused): "
        "is it running? (a message tries again)"
    )
    assert down.status().name == "no model chosen yet"
    job = down.select_model("org/wanted")
    job.wait(30)
    assert str(job.error).startswith("cannot reach") and down.status().name == "org/wanted"  # asked for later
    up = RemoteBackend(stub.url)  # a message with no model chosen yet asks the server for its first one
    assert up.status().name == "no model chosen yet"
    assert "".join(up.generate(request(conversation(), Settings()))) == "Hello there!"
    assert up.status().name == "stub-model"


def test_choosing_models_by_id_or_folder_name_and_a_wrong_name_keeps_the_current(stub):
    stub.models = ["/srv/models/tiny-qwen", "org/other", "qwen2.5:latest", "llama3:8b", "llama3:70b"]
    backend = connected(stub)
    assert backend.model == "/srv/models/tiny-qwen" and backend.status().name == "tiny-qwen"
    assert backend.status().placement.reason == "5 models on the server: /model lists them"
    job = backend.select_model("org/other")
    job.wait(30)
    assert job.error is None and backend.model == "org/other"
    job = backend.select_model("tiny-qwen")
    job.wait(30)
    assert job.error is None and backend.model == "/srv/models/tiny-qwen"
    job = backend.select_model("qwen2.5")
    job.wait(30)
    assert job.error is None and backend.model == "qwen2.5:latest"
    job = backend.select_model("llama3")  # two tags: ambiguous
    job.wait(30)
    assert str(job.error).startswith("no model 'llama3'") and backend.model == "qwen2.5:latest"
    job = backend.select_model("tiny-qwen")
    job.wait(30)
    serial = backend.status().serial
    job = backend.select_model("nope")
    job.wait(30)
    assert str(job.error).startswith(
        "no model 'nope' on the server at "
    ) and "(it serves: /srv/models/tiny-qwen, org/other, qwen2.5:latest," in str(job.error)
    assert backend.model == "/srv/models/tiny-qwen" and backend.status().serial == serial


def test_the_repl_on_a_server(stub):
    from support import drive_repl

    app = App(RemoteBackend(stub.url), Settings({"stats": True}))
    app.start_load(None).wait(30)
    out = drive_repl(app, "hello\n/set top_k 5\n/device\n/quantize 4\n/next\n/model\n/stats\n/retry\n/history\n")
    assert "Hello there!" in out
    assert "top_k = 5 (not sent to a remote server: the OpenAI chat API has no field for it)" in out
    for command in ("/device", "/quantize"):
        assert f"{command} is not available on a remote server" in out
    assert f"/next is not available: the server at {stub.url} returns no top_logprobs" in out
    assert f"Models on {stub.url} (/model NAME picks one)" in out and "*stub-model" in out
    assert "3 tokens · first token" in out and "prompt 7 tokens · stopped: end · counts from the server" in out
    assert out.count("user: hello") == 1 and out.count("assistant: Hello there!") == 1  # /retry replaced the reply
    assert [bool(entry.body.get("stream")) for entry in stub.chat_requests()] == [True, False, True]  # /next asked once


def test_next_tokens_from_a_server_that_returns_top_logprobs(stub):
    import math

    stub.top_logprobs = [("Hello", math.log(0.5)), ("Hi", math.log(0.25)), ("Hey", math.log(0.125))]
    backend = connected(stub)
    assert backend.next_tokens(conversation(), 2) == [
        ("Hello", "-", pytest.approx(0.5)),
        ("Hi", "-", pytest.approx(0.25)),
    ]
    sent = stub.chat_requests()[-1].body
    assert (sent["max_tokens"], sent["logprobs"], sent["top_logprobs"], sent.get("stream")) == (1, True, 2, None)
    stub.queue(CHAT, Canned(400, {"error": {"message": "logprobs is not supported"}}))
    with pytest.raises(
        RemoteError,
        match=r"^/next is not available: the server at .* returns no top_logprobs \(400: logprobs is not supported\)$",
    ):
        backend.next_tokens(conversation(), 2)
    with pytest.raises(GlmreplError, match="the conversation is empty"):
        backend.next_tokens(ChatSession(), 2)


def test_a_conversation_saved_with_a_local_folder_loads_on_the_server_serving_that_name(stub, tmp_path):
    from support import drive_repl

    app = App(RemoteBackend(stub.url), Settings())
    app.start_load(None).wait(30)
    saved = tmp_path / "chat.json"
    saved.write_text(json.dumps({"model": "/models/stub-model", "messages": [{"role": "user", "content": "hi"}]}))
    out = drive_repl(app, f"/load {saved}\n")
    assert "loaded 1 turn from" in out and "error" not in out
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"model": "/models/elsewhere", "messages": [{"role": "user", "content": "yo"}]}))
    out = drive_repl(app, f"/load {other}\n")
    assert "loaded 1 turn from" in out and "error" not in out  # a local folder is not looked for on the server
    assert "it was saved with /models/elsewhere; the server's model is stub-model (/model NAME picks one)" in out


def test_connect_sends_the_first_of_the_keys_the_environment_holds_for_a_server(monkeypatch):
    import argparse

    from glmrepl.cli.main import LOCAL_ONLY_FLAGS, build_backend

    args = argparse.Namespace(connect="http://127.0.0.1:8000", api_key=None, **dict.fromkeys(LOCAL_ONLY_FLAGS))
    monkeypatch.setenv("GLMREPL_API_KEY", "first-key, second-key")  # as `glmrepl serve` takes several
    assert build_backend(args).api_key == "first-key"
    monkeypatch.setenv("GLMREPL_API_KEY", "")
    assert build_backend(args).api_key is None
    assert build_backend(argparse.Namespace(**{**vars(args), "api_key": "given,key"})).api_key == "given,key"
