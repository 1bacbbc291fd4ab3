"""The fused decoding step (decode_step.py, decode_layer.cpp) against transformers' own forward."""

import copy

import pytest
import torch
from test_prefix_reuse import load, turn
from transformers import (
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from glmrepl.engine.conversation.chat import ChatSession
from glmrepl.engine.models.quantize import quantize_model
from glmrepl.engine.quant import decode_step
from glmrepl.engine.quant.layers import QuantizedLinear

PROMPT = [5, 17, 42, 99, 7, 3, 250, 11]


def tiny(kind: str, **extra):
    small = dict(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4)
    small.update(extra)
    kinds = {  # Qwen2: biased q/k/v and tied embeddings; Llama: untied; Mistral: a sliding window
        "qwen2": (Qwen2ForCausalLM, Qwen2Config(num_key_value_heads=2, tie_word_embeddings=True, **small)),
        "llama": (LlamaForCausalLM, LlamaConfig(num_key_value_heads=1, tie_word_embeddings=False, **small)),
        "mistral": (MistralForCausalLM, MistralConfig(num_key_value_heads=2, **{"sliding_window": 64, **small})),
    }
    model_class, config = kinds[kind]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = model_class(config)
    return model.float().eval()


def decode(forward, steps: int = 10, fed: bool = False):
    """Greedy steps after a prefill of PROMPT: each step's logits, the cache (and the ids fed)."""
    cache, ids = DynamicCache(), []
    with torch.inference_mode():
        out = forward(input_ids=torch.tensor([PROMPT]), cache=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        logits = []
        for _ in range(steps):
            ids.append(int(token))
            out = forward(input_ids=token, cache=cache, use_cache=True)
            logits.append(out.logits[0, -1])
            token = out.logits[:, -1:].argmax(-1)
    return (torch.stack(logits), cache, ids) if fed else (torch.stack(logits), cache)


def plain(model):
    return type(model).forward.__get__(model)


@pytest.mark.parametrize("kind", ["qwen2", "llama", "mistral"])
@pytest.mark.parametrize("bits", [None, 8, 4])
def test_fused_steps_equal_transformers_steps(kernels, steps_taken, kind, bits):
    model = tiny(kind)
    if bits:
        quantize_model(model, bits, 32)  # two groups a row: the kernels' 16-bit activation path
    assert decode_step.enable(model)
    fused, fused_cache = decode(model.forward)
    assert steps_taken["n"] == 10
    reference, reference_cache = decode(plain(model))
    # Float: the same sums in another order. int8/int4: the activations' 16-bit rounding
    # can fall the other way for a last-bit difference in a layer's input.
    tolerance = 2e-5 if bits is None else 2e-3
    assert torch.allclose(fused, reference, atol=tolerance, rtol=0)
    assert torch.equal(fused.argmax(-1), reference.argmax(-1))
    for ours, theirs in zip(fused_cache.layers, reference_cache.layers):
        assert ours.keys.shape == theirs.keys.shape == (1, model.config.num_key_value_heads, len(PROMPT) + 10, 16)
        assert torch.allclose(ours.keys, theirs.keys, atol=tolerance) and torch.allclose(
            ours.values, theirs.values, atol=tolerance
        )


def test_generate_gives_the_same_tokens_fused_and_plain(kernels, steps_taken):
    model = tiny("qwen2")
    ids = torch.tensor([PROMPT])
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=20, pad_token_id=0)
    with torch.inference_mode():
        before = model.generate(ids, **kwargs)
        decode_step.enable(model)
        after = model.generate(ids, **kwargs)
    assert steps_taken["n"] == 19  # every step after the prompt's
    assert torch.equal(before, after)


def test_steps_transformers_must_take_go_its_way(kernels, steps_taken):
    model = tiny("mistral", sliding_window=12)
    decode_step.enable(model)
    ids = torch.tensor([PROMPT, PROMPT])
    with torch.inference_mode():
        cache = DynamicCache()
        model(input_ids=ids, cache=cache)
        model(input_ids=ids[:, :1], cache=cache)  # two sequences
        cache = DynamicCache()
        model(input_ids=ids[:1], cache=cache)
        padded = torch.ones(1, len(PROMPT) + 1, dtype=torch.long)
        padded[0, 0] = 0
        model(input_ids=ids[:1, :1], cache=cache, attention_mask=padded)  # padding
        model(input_ids=ids[:1, :1], cache=copy.deepcopy(cache), output_attentions=True)
    assert steps_taken["n"] == 0
    fused, _ = decode(model.forward, steps=8)  # positions 8..15; from 12 on the window leaves some out
    assert steps_taken["n"] == 4
    reference, _ = decode(plain(model), steps=8)
    assert torch.allclose(fused, reference, atol=2e-5, rtol=0)


def test_a_cache_left_by_fused_steps_serves_transformers(kernels):
    """Cropped, copied and extended by a prompt, as prefix reuse does, it gives a fresh run's logits."""
    model = tiny("llama")
    decode_step.enable(model)
    _, cache, fed = decode(model.forward, steps=6, fed=True)
    assert cache.layers[0].keys.data_ptr() == cache.layers[0]._glmrepl_buffers[0].data_ptr()  # a view
    copied = copy.deepcopy(cache)
    copied.crop(-4)  # keep the prompt and the first two tokens fed
    more = [8, 9, 10, 11]
    with torch.inference_mode():
        continued = plain(model)(input_ids=torch.tensor([more]), cache=copied).logits[0]
        fresh = plain(model)(input_ids=torch.tensor([PROMPT + fed[:2] + more])).logits[0, -len(more) :]
    assert torch.allclose(continued, fresh, atol=2e-5)
    assert copied.get_seq_length() == len(PROMPT) + 2 + len(more)


def test_a_model_change_plans_again(qwen_checkpoint, kernels, steps_taken):
    backend = load(qwen_checkpoint, "qwen")
    model = backend.manager.current.model
    assert "forward" in vars(model)  # loading enabled the fused step
    session = ChatSession()
    session.add_user("hello there")
    turn(backend, session, 8, fresh=False)
    assert steps_taken["n"] > 0
    plan = vars(model)["_glmrepl_decode_plan"]
    assert not any(isinstance(m, QuantizedLinear) for m in plan.layers[0][1])
    backend.manager.quantize(8)
    assert "_glmrepl_decode_plan" not in vars(model)
    taken = steps_taken["n"]
    session.add_user("and again")
    turn(backend, session, 8, fresh=False)
    assert steps_taken["n"] > taken
    assert any(isinstance(m, QuantizedLinear) for m in vars(model)["_glmrepl_decode_plan"].layers[0][1])


def batch_logits(model, prompts, new_tokens: int = 6, step_tokens: int = 64):
    """Greedy replies to ``prompts`` in transformers' continuous batch (at most ``step_tokens``
    a step: longer prompts are read in parts), and the logits of every step."""
    from transformers import ContinuousBatchingConfig, GenerationConfig

    steps = []
    forward = model.forward

    def recorded(**kwargs):
        out = forward(**kwargs)
        steps.append(out.logits[0].clone())
        return out

    model.forward = recorded
    try:
        generation = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
        batching = ContinuousBatchingConfig(num_blocks=64, page_size=8, max_batch_tokens=step_tokens)
        with torch.inference_mode():
            outputs = model.generate_batch(
                inputs=prompts, generation_config=generation, continuous_batching_config=batching, warmup=False
            )
    finally:
        model.forward = forward
    replies = [list(output.generated_tokens) for _, output in sorted(outputs.items())]
    return replies, steps


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_fused_batch_steps_equal_transformers_steps(kernels, batch_steps_taken, kind):
    """Three sequences of different lengths, their prompts read together, then decoding
    together: the fused layers read each one's own positions from the paged cache and give
    transformers' logits at every step."""
    model = tiny(kind)
    prompts = [PROMPT, PROMPT[:5] + [60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70], [9, 8, 7]]
    decode_step.enable(model)
    with decode_step.transformers_steps(model):
        reference_replies, reference = batch_logits(model, prompts)
    assert batch_steps_taken["n"] == 0
    replies, fused = batch_logits(model, prompts)
    assert batch_steps_taken["n"] == len(fused) == len(reference) == 6  # the prompts' step, then 5 more
    assert replies == reference_replies
    for ours, theirs in zip(fused, reference):
        assert torch.allclose(ours, theirs, atol=2e-5, rtol=0)


def test_a_prompt_read_in_parts_is_fused_where_a_step_is_small(kernels, batch_steps_taken):
    """A 40-token prompt read 24 tokens a step: its second part attends to the cached first
    part; a step of more tokens than MAX_ROWS goes through transformers."""
    model = tiny("qwen2")
    long_prompt = [(7 * i) % 290 + 3 for i in range(40)]
    decode_step.enable(model)
    with decode_step.transformers_steps(model):
        reference_replies, reference = batch_logits(model, [long_prompt, PROMPT], step_tokens=24)
    replies, fused = batch_logits(model, [long_prompt, PROMPT], step_tokens=24)
    assert batch_steps_taken["n"] == len(fused) == len(reference)
    assert replies == reference_replies
    for ours, theirs in zip(fused, reference):
        assert torch.allclose(ours, theirs, atol=2e-5, rtol=0)
    taken = batch_steps_taken["n"]
    wide = [[(11 * i) % 290 + 3 for i in range(decode_step.MAX_ROWS + 8)]]
    replies, steps = batch_logits(model, wide, new_tokens=3)
    assert batch_steps_taken["n"] == taken + len(steps) - 1  # all but the prompt's step


def test_batch_steps_the_fused_layers_cannot_take_go_transformers_way(kernels, batch_steps_taken):
    """Quantized layers (their kernels read one token at a time) and sliding windows."""
    prompts = [PROMPT, [9, 8, 7]]
    quantized = tiny("qwen2")
    quantize_model(quantized, 8, 32)
    windowed = tiny("mistral", sliding_window=6)
    for model in (quantized, windowed):
        decode_step.enable(model)
        replies, steps = batch_logits(model, prompts, new_tokens=4)
        assert len(steps) == 4 and all(len(reply) == 4 for reply in replies)
    assert batch_steps_taken["n"] == 0
