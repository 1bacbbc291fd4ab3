"""Concurrent replies decoded together (transformers' continuous batching), each the reply it
would be alone; what cannot batch runs alone and says why."""

from __future__ import annotations

import threading
import time

import pytest
from chatglm_reference import DATA
from gated import StepGate
from support import request

from glmrepl.engine.backend import LocalBackend
from glmrepl.engine.conversation.chat import ChatSession
from glmrepl.engine.models.loading import LoadOptions
from glmrepl.engine.settings import Settings

QUESTIONS = ["hello there", "tell me a long story about dragons", "what is two plus two", "x", "why?"]


def load(path, name) -> LocalBackend:
    backend = LocalBackend()
    backend.load_and_wait(LoadOptions(mode="cpu", dtype="float32").for_model(path, name))
    return backend


def answer(backend: LocalBackend, question: str, new_tokens: int = 16, **settings):
    session = ChatSession()
    session.add_user(question)
    reply = backend.generate(request(session, Settings({"do_sample": False, "max_new_tokens": new_tokens, **settings})))
    with reply:
        streamed = "".join(reply)
    return reply.stats.new_ids, streamed, reply.text, reply.stats.path


def together(backend: LocalBackend, questions, **settings) -> list:
    """Every question at once, each from its own thread as the server's pool runs them."""
    results: list = [None] * len(questions)
    start = threading.Barrier(len(questions))

    def ask(index: int) -> None:
        start.wait()
        results[index] = answer(backend, questions[index], **settings)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(questions))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    return results


def assert_batched_like_alone(backend: LocalBackend) -> None:
    alone = [answer(backend, q) for q in QUESTIONS]
    backend.enable_batching(8)
    try:
        batched = together(backend, QUESTIONS)
        assert [b[:3] for b in batched] == [a[:3] for a in alone]  # ids, streamed text, whole text
        assert sum("continuous batching" in b[3] for b in batched) >= 2, [b[3] for b in batched]
    finally:
        backend.stop()


def test_qwen2_replies_in_a_batch_are_the_replies_alone(qwen_checkpoint):
    assert_batched_like_alone(load(qwen_checkpoint, "qwen"))


def test_gpt2_replies_in_a_batch_are_the_replies_alone(gpt2_checkpoint):
    assert_batched_like_alone(load(gpt2_checkpoint, "gpt2"))


@pytest.mark.parametrize("family", ["chatglm2", "chatglm3", "glm4", "chatglm2-int8"])
def test_chatglm_replies_in_a_batch_are_the_replies_alone(family):
    assert_batched_like_alone(load(DATA / f"{family}-tiny", family))


def test_chatglm1_says_why_it_decodes_one_at_a_time_and_still_serves_everyone():
    backend = load(DATA / "chatglm1-tiny", "chatglm1")
    alone = [answer(backend, q) for q in QUESTIONS[:3]]
    backend.enable_batching(8)
    status = backend.batching_status()
    assert not status["enabled"] and "ChatGLM-6B" in status["why_not"]
    assert together(backend, QUESTIONS[:3]) == alone


def test_seeded_and_penalised_replies_decode_in_the_batch_as_they_would_alone(qwen_checkpoint):
    backend = load(qwen_checkpoint, "qwen")
    kinds = [
        {"do_sample": True, "temperature": 0.9, "seed": 5},
        {"do_sample": True, "temperature": 1.2, "top_k": 40, "seed": 6},
        {"repetition_penalty": 1.3},
        {"do_sample": True, "temperature": 0.8, "seed": 9, "repetition_penalty": 1.2},
    ]
    questions = QUESTIONS[: len(kinds)]
    alone = [answer(backend, q, **kind) for q, kind in zip(questions, kinds)]
    backend.enable_batching(8)
    try:
        results: list = [None] * len(kinds)
        start = threading.Barrier(len(kinds))

        def ask(index: int) -> None:
            start.wait()
            results[index] = answer(backend, questions[index], **kinds[index])

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(kinds))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        assert [r[:3] for r in results] == [a[:3] for a in alone]  # the same ids as alone
        assert sum("continuous batching" in r[3] for r in results) >= 3, [r[3] for r in results]
    finally:
        backend.stop()


def test_a_cancelled_reply_leaves_the_batch_within_a_token_and_the_others_finish(qwen_checkpoint):
    backend = load(qwen_checkpoint, "qwen")
    alone = [answer(backend, q, new_tokens=60) for q in QUESTIONS[:3]]
    backend.enable_batching(8)
    try:
        sessions = []
        for question in QUESTIONS[:3]:
            session = ChatSession()
            session.add_user(question)
            sessions.append(session)
        settings = Settings({"do_sample": False, "max_new_tokens": 60})
        with StepGate(backend.manager.current.model) as gate:
            replies = [backend.generate(request(s, settings)) for s in sessions]
            threads = [threading.Thread(target=lambda r=r: "".join(r)) for r in replies]
            for thread in threads:
                thread.start()
            runs = [reply.run for reply in replies]
            gate.step_until(lambda: all(len(run.made) >= 3 for run in runs), most=20)
            replies[1].cancel()
            at_cancel = len(runs[1].made)
            assert runs[1].done.is_set()  # out of the batch at once
            gate.step_until(lambda: all(run.done.is_set() for run in runs), most=80)
        for thread in threads:
            thread.join(60)
        assert replies[1].finish_reason == "cancelled"
        assert replies[1].stats.new_tokens <= at_cancel
        assert [replies[i].stats.new_ids for i in (0, 2)] == [alone[i][0] for i in (0, 2)]
        assert all("continuous batching" in replies[i].stats.path for i in (0, 2))
    finally:
        backend.stop()


def test_a_move_stops_the_batch_and_the_next_ones_batch_again(qwen_checkpoint):
    backend = load(qwen_checkpoint, "qwen")
    backend.enable_batching(4)
    try:
        first = together(backend, QUESTIONS[:3])
        backend.move("cpu", "bfloat16")
        assert not backend.scheduler.batch_running
        again = together(backend, QUESTIONS[:3])
        assert sum("continuous batching" in r[3] for r in again) >= 2
        assert all(r[0] for r in first + again)
    finally:
        backend.stop()


# -- through the server -----------------------------------------------------------


def test_concurrent_clients_through_the_server_each_get_their_own_reply(qwen_checkpoint, tmp_path):
    pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    from serving import ServerProcess, open_chat_stream, openai_client

    alone_backend = load(qwen_checkpoint, "qwen")
    expected = {q: answer(alone_backend, q, new_tokens=24)[1] for q in QUESTIONS}  # as streamed
    server = ServerProcess([str(qwen_checkpoint), "--device", "cpu", "--max-batch", "4"], tmp_path / "serve.log")
    try:
        server.wait_ready()
        assert "up to 4 replies decoded together" in server.output()
        assert server.health()["batching"] == {"enabled": True, "max_batch": 4, "why_not": None}
        client = openai_client(server)
        leaver = open_chat_stream(server.port, "Tell me a long story", 400)
        got: dict = {}

        def ask(question: str) -> None:
            stream = client.chat.completions.create(
                model="tiny-qwen2-chat",
                messages=[{"role": "user", "content": question}],
                max_tokens=24,
                temperature=0,
                stream=True,
            )
            got[question] = "".join(chunk.choices[0].delta.content or "" for chunk in stream)

        threads = [threading.Thread(target=ask, args=(q,)) for q in QUESTIONS]
        for thread in threads:
            thread.start()
        leaver.close()  # one client leaves mid-batch
        for thread in threads:
            thread.join(300)
        assert got == expected
        deadline = time.monotonic() + 60
        while server.health()["replies"]["running"]:
            assert time.monotonic() < deadline, server.health()
            time.sleep(0.05)
        assert "Traceback" not in server.output()
    finally:
        server.stop()


def test_the_queue_admits_a_whole_batch_and_then_max_waiting_more():
    from glmrepl.engine.errors import QueueFull

    backend = LocalBackend(max_queue=1)
    backend.enable_batching(3)
    for _ in range(4):  # three decode together, one waits
        backend.scheduler.admit()
    with pytest.raises(QueueFull):
        backend.scheduler.admit()


def test_the_batch_lets_its_compute_helpers_go_while_a_lone_reply_decodes(qwen_checkpoint, monkeypatch):
    """With the paused batch's OpenMP pool kept, the lone reply's helper threads slept between
    regions instead of spinning (two pools on few cores): the batch's thread releases its pool
    as it parks, so a lone reply after a burst decodes as fast as before it."""
    from glmrepl.engine.generation import batching

    released_by: list[int] = []
    monkeypatch.setattr(batching, "release_thread_pool", lambda: released_by.append(threading.get_ident()))
    backend = load(qwen_checkpoint, "qwen")
    backend.enable_batching(4)
    try:
        burst = together(backend, QUESTIONS[:3])
        assert sum("continuous batching" in r[3] for r in burst) >= 2
        assert backend.scheduler.batch_running and not released_by  # the batch ran without parking
        lone = answer(backend, QUESTIONS[3])
        assert "continuous batching" not in lone[3] and lone[0]
        batch_thread = backend.scheduler._batcher._manager._generation_thread
        assert released_by and set(released_by) == {batch_thread.ident}
    finally:
        backend.stop()
