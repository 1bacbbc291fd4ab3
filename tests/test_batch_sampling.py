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
def test_top_p_matches_the_per_request_warper(top_p):
    slow, fast = _pair(cb.ContinuousBatchingTopPLogitsWarper, TopPLogitsWarper(top_p=0.9999))
    scores = torch.randn(3, 500, generator=torch.Generator().manual_seed(int(sum(top_p) * 10)))
    argument = torch.tensor(top_p, dtype=torch.float32).view(dtype=torch.int32)
    assert torch.equal(fast(scores.clone(), argument), slow(scores.clone(), argument))


def test_anything_else_is_left_alone():
    assert speed_up_warpers(_Manager([object()])) == 0
    assert speed_up_warpers(object()) == 0
