"""The cheaper nucleus filter keeps exactly the tokens transformers' warpers keep."""

import pytest
import torch
from support import loaded_app
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from glmrepl.engine.generation.nucleus import FIRST_CANDIDATES, NucleusFilter, cheaper_nucleus
from glmrepl.engine.generation.run import GenerationRun
from glmrepl.engine.generation.scheduler import private_scheduler


def transformers_kept(scores, top_p, temperature, top_k):
    """The tokens transformers' own warpers leave finite, in its order: temperature, top-k, top-p."""
    scores = TemperatureLogitsWarper(temperature)(None, scores.clone())
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    return torch.isfinite(TopPLogitsWarper(top_p)(None, scores))


@pytest.mark.parametrize("vocabulary", [50, 5000, 151936])
@pytest.mark.parametrize("sharpness", [0.3, 3.0, 12.0])  # flat (a full sort) to a nucleus of a few tokens
@pytest.mark.parametrize("top_p,temperature,top_k", [(0.9, 0.7, 0), (0.5, 1.0, 40), (0.95, 1.4, 0), (0.0, 1.0, 0)])
def test_kept_tokens_equal_transformers(vocabulary, sharpness, top_p, temperature, top_k):
    generator = torch.Generator().manual_seed(vocabulary + int(sharpness * 10))
    scores = torch.randn(3, vocabulary, generator=generator) * sharpness
    ours = NucleusFilter(top_p, temperature, top_k)(None, scores.clone())
    assert torch.equal(torch.isfinite(ours), transformers_kept(scores, top_p, temperature, top_k))
    kept = torch.isfinite(ours)
    assert torch.equal(ours[kept], scores[kept])  # kept scores are untouched (the temperature comes after)


def test_tied_scores_at_the_nucleus_edge_keep_as_many_tokens():
    """Which of tied tokens stays is the sort's choice, in transformers too; how many is not."""
    scores = torch.zeros(1, 4 * FIRST_CANDIDATES)
    scores[0, 100:110] = 5.0  # ten tied best tokens hold 59% of the mass, then a flat tail
    for top_p in (0.5, 0.6):  # the edge inside the tied tokens, then inside the tied tail
        ours = torch.isfinite(NucleusFilter(top_p)(None, scores.clone()))
        theirs = transformers_kept(scores, top_p, 1.0, 0)
        assert int(ours.sum()) == int(theirs.sum()) > 1
        assert bool(ours[0, 100:110].all()) == bool(theirs[0, 100:110].all())


def test_kwargs_swap_only_when_sampling_with_a_nucleus():
    greedy = {"do_sample": False, "top_p": 0.9}
    assert cheaper_nucleus(greedy) is greedy
    no_nucleus = {"do_sample": True, "top_p": 1.0, "temperature": 0.7}
    assert cheaper_nucleus(no_nucleus) is no_nucleus
    swapped = cheaper_nucleus({"do_sample": True, "top_p": 0.8, "temperature": 0.7, "top_k": 5})
    assert swapped["top_p"] == 1.0 and swapped["top_k"] == 0
    (nucleus,) = swapped["logits_processor"]
    assert (nucleus.top_p, nucleus.temperature, nucleus.top_k) == (0.8, 0.7, 5)


def test_sampled_replies_equal_transformers_own_sampling(qwen_checkpoint):
    """The same seed gives the same tokens through GenerationRun (the filter) and plain generate."""
    loaded = loaded_app(qwen_checkpoint).manager.current
    prompt = loaded.prompt_format.build([{"role": "user", "content": "Hello there"}])
    kwargs = {"max_new_tokens": 24, "do_sample": True, "temperature": 0.8, "top_p": 0.6, "top_k": 50}
    stop = loaded.prompt_format.stop_token_ids
    run = GenerationRun(loaded.model, loaded.tokenizer, prompt, kwargs, stop, seed=7, scheduler=private_scheduler())
    "".join(run)
    torch.manual_seed(7)
    with torch.inference_mode():
        raw = loaded.model.generate(torch.tensor([prompt]), eos_token_id=stop, pad_token_id=0, **kwargs)
    assert run.stats.new_ids == raw[0, len(prompt) :].tolist()
    assert len(set(run.stats.new_ids)) > 1
