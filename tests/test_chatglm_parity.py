"""Parity with the released ChatGLM code on the tiny reference checkpoints.

For every fixture case: the prompt ids, the greedy ids and their decoded text
exactly, and the logits of a plain forward pass within 1e-4 in float32.
"""

from __future__ import annotations

import pytest
from chatglm_reference import assert_logits_match, assert_matches_case, expected, load_reference, reference_cases

FAMILIES = ("chatglm1", "chatglm2", "chatglm3")


@pytest.fixture(scope="module")
def loaded():
    return {family: load_reference(family) for family in FAMILIES}


@pytest.mark.parametrize("family,index", reference_cases(FAMILIES))
def test_prompt_greedy_and_decoded(loaded, family, index):
    assert_matches_case(loaded[family], expected(family)["cases"][index])


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_reference(loaded, family):
    assert_logits_match(loaded[family], family)


@pytest.mark.parametrize("family", ["chatglm1", "chatglm2"])
def test_clean_reply_matches_chat_response(loaded, family):
    for case in expected(family)["cases"]:
        assert loaded[family].prompt_format.clean_reply(case["decoded"]) == case["response"]


def test_chatglm3_reply_drops_the_stop_token(loaded):
    case = expected("chatglm3")["cases"][1]  # ended by <|user|>
    assert loaded["chatglm3"].prompt_format.clean_reply(case["decoded"]) == case["response"]


def test_generation_config_stops_like_chat(loaded):
    for parts in loaded.values():
        assert parts.model.generation_config.eos_token_id == parts.prompt_format.stop_token_ids


def test_chatglm1_streams_with_stopping_criteria(loaded):
    """The generic generate() path: streamer, stopping criteria, padding mask, sampling settings."""
    import torch
    from transformers import StoppingCriteria

    class StopAfter(StoppingCriteria):
        def __init__(self, length):
            self.length = length

        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)

    class Collect:
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.reshape(-1).tolist())

        def end(self):
            pass

    case = expected("chatglm1")["cases"][0]
    parts, streamer = loaded["chatglm1"], Collect()
    prompt = torch.tensor([case["prompt_ids"]])
    with torch.inference_mode():
        parts.model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            streamer=streamer,
            stopping_criteria=[StopAfter(prompt.shape[1] + 5)],
            do_sample=False,
            max_new_tokens=24,
            eos_token_id=parts.prompt_format.stop_token_ids,
            pad_token_id=parts.prompt_format.stop_token_ids[0],
        )
    streamed = [token for chunk in streamer.chunks[1:] for token in chunk]
    assert streamed == case["greedy_ids"][:5]


def test_chatglm1_guard_replaces_invalid_scores():
    import torch

    from glmrepl.engine.families.chatglm.glm1_model import INVALID_SCORE_TOKEN, _replace_invalid_scores

    logits = torch.tensor([[[0.0, float("nan"), 1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]]])
    guarded = _replace_invalid_scores(logits)
    assert guarded[0, 0].argmax().item() == INVALID_SCORE_TOKEN and torch.isfinite(guarded).all()
    assert torch.equal(guarded[0, 1], logits[0, 1])


def test_chatglm1_positions_and_prompt_attention():
    import torch

    from glmrepl.engine.families.chatglm.glm1_model import ChatGLM1Config, glm1_attention_mask, glm1_position_ids

    config = ChatGLM1Config(bos_token_id=8, gmask_token_id=5, mask_token_id=4)
    positions = glm1_position_ids(torch.tensor([[20, 21, 5, 8, 30, 31]]), config)
    assert positions.tolist() == [[[0, 1, 2, 2, 2, 2], [0, 0, 0, 1, 2, 3]]]
    visible = glm1_attention_mask(positions, past_length=0, padding_mask=None)[0, 0]
    assert visible[0].tolist() == [True, True, True, False, False, False]  # the prompt sees all of itself
    assert visible[4].tolist() == [True, True, True, True, True, False]  # the reply is causal
    step = glm1_attention_mask(positions[..., -1:], past_length=5, padding_mask=None)[0, 0]
    assert step.tolist() == [[True] * 6]
