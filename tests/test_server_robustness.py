"""What a careless or hostile client sends `glmrepl serve`: a history that takes long to fit, a
request it abandons, long stop strings, a temperature next to 0, broken Unicode, the placeholder
model names of common clients. Each answer is the right status, and the server keeps serving."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest
from serving import error_of, request, started_server, wait_idle

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

DATA = Path(__file__).parent / "data" / "chatglm"
LONG_PROMPT = "Tell me a long story"  # greedy on the tiny chat model: runs to max_tokens
GOOD = {"model": "tiny-qwen2-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


@pytest.fixture(scope="module")
def qwen_server(qwen_checkpoint, tmp_path_factory):
    server = started_server(
        [str(qwen_checkpoint), "--device", "cpu", "--temperature", "0", "--max-queue", "1"],
        tmp_path_factory.mktemp("serve") / "qwen.log",
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def chatglm_server(tmp_path_factory):
    server = started_server(
        [str(DATA / "chatglm2-tiny"), "--device", "cpu", "--temperature", "0"],
        tmp_path_factory.mktemp("serve") / "chatglm.log",
    )
    yield server
    server.stop()


def _wait_running(server, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while server.health()["replies"]["running"] == 0:
        assert time.monotonic() < deadline, "the reply never started"
        time.sleep(0.01)


# -- 1. a request whose fitting took long froze every other client ------------


def test_a_long_chatglm_history_never_stalls_other_clients(chatglm_server):
    history = [["hello there, how are you", "fine, thank you"] for _ in range(1400)]
    body = {"prompt": "and now?", "history": history, "max_length": 64}
    assert len(json.dumps(body)) > 56_000
    answer: dict = {}

    def send():
        answer["started"] = time.monotonic()
        answer["status"], _, answer["raw"] = request(chatglm_server.port, "POST", "/", body, timeout=120)
        answer["took"] = time.monotonic() - answer["started"]

    sender = threading.Thread(target=send)
    sender.start()
    slowest = 0.0
    while sender.is_alive():
        started = time.monotonic()
        assert request(chatglm_server.port, "GET", "/health", timeout=30)[0] == 200
        slowest = max(slowest, time.monotonic() - started)
        time.sleep(0.02)
    sender.join()
    assert answer["status"] == 400, answer["raw"][:300]
    assert error_of(answer["raw"])["param"] == "max_length"
    assert slowest < 0.5, f"/health waited {slowest:.2f} s while the history was fitted"
    assert request(chatglm_server.port, "POST", "/", {"prompt": "你好", "max_length": 40})[0] == 200


# -- 2. a non-streaming request abandoned by its client ran to max_tokens ------

ABANDONED = [
    ("/v1/chat/completions", {"model": "tiny-qwen2-chat", "messages": [{"role": "user", "content": LONG_PROMPT}]}),
    ("/v1/completions", {"model": "tiny-qwen2-chat", "prompt": LONG_PROMPT}),
    ("/", {"prompt": LONG_PROMPT, "temperature": 0, "max_length": 480}),
]


@pytest.mark.parametrize("path, body", ABANDONED, ids=["chat", "completions", "chatglm-api"])
def test_a_non_streaming_client_that_leaves_stops_its_reply(qwen_server, path, body):
    if path != "/":
        body = {**body, "max_tokens": 400, "temperature": 0}
    before = wait_idle(qwen_server)["replies"]["tokens_generated"]
    status, _, raw = request(qwen_server.port, "POST", path, body)  # the whole reply, for comparison
    assert status == 200, raw[:300]
    full = wait_idle(qwen_server)["replies"]["tokens_generated"]
    whole = full - before
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", qwen_server.port), timeout=60)
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    _wait_running(qwen_server)
    sock.close()
    generated = wait_idle(qwen_server)["replies"]["tokens_generated"] - full
    assert whole > 100, "the prompt must run long for the test to mean anything"
    assert generated < whole / 2, f"{generated} of {whole} tokens generated after the client left"
    assert request(qwen_server.port, "POST", "/v1/chat/completions", GOOD)[0] == 200


# -- 5. long stop strings ---------------------------------------------------------


def test_stop_strings_are_bounded_in_length(qwen_server):
    body = {**GOOD, "stop": ["x" * 1025]}
    status, _, raw = request(qwen_server.port, "POST", "/v1/chat/completions", body)
    assert status == 400 and error_of(raw)["param"] == "stop"
    status, _, raw = request(qwen_server.port, "POST", "/v1/chat/completions", {**GOOD, "stop": ["x" * 1024] * 4})
    assert status == 200, raw[:300]


# -- 6. valid-looking input that gave 500s --------------------------------------


def test_a_temperature_next_to_zero_decodes_greedily(qwen_server):
    greedy = {**GOOD, "max_tokens": 8, "temperature": 0}
    status, _, raw = request(qwen_server.port, "POST", "/v1/chat/completions", greedy)
    assert status == 200
    for temperature in (1e-39, 1e-30, 1e-6):
        got, _, tiny = request(qwen_server.port, "POST", "/v1/chat/completions", {**greedy, "temperature": temperature})
        assert got == 200, tiny[:300]
        assert json.loads(tiny)["choices"][0]["message"] == json.loads(raw)["choices"][0]["message"]


SURROGATE = '"a\\ud800b"'  # a JSON escape of a lone UTF-16 surrogate

BROKEN_TEXT = [
    (
        "/v1/chat/completions",
        '{"model": "tiny-qwen2-chat", "messages": [{"role": "user", "content": %s}]}',
        "messages[0].content",
    ),
    (
        "/v1/chat/completions",
        '{"model": "tiny-qwen2-chat", "messages": [{"role": "user", "content": [{"type": "text", "text": %s}]}]}',
        "messages[0].content[0].text",
    ),
    ("/v1/chat/completions", '{"model": %s, "messages": [{"role": "user", "content": "hi"}]}', "model"),
    ("/v1/chat/completions", '{"model": "tiny-qwen2-chat", "messages": [], "stop": [%s]}', "stop[0]"),
    ("/v1/completions", '{"model": "tiny-qwen2-chat", "prompt": %s}', "prompt"),
    ("/", '{"prompt": %s}', "prompt"),
    ("/", '{"prompt": "hi", "history": [["q", %s]]}', "history[0][1]"),
]


@pytest.mark.parametrize("path, template, param", BROKEN_TEXT)
def test_a_lone_surrogate_is_a_400_naming_the_field(qwen_server, path, template, param):
    status, _, raw = request(qwen_server.port, "POST", path, (template % SURROGATE).encode())
    assert status == 400, raw[:300]
    error = error_of(raw)
    assert "surrogate" in error["message"]
    assert error["param"] == param
    assert request(qwen_server.port, "POST", "/v1/chat/completions", GOOD)[0] == 200
    assert "Traceback" not in qwen_server.output()


# -- 7. what real clients send ----------------------------------------------------


def test_huggingface_hub_inference_client_chats(qwen_server, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    # The suite's offline switch blocks every request of the hub's client, loopback too;
    # this one goes only to the server above.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    client = huggingface_hub.InferenceClient(base_url=qwen_server.base_url + "/v1")
    answer = client.chat_completion(messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0)
    assert answer.choices[0].message.role == "assistant"
    assert answer.model == "tiny-qwen2-chat"  # the model that answered, not the placeholder


def test_a_model_name_is_refused_unless_it_is_the_served_one_or_a_placeholder(qwen_server):
    for name in ("dummy", "TGI", "default", "tiny-qwen2-chat"):
        status, _, raw = request(qwen_server.port, "POST", "/v1/chat/completions", {**GOOD, "model": name})
        assert status == 200, (name, raw[:300])
        assert json.loads(raw)["model"] == "tiny-qwen2-chat"
    status, _, raw = request(qwen_server.port, "POST", "/v1/chat/completions", {**GOOD, "model": "gpt-4o"})
    assert status == 404 and error_of(raw)["code"] == "model_not_found"


def test_a_message_name_is_refused_rather_than_dropped(qwen_server):
    body = {**GOOD, "messages": [{"role": "user", "content": "hi", "name": "alice"}]}
    status, _, raw = request(qwen_server.port, "POST", "/v1/chat/completions", body)
    assert status == 400
    error = error_of(raw)
    assert error["param"] == "messages[0].name" and error["code"] == "unsupported_parameter"


# -- 8. what /openapi.json says a value is ------------------------------------------


@pytest.mark.parametrize(
    "change, param",
    [
        ({"max_tokens": "1"}, "max_tokens"),
        ({"seed": 1.5}, "seed"),
        ({"seed": True}, "seed"),
        ({"temperature": "0.5"}, "temperature"),
        ({"stream": "false"}, "stream"),
        ({"stream": 0}, "stream"),
    ],
)
def test_a_value_must_have_the_type_the_document_gives(qwen_server, change, param):
    status, _, raw = request(qwen_server.port, "POST", "/v1/chat/completions", {**GOOD, **change})
    assert status == 400 and error_of(raw)["param"] == param, raw[:300]


def test_an_integral_number_is_an_integer_and_an_unknown_null_is_left_out(qwen_server):
    body = {**GOOD, "max_tokens": 1.0, "seed": 7.0, "metadata": None, "stream_options": None}
    assert request(qwen_server.port, "POST", "/v1/chat/completions", body)[0] == 200
    streamed = {**GOOD, "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": None}}
    assert request(qwen_server.port, "POST", "/v1/chat/completions", streamed)[0] == 200
    status, _, raw = request(qwen_server.port, "POST", "/v1/chat/completions", {**GOOD, "metadata": {"a": "b"}})
    assert status == 400 and error_of(raw)["code"] == "unsupported_parameter"


def test_an_empty_chatglm_prompt_is_refused_whatever_the_prompt_format_adds(qwen_server):
    status, _, raw = request(qwen_server.port, "POST", "/", {"prompt": ""})
    assert status == 400
    error = error_of(raw)
    assert error["param"] == "prompt" and "empty" in error["message"]
