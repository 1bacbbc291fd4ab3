"""Nucleus (top-p) sampling without sorting the whole vocabulary at every token.

transformers' TopPLogitsWarper sorts every score of the step to find the nucleus: for a
152k-token vocabulary that is most of 20 ms a token on two cores, as long as an int4 model's
whole decoding step. The nucleus of a trained model is seldom more than a few hundred
tokens, so this one takes the best few hundred (``torch.topk``). The tokens kept are the ones transformers keeps: a token stays when the tokens ranked strictly
above it hold less than ``top_p``, the best token always stays.

transformers applies its own warpers after the ones it is given, so this one runs before
the temperature: it applies top-k itself (the order transformers keeps), uses the
temperature for the probabilities, and the temperature warper then divides the kept
scores as before (a filtered score stays -inf).

A flat distribution (a nucleus of thousands of tokens) needs no full sort either
(``nucleus_removed``): the scores are counted into value bins, the bin where the mass from the
least likely token reaches ``1 - top_p`` is found from the bins' masses, and only that bin's
tokens are sorted. The batch's top-p (batch_sampling.TopP) decides the same way.
"""

from __future__ import annotations

from typing import Any

import torch

FIRST_CANDIDATES = 256
# Value bins a row's scores are counted into to find the nucleus's edge without a full sort.
EDGE_BINS = 4096


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
        return scores.masked_fill(nucleus_removed(scores.float() / self.temperature, self.top_p), float("-inf"))


def nucleus_removed(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Which tokens of each row of ``scores`` [..., vocabulary] TopPLogitsWarper removes: in
    ascending order of score, those whose cumulative probability is at most ``1 - top_p``
    (the best token always stays)."""
    rows = scores.reshape(-1, scores.shape[-1])
    return torch.stack([_row_nucleus_removed(row, top_p) for row in rows]).reshape(scores.shape)


def _row_nucleus_removed(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    found = _among_candidates(scores, top_p)
    return found if found is not None else _row_removed(scores, 1.0 - top_p)


def _among_candidates(scores: torch.Tensor, top_p: float) -> torch.Tensor | None:
    """``nucleus_removed`` for one row whose nucleus is among its FIRST_CANDIDATES best tokens
    (a token stays when the tokens ranked strictly above it hold less than ``top_p``); None
    when it is wider."""
    probabilities = torch.softmax(scores, dim=-1)
    best, indices = probabilities.topk(min(FIRST_CANDIDATES, scores.shape[-1]))
    if float(best.sum()) < top_p:
        return None
    keep_sorted = best.cumsum(-1) - best < top_p
    keep_sorted[0] = True
    return torch.ones_like(scores, dtype=torch.bool).index_fill_(0, indices[keep_sorted], False)


def _row_removed(scores: torch.Tensor, limit: float) -> torch.Tensor:
    """``nucleus_removed`` for one row: bins of equal width over the row's finite scores, the
    bin where the ascending cumulative mass passes ``limit``, and a sort of that bin alone."""
    probabilities = torch.softmax(scores.double(), dim=-1)
    finite = torch.isfinite(scores)
    lowest, highest = float(scores[finite].min()), float(scores[finite].max())
    scale = (EDGE_BINS - 1) / (highest - lowest) if highest > lowest else 0.0
    bins = ((scores.double() - lowest) * scale).floor_().nan_to_num_(-1.0, -1.0, -1.0).long()
    bins = bins.clamp_(min=-1) + 1  # bin 0: the -inf scores, which never stay
    mass = torch.zeros(EDGE_BINS + 1, dtype=torch.float64).index_add_(0, bins, probabilities)
    cumulative = mass.cumsum(0)
    edge = int((cumulative <= limit).sum())  # the first bin whose cumulative mass passes the limit
    removed = bins < edge
    if edge <= EDGE_BINS:
        inside = (bins == edge).nonzero().flatten()
        order = inside[scores[inside].argsort(stable=True)]
        below = float(cumulative[edge - 1]) if edge else 0.0
        removed[order] = below + probabilities[order].cumsum(0) <= limit
    removed[int(scores.argmax())] = False
    return removed


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
