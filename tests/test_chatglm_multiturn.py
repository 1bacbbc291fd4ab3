"""A second turn after a reply cut at max_new_tokens, through the engine as the REPL runs a turn.

The released chat() keeps a reply in its history as it decoded it: one cut inside a multi-byte
character keeps the fragment as U+FFFD (ChatGLM3's chat() also drops the last id, taken for the
stop token, and keeps the first line apart as metadata). glmrepl shows the reply without the
fragment, and the next prompt must still be the one the release builds from its history: the
prompt ids and the greedy reply are compared exactly, on every generation.
"""

from __future__ import annotations

import pytest
from chatglm_reference import DATA, as_messages, chat_history_reply, expected, greedy_reply
from support import request

from glmrepl.engine.backend import LocalBackend
from glmrepl.engine.contract import record_reply
from glmrepl.engine.conversation.chat import ChatSession
from glmrepl.engine.models.loading import LoadOptions
from glmrepl.engine.settings import Settings

GENERATIONS = ("chatglm1", "chatglm2", "chatglm3", "glm4")
FRAGMENT = "\ufffd"


@pytest.fixture(scope="module")
def backends():
    return {family: loaded_backend(family) for family in GENERATIONS}


def loaded_backend(family: str) -> LocalBackend:
    backend = LocalBackend()
    backend.load_and_wait(LoadOptions(mode="cpu", dtype="float32").for_model(DATA / f"{family}-tiny", family))
    return backend


def answer(backend: LocalBackend, session: ChatSession, max_new_tokens: int):
    """One greedy turn as the REPL runs it: plan, stream, record. Returns the reply and its deltas."""
    reply = backend.generate(request(session, Settings({"max_new_tokens": max_new_tokens, "do_sample": False})))
    with reply:
        streamed = "".join(reply)
    record_reply(session, reply)
    return reply, streamed


@pytest.mark.parametrize("family", GENERATIONS)
def test_the_recorded_second_turn_follows_a_reply_cut_at_max_new_tokens(backends, family):
    """Case 2 continues case 1, whose reply the release cut at 24 tokens (all but ChatGLM-6B's
    kept ending in a character's fragment): the engine's second turn is the one recorded."""
    first, second = expected(family)["cases"][:2]
    parts = backends[family].manager.current
    # The rule chat_history_reply states is the release's: it gives the history recorded.
    assert chat_history_reply(family, parts, first["greedy_ids"]) == as_messages(second)[-2]

    session = ChatSession()
    session.add_user(first["query"])
    reply, streamed = answer(backends[family], session, 24)
    assert reply.finish_reason == "length" and reply.stats.new_ids == first["greedy_ids"]
    assert streamed == reply.text and not reply.text.endswith(FRAGMENT)

    session.add_user(second["query"])
    reply, _ = answer(backends[family], session, 24)
    assert reply.run.prompt_ids == second["prompt_ids"]
    assert reply.stats.new_ids == second["greedy_ids"]


# (generation, recorded case answered first, max_new_tokens): each cut leaves a fragment at the
# end of the decoded reply. ChatGLM3 has none here: its chat() fails on a reply without a line
# break, and the tiny model's only reply with one is the recorded case above (cut inside "Ɔ").
CUTS = [
    ("chatglm1", 2, 24),  # runs of spaces, then the fragment: "nd<|blank_N|>" before U+FFFD
    ("chatglm1", 2, 7),
    ("chatglm2", 2, 12),
    ("glm4", 3, 6),  # inside "仁", which the 7th token completes
    ("glm4", 3, 22),  # inside "仌"
]


@pytest.mark.parametrize("family,index,max_new_tokens", CUTS)
def test_a_second_turn_after_a_cut_inside_a_character(backends, family, index, max_new_tokens):
    """The expected prompt is the release's prompt builder over the history its chat() keeps
    (the builder is pinned by the recorded cases); the expected reply, greedy generation on it."""
    first = expected(family)["cases"][index]
    parts = backends[family].manager.current
    session = ChatSession()
    session.add_user(first["query"])
    reply, _ = answer(backends[family], session, max_new_tokens)
    assert reply.finish_reason == "length" and reply.stats.new_ids == first["greedy_ids"][:max_new_tokens]

    kept = chat_history_reply(family, parts, reply.stats.new_ids)
    assert kept["content"].endswith(FRAGMENT) and not reply.text.endswith(FRAGMENT)
    question = expected(family)["cases"][1]["query"]
    history = [{"role": "user", "content": first["query"]}, kept]
    prompt_ids = parts.prompt_format.build(as_messages({"history": history, "query": question}))

    session.add_user(question)
    reply, _ = answer(backends[family], session, 24)
    assert reply.run.prompt_ids == prompt_ids
    assert reply.stats.new_ids == greedy_reply(parts, prompt_ids)


def test_a_reply_cut_by_a_stop_string_is_kept_as_shown(backends):
    """A stop string is glmrepl's own cut, with no release behaviour to follow."""
    session = ChatSession()
    session.add_user(expected("glm4")["cases"][3]["query"])
    settings = Settings({"max_new_tokens": 6, "do_sample": False})
    with backends["glm4"].generate(request(session, settings, stop=["问我"])) as reply:
        "".join(reply)
    assert reply.stopped_by_string and "问我" not in record_reply(session, reply)
    assert session.messages[-1].kept is None
