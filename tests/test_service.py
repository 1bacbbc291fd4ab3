"""The chat turn in the engine (service.py, backend.py): the policy of each front end,
the queue bound, stop strings, and the scheduler that keeps moves away from running replies."""

import threading
import time
from pathlib import Path

import pytest
from support import loaded_app, request

from glmrepl.engine.contract import record_reply
from glmrepl.engine.conversation.chat import ChatSession
from glmrepl.engine.conversation.stops import StopStrings
from glmrepl.engine.errors import ContextLengthExceeded, GlmreplError, QueueFull
from glmrepl.engine.generation.service import conversation_from_messages
from glmrepl.engine.settings import Settings


def test_front_end_modules_never_reach_into_the_loaded_model():
    package = Path(__file__).parent.parent / "glmrepl"
    front_ends = sorted(path for folder in ("repl", "server", "cli") for path in (package / folder).glob("*.py"))
    assert len(front_ends) > 20
    for path in front_ends:
        name, source = path.name, path.read_text(encoding="utf-8")
        for internal in ("manager.current", ".prompt_format", ".tokenizer", "loaded.model", "manager.move"):
            assert internal not in source, f"{name} uses {internal}"


@pytest.fixture(scope="module")
def qwen_app(qwen_checkpoint):
    return loaded_app(qwen_checkpoint)


def conversation(*texts):
    session = ChatSession()
    for text in texts:
        session.add_user(text)
    return session


def test_stop_strings_cut_the_text_and_hold_back_a_possible_start():
    stops = StopStrings(["END", "xy"])
    assert stops.push("abc E") == "abc "  # "E" may begin END
    assert stops.push("N") == ""
    assert stops.push("D and more") == "" and stops.hit
    plain = StopStrings(["zz"])
    assert plain.push("a z") == "a " and plain.flush() == "z" and not plain.hit


def test_a_stop_string_ends_the_reply_with_finish_reason_stop(qwen_app):
    backend = qwen_app.backend
    free = backend.generate(request(conversation("hello"), Settings({"temperature": 0, "max_new_tokens": 12})))
    full = "".join(free)
    assert free.finish_reason == "length" and len(full) > 4
    stop = full[2:4]
    reply = backend.generate(
        request(conversation("hello"), Settings({"temperature": 0, "max_new_tokens": 12}), stop=[stop])
    )
    streamed = "".join(reply)
    assert streamed == full[: full.index(stop)] == reply.text
    assert reply.finish_reason == "stop" and reply.stats.new_tokens < 12


def test_the_api_policy_refuses_what_the_repl_policy_shortens(qwen_app):
    backend = qwen_app.backend
    long_text = "word " * 600  # more than the tiny model's 512-token context
    with pytest.raises(ContextLengthExceeded, match="maximum context length is 512 tokens") as caught:
        backend.generate(request(conversation(long_text), Settings(), drop_oldest=False, shorten_reply=False))
    assert caught.value.prompt_tokens > 512
    settings = Settings({"max_new_tokens": 500})
    with pytest.raises(ContextLengthExceeded, match="in the completion"):
        backend.generate(request(conversation("hi"), settings, drop_oldest=False, shorten_reply=False))
    shortened = backend.generate(request(conversation("hi"), settings, drop_oldest=False, shorten_reply=True))
    with shortened:
        assert shortened.max_new_tokens == 512 - shortened.prompt_tokens
    kept = backend.generate(request(conversation("word " * 300, "hi"), Settings({"max_new_tokens": 8})))
    with kept:
        assert kept.dropped_turns == 1  # the REPL's policy
    assert backend.scheduler.admitted == 0  # every plan gave its place back


def test_the_queue_bound_refuses_the_next_request_until_one_ends(qwen_checkpoint):
    from glmrepl.engine.backend import LocalBackend

    app = loaded_app(qwen_checkpoint)
    backend = LocalBackend(app.manager, max_queue=1)
    running = backend.generate(request(conversation("a"), app.settings))
    waiting = backend.generate(request(conversation("b"), app.settings))
    with pytest.raises(QueueFull, match="1 requests are already waiting"):
        backend.generate(request(conversation("c"), app.settings))
    "".join(running)
    third = backend.generate(request(conversation("c"), app.settings))
    "".join(waiting), "".join(third)
    assert backend.scheduler.admitted == 0


def test_a_move_waits_for_running_replies_and_says_so(qwen_checkpoint):
    app = loaded_app(qwen_checkpoint, max_new_tokens=40)
    backend = app.backend
    reply = backend.generate(request(conversation("hello"), app.settings))
    said, moved = [], threading.Event()
    mover = threading.Thread(target=lambda: (backend.move("cpu", "bfloat16", on_wait=said.append), moved.set()))
    mover.start()
    deadline = time.monotonic() + 30
    while backend.scheduler.changes_waiting != 1:  # the move is in, waiting: the reply holds its place
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert not moved.is_set() and said == [1]  # waits for the reply, and said it does
    deltas = list(reply)
    assert deltas and reply.stats.new_tokens == 40  # the reply was not disturbed
    assert moved.wait(30)
    mover.join()
    assert backend.status().placement.describe() == "cpu bfloat16"
    assert "".join(backend.generate(request(conversation("again"), app.settings)))


def test_changes_to_the_model_run_on_the_model_thread_like_its_replies(qwen_checkpoint, monkeypatch):
    from glmrepl.engine.models import manager as manager_module

    app = loaded_app(qwen_checkpoint)
    backend = app.backend
    moved_on, real_move = [], manager_module.move_model
    monkeypatch.setattr(
        manager_module, "move_model", lambda *a: (moved_on.append(threading.current_thread().name), real_move(*a))
    )
    "".join(backend.generate(request(conversation("hello"), app.settings)))
    backend.move("cpu", "bfloat16")
    backend.set_prompt_mode("complete")
    assert moved_on == [backend.scheduler._thread.name] == ["glmrepl-model"]
    assert backend.status().placement.describe() == "cpu bfloat16" and backend.status().format_name == "completion"
    assert "".join(backend.generate(request(conversation("again"), app.settings)))


def test_device_keeps_the_gpu_chosen_at_load(qwen_checkpoint, monkeypatch):
    from glmrepl.engine.models import manager as manager_module
    from glmrepl.repl.commands import TABLE

    app = loaded_app(qwen_checkpoint)
    app.manager.current.request.gpu = 1  # as if loaded with --gpu 1
    asked = []
    real_plan = manager_module.plan_placement

    def recording_plan(mode, dtype, stored, gpu, **kwargs):
        asked.append(gpu)
        return real_plan("cpu", dtype, stored, gpu, **kwargs)

    monkeypatch.setattr(manager_module, "plan_placement", recording_plan)
    assert "model now on cpu float32" in TABLE.dispatch(app, "/device gpu").text
    assert asked == [1]


def test_messages_from_an_api_become_a_conversation():
    session = conversation_from_messages(
        [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "more"},
        ]
    )
    assert session.system == "be brief" and [m.role for m in session.messages] == ["user", "assistant", "user"]
    with pytest.raises(GlmreplError, match=r"messages\[0\].role must be one of system, user, assistant"):
        conversation_from_messages([{"role": "robot", "content": "x"}])
    with pytest.raises(GlmreplError, match="at least one user"):
        conversation_from_messages([{"role": "system", "content": "x"}])


def test_a_cancelled_reply_is_recorded_as_cut(qwen_app):
    session = conversation("hello")
    reply = qwen_app.backend.generate(request(session, Settings({"temperature": 0, "max_new_tokens": 50})))
    for _ in reply:
        reply.cancel()
    assert reply.finish_reason == "cancelled" and reply.stats.new_tokens < 50
    record_reply(session, reply)
    assert session.messages[-1].cut and session.messages[-1].content == reply.text


def test_an_empty_prompt_is_refused_before_generating(gpt2_checkpoint):
    from glmrepl.engine.errors import EmptyPrompt

    app = loaded_app(gpt2_checkpoint)
    with pytest.raises(EmptyPrompt, match="the prompt is empty"):
        app.backend.generate(request(conversation(""), app.settings))
    assert app.backend.scheduler.admitted == 0


def test_the_repl_says_that_a_move_waits_for_a_running_reply(qwen_checkpoint):
    from glmrepl.repl.commands import TABLE

    app = loaded_app(qwen_checkpoint, max_new_tokens=30)
    said = []
    app.notify = said.append
    reply = app.backend.generate(request(conversation("hello"), app.settings))  # as a server's request would hold it
    result = {}
    command = threading.Thread(target=lambda: result.update(out=TABLE.dispatch(app, "/device cpu bfloat16")))
    command.start()
    deadline = time.monotonic() + 30
    while not said and time.monotonic() < deadline:
        time.sleep(0.01)
    assert said == ["waiting for 1 running reply to finish before moving the model"] and "out" not in result
    "".join(reply)
    command.join(30)
    assert result["out"].text == "model now on cpu bfloat16; conversation kept"
