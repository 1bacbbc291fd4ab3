"""`glmrepl serve` keeps clients' caches apart: a request reuses a cached prompt only from requests
with its `cache_salt` and its API key, so `cached_tokens` (and the time to a first token) tells no
client what another's prompt holds. Several keys may be given, each a namespace of its own. Real
server processes on free loopback ports; replies decode alone, where `cached_tokens` is reported."""

from __future__ import annotations

import json

import pytest
from serving import ServerProcess, error_of, request, started_server

pytest.importorskip("fastapi")

KEYS = ("first-key-0b3e", "second-key-9a71")
ENV_KEYS = ("env-key-5c2d", "env-key-e48a")
MODEL = "tiny-qwen2-chat"


def start(args: list[str], log_path, env: dict | None = None) -> ServerProcess:
    return started_server([*args, "--device", "cpu", "--temperature", "0", "--no-batching"], log_path, env)


@pytest.fixture(scope="module")
def open_server(qwen_checkpoint, tmp_path_factory):
    server = start([str(qwen_checkpoint)], tmp_path_factory.mktemp("serve") / "open.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def keyed_server(qwen_checkpoint, tmp_path_factory):
    args = [str(qwen_checkpoint), "--api-key", KEYS[0], "--api-key", KEYS[1]]
    server = start(args, tmp_path_factory.mktemp("serve") / "keyed.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def env_keyed_server(qwen_checkpoint, tmp_path_factory):
    env = {"GLMREPL_API_KEY": f"{ENV_KEYS[0]}, {ENV_KEYS[1]}"}
    server = start([str(qwen_checkpoint)], tmp_path_factory.mktemp("serve") / "env.log", env)
    yield server
    server.stop()


def bearer(key: str | None) -> dict:
    return {"Authorization": f"Bearer {key}"} if key else {}


def chat(server: ServerProcess, text: str, key: str | None = None, **extra) -> tuple[int, bytes]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 2, **extra}
    status, _, raw = request(server.port, "POST", "/v1/chat/completions", body, bearer(key))
    return status, raw


def cached_tokens(server: ServerProcess, text: str, key: str | None = None, **extra) -> int:
    """The prompt tokens the reply to ``text`` took from a cache."""
    status, raw = chat(server, text, key, **extra)
    assert status == 200, raw
    return json.loads(raw)["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_requests_with_different_salts_never_reuse_each_other_s_cache(open_server):
    text = "A question only this test asks about salts"
    assert cached_tokens(open_server, text, cache_salt="salt-a") == 0
    assert cached_tokens(open_server, text, cache_salt="salt-b") == 0
    assert cached_tokens(open_server, text) == 0  # no salt is a namespace of its own too
    assert cached_tokens(open_server, text, cache_salt="salt-a") > 0
    assert cached_tokens(open_server, text, cache_salt="salt-b") > 0
    assert cached_tokens(open_server, text) > 0


def test_completions_take_a_salt_too(open_server):
    def completed(salt: str) -> int:
        body = {"model": MODEL, "prompt": "Once upon a time in a salted land", "max_tokens": 2, "cache_salt": salt}
        status, _, raw = request(open_server.port, "POST", "/v1/completions", body)
        assert status == 200, raw
        return json.loads(raw)["usage"]["prompt_tokens_details"]["cached_tokens"]

    assert completed("one") == 0
    assert completed("two") == 0
    assert completed("one") > 0


@pytest.mark.parametrize("salt", [123, "", "x" * 257, ["a"], None])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_bad_salt_is_a_400_naming_it(open_server, path, salt):
    body = {"model": MODEL, "max_tokens": 1, "cache_salt": salt}
    body.update({"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"})
    status, _, raw = request(open_server.port, "POST", path, body)
    if salt is None:  # JSON null: as if not sent
        assert status == 200, raw
        return
    error = error_of(raw)
    assert status == 400 and error["param"] == "cache_salt" and "'cache_salt'" in error["message"], raw
    assert "string" in error["message"].lower() and error["code"] != "unsupported_parameter", raw  # taken, if bad


def test_each_key_given_is_accepted_and_has_caches_of_its_own(keyed_server):
    text = "A question only this test asks about keys"
    assert cached_tokens(keyed_server, text, KEYS[0]) == 0
    assert cached_tokens(keyed_server, text, KEYS[1]) == 0
    assert cached_tokens(keyed_server, text, KEYS[0]) > 0
    assert cached_tokens(keyed_server, text, KEYS[1]) > 0
    # One key's salted requests are apart from its unsalted ones and from the other key's salted ones.
    assert cached_tokens(keyed_server, text, KEYS[0], cache_salt="shared") == 0
    assert cached_tokens(keyed_server, text, KEYS[1], cache_salt="shared") == 0
    assert cached_tokens(keyed_server, text, KEYS[1], cache_salt="shared") > 0


@pytest.mark.parametrize("key", ["wrong", KEYS[0] + KEYS[1], f"{KEYS[0]},{KEYS[1]}", KEYS[0][:-1], ""])
def test_a_key_that_is_none_of_them_is_refused(keyed_server, key):
    status, raw = chat(keyed_server, "hi", key or None)
    assert status == 401 and error_of(raw)["code"] == "invalid_api_key"


def test_keys_from_the_environment_are_split_at_commas(env_keyed_server):
    text = "A question only this test asks about the environment"
    assert cached_tokens(env_keyed_server, text, ENV_KEYS[0]) == 0
    assert cached_tokens(env_keyed_server, text, ENV_KEYS[1]) == 0
    assert cached_tokens(env_keyed_server, text, ENV_KEYS[1]) > 0
    for key in ("wrong", f"{ENV_KEYS[0]}, {ENV_KEYS[1]}", KEYS[0]):
        status, raw = chat(env_keyed_server, "hi", key)
        assert status == 401 and error_of(raw)["code"] == "invalid_api_key", key
    assert "API key required (any of 2" in env_keyed_server.output()
