import threading

import pytest
import torch
from gated import StepGate
from support import loaded_app

from glmrepl.engine.errors import GenerationError
from glmrepl.engine.generation.run import GenerationRun, IncrementalDecoder, next_token_distribution
from glmrepl.engine.generation.scheduler import private_scheduler


@pytest.fixture(scope="module")
def qwen(qwen_checkpoint):
    return loaded_app(qwen_checkpoint).manager.current


@pytest.fixture(scope="module")
def gpt2(gpt2_checkpoint):
    return loaded_app(gpt2_checkpoint).manager.current


def test_incremental_decoder_never_splits_a_character(gpt2):
    tokenizer = gpt2.tokenizer
    text = "Grüße aus München. 日本の東京は大きな都市です。 café"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text.split())  # multi-byte characters span several byte-level tokens
    decoder = IncrementalDecoder(tokenizer)
    deltas = [decoder.push([i]) for i in ids] + [decoder.flush()]
    assert "".join(deltas) == tokenizer.decode(ids)
    assert not any("\ufffd" in d for d in deltas)


def test_invalid_bytes_are_let_go_after_a_few_tokens_not_held_for_ever(gpt2):
    """A model writing bytes that never complete a character (a random or broken one) must not
    make each later token decode a longer window."""
    tokenizer = gpt2.tokenizer
    lone = next(i for i in range(tokenizer.vocab_size) if tokenizer.decode([i]) == "\ufffd")  # a continuation byte
    decoder = IncrementalDecoder(tokenizer)
    deltas = []
    for _ in range(40):
        deltas.append(decoder.push([lone]))
        assert len(decoder.ids) - decoder.prefix_offset <= 2 * IncrementalDecoder.MAX_HELD_IDS
    assert deltas[: IncrementalDecoder.MAX_HELD_IDS - 1] == [""] * (IncrementalDecoder.MAX_HELD_IDS - 1)
    assert "\ufffd" in deltas[IncrementalDecoder.MAX_HELD_IDS - 1]  # shown as what it is, then on
    assert sum(d.count("\ufffd") for d in deltas + [decoder.flush()]) >= 30


def test_streamed_greedy_reply_equals_raw_generate(qwen):
    prompt = qwen.prompt_format.build([{"role": "user", "content": "Hello there"}])
    run = GenerationRun(
        qwen.model,
        qwen.tokenizer,
        prompt,
        {"max_new_tokens": 12, "do_sample": False},
        qwen.prompt_format.stop_token_ids,
        scheduler=private_scheduler(),
    )
    streamed = "".join(run)
    raw = qwen.model.generate(
        torch.tensor([prompt]),
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=qwen.prompt_format.stop_token_ids,
        pad_token_id=0,
    )
    raw_ids = raw[0, len(prompt) :].tolist()
    assert run.stats.new_ids == raw_ids
    stop = set(qwen.prompt_format.stop_token_ids)
    assert streamed == qwen.tokenizer.decode([i for i in raw_ids if i not in stop], skip_special_tokens=True)
    assert run.stats.prompt_tokens == len(prompt) and run.stats.new_tokens == len(raw_ids)
    assert run.stats.first_token_s is not None and run.stats.total_s >= run.stats.first_token_s


def test_cancel_stops_within_a_token_and_the_model_is_reusable(qwen):
    prompt = qwen.prompt_format.build([{"role": "user", "content": "Tell me everything"}])
    run = GenerationRun(
        qwen.model,
        qwen.tokenizer,
        prompt,
        {"max_new_tokens": 400, "do_sample": False},
        [],
        scheduler=private_scheduler(),
    )
    with StepGate(qwen.model) as gate:  # each token waits for the test: the cancel lands after the third
        consumer = threading.Thread(target=lambda: "".join(run))
        consumer.start()
        gate.step_until(lambda: len(run.made) >= 3, most=5)
        run.cancel()
        gate.step_until(run.done.is_set, most=2)
    consumer.join(30)
    assert run.stats.stop_reason == "cancelled"
    assert run.stats.new_tokens <= 4  # the step under way when it was cancelled, at most
    threads = set(threading.enumerate())
    again = GenerationRun(
        qwen.model, qwen.tokenizer, prompt, {"max_new_tokens": 3, "do_sample": False}, [], scheduler=private_scheduler()
    )
    "".join(again)
    assert again.stats.new_tokens == 3 and again.stats.stop_reason == "length"
    # one long-lived model thread serves every reply: no thread is left behind per reply
    assert set(threading.enumerate()) == threads and again.scheduler is run.scheduler


def test_closing_the_stream_early_stops_the_worker(qwen):
    """What the REPL does on Ctrl-C: it closes the delta iterator."""
    prompt = qwen.prompt_format.build([{"role": "user", "content": "Go on"}])
    run = GenerationRun(
        qwen.model,
        qwen.tokenizer,
        prompt,
        {"max_new_tokens": 400, "do_sample": False},
        [],
        scheduler=private_scheduler(),
    )
    deltas = iter(run)
    next(deltas)
    deltas.close()
    assert run.stats.stop_reason == "cancelled" and run.stats.new_tokens < 400
    assert run.text()  # the partial reply is available


def test_a_failure_in_generate_becomes_a_one_line_generation_error(qwen):
    run = GenerationRun(
        qwen.model,
        qwen.tokenizer,
        [10**9],
        {"max_new_tokens": 2, "do_sample": False},
        [],
        scheduler=private_scheduler(),
    )
    with pytest.raises(GenerationError, match="^generation failed: "):
        list(run)


def test_next_token_distribution_matches_the_model(qwen):
    prompt = qwen.prompt_format.build([{"role": "user", "content": "Hi"}])
    top = next_token_distribution(qwen.model, qwen.tokenizer, prompt, 5)
    logits = qwen.model(torch.tensor([prompt])).logits[0, -1]
    assert [token_id for _, token_id, _ in top] == torch.topk(logits, 5).indices.tolist()
    probabilities = [p for _, _, p in top]
    assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1
