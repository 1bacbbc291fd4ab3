"""Streaming generation with cancellation and timing.

``model.generate`` runs in a worker thread; tokens come back through a queue
and are turned into text deltas here, in the caller's thread. Cancelling sets
an event that a stopping criterion checks after every token, so Ctrl-C stops
a reply within one decoding step and leaves the model ready for the next.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

from ..cpu.machine import release_thread_pool
from ..errors import GenerationError, Hint, first_line
from ..protocols import Tokenizer
from ..status import GenerationStats

_DONE = object()


class IncrementalDecoder:
    """Token ids in, new text out, one step at a time, in O(1) per token.

    Decodes a short window of recent tokens twice (with and without the new
    ones) and emits the difference, so spacing rules of the tokenizer (e.g.
    sentencepiece's leading "▁") come out right. A window that ends in an
    incomplete multi-byte character decodes to U+FFFD; it is held back until
    the following tokens complete it.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def push(self, new_ids: list[int]) -> str:
        self.ids.extend(new_ids)
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset :])
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return full_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back when generation ends (even if incomplete)."""
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full_text[len(prefix_text) :].rstrip("\ufffd")

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""


class _QueueStreamer:
    """transformers streamer protocol: ``put`` gets the prompt first, then each new token."""

    def __init__(self, sink: queue.Queue):
        self.sink = sink
        self.saw_prompt = False

    def put(self, value: Any) -> None:
        if not self.saw_prompt:
            self.saw_prompt = True
            return
        # Stamped here, where the token is made: the consumer may wake later.
        self.sink.put((time.perf_counter(), value.reshape(-1).tolist()))

    def end(self) -> None:
        pass


def _cancel_criterion(cancel: threading.Event):
    from transformers import StoppingCriteria

    class CancelOnEvent(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            import torch

            return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device)

    return CancelOnEvent()


class _Worker:
    """One long-lived thread that runs every generation.

    torch keeps a pool of compute threads per calling thread; a fresh thread
    per reply would build that pool again before each first token.
    """

    def __init__(self) -> None:
        self.jobs: queue.Queue = queue.Queue()
        self.thread: threading.Thread | None = None
        self.lock = threading.Lock()

    def submit(self, job) -> None:
        with self.lock:
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._serve, name="glmrepl-generate", daemon=True)
                self.thread.start()
        self.jobs.put(job)

    def _serve(self) -> None:
        while True:
            self.jobs.get()()


_WORKER = _Worker()


class GenerationRun:
    """One reply being generated. Iterate it for text deltas; ``stats`` after."""

    def __init__(
        self,
        model: Any,
        tokenizer: Tokenizer,
        prompt_ids: list[int],
        generate_kwargs: dict,
        stop_ids: list[int],
        seed: int | None = None,
        reuse: Any = None,
    ):
        """``reuse``: a prefix_cache.Reuse whose cache holds the first ``reuse.tokens`` prompt ids."""
        self.model = model
        self.decoder = IncrementalDecoder(tokenizer)
        self.prompt_ids = prompt_ids
        self.generate_kwargs = generate_kwargs
        self.stop_ids = stop_ids
        self.seed = seed
        self.cancel_event = threading.Event()
        self.stats = GenerationStats(prompt_tokens=len(prompt_ids))
        self.reuse = reuse
        self.cache: Any = None  # the model's cache after the reply, when it ended without an error
        self._tokens: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._worker_done = threading.Event()

    def cancel(self) -> None:
        self.cancel_event.set()

    def __iter__(self) -> Iterator[str]:
        self._started = time.perf_counter()
        _WORKER.submit(self._work)
        try:
            yield from self._deltas()
        finally:
            # Reached on normal end, on an error in the consumer and on
            # KeyboardInterrupt: the worker must stop before the model is reused.
            self._stop_worker()
        if self._error is not None:
            raise self._error

    _finished = False
    _started = 0.0
    _last_token_at = 0.0

    def _stop_worker(self) -> None:
        if not self._finished:
            self.cancel_event.set()
        while not self._worker_done.is_set():
            try:
                self._worker_done.wait()
            except KeyboardInterrupt:  # a second Ctrl-C: the worker is already stopping
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
        classify_stop(self.stats, self.cancel_event, self.stop_ids, self.generate_kwargs.get("max_new_tokens"))

    def _work(self) -> None:
        try:
            self._generate()
        except BaseException as error:  # handed to the consumer thread
            self._error = _translate_error(error)
        finally:
            release_thread_pool()
            self._tokens.put(_DONE)
            self._worker_done.set()

    def _generate(self) -> None:
        import torch

        from ..cpu.machine import apply_threads
        from ..quant.layers import decode_path
        from .nucleus import cheaper_nucleus

        apply_threads()
        if self.seed is not None:
            torch.manual_seed(self.seed)
        device = _input_device(self.model)
        input_ids = torch.tensor([self.prompt_ids], dtype=torch.long, device=device)
        pad = self.stop_ids[0] if self.stop_ids else None
        reused = self.reuse.cache if self.reuse is not None else None
        # generate reads only the ids past the given cache's length
        continued = {"cache": reused} if reused is not None else {}
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                streamer=_QueueStreamer(self._tokens),
                stopping_criteria=[_cancel_criterion(self.cancel_event)],
                eos_token_id=self.stop_ids or None,
                pad_token_id=pad,
                return_dict_in_generate=True,
                **continued,
                **cheaper_nucleus(self.generate_kwargs),
            )
        self.stats.reused_tokens = self.reuse.tokens if reused is not None else 0
        self.cache = getattr(output, "cache", None)
        self.stats.path = decode_path(self.model)  # after: a kernel failing mid-reply changes it


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


def _translate_error(error: BaseException) -> BaseException:
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
