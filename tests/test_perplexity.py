"""Perplexity in sliding windows (engine/perplexity.py), against transformers' own loss.

The references are computed the plain way: one forward with ``labels=`` (the
loss transformers computes for training), or the docs' sliding-window loop
written out. Models are the tiny checkpoints, the ChatGLM fixtures (native
families, int4, LoRA) and the trained Llama of trained.py.
"""

from __future__ import annotations

import math
import os
import random
import threading

import pytest
import torch
from chatglm_reference import DATA
from support import loaded_app
from trained import grammar_text

from glmrepl.engine.generation.perplexity import (
    PerplexityCancelled,
    PerplexityError,
    choose_window,
    perplexity_of_ids,
    perplexity_of_text,
    plan_windows,
    read_text,
    text_ids,
    text_prefix,
)

SHORT = "The quick brown fox jumps over the lazy dog. Hello! How are you today?"


def loaded(path, **options):
    app = loaded_app(path)
    for key, value in options.items():
        setattr(app.options, key, value)
    if options:
        app.manager.load(app.load_request(str(path)))
    return app.manager.current


def labels_loss(model, input_ids: list[int], ignored: int = 0) -> float:
    """transformers' training loss: mean NLL of every token after the first ``ignored + 1``."""
    ids = torch.tensor([input_ids])
    labels = ids.clone()
    labels[:, :ignored] = -100
    with torch.inference_mode():
        return float(model(input_ids=ids, labels=labels).loss)


# -- the plan ----------------------------------------------------------------------


@pytest.mark.parametrize("prefix", [0, 1, 2])
@pytest.mark.parametrize(("length", "window", "stride"), [(100, 16, 8), (100, 16, 16), (37, 10, 3), (5, 64, 32)])
def test_every_token_is_scored_once_with_the_context_before_it(length, window, stride, prefix):
    plan = plan_windows(length, prefix, window, stride)
    scored = [j for w in plan for j in range(w.first_target, w.end)]
    assert scored == sorted(set(scored))  # never twice, in order
    skipped = {0} if not prefix else set()
    if not prefix and stride == window:  # independent windows: each one's first token has no context
        skipped |= {w.begin for w in plan}
    assert set(scored) == set(range(length)) - skipped
    for w in plan:
        assert prefix + w.end - w.begin <= window
        assert w.first_target > w.begin or prefix  # something before every target


def test_window_and_stride_defaults_and_limits():
    assert choose_window(4096, None, None) == (1024, 512)
    assert choose_window(64, None, None) == (64, 32)
    assert choose_window(None, 100, 100) == (100, 100)
    with pytest.raises(PerplexityError, match="longer than the model's context"):
        choose_window(64, 65, None)
    with pytest.raises(PerplexityError, match="stride must be from 1 to the window"):
        choose_window(64, 32, 33)
    with pytest.raises(PerplexityError, match="at least 2"):
        choose_window(64, 1, None)


# -- exact against transformers ------------------------------------------------------


def test_one_window_equals_the_labels_loss_with_a_bos(trained_checkpoint):
    model = loaded(trained_checkpoint)
    text = grammar_text(2, seed=7)
    ids = model.tokenizer(text)["input_ids"]  # with the BOS the tokenizer adds
    assert text_prefix(model.tokenizer) == ids[:1] and len(ids) <= 64
    result = perplexity_of_text(model.model, model.tokenizer, text, 64, 32)
    assert result.windows == 1 and result.tokens == len(ids) - 1
    assert result.mean_nll == pytest.approx(labels_loss(model.model, ids), rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(labels_loss(model.model, ids)), rel=1e-5)


@pytest.mark.parametrize("fixture", ["qwen_checkpoint", "gpt2_checkpoint"])
def test_one_window_without_a_prefix(fixture, request):
    model = loaded(request.getfixturevalue(fixture))
    ids = text_ids(model.tokenizer, SHORT)
    assert text_prefix(model.tokenizer) == []
    result = perplexity_of_text(model.model, model.tokenizer, SHORT, 128, 64)
    assert result.tokens == len(ids) - 1  # the first token has nothing before it
    assert result.mean_nll == pytest.approx(labels_loss(model.model, ids), rel=1e-5)


def test_stride_equal_to_window_is_the_mean_of_independent_windows(trained_checkpoint):
    model = loaded(trained_checkpoint)
    text = grammar_text(12, seed=3)
    ids, bos = text_ids(model.tokenizer, text), text_prefix(model.tokenizer)
    result = perplexity_of_ids(model.model, ids, bos, 40, 40)
    chunks = [ids[i : i + 39] for i in range(0, len(ids), 39)]  # 39 text tokens after the BOS
    total = sum(labels_loss(model.model, bos + chunk) * len(chunk) for chunk in chunks)
    assert result.windows == len(chunks) > 3
    assert result.tokens == len(ids)
    assert result.mean_nll == pytest.approx(total / len(ids), rel=1e-5)


def test_overlapping_windows_equal_the_documented_loop(qwen_checkpoint):
    """The loop of transformers' "Perplexity of fixed-length models", written out."""
    model = loaded(qwen_checkpoint)
    ids = text_ids(model.tokenizer, SHORT * 4)
    window, stride = 24, 10
    nll_sum, counted, previous_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        target_length = end - previous_end
        input_ids = torch.tensor([ids[begin:end]])
        labels = input_ids.clone()
        labels[:, :-target_length] = -100
        with torch.inference_mode():
            loss = float(model.model(input_ids=input_ids, labels=labels).loss)
        valid = int((labels[:, 1:] != -100).sum())  # the labels left after the shift
        nll_sum, counted, previous_end = nll_sum + loss * valid, counted + valid, end
        if end == len(ids):
            break
    result = perplexity_of_ids(model.model, ids, [], window, stride)
    assert result.tokens == counted == len(ids) - 1
    assert result.mean_nll == pytest.approx(nll_sum / counted, rel=1e-5)


class WithoutLogitsToKeep(torch.nn.Module):
    """A model whose forward takes no ``logits_to_keep``, as some checkpoints' own code."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def forward(self, input_ids, use_cache=None):
        return self.model(input_ids=input_ids, use_cache=use_cache)


def test_a_model_without_logits_to_keep_gives_the_same_number(qwen_checkpoint):
    model = loaded(qwen_checkpoint)
    ids = text_ids(model.tokenizer, SHORT * 2)
    plain = perplexity_of_ids(WithoutLogitsToKeep(model.model), ids, [], 24, 10)
    assert plain.mean_nll == pytest.approx(perplexity_of_ids(model.model, ids, [], 24, 10).mean_nll, rel=1e-6)


# -- the ChatGLM families, quantized and with adapters -----------------------------------


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("chatglm2-tiny", {}),
        ("glm4-tiny", {}),
        ("chatglm2-int4-tiny", {}),
        ("chatglm2-tiny", {"adapter": DATA / "chatglm2-lora-tiny"}),
        ("chatglm2-tiny", {"adapter": DATA / "chatglm2-ptuning-tiny"}),
    ],
    ids=["chatglm2", "glm4", "int4", "lora", "ptuning"],
)
def test_glm_families_score_after_gmask_sop(name, options):
    model = loaded(DATA / name, **options)
    prefix = text_prefix(model.tokenizer, model.model)
    assert prefix == model.tokenizer.encode("x", add_special_tokens=True)[:2]  # [gMASK] sop
    ids = text_ids(model.tokenizer, SHORT)
    result = perplexity_of_text(model.model, model.tokenizer, SHORT, 128, 64)
    assert result.tokens == len(ids)
    assert result.mean_nll == pytest.approx(labels_loss(model.model, prefix + ids, ignored=2), rel=1e-5)


def test_an_adapter_changes_the_number():
    base = loaded(DATA / "chatglm2-tiny")
    tuned = loaded(DATA / "chatglm2-tiny", adapter=DATA / "chatglm2-lora-tiny")
    assert tuned.adapter is not None
    first = perplexity_of_text(base.model, base.tokenizer, SHORT, 128, 64).mean_nll
    second = perplexity_of_text(tuned.model, tuned.tokenizer, SHORT, 128, 64).mean_nll
    assert abs(first - second) > 1e-4


def test_chatglm1_reads_the_text_causally_after_gmask_sop():
    model = loaded(DATA / "chatglm1-tiny")
    tokenizer = model.tokenizer
    prefix = text_prefix(tokenizer, model.model)
    assert prefix == [tokenizer.gmask_token_id, tokenizer.bos_token_id]
    ids = text_ids(tokenizer, SHORT)
    result = perplexity_of_ids(model.model, ids, prefix, 256, 128)
    with torch.inference_mode():
        logits = model.model(input_ids=torch.tensor([prefix + ids])).logits[0, 1:-1]
    assert result.mean_nll == pytest.approx(float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids))))
    # Causal: a token's score does not depend on what follows it (text before <sop> would see it).
    changed = ids[:-1] + [ids[0] if ids[-1] != ids[0] else ids[1]]
    head = perplexity_of_ids(model.model, ids[:-1], prefix, 256, 128)
    assert perplexity_of_ids(model.model, changed[:-1], prefix, 256, 128).mean_nll == head.mean_nll


# -- a trained model: the number means something ---------------------------------------


@pytest.fixture(scope="module")
def trained(trained_checkpoint):
    return loaded(trained_checkpoint)


HELD_OUT = grammar_text(20, seed=99)


def test_training_brings_perplexity_far_below_the_vocabulary(trained):
    from transformers import LlamaForCausalLM

    result = perplexity_of_text(trained.model, trained.tokenizer, HELD_OUT, 64, 32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        untrained = LlamaForCausalLM(trained.model.config).eval()
    baseline = perplexity_of_text(untrained, trained.tokenizer, HELD_OUT, 64, 32)
    vocabulary = trained.model.config.vocab_size
    assert result.perplexity < 10 < vocabulary
    assert baseline.perplexity > vocabulary / 2
    assert result.perplexity * 20 < baseline.perplexity


def test_shuffled_tokens_score_much_worse(trained):
    ids = text_ids(trained.tokenizer, HELD_OUT)
    shuffled = list(ids)
    random.Random(5).shuffle(shuffled)
    prefix = text_prefix(trained.tokenizer)
    grammatical = perplexity_of_ids(trained.model, ids, prefix, 64, 32)
    assert perplexity_of_ids(trained.model, shuffled, prefix, 64, 32).perplexity > 10 * grammatical.perplexity


# Measured on this fixture and HELD_OUT (window 64, stride 32): float 1.9605, int8 1.9604,
# int4 (groups of 32) 1.9645; the untrained model 519, the shuffled tokens 6,300 to 6,400.
# The bounds leave a wide margin over those changes (int8 moves it by 0.005%, int4 by 0.2%),
# yet scales half again too large would more than double it.
QUANTIZED_WITHIN = {8: 0.01, 4: 0.05}


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_perplexity_stays_near_the_float_one(trained, trained_checkpoint, bits):
    """``--quantize`` (LoadRequest.quantize) on the trained model, scored by the same function as the float one."""
    from transformers import LlamaForCausalLM

    from glmrepl.engine.quant.layers import QuantizedLinear

    quantized = loaded(trained_checkpoint, quantize=bits)
    assert quantized.info.placement.describe() == f"cpu float32 int{bits}"
    layers = [
        m for m in quantized.model.modules() if isinstance(m, QuantizedLinear) and m is not quantized.model.lm_head
    ]
    assert layers and all(layer.bits == bits and layer.group_size > 0 for layer in layers)  # group-wise
    float_result = perplexity_of_text(trained.model, trained.tokenizer, HELD_OUT, 64, 32)
    result = perplexity_of_text(quantized.model, quantized.tokenizer, HELD_OUT, 64, 32)
    assert result.tokens == float_result.tokens
    assert result.perplexity != float_result.perplexity  # the weights did change
    assert result.perplexity == pytest.approx(float_result.perplexity, rel=QUANTIZED_WITHIN[bits])

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        untrained = LlamaForCausalLM(trained.model.config).eval()
    assert result.perplexity * 20 < perplexity_of_text(untrained, trained.tokenizer, HELD_OUT, 64, 32).perplexity
    shuffled = list(text_ids(quantized.tokenizer, HELD_OUT))
    random.Random(5).shuffle(shuffled)
    prefix = text_prefix(quantized.tokenizer)
    assert result.perplexity * 10 < perplexity_of_ids(quantized.model, shuffled, prefix, 64, 32).perplexity


@pytest.mark.parametrize("bits", [8, 4])
def test_the_int8_head_scores_within_one_percent_of_the_float_head(trained_checkpoint, bits):
    """A quantized model's head is int8 on the CPU unless --float-head (LoadRequest.float_head)."""
    from glmrepl.engine.quant.layers import QuantizedLinear

    float_head = loaded(trained_checkpoint, quantize=bits, float_head=True)
    assert not isinstance(float_head.model.lm_head, QuantizedLinear)
    float_result = perplexity_of_text(float_head.model, float_head.tokenizer, HELD_OUT, 64, 32)
    int8_head = loaded(trained_checkpoint, quantize=bits)
    head = int8_head.model.lm_head
    assert isinstance(head, QuantizedLinear) and (head.bits, head.group_size) == (8, 32)
    result = perplexity_of_text(int8_head.model, int8_head.tokenizer, HELD_OUT, 64, 32)
    assert result.tokens == float_result.tokens
    assert result.perplexity != float_result.perplexity  # the head did change
    assert result.perplexity == pytest.approx(float_result.perplexity, rel=0.01)
    with torch.no_grad():
        head.weight_scale.mul_(1.5)  # damaged scales: the same comparison fails
    damaged = perplexity_of_text(int8_head.model, int8_head.tokenizer, HELD_OUT, 64, 32)
    assert damaged.perplexity != pytest.approx(float_result.perplexity, rel=0.01)


# -- progress, cancelling, bad input -----------------------------------------------------


def test_progress_counts_up_to_the_total_and_cancel_stops_between_windows(trained):
    ids = text_ids(trained.tokenizer, HELD_OUT)
    seen: list[tuple[int, int]] = []
    perplexity_of_ids(trained.model, ids, [1], 64, 32, progress=lambda done, total: seen.append((done, total)))
    assert seen[0] == (0, len(ids)) and seen[-1] == (len(ids), len(ids))
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)

    cancel, calls = threading.Event(), []

    def stop_after_two(done, total):
        calls.append(done)
        if len(calls) == 3:  # (0, first window, second window): stop now
            cancel.set()

    with pytest.raises(PerplexityCancelled) as stopped:
        perplexity_of_ids(trained.model, ids, [1], 64, 32, cancel, stop_after_two)
    assert str(stopped.value) == f"perplexity cancelled after {calls[-1]:,} of {len(ids):,} tokens"
    assert len(calls) == 3 and 0 < calls[-1] < len(ids)


def test_too_short_texts(trained):
    with pytest.raises(PerplexityError, match="it needs at least 2"):
        perplexity_of_ids(trained.model, [5], [1], 64, 32)
    with pytest.raises(PerplexityError, match="0 tokens"):
        perplexity_of_ids(trained.model, [], [1], 64, 32)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\xff\xfe\x00h\x00i", "is not UTF-8 text"),
        ("hé".encode("utf-16-le"), "is not UTF-8 text"),
        (b"text\x00with a NUL", "holds NUL bytes"),
        (b"  \n\t\n", "is empty"),
        (b"", "is empty"),
    ],
)
def test_files_that_are_not_text(tmp_path, content, message):
    path = tmp_path / "input.txt"
    path.write_bytes(content)
    with pytest.raises(PerplexityError, match=message):
        read_text(path)


def test_missing_folder_and_unreadable(tmp_path, monkeypatch):
    with pytest.raises(PerplexityError, match="no such file"):
        read_text(tmp_path / "absent.txt")
    with pytest.raises(PerplexityError, match="is a folder"):
        read_text(tmp_path)
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(PerplexityError, match="is not a regular file"):
        read_text(tmp_path / "pipe")
    locked = tmp_path / "locked.txt"
    locked.write_text("secret words")
    locked.chmod(0)
    try:
        if os.access(locked, os.R_OK):  # root reads every file: refuse the way the system would

            def refuse(path):
                raise PermissionError(13, "Permission denied")

            monkeypatch.setattr("pathlib.Path.read_bytes", refuse)
        with pytest.raises(PerplexityError, match=r"cannot read it \(Permission denied\)"):
            read_text(locked)
    finally:
        locked.chmod(0o600)


def test_a_byte_order_mark_is_not_text(tmp_path):
    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeffHello".encode())
    assert read_text(bom) == "Hello"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_on_a_gpu_the_number_is_the_cpu_one(trained, trained_checkpoint, dtype):
    """The inputs go to the model's device and the loss is summed in float32 whatever the weights' dtype."""
    on_cpu = perplexity_of_text(trained.model, trained.tokenizer, HELD_OUT, 64, 32)
    gpu = loaded(trained_checkpoint, mode="gpu", dtype=dtype)
    assert next(gpu.model.parameters()).device.type == "cuda"
    on_gpu = perplexity_of_text(gpu.model, gpu.tokenizer, HELD_OUT, 64, 32)
    assert on_gpu.tokens == on_cpu.tokens
    assert on_gpu.perplexity == pytest.approx(on_cpu.perplexity, rel=1e-4 if dtype == "float32" else 2e-2)
