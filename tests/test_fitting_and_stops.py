"""The engine's answers to sizes a client picks: fitting a long history, stop strings, the queue's
Retry-After, a temperature next to zero."""

from __future__ import annotations

import random

import pytest

from glmrepl.engine.conversation.chat import ChatSession, Message
from glmrepl.engine.conversation.stops import StopStrings
from glmrepl.engine.errors import QueueFull
from glmrepl.engine.generation.scheduler import Scheduler
from glmrepl.engine.request import SamplingParams
from glmrepl.engine.settings import Settings


class CountingWordFormat:
    """One token per word, and a count of the prompts built."""

    name = "words"

    def __init__(self):
        self.builds = 0

    def build(self, messages):
        self.builds += 1
        return [w for m in messages for w in m["content"].split()]


def _drop_one_turn_at_a_time(messages: list[Message], prompt_format, context_length: int, max_new_tokens: int):
    """What fitting did before: rebuild after dropping each oldest turn (the reference result)."""
    dropped = 0
    while True:
        ids = prompt_format.build([{"role": m.role, "content": m.content} for m in messages])
        if len(ids) + max_new_tokens <= context_length or sum(m.role == "user" for m in messages) <= 1:
            return ids, dropped
        messages = messages[2:] if len(messages) > 1 and messages[1].role == "assistant" else messages[1:]
        dropped += 1


@pytest.mark.parametrize("seed", range(20))
def test_fitting_a_long_history_builds_a_few_prompts_and_drops_what_one_at_a_time_dropped(seed):
    rng = random.Random(seed)
    session = ChatSession()
    for _ in range(rng.randint(1, 3000)):
        session.add_user(" ".join("w" * rng.randint(1, 3) for _ in range(rng.randint(1, 9))))
        if rng.random() < 0.9:
            session.add_assistant(" ".join("r" for _ in range(rng.randint(0, 9))))
    session.add_user("last question here")
    context, budget = rng.randint(20, 400), rng.randint(0, 16)
    prompt_format = CountingWordFormat()
    fitted = session.fit(prompt_format, context, budget)
    expected_ids, expected_dropped = _drop_one_turn_at_a_time(
        list(session.messages), CountingWordFormat(), context, budget
    )
    assert (fitted.ids, fitted.dropped_turns) == (expected_ids, expected_dropped)
    assert prompt_format.builds <= 2 + len(session.messages).bit_length()


def _reference_stop(stops: list[str], deltas: list[str]) -> tuple[str, bool]:
    """The whole text cut at the first stop string completed, as if it came one character at a time."""
    text = "".join(deltas)
    for end in range(1, len(text) + 1):
        for stop in stops:
            if text[:end].endswith(stop):
                return text[: end - len(stop)], True
    return text, False


@pytest.mark.parametrize("seed", range(300))
def test_stop_strings_cut_where_the_first_one_is_completed_and_never_show_a_possible_start(seed):
    rng = random.Random(seed)
    alphabet = "ab" if seed % 2 else "abc"
    stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 4))]
    deltas = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 5))) for _ in range(rng.randint(1, 12))]
    matcher, shown = StopStrings(stops), ""
    for delta in deltas:
        shown += matcher.push(delta)
        if matcher.hit:
            break
    if not matcher.hit:
        shown += matcher.flush()
    assert (shown, matcher.hit) == _reference_stop(stops, deltas)


def test_long_stop_strings_cost_their_own_length_once_not_per_token():
    stop = "ab" * 512
    matcher = StopStrings([stop])
    shown = "".join(matcher.push(char) for char in "ab" * 511 + "a")
    assert shown == "" and len(matcher.pending) == 1023  # all of it may still begin the stop string
    assert matcher.push("c") == "ab" * 511 + "ac" and matcher.pending == ""
    assert matcher.push(stop) == "" and matcher.hit


def test_retry_after_follows_how_long_replies_take():
    queue = Scheduler(max_waiting=0)
    queue.admit()
    with pytest.raises(QueueFull) as first:
        queue.admit()
    assert first.value.retry_after_s == 1  # nothing measured yet
    queue.leave(10, seconds=12.0)
    queue.admit()
    with pytest.raises(QueueFull) as later:
        queue.admit()
    assert later.value.retry_after_s == 12


@pytest.mark.parametrize("temperature", [0.0, 1e-39, 1e-30, 9e-6])
def test_a_temperature_next_to_zero_is_greedy(temperature):
    kwargs = SamplingParams.from_settings(Settings({"temperature": temperature, "do_sample": True})).generate_kwargs()
    assert kwargs["do_sample"] is False and kwargs["temperature"] is None


def test_a_small_real_temperature_still_samples():
    assert (
        SamplingParams.from_settings(Settings({"temperature": 0.01, "do_sample": True})).generate_kwargs()["do_sample"]
        is True
    )
