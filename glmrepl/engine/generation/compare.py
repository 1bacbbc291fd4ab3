"""How far another model (or a variant of the loaded one) is from the loaded model, token by token.

Two kinds of figures, as llama.cpp's ``perplexity --kl-divergence`` reports them:

- teacher-forced: both models read the same tokens (the loaded model's reply, or a text file) and,
  at each position where a token is predicted, give a distribution over the vocabulary: P from the
  loaded model (the reference), Q from the other. Per token, the KL divergence
  KL(P || Q) = sum P (log P - log Q), in nats (0: the same distribution), and whether the two most
  likely tokens are the same ("same top-1"). Reported: the mean, the 99th percentile and the max of
  the KL divergence, and the share of positions with the same top-1.
- free-running: each model writes its own greedy reply (the most likely token at every step, with
  no repetition penalty) to the same prompt; the share of greedy tokens that agree is the length
  of the two replies' common beginning over the longer reply's length. Past the first token that
  differs, tokens at the same position no longer continue the same text, so they are not counted
  as agreeing even when they happen to be equal.

Both need the same tokenizer (an id must mean the same token to both models). The reference's
log-probabilities are kept, one row of the vocabulary's width per scored token, in float32 on the
CPU (``log_prob_rows``), so the other model can run after the loaded one was freed when the two do
not fit in memory together (see comparing.py).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ...common.units import counted
from ..errors import GlmreplError
from .perplexity import input_device, last_logits

Progress = Callable[[int, int], None]  # (done so far, to do)


class CompareError(GlmreplError):
    """The comparison cannot be made as asked; one line says why."""


class CompareCancelled(GlmreplError):
    """The user stopped a comparison."""


# -- per-token figures ----------------------------------------------------------------


@dataclass(frozen=True)
class TokenFigures:
    """Teacher-forced figures over ``tokens`` predicted positions (see the module docstring)."""

    tokens: int
    mean_kl: float  # nats per token
    max_kl: float
    p99_kl: float
    same_top: float  # share of positions where both models' most likely token is the same
    reference_nll: float  # mean negative log-likelihood of the tokens read, loaded model (nats)
    other_nll: float

    def describe(self) -> str:
        return (
            f"KL divergence per token: mean {self.mean_kl:.6f}, 99% {self.p99_kl:.6f}, max {self.max_kl:.6f}; "
            f"same top-1 {self.same_top:.1%} (over {counted(self.tokens, 'token')})"
        )


@dataclass
class Divergence:
    """Adds up the teacher-forced figures, a group of positions at a time."""

    kl: list[float] = field(default_factory=list)
    same_top: int = 0
    reference_nll: float = 0.0
    other_nll: float = 0.0

    def add(self, reference: Any, other: Any, targets: list[int]) -> None:
        """``reference`` and ``other``: log-probability rows (one per target, float32, on the CPU);
        ``targets``: the tokens those rows predict."""
        import torch

        reference, other = same_width(reference, other)
        token_kl = (reference.exp() * (reference - other)).sum(-1).clamp_min(0)  # rounding can dip below 0
        self.kl += token_kl.tolist()
        self.same_top += int((reference.argmax(-1) == other.argmax(-1)).sum())
        index = torch.tensor(targets, dtype=torch.long).unsqueeze(-1)
        self.reference_nll -= float(reference.gather(-1, index).sum())
        self.other_nll -= float(other.gather(-1, index).sum())

    def figures(self) -> TokenFigures:
        import torch

        tokens = len(self.kl)
        if not tokens:
            raise CompareError("there is no token to compare on")
        values = torch.tensor(self.kl, dtype=torch.float64)
        return TokenFigures(
            tokens,
            float(values.mean()),
            float(values.max()),
            float(torch.quantile(values, 0.99)),
            self.same_top / tokens,
            self.reference_nll / tokens,
            self.other_nll / tokens,
        )


def same_width(reference: Any, other: Any) -> tuple[Any, Any]:
    """Rows over the same vocabulary: where one model pads its output layer wider than the other
    (a ChatGLM's padded vocabulary), both are cut to the narrower width and normalized again."""
    width = min(reference.shape[-1], other.shape[-1])
    if reference.shape[-1] == other.shape[-1]:
        return reference, other
    return reference[..., :width].log_softmax(-1), other[..., :width].log_softmax(-1)


def log_prob_rows(model: Any, fed: list[int], count: int) -> Any:
    """Log-probabilities (float32, on the CPU) of the positions that predict the last ``count`` of
    ``fed``: one row of the vocabulary's width per predicted token."""
    import torch

    input_ids = torch.tensor([fed], dtype=torch.long, device=input_device(model))
    with torch.inference_mode():
        logits = last_logits(model, input_ids, count + 1)[0, -(count + 1) : -1]
        return torch.log_softmax(logits.float(), dim=-1).cpu()


def rows_bytes(tokens: int, width: int) -> int:
    """Memory kept for the reference's rows of ``tokens`` positions (float32)."""
    return tokens * width * 4


# -- greedy replies ---------------------------------------------------------------------


def greedy_ids(
    model: Any,
    prompt_ids: list[int],
    max_new_tokens: int,
    stop_ids: list[int],
    cancel: threading.Event,
    progress: Progress | None = None,
) -> list[int]:
    """The model's greedy reply to ``prompt_ids``, its end-of-turn id included when it wrote one;
    CompareCancelled when ``cancel`` is set (checked after every token)."""
    import torch
    from transformers import StoppingCriteria

    class Watch(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            if progress is not None:
                progress(input_ids.shape[-1] - len(prompt_ids), max_new_tokens)
            return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device)

    input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=input_device(model))
    with torch.inference_mode():
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            # The checkpoint's sampling values and penalty would make this something else than the argmax.
            temperature=None,
            top_p=None,
            top_k=None,
            repetition_penalty=1.0,
            eos_token_id=stop_ids or None,
            pad_token_id=stop_ids[0] if stop_ids else None,
            stopping_criteria=[Watch()],
        )
    if cancel.is_set():
        raise CompareCancelled("cancelled")
    return [int(i) for i in output[0, len(prompt_ids) :].tolist()]


def greedy_agreement(first: list[int], second: list[int]) -> tuple[int, int]:
    """(tokens the two replies begin with in common, tokens of the longer one)."""
    common = 0
    for a, b in zip(first, second):
        if a != b:
            break
        common += 1
    return common, max(len(first), len(second))


# -- the results ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplyComparison:
    """``/compare``: both greedy replies to the conversation's last message, and the figures."""

    name: str  # the loaded model
    other: str  # the model compared with
    reply: str
    other_reply: str
    agreeing: int  # greedy tokens the replies begin with in common
    longest: int  # tokens of the longer reply
    figures: TokenFigures | None  # None when the tokenizers differ
    order: str  # "beside", or "after" (once the loaded model made room)
    seconds: float

    @property
    def agreement(self) -> float:
        return self.agreeing / self.longest if self.longest else 1.0

    def describe(self) -> str:
        if self.figures is None:
            figures = ["the tokenizers differ: the replies are compared as text only"]
        else:
            figures = [
                f"greedy tokens that agree: {self.agreement:.1%} "
                f"(the replies begin with the same {self.agreeing} of {counted(self.longest, 'token')})",
                f"{self.other} on this model's reply, teacher-forced: {self.figures.describe()}",
            ]
        return "\n".join([*figures, f"({ran(self.other, 'this model', self.order)}; {self.seconds:.1f} s)"])


@dataclass(frozen=True)
class TextComparison:
    """``glmrepl check A --compare B --ppl FILE``: the figures over a text, in perplexity's windows."""

    name: str
    other: str
    figures: TokenFigures
    windows: int
    window: int
    stride: int
    order: str
    seconds: float

    def describe(self) -> str:
        f = self.figures
        windows = f"{counted(self.windows, 'window')} of {self.window}, stride {self.stride}"
        return "\n".join(
            [
                f"compared {self.other} with {self.name} over {counted(f.tokens, 'token')} ({windows}) "
                f"in {self.seconds:.1f} s ({ran(self.other, self.name, self.order)})",
                f"perplexity: {self.name} {math.exp(f.reference_nll):,.4f}, {self.other} {math.exp(f.other_nll):,.4f}",
                f"KL divergence per token: mean {f.mean_kl:.6f}, 99% {f.p99_kl:.6f}, max {f.max_kl:.6f}",
                f"same top-1: {f.same_top:.2%}",
            ]
        )


def ran(other: str, name: str, order: str) -> str:
    """How the two models shared the memory."""
    if order == "beside":
        return f"{other} ran beside {name}"
    return f"{other} ran after {name} made room for it: they do not fit in memory together"
