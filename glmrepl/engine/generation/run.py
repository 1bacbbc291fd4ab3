"""One reply's decoding: its state, its text deltas, and a stretch of it decoded alone.

The scheduler (scheduler.py) decides when and how a run decodes: alone, in
stretches of ``model.generate`` that continue from the run's own cache, or in
the batch. Whatever the path, tokens come back through the run's queue and are
turned into text deltas here, in the consumer's thread. Cancelling sets an
event that a stopping criterion checks after every token, so Ctrl-C stops a
reply within one decoding step and leaves the model ready for the next.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from ..errors import GenerationError, Hint, first_line
from ..protocols import Tokenizer
from ..status import GenerationStats

_DONE = object()


class RunQueue(Protocol):
    """Who decodes runs (scheduler.Scheduler)."""

    def submit(self, run: GenerationRun) -> None: ...

    def cancelled(self, run: GenerationRun) -> None: ...


class IncrementalDecoder:
    """Token ids in, new text out, one step at a time, in O(1) per token.

    Decodes a short window of recent tokens twice (with and without the new
    ones) and emits the difference, so spacing rules of the tokenizer (e.g.
    sentencepiece's leading "▁") come out right. A window that ends in an
    incomplete multi-byte character decodes to U+FFFD; it is held back until
    the following tokens complete it, or until MAX_HELD_IDS tokens have not and
    it holds bytes that cannot be: a model that writes invalid bytes (a random
    or broken one) made every later token decode a growing window.
    """

    MAX_HELD_IDS = 8

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def push(self, new_ids: list[int]) -> str:
        self.ids.extend(new_ids)
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset :])
        if len(full_text) > len(prefix_text) and self._settled(full_text[len(prefix_text) :]):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return full_text[len(prefix_text) :]
        return ""

    def _settled(self, new: str) -> bool:
        """Whether the new text can be shown: it ends in a whole character, or MAX_HELD_IDS tokens
        have not completed it and it holds bytes no later token can (a U+FFFD before its end, or
        more at its end than a character's 3 missing bytes)."""
        whole = new.rstrip("\ufffd")
        if whole == new:
            return True
        hopeless = "\ufffd" in whole or len(new) - len(whole) > 3
        return hopeless and len(self.ids) - self.read_offset >= self.MAX_HELD_IDS

    def flush(self) -> str:
        """Whatever is still held back when generation ends (even if incomplete)."""
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full_text[len(prefix_text) :].rstrip("\ufffd")

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""


class GenerationRun:
    """One reply being generated. Iterate it for text deltas; ``stats`` after.

    The consumer's side (iteration, ``text``, ``stats``) and the scheduler's side (``emit``,
    ``finish``, ``made``, the cache it continues from) meet only in the token queue and the
    ``done`` event: the scheduler touches the model for this run until ``done`` is set.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Tokenizer,
        prompt_ids: list[int],
        generate_kwargs: dict,
        stop_ids: list[int],
        seed: int | None = None,
        reuse: Any = None,
        scheduler: RunQueue | None = None,
        cache_namespace: str = "",
        processors: list | None = None,
        recorder: Any = None,
    ):
        """``reuse``: a prefix_cache.Reuse whose cache holds the first ``reuse.tokens`` prompt ids, or
        a function that finds one (called when the run starts decoding alone: a run that goes
        to the batch, or never starts, copies no cache).
        ``scheduler``: who decodes it (scheduler.private_scheduler() for a run of its own).
        ``cache_namespace``: whose blocks it may share in the batch (request.GenerateRequest's).
        ``processors``: logits processors of its own (a format's mask: grammar.GrammarMask), which
        keep it out of the batch; ``recorder``: a logprobs.LogprobRecorder, likewise."""
        self.model = model
        self.decoder = IncrementalDecoder(tokenizer)
        self.prompt_ids = prompt_ids
        self.generate_kwargs = generate_kwargs
        self.max_new_tokens: int = generate_kwargs.get("max_new_tokens") or 0
        self.stop_ids = stop_ids
        self.seed = seed
        self.cancel_event = threading.Event()
        self.stats = GenerationStats(prompt_tokens=len(prompt_ids))
        self.reuse = reuse
        self.scheduler = scheduler
        self.cache_namespace = cache_namespace
        self.may_batch = False  # the scheduler may decode it in a batch (its model can batch)
        self.processors = list(processors or ())
        self.recorder = recorder
        self.token_logprobs: list = []  # with a recorder: one status.TokenLogprob a token made
        self.cache: Any = None  # the model's cache after the reply, when it ended alone without an error
        # The scheduler's side: ids made so far, the random state of a seeded run between stretches.
        self.made: list[int] = []
        self.rng_state: Any = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._tokens: queue.Queue = queue.Queue()

    # -- the scheduler's side ------------------------------------------------------
    @property
    def remaining(self) -> int:
        return self.max_new_tokens - len(self.made)

    def emit(self, ids: list[int], made_at: float) -> None:
        self.made.extend(ids)
        self._tokens.put((made_at, ids))

    def finish(self, error: BaseException | None = None) -> None:
        """The scheduler is done with this run (it ended, failed or was cancelled)."""
        if self.done.is_set():
            return
        self.error = error
        self._tokens.put(_DONE)
        self.done.set()

    def note_path(self, path: str) -> None:
        """How this stretch decoded, after the paths before it (alone, then in the batch...)."""
        if self.stats.path.rsplit(" then ", 1)[-1] != path:
            self.stats.path = f"{self.stats.path} then {path}" if self.stats.path else path

    def ended(self) -> bool:
        """Nothing more to decode: cancelled, a stop id made, or the length reached."""
        if self.cancel_event.is_set() or self.remaining <= 0:
            return True
        return bool(self.made) and self.made[-1] in self.stop_ids

    # -- the consumer's side -------------------------------------------------------
    def cancel(self) -> None:
        self.cancel_event.set()
        if self.scheduler is not None:
            self.scheduler.cancelled(self)

    def __iter__(self) -> Iterator[str]:
        if self.scheduler is None:
            raise GenerationError("a run needs a scheduler to decode it")
        self._started = time.perf_counter()
        self.scheduler.submit(self)
        try:
            yield from self._deltas()
        finally:
            # Reached on normal end, on an error in the consumer and on
            # KeyboardInterrupt: the scheduler must be done with the run before its cache is used.
            self._wait_done()
        if self.error is not None:
            raise self.error

    _finished = False
    _started = 0.0
    _last_token_at = 0.0

    def _wait_done(self) -> None:
        if not self._finished:
            self.cancel()
        while not self.done.is_set():
            try:
                self.done.wait()
            except KeyboardInterrupt:  # a second Ctrl-C: the run is already stopping
                continue
        if self._finished and self._last_token_at:
            self.stats.total_s = self._last_token_at - self._started
        else:
            self.stats.total_s = time.perf_counter() - self._started
        if not self._finished:
            self._classify_stop()

    def cached_ids(self) -> list[int]:
        """The ids whose KV ``cache`` holds: the prompt and the reply but for its last token."""
        if self.cache is None:
            return []
        return (self.prompt_ids + self.stats.new_ids)[: self.cache.get_seq_length()]

    def text(self) -> str:
        """The whole reply so far, decoded at once (authoritative over the deltas).

        A reply cut inside a multi-byte character ends without its fragment, as
        the streamed deltas do (``IncrementalDecoder.flush``), so a streamed and
        a whole reply are the same text. This is the text shown: a family whose
        chat() keeps the fragment in its history gets it back in the next
        prompt (``service.Reply.kept``).
        """
        kept = [t for t in self.stats.new_ids if t not in self.stop_ids]
        return self.decoder.tokenizer.decode(kept, skip_special_tokens=True).rstrip("\ufffd")

    def _deltas(self) -> Iterator[str]:
        while True:
            item = self._tokens.get()
            if item is _DONE:
                self._finished = True
                break
            made_at, item = item
            if self.stats.first_token_s is None:
                self.stats.first_token_s = made_at - self._started
            self._last_token_at = made_at
            self.stats.new_ids.extend(item)
            self.stats.new_tokens += len(item)
            delta = self.decoder.push([t for t in item if t not in self.stop_ids])
            if delta:
                yield delta
        tail = self.decoder.flush()
        if tail:
            yield tail
        self._classify_stop()

    def _classify_stop(self) -> None:
        classify_stop(self.stats, self.cancel_event, self.stop_ids, self.max_new_tokens or None)


class _RunStreamer:
    """transformers' streamer protocol: ``put`` gets the prompt first, then each new token."""

    def __init__(self, run: GenerationRun):
        self.run = run
        self.saw_prompt = False

    def put(self, value: Any) -> None:
        if not self.saw_prompt:
            self.saw_prompt = True
            return
        ids = value.reshape(-1).tolist()
        if self.run.recorder is not None:  # before the token reaches the consumer, which reads both
            self.run.token_logprobs.extend(self.run.recorder.entry(int(token)) for token in ids)
        # Stamped here, where the token is made: the consumer may wake later.
        self.run.emit(ids, time.perf_counter())

    def end(self) -> None:
        pass


def _stop_criterion(run: GenerationRun, should_yield: Callable[[int], bool]):
    """Stops generate when the run is cancelled, or when the scheduler wants the model back
    (``should_yield(tokens made in this stretch)``)."""
    from transformers import StoppingCriteria

    class StopOrYield(StoppingCriteria):
        def __init__(self) -> None:
            self.made = 0

        def __call__(self, input_ids, scores, **kwargs):
            import torch

            self.made += 1
            stop = run.cancel_event.is_set() or should_yield(self.made)
            return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

    return StopOrYield()


def decode_alone(run: GenerationRun, should_yield: Callable[[int], bool]) -> bool:
    """Decode ``run`` on this thread, one sequence, until it ends or ``should_yield`` says the
    scheduler wants the model back. Returns whether the run ended. A later stretch continues
    from the run's cache (and, when seeded, its random state), so stretches make the tokens
    one ``generate`` would."""
    try:
        _generate_stretch(run, should_yield)
    except BaseException as error:  # handed to the consumer thread
        run.cache = None
        run.finish(translate_error(error))
        return True
    return run.ended()


def _generate_stretch(run: GenerationRun, should_yield: Callable[[int], bool]) -> None:
    import torch

    from ..cpu.machine import apply_threads
    from ..quant.layers import decode_path
    from .nucleus import cheaper_nucleus

    apply_threads()
    first = not run.made and run.cache is None
    _restore_random_state(run, first)
    ids = run.prompt_ids + run.made
    device = _input_device(run.model)
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    if first and callable(run.reuse):
        run.reuse = run.reuse()
    cache = run.cache if not first else (run.reuse.cache if run.reuse is not None else None)
    # generate reads only the ids past the given cache's length
    continued = {"cache": cache} if cache is not None else {}
    kwargs = dict(run.generate_kwargs, max_new_tokens=run.remaining)
    if "min_new_tokens" in kwargs:
        kwargs["min_new_tokens"] = max(0, kwargs["min_new_tokens"] - len(run.made))
    pad = run.stop_ids[0] if run.stop_ids else None
    kwargs = _with_run_processors(run, cheaper_nucleus(kwargs) if run.recorder is None else kwargs)
    with torch.inference_mode():
        output = run.model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            streamer=_RunStreamer(run),
            stopping_criteria=[_stop_criterion(run, should_yield)],
            eos_token_id=run.stop_ids or None,
            pad_token_id=pad,
            return_dict_in_generate=True,
            **continued,
            **kwargs,
        )
    if first:
        run.stats.reused_tokens = run.reuse.tokens if cache is not None else 0
    run.cache = getattr(output, "cache", None)
    if run.seed is not None:
        run.rng_state = _random_state()
    run.note_path(decode_path(run.model))  # after: a kernel failing mid-reply changes it


def _with_run_processors(run: GenerationRun, kwargs: dict[str, Any]) -> dict[str, Any]:
    """generate's arguments with the run's own processors first (a format's mask, before the
    sampling filters) and its logprobs recorder after everything that shapes the draw."""
    if not run.processors and run.recorder is None:
        return kwargs
    from transformers import LogitsProcessorList

    from .logprobs import recording_processors

    processors = [*run.processors, *(kwargs.get("logits_processor") or ())]
    kwargs = {**kwargs, "logits_processor": LogitsProcessorList(processors)}
    return recording_processors(kwargs, run.recorder) if run.recorder is not None else kwargs


def _restore_random_state(run: GenerationRun, first: bool) -> None:
    """A seeded run draws from its own sequence, whatever ran between its stretches."""
    import torch

    if run.seed is None:
        return
    if first or run.rng_state is None:
        torch.manual_seed(run.seed)
        return
    cpu, cuda = run.rng_state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def _random_state() -> tuple[Any, Any]:
    import torch

    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def classify_stop(stats: GenerationStats, cancel: threading.Event, stop_ids: list[int], limit: int | None) -> None:
    """Why a reply ended: cancelled, a stop id (end), or the length it was given (left as it was otherwise)."""
    if cancel.is_set():
        stats.stop_reason = "cancelled"
    elif stats.new_ids and stats.new_ids[-1] in stop_ids:
        stats.stop_reason = "end"
    elif limit is None or stats.new_tokens >= limit:
        stats.stop_reason = "length"


def _input_device(model: Any):
    """Inputs go where the embeddings are (the first device of a sharded model)."""
    embeddings = model.get_input_embeddings()
    return embeddings.weight.device if embeddings is not None else model.device


def translate_error(error: BaseException) -> BaseException:
    import torch

    if isinstance(error, torch.OutOfMemoryError):
        return GenerationError(
            "out of memory while generating",
            Hint("setting", "max_new_tokens", "lower {}, start a new conversation, or use the cpu device"),
        )
    if isinstance(error, (RuntimeError, ValueError, IndexError)):
        return GenerationError(f"generation failed: {first_line(error)}")
    return error


def next_token_distribution(
    model: Any, tokenizer: Tokenizer, prompt_ids: list[int], k: int
) -> list[tuple[str, int, float]]:
    """The k most likely next tokens after ``prompt_ids``: (text, id, probability)."""
    import torch

    input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=_input_device(model))
    with torch.inference_mode():
        logits = model(input_ids=input_ids).logits[0, -1].float()
    probs = torch.softmax(logits, dim=-1)
    top = torch.topk(probs, k=min(k, probs.shape[-1]))
    return [
        (tokenizer.decode([int(i)], skip_special_tokens=False), int(i), float(p))
        for p, i in zip(top.values.tolist(), top.indices.tolist())
    ]
