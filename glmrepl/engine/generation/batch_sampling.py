"""Cheaper per-request top-k and top-p for transformers' continuous batching.

Its per-request warpers sort the whole vocabulary of every row at every step, even for a
greedy request (top-k 1) or one without a nucleus (top-p 1): two sorts of 8 x 152k scores
took about 120 ms a step on two cores, as long as the model's own step for 8 requests. These
give the same scores: rows that need no filtering are left as they are, a greedy row keeps
its maximum, and only the rows that really filter pay for a top-k or a nucleus (without a
sort of the vocabulary: nucleus.py).

The draw after them has the same cost problem: ``torch.multinomial`` over 8 x 152k
probabilities took longer than the rest of the step's sampling together, for rows whose
filters left a single token (greedy, seeded). ``draw_tokens`` takes that token directly and
draws only the rows that have a choice, by their cumulative distribution.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch


def speed_up_warpers(manager: Any) -> int:
    """Swap the manager's per-request top-k / top-p warpers for these; returns how many.
    Anything not as expected (another transformers) is left alone."""
    try:
        from transformers.generation.continuous_batching import cb_logits_processors as cb
    except ImportError:
        return 0
    faster: dict[type, type] = {
        cb.ContinuousBatchingTopKLogitsWarper: TopK,
        cb.ContinuousBatchingTopPLogitsWarper: TopP,
    }
    processors: Any = getattr(getattr(manager, "logit_processor", None), "logits_processor", None)
    swapped = 0
    for index, processor in enumerate(processors or ()):
        fast = faster.get(type(processor))
        if fast is not None:
            # The same state in a subclass: the list still sees the per-request warper it made.
            replacement: Any = object.__new__(type(fast.__name__, (fast, type(processor)), {}))
            replacement.__dict__.update(vars(processor))
            processors[index] = replacement
            swapped += 1
    return swapped


def speed_up_draws(manager: Any) -> bool:
    """Make the batch processor the manager creates draw with ``draw_tokens``; False on other
    devices than the CPU (a GPU's step may be captured as a graph, which a data-dependent
    choice of rows would break) and when this transformers is not as expected."""
    create = getattr(manager, "_create_batch_processor", None)
    if not callable(create) or getattr(getattr(manager, "model", None), "device", None) != torch.device("cpu"):
        return False

    def create_with_cheaper_draws() -> Any:
        processor = create()
        runner = getattr(processor, "model_runner", None)
        if callable(getattr(runner, "_sample", None)) and getattr(runner, "return_logprobs", None) is False:
            runner._sample = draw_tokens  # type: ignore[union-attr]
        return processor

    manager._create_batch_processor = create_with_cheaper_draws
    return True


def draw_tokens(scores: torch.Tensor, output_ids: torch.Tensor) -> None:
    """The next token of each row of ``scores`` [1, rows, vocabulary], into ``output_ids[0]``:
    a row whose filters left one token (its second best is -inf) takes it; the others draw
    from their softmax by inverse transform (one uniform number per row)."""
    rows = scores[0]
    best = rows.topk(2, dim=-1)
    tokens = best.indices[:, 0].clone()
    choosing = (best.values[:, 1] > float("-inf")).nonzero().flatten()
    if choosing.numel():
        cumulative = torch.softmax(rows[choosing], dim=-1).cumsum(dim=-1)
        targets = torch.rand(choosing.numel(), 1) * cumulative[:, -1:]
        drawn = torch.searchsorted(cumulative, targets, right=True).flatten()
        tokens[choosing] = drawn.clamp_(max=rows.shape[-1] - 1)
    output_ids[0, : tokens.numel()].copy_(tokens)


class TopK:
    """Keep each row's k best scores (ties kept), k from the request; k >= vocabulary: all."""

    filter_value: float

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        rows, vocabulary = scores.shape
        top_k = tensor_arg[:rows].clamp(max=vocabulary).tolist()
        if all(k >= vocabulary for k in top_k):
            return scores
        thresholds = torch.full((rows, 1), float("-inf"), dtype=scores.dtype)
        for row, k in enumerate(top_k):
            if k < vocabulary:
                thresholds[row, 0] = scores[row].max() if k == 1 else scores[row].topk(k).values[-1]
        return scores.masked_fill(scores < thresholds, self.filter_value)


class TopP:
    """The nucleus filter on the rows whose top_p is below 1 (the others have nothing to filter),
    deciding as transformers' warper does without sorting the vocabulary (nucleus.py)."""

    filter_value: float

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        from .nucleus import nucleus_removed

        rows = scores.shape[0]
        top_p = tensor_arg[:rows].view(dtype=torch.float32).tolist()
        filtering = [row for row in range(rows) if top_p[row] < 1.0]
        if not filtering:
            return scores
        scores = scores.clone()
        for row in filtering:
            scores[row].masked_fill_(nucleus_removed(scores[row], top_p[row]), self.filter_value)
        return scores


def add_request_processors(manager: Any) -> tuple[RepetitionPenalty, SeededDraws] | None:
    """Give the batch per-request repetition penalties and seeds, so that such replies decode in
    the batch rather than beside it; returns both (None: this transformers is not as expected)."""
    try:
        from transformers.generation.continuous_batching import cb_logits_processors as cb
    except ImportError:
        return None
    processors: Any = getattr(manager, "logit_processor", None)
    if processors is None or not hasattr(processors, "supported_keys"):
        return None
    penalty = type("RepetitionPenalty", (RepetitionPenalty, cb.ContinuousBatchingLogitsProcessor), {})()
    draws = type("SeededDraws", (SeededDraws, cb.ContinuousBatchingLogitsProcessor), {})()
    # generate's order: the penalty before the warpers; the draw after them, from what they kept.
    processors.logits_processor.insert(0, penalty)
    processors.logits_processor.append(draws)
    processors.tensors_required += 2
    processors.supported_keys.update(RepetitionPenalty.supported_kwargs, **SeededDraws.supported_kwargs)
    processors.do_processing = True
    return penalty, draws


class _RequestSlots:
    """A number per request that its row's tensor argument carries (-1: nothing to do), so a
    step's rows find their request's state whatever order the batch prepares steps in. Numbers
    are never reused: a request taken out while its step runs (cancelled, or back to decoding
    alone) leaves a number that finds nothing, and its row is left as it is."""

    def __init__(self) -> None:
        self._slots: dict[str, int] = {}
        self._next = 0

    def slot(self, request_id: str) -> int:
        slot = self._slots.get(request_id)
        if slot is None:
            slot = self._slots[request_id] = self._next
            self._next = (self._next + 1) % 2**31  # the tensor argument is int32
        return slot

    def find(self, request_id: str) -> int:
        return self._slots.get(request_id, -1)

    def release(self, request_id: str) -> int | None:
        return self._slots.pop(request_id, None)

    def rows(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> list[tuple[int, int]]:
        """(row, slot) of the rows that carry a slot."""
        return [(row, slot) for row, slot in enumerate(tensor_arg[: scores.shape[0]].tolist()) if slot >= 0]


class _PerRequest:
    """A per-request processor of the batch: each row's tensor argument is its request's slot."""

    def __init__(self) -> None:
        self.slots = _RequestSlots()

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.fill_(-1)

    def prepare_tensor_args(self, requests_with_new_token: list[Any]) -> torch.Tensor:
        return torch.tensor([self._row(request.state) for request in requests_with_new_token], dtype=torch.int32)

    def _row(self, state: Any) -> int:
        """The row's slot, or -1 when the processor leaves the request's scores alone."""
        raise NotImplementedError

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        rows = self.slots.rows(scores, tensor_arg)
        if not rows:
            return scores
        scores = scores.clone()
        for row, slot in rows:
            self._apply(scores, row, slot)
        return scores

    def _apply(self, scores: torch.Tensor, row: int, slot: int) -> None:
        """Change the row's scores in place."""
        raise NotImplementedError


class RepetitionPenalty(_PerRequest):
    """transformers' repetition penalty, per request: the scores of each row's prompt and
    generated ids are divided (positive) or multiplied (negative) by the request's penalty."""

    supported_kwargs: dict[str, type] = {"repetition_penalty": float}
    ignored_kwargs: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self._states: dict[int, Any] = {}

    def forget(self, request_id: str) -> None:
        slot = self.slots.release(request_id)
        self._states.pop(slot if slot is not None else -1, None)

    def _row(self, state: Any) -> int:
        if float(state.logit_processor_kwargs.get("repetition_penalty", 1.0)) == 1.0:
            return -1
        slot = self.slots.slot(state.request_id)
        self._states[slot] = state
        return slot

    def _apply(self, scores: torch.Tensor, row: int, slot: int) -> None:
        state = self._states.get(slot)
        if state is None:  # taken out of the batch while this step ran: its token is never used
            return
        penalty = float(state.logit_processor_kwargs["repetition_penalty"])
        ids = list(state.initial_tokens) + list(state.generated_tokens)  # as generate's input_ids
        index = torch.tensor(ids, dtype=torch.long, device=scores.device)
        picked = scores[row].gather(0, index)
        scores[row].scatter_(0, index, torch.where(picked < 0, picked * penalty, picked / penalty))


class SeededDraws(_PerRequest):
    """The draw of a seeded request from its own generator, as ``generate`` draws after
    ``torch.manual_seed``: its row's scores become that token alone, so the batch's shared
    sampler can only pick it. Rows without a seed pass unchanged."""

    supported_kwargs: dict[str, type] = {"seed": int}
    ignored_kwargs: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self._generators: dict[int, torch.Generator] = {}
        self._starts: dict[str, torch.Tensor] = {}  # where a request's draws start (a run moved into the batch)
        # Per slot: draws made, and the generator's state after each of the last few of them (a
        # draw whose token never reached the run is undone when the run leaves the batch).
        self._draws: dict[int, int] = {}
        self._recent: dict[int, deque[tuple[int, torch.Tensor]]] = {}

    def start_from(self, request_id: str, state: torch.Tensor) -> None:
        """The request's draws continue from this CPU generator state (given before it is added)."""
        self._starts[request_id] = state

    def forget(self, request_id: str) -> None:
        slot = self.slots.release(request_id)
        for table in (self._generators, self._draws, self._recent):
            table.pop(slot if slot is not None else -1, None)
        self._starts.pop(request_id, None)

    def state_of(self, request_id: str, delivered: int) -> torch.Tensor | None:
        """The generator's state after the request's first ``delivered`` draws (the tokens its run
        received), or None when it cannot be told."""
        slot = self.slots.find(request_id)
        generator = self._generators.get(slot)
        if generator is None:
            return self._starts.get(request_id) if delivered == 0 else None
        if delivered >= self._draws.get(slot, 0):
            return generator.get_state()
        return next((state for count, state in self._recent.get(slot, ()) if count == delivered), None)

    def _row(self, state: Any) -> int:
        seed = state.logit_processor_kwargs.get("seed")
        if seed is None:
            return -1
        slot = self.slots.slot(state.request_id)
        if slot not in self._generators:
            self._generators[slot] = self._new_generator(state.request_id, int(seed))
        return slot

    def _new_generator(self, request_id: str, seed: int) -> torch.Generator:
        generator = torch.Generator()
        start = self._starts.pop(request_id, None)
        if start is not None:
            generator.set_state(start)
        else:
            generator.manual_seed(seed)
        return generator

    def _apply(self, scores: torch.Tensor, row: int, slot: int) -> None:
        generator = self._generators.get(slot)
        if generator is None:  # taken out of the batch while this step ran: its token is never used
            return
        count = self._draws.get(slot, 0)
        self._recent.setdefault(slot, deque(maxlen=8)).append((count, generator.get_state()))
        self._draws[slot] = count + 1
        probabilities = torch.softmax(scores[row : row + 1].float(), dim=-1).cpu()
        token = int(torch.multinomial(probabilities, 1, generator=generator))
        scores[row].fill_(float("-inf"))
        scores[row, token] = 0.0
