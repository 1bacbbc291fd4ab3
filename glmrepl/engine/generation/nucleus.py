"""Nucleus (top-p) sampling without sorting the whole vocabulary at every token.

transformers' TopPLogitsWarper sorts every score of the step to find the nucleus: for a
152k-token vocabulary that is most of 20 ms a token on two cores, as long as an int4 model's
whole decoding step. The nucleus of a trained model is seldom more than a few hundred
tokens, so this one takes the best few hundred (``torch.topk``), and only when they do not
hold the mass ``top_p`` sorts them all, as transformers does. The
tokens kept are the ones transformers keeps: a token stays when the tokens ranked strictly
above it hold less than ``top_p``, the best token always stays.

transformers applies its own warpers after the ones it is given, so this one runs before
the temperature: it applies top-k itself (the order transformers keeps), uses the
temperature for the probabilities, and the temperature warper then divides the kept
scores as before (a filtered score stays -inf).
"""

from __future__ import annotations

from typing import Any

import torch

FIRST_CANDIDATES = 256


class NucleusFilter:
    """A logits processor: scores outside the top-p nucleus of softmax(scores / temperature) become -inf."""

    def __init__(self, top_p: float, temperature: float | None = None, top_k: int | None = None):
        self.top_p = top_p
        self.temperature = temperature or 1.0
        self.top_k = top_k or 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if 0 < self.top_k < scores.shape[-1]:  # transformers' order: top-k, then the nucleus of what is left
            threshold = scores.topk(self.top_k, dim=-1).values[..., -1:]
            scores = scores.masked_fill(scores < threshold, float("-inf"))
        probabilities = torch.softmax(scores.float() / self.temperature, dim=-1)
        best, indices = probabilities.topk(min(FIRST_CANDIDATES, scores.shape[-1]), dim=-1)
        if not bool((best.sum(-1) >= self.top_p).all()):  # a flat distribution: transformers' own sort
            return self._sorted(scores)
        above = best.cumsum(-1) - best  # the mass of the tokens ranked strictly above each
        keep_sorted = above < self.top_p
        keep_sorted[..., 0] = True
        keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, indices, keep_sorted)
        return scores.masked_fill(~keep, float("-inf"))

    def _sorted(self, scores: torch.Tensor) -> torch.Tensor:
        """TopPLogitsWarper's computation (after the temperature), so that even a nucleus of
        100k tokens ends at the same token: its cumulative sum runs from the least likely."""
        ascending, order = torch.sort(scores / self.temperature, descending=False)
        remove_sorted = ascending.softmax(dim=-1).cumsum(dim=-1) <= (1 - self.top_p)
        remove_sorted[..., -1:] = False
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        return scores.masked_fill(remove, float("-inf"))


def cheaper_nucleus(generate_kwargs: dict[str, Any]) -> dict[str, Any]:
    """``generate_kwargs`` with transformers' top-p warper replaced by NucleusFilter (same tokens kept)."""
    top_p = generate_kwargs.get("top_p")
    if not generate_kwargs.get("do_sample") or top_p is None or top_p >= 1.0:
        return generate_kwargs
    processors = list(generate_kwargs.get("logits_processor") or ())
    processors.append(NucleusFilter(top_p, generate_kwargs.get("temperature"), generate_kwargs.get("top_k")))
    from transformers import LogitsProcessorList

    cheaper = {"top_p": 1.0, "top_k": 0, "logits_processor": LogitsProcessorList(processors)}
    return {**generate_kwargs, **cheaper}
