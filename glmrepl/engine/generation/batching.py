"""Batched decoding for concurrent replies, on transformers' continuous batching.

Decoding is memory-bound: a step for eight replies reads the weights once,
as a step for one does. ``glmrepl serve`` hands concurrent replies to
transformers' ``ContinuousBatchingManager`` (paged KV cache, requests joining
and leaving the batch between steps, shared prefix blocks). A reply that
runs alone keeps the one-at-a-time path: ``generate`` with the fused
one-row kernels and the exact prefix reuse of the last reply's cache.

``Lanes`` decides which path a reply takes when it starts: the two never run
at once, because the manager swaps the model's attention for its paged one
while it runs. A model that cannot batch (``batching_refused``), and a reply
that needs what the batch cannot give (a seed, a repetition penalty, more
cache than the batch holds), take the one-at-a-time path and say why.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from ..errors import GenerationError
from .batch_sampling import speed_up_warpers
from .run import GenerationStats, IncrementalDecoder, classify_stop

PAGE_SIZE = 32  # tokens a KV block holds: small, so that a shared system prompt shares whole blocks
MAX_BATCH_TOKENS = 256  # tokens one step reads at most (longer prompts are prefilled in chunks)
DEFAULT_CACHE_BYTES = 512 * 2**20
# How long a reply that finds the model idle waits for another to batch with (see Lanes).
BATCH_GRACE_S = 0.03
_CANCELLED = object()


def batching_refused(loaded: Any) -> str | None:
    """Why this model cannot decode in a batch, or None."""
    family = getattr(loaded.info, "family", None)
    if family == "chatglm1":
        return "ChatGLM-6B's own implementation has no paged cache"
    model = loaded.model
    attention = getattr(model.config, "_attn_implementation", None)
    if attention not in (None, "sdpa", "eager"):
        return f"its attention ({attention}, e.g. a P-tuning prefix) has no paged form"
    devices = set((getattr(model, "hf_device_map", None) or {}).values())
    if len(devices) > 1:
        return "the model is split across devices"
    if not hasattr(model, "init_continuous_batching"):
        return "this transformers has no continuous batching"
    return None


def kv_bytes_per_token(config: Any, element_size: int) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_attention_heads", 1)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return 2 * text.num_hidden_layers * kv_heads * head_dim * element_size


class Batcher:
    """One continuous-batching manager for the loaded model, and a thread routing its outputs."""

    def __init__(self, model: Any, cache_bytes: int, max_batch: int):
        self.model = model
        self.max_batch = max_batch
        per_token = kv_bytes_per_token(model.config, next(model.parameters()).element_size())
        self.num_blocks = max(cache_bytes // (per_token * PAGE_SIZE), 4)
        self.capacity_tokens = self.num_blocks * PAGE_SIZE
        self.broken: str | None = None  # set when the manager failed: the model decodes alone from then on
        self._manager: Any = None
        self._routes: dict[str, queue.Queue] = {}
        self._lock = threading.Lock()
        self._dispatcher: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._manager is not None

    def fits(self, prompt_tokens: int, max_new_tokens: int) -> bool:
        return prompt_tokens + max_new_tokens <= self.capacity_tokens

    def submit(
        self, ids: list[int], max_new_tokens: int, stop_ids: list[int], sampling: dict
    ) -> tuple[str, queue.Queue]:
        with self._lock:
            self._start()
            route: queue.Queue = queue.Queue()
            request_id = self._manager.add_request(
                ids, max_new_tokens=max_new_tokens, streaming=True, eos_token_id=list(stop_ids) or None, **sampling
            )
            if request_id is None:
                raise GenerationError("generation failed: the batch is not running")
            self._routes[request_id] = route
        return request_id, route

    def cancel(self, request_id: str) -> None:
        with self._lock:
            if self._manager is not None:
                self._manager.cancel_request(request_id)
            route = self._routes.pop(request_id, None)
        if route is not None:
            route.put(_CANCELLED)

    def forget(self, request_id: str) -> None:
        with self._lock:
            self._routes.pop(request_id, None)

    def stop(self) -> None:
        """Stop the manager (the model gets its own attention back); open requests end as failed."""
        with self._lock:
            manager, self._manager = self._manager, None
            routes, self._routes = self._routes, {}
        if manager is not None:
            manager.stop(block=True, timeout=30, hard_stop=True)
        for route in routes.values():
            route.put(GenerationError("generation failed: the batch was stopped"))
        if self._dispatcher is not None:
            self._dispatcher.join(5)
            self._dispatcher = None

    def _start(self) -> None:
        if self._manager is not None:
            return
        from transformers import ContinuousBatchingConfig, GenerationConfig

        vocabulary = self.model.config.get_text_config().vocab_size
        # Sampling on, with every processor present, so that each request sets its own values
        # (greedy is top_k 1); the stop ids come with each request.
        generation = GenerationConfig(
            do_sample=True, temperature=0.999, top_k=vocabulary, top_p=0.9999, eos_token_id=-1, pad_token_id=0
        )
        batching = ContinuousBatchingConfig(
            num_blocks=self.num_blocks,
            page_size=PAGE_SIZE,
            max_batch_tokens=MAX_BATCH_TOKENS,
            max_requests_per_batch=self.max_batch,
            per_request_processors=True,
            seed=None,  # a seed here would reseed the whole process
        )
        manager = self.model.init_continuous_batching(generation_config=generation, continuous_batching_config=batching)
        speed_up_warpers(manager)
        manager.start()
        self._manager = manager
        self._dispatcher = threading.Thread(target=self._dispatch, args=(manager,), name="glmrepl-batch", daemon=True)
        self._dispatcher.start()

    def _dispatch(self, manager: Any) -> None:
        """Route each output to its request's queue (one reader: the manager's queue is shared)."""
        while manager is self._manager:
            output = manager.get_result(timeout=0.1)
            if output is None:
                failure = getattr(manager.background_thread_status, "fatal_error", None)
                if failure is not None:
                    self._fail_all(manager, failure)
                    return
                continue
            with self._lock:
                route = self._routes.get(output.request_id)
            if route is not None:
                route.put((time.perf_counter(), output))

    def _fail_all(self, manager: Any, failure: Any) -> None:
        with self._lock:
            if manager is not self._manager:
                return
            self.broken = f"the batch failed ({failure})"
            self._manager = None
            routes, self._routes = self._routes, {}
        for route in routes.values():
            route.put(GenerationError(f"generation failed: {failure}"))


class BatchedRun:
    """One reply decoded in the batch; the same face as ``GenerationRun`` (iterate, cancel, stats, text)."""

    def __init__(self, batcher: Batcher, tokenizer: Any, prompt_ids: list[int], kwargs: dict, stop_ids: list[int]):
        self.batcher = batcher
        self.decoder = IncrementalDecoder(tokenizer)
        self.prompt_ids = prompt_ids
        self.max_new_tokens = kwargs["max_new_tokens"]
        self.sampling = batch_sampling(kwargs, batcher.model)
        self.stop_ids = stop_ids
        self.cancel_event = threading.Event()
        self.stats = GenerationStats(prompt_tokens=len(prompt_ids))
        self.cache: Any = None  # the batch keeps its own blocks
        self._request_id: str | None = None

    def cancel(self) -> None:
        self.cancel_event.set()
        if self._request_id is not None:
            self.batcher.cancel(self._request_id)

    def cached_ids(self) -> list[int]:
        return []

    def text(self) -> str:
        kept = [t for t in self.stats.new_ids if t not in self.stop_ids]
        return self.decoder.tokenizer.decode(kept, skip_special_tokens=True).rstrip("\ufffd")

    def __iter__(self) -> Iterator[str]:
        from ..quant.layers import decode_path

        started = time.perf_counter()
        self._request_id, route = self.batcher.submit(
            self.prompt_ids, self.max_new_tokens, self.stop_ids, self.sampling
        )
        if self.cancel_event.is_set():
            self.batcher.cancel(self._request_id)
        self.stats.path = f"{decode_path(self.batcher.model)}, continuous batching"
        finished = False
        try:
            for made_at, new in _new_tokens(route):
                if self.stats.first_token_s is None:
                    self.stats.first_token_s = made_at - started
                self.stats.total_s = made_at - started
                self.stats.new_ids.extend(new)
                self.stats.new_tokens += len(new)
                delta = self.decoder.push([t for t in new if t not in self.stop_ids])
                if delta:
                    yield delta
            finished = True
        finally:
            if not finished:
                self.batcher.cancel(self._request_id)
            self.batcher.forget(self._request_id)
        tail = self.decoder.flush()
        if tail:
            yield tail
        self._classify_stop()

    def _classify_stop(self) -> None:
        classify_stop(self.stats, self.cancel_event, self.stop_ids, None)


def _new_tokens(route: queue.Queue) -> Iterator[tuple[float, list[int]]]:
    """(time, new ids) per output of one request, until it finishes or is cancelled."""
    from transformers.generation.continuous_batching.requests import RequestStatus

    seen = 0
    while True:
        item = route.get()
        if item is _CANCELLED:
            return
        if isinstance(item, BaseException):
            raise item
        made_at, output = item
        if output.status == RequestStatus.FAILED:
            raise GenerationError(f"generation failed: {output.error}")
        tokens = output.generated_tokens
        if len(tokens) > seen:
            yield made_at, list(tokens[seen:])
            seen = len(tokens)
        if output.is_finished():
            return


def batch_sampling(kwargs: dict, model: Any) -> dict:
    """A request's own sampling values, as the batch's per-request processors take them."""
    if not kwargs.get("do_sample"):
        return {"top_k": 1, "top_p": 1.0}  # no nucleus to sort for
    vocabulary = model.config.get_text_config().vocab_size
    return {
        "temperature": float(kwargs.get("temperature") or 1.0),
        "top_p": float(kwargs.get("top_p") or 1.0),
        "top_k": int(kwargs.get("top_k") or vocabulary),
    }


def unbatchable(kwargs: dict, seed: int | None) -> str | None:
    """Why a reply with these settings decodes alone, or None."""
    if seed is not None:
        return "a seed (the batch samples all replies with one generator)"
    if kwargs.get("repetition_penalty", 1.0) != 1.0:
        return "a repetition penalty"
    return None


class Lanes:
    """Which path a starting reply takes: alone (``generate``) or in the batch.

    A reply that finds the model idle and no other reply waiting runs alone,
    with the fastest single-stream path and the exact prefix reuse; it first
    waits ``grace_s`` for company, because clients that send together (an
    agent's parallel calls, a benchmark) arrive a few milliseconds apart and
    the first one alone would hold the others back for a whole reply. When
    several wait, they start a batch, which others join while it runs (up to
    ``max_batch``). The two never overlap; a reply that must run alone waits
    for the batch to drain, and meanwhile no new reply joins the batch.
    """

    def __init__(self, max_batch: int, before_alone: Callable[[], None], grace_s: float = BATCH_GRACE_S):
        self.max_batch = max_batch
        self.grace_s = grace_s
        self._before_alone = before_alone  # stops the batch, so that generate has the model's own attention
        self._changed = threading.Condition()
        self._mode: str | None = None
        self.active = 0
        self._waiting = {"alone": 0, "batch": 0}

    def enter(self, batchable: bool, cancelled: threading.Event) -> str | None:
        """Wait for a lane: "alone" or "batch"; None when cancelled while waiting."""
        want = "batch" if batchable else "alone"
        alone_after = time.monotonic() + self.grace_s
        with self._changed:
            self._waiting[want] += 1
            self._changed.notify_all()  # a reply waiting for company has some now
            try:
                while not cancelled.is_set():
                    lane = self._lane_for(batchable)
                    if lane == "alone" and batchable and time.monotonic() < alone_after:
                        lane = None  # a moment more: another reply may be on its way
                    if lane is not None:
                        self._mode = lane
                        self.active += 1
                        break
                    self._changed.wait(min(0.05, max(0.001, alone_after - time.monotonic())))
                else:
                    return None
            finally:
                self._waiting[want] -= 1
        if lane == "alone":
            self._before_alone()
        return lane

    def leave(self) -> None:
        with self._changed:
            self.active -= 1
            if self.active == 0:
                self._mode = None
            self._changed.notify_all()

    def _lane_for(self, batchable: bool) -> str | None:
        if self._mode == "alone":
            return None
        if self._mode == "batch":
            room = self.active < self.max_batch and not self._waiting["alone"]
            return "batch" if batchable and room else None
        if batchable and self._waiting["batch"] >= 2 and not self._waiting["alone"]:
            return "batch"  # several replies wait: decode them together
        if not batchable or not self._waiting["alone"]:
            return "alone"
        return None  # a reply that must run alone goes first


class LanedRun:
    """A reply that takes its lane when it starts; delegates to the run of that lane."""

    def __init__(self, alone: Any, batched: Callable[[], BatchedRun] | None, lanes: Lanes):
        self.alone = alone
        self._batched = batched
        self.lanes = lanes
        self.chosen: Any = alone
        self._cancelled = threading.Event()

    @property
    def stats(self) -> GenerationStats:
        return self.chosen.stats

    @property
    def cache(self) -> Any:
        return self.chosen.cache

    def cached_ids(self) -> list[int]:
        return self.chosen.cached_ids()

    def text(self) -> str:
        return self.chosen.text()

    def cancel(self) -> None:
        self._cancelled.set()
        self.chosen.cancel()

    def __iter__(self) -> Iterator[str]:
        lane = self.lanes.enter(self._batched is not None, self._cancelled)
        if lane is None:
            self.alone.stats.stop_reason = "cancelled"
            return
        try:
            if lane == "batch" and self._batched is not None:
                self.chosen = self._batched()
            if self._cancelled.is_set():
                self.chosen.cancel()
            yield from self.chosen
        finally:
            self.lanes.leave()


class Batching:
    """Batched decoding for a backend: the lanes, and the batch of the loaded model."""

    def __init__(self, max_batch: int, cache_bytes: int = DEFAULT_CACHE_BYTES):
        self.max_batch = max_batch
        self.cache_bytes = cache_bytes
        self.lanes = Lanes(max_batch, before_alone=self._stop_batch)
        self._batcher: Batcher | None = None
        self._lock = threading.Lock()

    def why_not(self, loaded: Any) -> str | None:
        """Why the loaded model's replies run one at a time, or None when they batch."""
        if loaded is None:
            return None
        refused = batching_refused(loaded)
        if refused is None and self._batcher is not None and self._batcher.model is loaded.model:
            refused = self._batcher.broken
        return refused

    def run_for(self, loaded: Any, alone: Any, kwargs: dict, seed: int | None) -> LanedRun:
        """``alone`` (a GenerationRun) behind the lanes, or the same reply in the batch when it may."""
        batcher = self._batcher_for(loaded)
        reason = unbatchable(kwargs, seed)
        if batcher is None or reason is not None or not batcher.fits(len(alone.prompt_ids), kwargs["max_new_tokens"]):
            return LanedRun(alone, None, self.lanes)

        def batched() -> BatchedRun:
            return BatchedRun(batcher, loaded.tokenizer, alone.prompt_ids, kwargs, alone.stop_ids)

        return LanedRun(alone, batched, self.lanes)

    def model_changed(self) -> None:
        """The model is changing (its lease is held alone): its batch goes."""
        with self._lock:
            batcher, self._batcher = self._batcher, None
        if batcher is not None:
            batcher.stop()

    def _batcher_for(self, loaded: Any) -> Batcher | None:
        if self.why_not(loaded) is not None:
            return None
        with self._lock:
            if self._batcher is None or self._batcher.model is not loaded.model:
                self._batcher = Batcher(loaded.model, self.cache_bytes, self.max_batch)
            return self._batcher

    def _stop_batch(self) -> None:
        with self._lock:
            batcher = self._batcher
        if batcher is not None and batcher.running:
            batcher.stop()
