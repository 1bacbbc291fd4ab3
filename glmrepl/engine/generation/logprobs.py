"""Each token's log-probability, under the distribution it was drawn from.

That distribution is the model's after everything that shapes the choice: the repetition
penalty, a format's mask (grammar.py), the temperature, top-k and top-p, as OpenAI
documents its logprobs. A greedy reply's is the softmax of the (penalised, masked) logits.
transformers applies its sampling filters after the processors it is given, so a reply that
records log-probabilities and samples gets these filters from ``recording_processors``
instead, in transformers' order, with the recorder last.
"""

from __future__ import annotations

from typing import Any

from ..conversation.tokens import escape_partial_characters, piece_bytes
from ..status import TokenLogprob

MAX_TOP_LOGPROBS = 20


class LogprobRecorder:
    """A logits processor that keeps the step's scores and their log-sum-exp (a log-softmax
    without writing one: only the drawn token and the best few are read); ``entry`` turns them
    into the drawn token's TokenLogprob once the token is known (transformers' streamer gets it
    next, before the following step makes new scores)."""

    def __init__(self, tokenizer: Any, top: int):
        self.tokenizer = tokenizer
        self.top = max(0, min(top, MAX_TOP_LOGPROBS))
        self.row: Any = None
        self.total: Any = None

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        self.row = scores[-1].float()
        self.total = torch.logsumexp(self.row, dim=-1)
        return scores

    def entry(self, token_id: int) -> TokenLogprob | None:
        if self.row is None:
            return None
        row, total, self.row = self.row, float(self.total), None
        top: tuple[TokenLogprob, ...] = ()
        if self.top:
            values, indices = row.topk(min(self.top, row.shape[-1]))
            values = values - total
            top = tuple(
                self._logprob(int(index), float(value))
                for value, index in zip(values.tolist(), indices.tolist())
                if value != float("-inf")  # a token the filters removed is no alternative
            )
        chosen = self._logprob(token_id, float(row[token_id]) - total)
        return TokenLogprob(chosen.token, token_id, chosen.logprob, chosen.bytes, top)

    def _logprob(self, token_id: int, logprob: float) -> TokenLogprob:
        raw = piece_bytes(self.tokenizer, token_id)
        return TokenLogprob(escape_partial_characters(raw), token_id, logprob, tuple(raw))


def recording_processors(generate_kwargs: dict[str, Any], recorder: LogprobRecorder) -> dict[str, Any]:
    """``generate_kwargs`` whose sampling filters run before ``recorder`` (the given processors
    first, as transformers runs them): the temperature, top-k and top-p as processors of our own."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper

    from .nucleus import NucleusFilter

    processors = list(generate_kwargs.get("logits_processor") or ())
    if generate_kwargs.get("do_sample"):
        temperature = float(generate_kwargs.get("temperature") or 1.0)
        top_k, top_p = int(generate_kwargs.get("top_k") or 0), float(generate_kwargs.get("top_p") or 1.0)
        if top_k > 0:
            processors.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            processors.append(NucleusFilter(top_p, temperature))
        if temperature != 1.0:
            processors.append(TemperatureLogitsWarper(temperature))
        generate_kwargs = {**generate_kwargs, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
    processors.append(recorder)
    return {**generate_kwargs, "logits_processor": LogitsProcessorList(processors)}
