"""A turn reads only its new tokens: the KV cache of the last reply is reused for the common prefix.

Every check compares against a fresh prefill of the same prompt (the path the parity tests hold
to the released code): greedy ids exactly, logits within 1e-4, over multi-turn scripts with
/undo, /retry, a new system prompt and length-cut replies; and a cache is never reused once the
model has changed.
"""

from __future__ import annotations

import pytest
import torch
from chatglm_reference import DATA, reference_logits
from support import request

from glmrepl.engine.backend import LocalBackend
from glmrepl.engine.contract import record_reply
from glmrepl.engine.conversation.chat import ChatSession
from glmrepl.engine.generation.prefix_cache import PrefixCache, crop_to
from glmrepl.engine.models.loading import LoadOptions
from glmrepl.engine.settings import Settings

CAUSAL_CHATGLM = ("chatglm2", "chatglm3", "glm4", "chatglm2-32k", "chatglm3-32k")
SCRIPT = [
    ("say", "hello there"),
    ("say", "tell me more about it, please"),
    ("retry", None),
    ("say", "and then what happened"),
    ("undo", None),
    ("say", "something else entirely"),
    ("system", "You are terse."),
    ("say", "ok"),
]


def load(path, name, **options) -> LocalBackend:
    backend = LocalBackend()
    backend.load_and_wait(LoadOptions(mode="cpu", dtype="float32", **options).for_model(path, name))
    return backend


def turn(backend: LocalBackend, session: ChatSession, max_new_tokens: int, fresh: bool):
    if fresh:
        backend.prefixes.clear()
    reply = backend.generate(request(session, Settings({"max_new_tokens": max_new_tokens, "do_sample": False})))
    with reply:
        "".join(reply)
    record_reply(session, reply)
    return reply.stats.new_ids, reply.stats.reused_tokens, reply.prompt_tokens


def play(backend: LocalBackend, fresh: bool, max_new_tokens: int = 10) -> list[tuple]:
    """The script as the REPL plays it; (new ids, reused tokens, prompt tokens, after a new system prompt)
    per reply."""
    session, replies, new_system = ChatSession(), [], False
    for action, text in SCRIPT:
        if action == "say":
            session.add_user(text)
        elif action == "retry":
            session.prepare_retry()
        elif action == "undo":
            session.undo()
            continue
        else:
            session.system, new_system = text, True
            continue
        replies.append((*turn(backend, session, max_new_tokens, fresh), new_system))
        new_system = False
    return replies


def assert_reuse_matches_fresh(backend: LocalBackend, expect_reuse: bool = True) -> None:
    reused, fresh = play(backend, fresh=False), play(backend, fresh=True)
    assert [r[0] for r in reused] == [f[0] for f in fresh]  # greedy ids, turn after turn
    assert [r[2] for r in reused] == [f[2] for f in fresh]
    assert all(f[1] == 0 for f in fresh)
    if expect_reuse:
        # A new system prompt changes the prompt's beginning: what follows may share nothing.
        assert reused[0][1] == 0 and all(r[1] > 0 for r in reused[1:] if not r[3]), reused
        assert all(r[1] < r[2] for r in reused)  # at least one token is always read
    else:
        assert all(r[1] == 0 for r in reused)


def test_qwen2_turns_reuse_the_cache_and_reply_as_a_fresh_prefill(qwen_checkpoint):
    assert_reuse_matches_fresh(load(qwen_checkpoint, "qwen"))


def test_gpt2_completions_reuse_the_cache_and_reply_as_a_fresh_prefill(gpt2_checkpoint):
    assert_reuse_matches_fresh(load(gpt2_checkpoint, "gpt2"))


@pytest.mark.parametrize("family", CAUSAL_CHATGLM)
def test_chatglm_turns_reuse_the_cache_and_reply_as_a_fresh_prefill(family):
    assert_reuse_matches_fresh(load(DATA / f"{family}-tiny", family))


def test_chatglm1_never_reuses_its_bidirectional_prompt():
    assert_reuse_matches_fresh(load(DATA / "chatglm1-tiny", "chatglm1"), expect_reuse=False)


def test_the_int4_chatglm2_reuses_too():
    assert_reuse_matches_fresh(load(DATA / "chatglm2-int4-tiny", "chatglm2-int4"))


@pytest.mark.parametrize("family", CAUSAL_CHATGLM)
@pytest.mark.parametrize("split", [1, 4, 7])
def test_logits_after_a_reused_prefix_match_the_reference(family, split):
    """The recorded prompt read in two parts, the second on the first's cache: the released
    code's logits for every position of the second part, within 1e-4."""
    backend = load(DATA / f"{family}-tiny", family)
    model = backend.manager.current.model
    recorded = reference_logits(family)
    ids = recorded["input_ids"]
    with torch.inference_mode():
        first = model(input_ids=ids[:, :split], use_cache=True)
        cache = first.cache if getattr(first, "cache", None) is not None else first.past_key_values
        rest = model(input_ids=ids[:, split:], cache=cache, use_cache=True)
    difference = (rest.logits.float() - recorded["logits"][:, split:].float()).abs().max().item()
    assert difference < 1e-4, difference


def test_a_cache_is_never_reused_after_the_model_changes(qwen_checkpoint):
    backend = load(qwen_checkpoint, "qwen")
    session = ChatSession()
    session.add_user("hello there")
    turn(backend, session, 6, fresh=False)
    assert len(backend.prefixes) == 1
    backend.move("cpu", "bfloat16")  # another dtype: the old cache holds float32 keys of other weights
    assert len(backend.prefixes) == 0
    session.add_user("and more")
    assert turn(backend, session, 6, fresh=False)[1] == 0
    session.add_user("and again")
    assert turn(backend, session, 6, fresh=False)[1] > 0  # the new state's own cache is reused
    backend.set_prompt_mode("complete")
    assert len(backend.prefixes) == 0


def test_an_adapter_change_drops_the_caches():
    backend = load(DATA / "chatglm2-tiny", "chatglm2")
    session = ChatSession()
    session.add_user("hello")
    turn(backend, session, 6, fresh=False)
    assert len(backend.prefixes) == 1
    backend.set_adapter(DATA / "chatglm2-lora-tiny")
    assert len(backend.prefixes) == 0
    session.add_user("again")
    assert turn(backend, session, 6, fresh=False)[1] == 0


def test_a_new_conversation_gets_a_copy_of_a_shared_beginning_and_leaves_the_entry(qwen_checkpoint):
    backend = load(qwen_checkpoint, "qwen")
    first = ChatSession("A long shared system prompt that both conversations start with, word for word.")
    first.add_user("hello there")
    turn(backend, first, 8, fresh=False)
    other = ChatSession(first.system)
    other.add_user("a different question")
    _, reused, _ = turn(backend, other, 8, fresh=False)
    assert reused > 10  # the system prompt's tokens
    assert len(backend.prefixes) == 2  # the first conversation's cache is still there
    first.add_user("and more")
    _, reused_again, prompt = turn(backend, first, 8, fresh=False)
    assert reused_again > prompt // 2


class _FakeCache:
    """Just enough of a transformers cache for the store's bookkeeping: a length."""

    def __init__(self, length: int):
        self.length = length

    def get_seq_length(self) -> int:
        return self.length

    def crop(self, count: int) -> None:
        assert count < 0
        self.length += count


def test_the_store_keeps_the_longest_prefix_within_its_entry_limit():
    store = PrefixCache(max_entries=2, max_bytes=None)
    store.put([1, 2, 3, 4], _FakeCache(4))
    store.put([1, 2, 9, 9, 9], _FakeCache(5))
    reuse = store.take([1, 2, 9, 9, 7])
    assert reuse.tokens == 4 and reuse.cache.get_seq_length() == 4
    assert store.take([5, 6]).cache is None
    assert store.take([1, 2, 3, 4]).tokens == 3  # the whole prompt cached: one token is still read
    store.put([1], _FakeCache(1))
    store.put([2], _FakeCache(1))
    store.put([3], _FakeCache(1))
    assert len(store) == 2 and store.take([1, 5]).cache is None  # the oldest went first
    crop_to(cache := _FakeCache(9), 4)
    assert cache.length == 4


def test_stats_show_the_reused_and_read_prompt_tokens(qwen_checkpoint):
    import re

    from support import drive_repl, loaded_app

    out = drive_repl(loaded_app(qwen_checkpoint), "hello there\ntell me more\n/stats\n")
    found = re.search(r"prompt (\d+) tokens \((\d+) reused from a cache, (\d+) read\)", out)
    assert found, out
    prompt, reused, read = map(int, found.groups())
    assert reused > 0 and read > 0 and reused + read == prompt


def test_an_openai_client_resending_its_history_gets_the_saving_and_the_same_replies(qwen_checkpoint, tmp_path):
    pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    from serving import ServerProcess, openai_client

    from glmrepl.engine.generation.service import conversation_from_messages

    server = ServerProcess([str(qwen_checkpoint), "--device", "cpu"], tmp_path / "serve.log")
    try:
        server.wait_ready()
        client = openai_client(server)
        alone = load(qwen_checkpoint, "qwen")  # fresh prefills, for the replies each request would get
        messages: list[dict] = []
        for index, text in enumerate(["hello there", "tell me more about it", "and then?"]):
            messages.append({"role": "user", "content": text})
            answer = client.chat.completions.create(
                model="tiny-qwen2-chat", messages=messages, max_tokens=8, temperature=0
            )
            cached = answer.usage.prompt_tokens_details.cached_tokens
            assert (cached == 0) if index == 0 else (0 < cached < answer.usage.prompt_tokens), answer.usage
            alone.prefixes.clear()
            reply = alone.generate(
                request(conversation_from_messages(messages), Settings({"max_new_tokens": 8, "do_sample": False}))
            )
            with reply:
                "".join(reply)
            assert answer.choices[0].message.content == reply.text
            messages.append({"role": "assistant", "content": answer.choices[0].message.content})
        assert server.health()["kv_cache"]["prefix_cache"]["tokens_reused"] > 0
    finally:
        server.stop()
