"""The cheaper per-request warpers give the scores transformers' own give, row for row."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.continuous_batching import cb_logits_processors as cb
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from glmrepl.engine.generation.batch_sampling import speed_up_warpers


class _Manager:
    def __init__(self, processors):
        self.logit_processor = type("List", (), {"logits_processor": processors})()


def _pair(slow_class, warper):
    processors = [slow_class(warper)]
    assert speed_up_warpers(_Manager(processors)) == 1 and isinstance(processors[0], slow_class)
    assert type(processors[0]) is not slow_class
    return slow_class(warper), processors[0]


@pytest.mark.parametrize("top_k", [[1, 1, 1], [500, 500, 500], [1, 7, 500], [2, 500, 1], [3, 3, 3]])
def test_top_k_matches_the_per_request_warper(top_k):
    slow, fast = _pair(cb.ContinuousBatchingTopKLogitsWarper, TopKLogitsWarper(top_k=500))
    scores = torch.randn(3, 500, generator=torch.Generator().manual_seed(len(top_k) + sum(top_k)))
    scores[1, :4] = scores[1].max()  # ties at the top
    argument = torch.tensor(top_k, dtype=torch.int32)
    assert torch.equal(fast(scores.clone(), argument), slow(scores.clone(), argument))


@pytest.mark.parametrize("top_p", [[1.0, 1.0, 1.0], [0.9, 0.5, 0.99], [1.0, 0.8, 1.0], [0.3, 1.0, 1.0]])
@pytest.mark.parametrize("vocabulary,spread", [(500, 1.0), (151936, 0.5), (151936, 4.0)])  # flat to peaked
def test_top_p_matches_the_per_request_warper(top_p, vocabulary, spread):
    slow, fast = _pair(cb.ContinuousBatchingTopPLogitsWarper, TopPLogitsWarper(top_p=0.9999))
    generator = torch.Generator().manual_seed(int(sum(top_p) * 10))
    scores = torch.randn(3, vocabulary, generator=generator) * spread
    argument = torch.tensor(top_p, dtype=torch.float32).view(dtype=torch.int32)
    assert torch.equal(fast(scores.clone(), argument), slow(scores.clone(), argument))


def test_anything_else_is_left_alone():
    assert speed_up_warpers(_Manager([object()])) == 0
    assert speed_up_warpers(object()) == 0


def test_a_row_left_with_one_token_takes_it_and_the_others_draw_from_their_softmax():
    from glmrepl.engine.generation.batch_sampling import draw_tokens

    vocabulary, draws = 50, 4000
    greedy = torch.full((vocabulary,), float("-inf"))
    greedy[17] = 3.0  # what a top-k of 1 or a seeded draw leaves
    two_way = torch.full((vocabulary,), float("-inf"))
    two_way[3], two_way[40] = 0.0, torch.log(torch.tensor(3.0))  # probabilities 1/4 and 3/4
    scores = torch.stack([greedy, two_way] * draws).unsqueeze(0)
    output_ids = torch.full((2, 2 * draws), -1, dtype=torch.int32)

    torch.manual_seed(0)
    draw_tokens(scores, output_ids)

    tokens = output_ids[0]
    assert torch.all(tokens[0::2] == 17)
    drawn = tokens[1::2]
    assert set(drawn.tolist()) == {3, 40}
    assert abs((drawn == 40).float().mean().item() - 0.75) < 0.03
    assert torch.all(output_ids[1] == -1)  # the second row (log probabilities) is not written


def test_the_batch_processor_the_manager_creates_draws_with_the_cheaper_draw():
    from glmrepl.engine.generation.batch_sampling import draw_tokens, speed_up_draws

    class Runner:
        return_logprobs = False

        def _sample(self, scores, output_ids):
            raise AssertionError("the transformers draw ran")

    class Manager:
        model = type("Model", (), {"device": torch.device("cpu")})()

        def _create_batch_processor(self):
            return type("Processor", (), {"model_runner": Runner()})()

    manager = Manager()
    assert speed_up_draws(manager)
    assert manager._create_batch_processor().model_runner._sample is draw_tokens
    with_logprobs = Manager()
    Runner.return_logprobs = True
    assert speed_up_draws(with_logprobs)
    assert with_logprobs._create_batch_processor().model_runner._sample is not draw_tokens
    assert not speed_up_draws(object())
    Manager.model = type("Model", (), {"device": torch.device("meta")})()  # not a CPU step
    assert not speed_up_draws(Manager())
