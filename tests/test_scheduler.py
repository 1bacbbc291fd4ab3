"""The scheduler that owns the model: a newcomer never waits for another's whole reply, a reply
decoded in stretches or moved into the batch is the reply it would be alone. Every step of the
model passes a gate the test opens one step at a time (gated.py): no sleeps, no retries."""

from __future__ import annotations

import gc
import threading
import time
import weakref

import pytest
from gated import StepGate

from glmrepl.engine.backend import LocalBackend
from glmrepl.engine.generation.run import GenerationRun
from glmrepl.engine.generation.scheduler import STRETCH_TOKENS
from glmrepl.engine.models.loading import LoadOptions


@pytest.fixture
def backend(qwen_checkpoint):
    backend = LocalBackend()
    backend.load_and_wait(LoadOptions(mode="cpu", dtype="float32").for_model(qwen_checkpoint, "qwen"))
    yield backend
    backend.stop()


def make_run(backend: LocalBackend, text: str, tokens: int, seed: int | None = None, **extra: object) -> GenerationRun:
    """A reply that runs to ``tokens`` (no stop ids), greedy unless seeded."""
    loaded = backend.manager.current
    ids = loaded.prompt_format.build([{"role": "user", "content": text}])
    sampling = {"do_sample": True, "temperature": 0.9, "top_k": 50} if seed is not None else {"do_sample": False}
    kwargs = {"max_new_tokens": tokens, **sampling, **extra}
    run = GenerationRun(loaded.model, loaded.tokenizer, ids, kwargs, [], seed, None, backend.scheduler)
    run.may_batch = backend.scheduler.why_not_batching(loaded) is None
    return run


def alone(backend: LocalBackend, text: str, tokens: int, seed: int | None = None, **extra: object) -> list[int]:
    run = make_run(backend, text, tokens, seed, **extra)
    "".join(run)
    return run.stats.new_ids


def start(run: GenerationRun) -> threading.Thread:
    thread = threading.Thread(target=lambda: "".join(run), daemon=True)
    thread.start()
    return thread


def start_submitted(backend: LocalBackend, run: GenerationRun) -> threading.Thread:
    """``start``, returning once the scheduler has the run: the steps counted from then on are
    the scheduler's doing, not the starting thread's (which a busy machine delays)."""
    submitted = threading.Event()
    submit = backend.scheduler.submit

    def recording(item):
        submit(item)
        if item is run:
            submitted.set()

    backend.scheduler.submit = recording
    try:
        thread = start(run)
        assert submitted.wait(60), "the run never reached the scheduler"
    finally:
        del backend.scheduler.submit  # the class's own again
    return thread


def newcomer_beside_a_long_reply(
    backend: LocalBackend, seed: int | None = None
) -> tuple[GenerationRun, GenerationRun, int]:
    """A 60-token reply runs; after its third token a 3-token reply arrives. Returns both and
    the steps the newcomer took to finish."""
    model = backend.manager.current.model
    with StepGate(model) as gate:
        long = make_run(backend, "Tell me everything about dragons", 60, seed)
        threads = [start(long)]
        gate.step_until(lambda: len(long.made) >= 3, most=10)
        short = make_run(backend, "hi", 3)
        threads.append(start_submitted(backend, short))
        steps = gate.step_until(lambda: len(short.made) >= 1, most=20)
        if backend.scheduler.batching:
            # The long reply joins the batch once the newcomer has its first token: the model
            # thread places it while the batch's next step waits here (else the race is the test's).
            gate.wait_for(lambda: backend.scheduler.running == 2)
        steps += gate.step_until(short.done.is_set, most=20)
        assert len(long.made) < 3 + STRETCH_TOKENS  # the long reply did not run on meanwhile
        gate.step_until(long.done.is_set, most=80)
    for thread in threads:
        thread.join(60)
    return long, short, steps


def test_a_newcomer_takes_turns_with_a_long_reply_and_both_are_as_alone(backend):
    expected = alone(backend, "Tell me everything about dragons", 60), alone(backend, "hi", 3)
    long, short, steps = newcomer_beside_a_long_reply(backend)
    assert steps <= 5  # the long reply's step under way, then the newcomer's three
    assert (long.stats.new_ids, short.stats.new_ids) == expected  # a stretch continues exactly
    assert "continuous batching" not in long.stats.path


def test_a_newcomer_moves_the_long_reply_into_the_batch_and_both_are_as_alone(backend):
    expected = alone(backend, "Tell me everything about dragons", 60), alone(backend, "hi", 3)
    backend.enable_batching(8)
    long, short, steps = newcomer_beside_a_long_reply(backend)
    assert steps <= 6
    assert (long.stats.new_ids, short.stats.new_ids) == expected
    assert "continuous batching" in long.stats.path and "continuous batching" in short.stats.path
    # Alone, then in the batch, then alone again once the newcomer left: the same ids throughout.
    assert long.stats.path.count(" then ") == 2 and not long.stats.path.endswith("continuous batching")


def test_a_seeded_reply_moves_into_the_batch_with_its_own_random_sequence(backend):
    expected = alone(backend, "Tell me everything about dragons", 60, seed=7), alone(backend, "hi", 3)
    backend.enable_batching(8)
    long, short, steps = newcomer_beside_a_long_reply(backend, seed=7)
    assert steps <= 6
    assert (long.stats.new_ids, short.stats.new_ids) == expected  # its draws went on where they were
    assert "continuous batching" in long.stats.path and long.stats.path.count(" then ") == 2


def test_a_reply_that_cannot_batch_takes_turns_with_the_batch_without_stopping_it(backend):
    greedy_texts = ["Tell me everything about dragons", "and about castles"]
    expected = [alone(backend, text, 40) for text in greedy_texts]
    expected_lone = alone(backend, "pick a number", 5, seed=11, min_new_tokens=5)  # the batch has no minimum
    backend.enable_batching(8)
    model = backend.manager.current.model
    with StepGate(model) as gate:
        batched = [make_run(backend, text, 40) for text in greedy_texts]
        threads = [start(run) for run in batched]
        gate.step_until(lambda: all(len(run.made) >= 2 for run in batched), most=10)
        lone = make_run(backend, "pick a number", 5, seed=11, min_new_tokens=5)
        threads.append(start(lone))
        gate.step_until(lone.done.is_set, most=20)
        assert max(len(run.made) for run in batched) < 40 - 10  # the batch did not finish first
        assert backend.scheduler.batch_running  # paused, never stopped
        gate.step_until(lambda: all(run.done.is_set() for run in batched), most=80)
    for thread in threads:
        thread.join(60)
    assert [run.stats.new_ids for run in batched] == expected
    assert lone.stats.new_ids == expected_lone  # its own random sequence, whatever ran between
    assert all("continuous batching" in run.stats.path for run in batched)
    assert "continuous batching" not in lone.stats.path


def test_a_reply_cancelled_while_it_waits_for_its_turn_decodes_no_more(backend):
    model = backend.manager.current.model
    with StepGate(model) as gate:
        first = make_run(backend, "Tell me everything about dragons", 60)
        threads = [start(first)]
        gate.step_until(lambda: len(first.made) >= 2, most=10)
        second = make_run(backend, "and about castles", 60)
        threads.append(start(second))
        gate.step_until(lambda: len(second.made) >= 1, most=5)  # the first waits for its turn now
        made = len(first.made)
        first.cancel()
        gate.step_until(lambda: first.done.is_set() and second.done.is_set(), most=80)
    for thread in threads:
        thread.join(60)
    assert first.stats.stop_reason == "cancelled" and len(first.made) == made
    assert second.stats.stop_reason == "length" and len(second.made) == 60


def test_a_batch_that_cannot_be_made_leaves_the_replies_decoding_alone_and_says_why(backend, monkeypatch):
    from glmrepl.engine.generation import scheduler

    def broken(*args, **kwargs):
        raise RuntimeError("no room for a batch")

    expected = [alone(backend, text, 8) for text in ("one", "two")]
    backend.enable_batching(8)
    monkeypatch.setattr(scheduler, "Batcher", broken)
    runs = [make_run(backend, text, 8) for text in ("one", "two")]
    threads = [start(run) for run in runs]
    for thread in threads:
        thread.join(60)
    assert [run.stats.new_ids for run in runs] == expected and all(run.error is None for run in runs)
    assert "the batch could not start (no room for a batch)" in backend.batching_status()["why_not"]


def test_a_finished_reply_is_let_go_while_the_model_thread_waits(backend):
    """The model thread keeps no reference to the last reply (its model, its cache) until the
    next one arrives: a model dropped after its last reply is freed."""
    run = make_run(backend, "hi", 3)
    "".join(run)
    finished = weakref.ref(run)
    del run
    deadline = time.monotonic() + 30
    while finished() is not None:  # the thread is back waiting within moments of the reply's end
        assert time.monotonic() < deadline, "the model thread still holds the finished reply"
        gc.collect()
        time.sleep(0.01)


def test_a_reply_that_leaves_the_model_idle_hands_freed_memory_back(backend, monkeypatch):
    """A quantized prompt's scratch would stay in glibc's heap: the scheduler trims it when a run
    ends and nothing waits, before the run is done (so resident memory is measured after it)."""
    from glmrepl.engine.generation import scheduler as scheduler_module

    trims: list[bool] = []
    run = make_run(backend, "hello", 3)
    monkeypatch.setattr(scheduler_module, "release_freed_memory", lambda: trims.append(run.done.is_set()))
    "".join(run)
    assert trims == [False]  # once, before the run was finished
