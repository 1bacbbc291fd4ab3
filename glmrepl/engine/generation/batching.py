"""Concurrent replies decoded together, on transformers' continuous batching.

Decoding is memory-bound: a step for eight replies reads the weights once,
as a step for one does. The scheduler hands concurrent replies to one
``ContinuousBatchingManager`` per loaded model (paged KV cache, requests
joining and leaving the batch between steps, shared prefix blocks, never shared
across cache namespaces: block_namespaces.py); a reply that runs alone keeps the
one-at-a-time path (``run.decode_alone``).

Seeds and repetition penalties are per request in the batch
(batch_sampling.py), so such replies batch like any other. A model that cannot
batch (``batching_refused``), and a reply that needs what the batch cannot give
(a minimum length, more cache than the batch holds: ``unbatchable``), decode
alone in stretches between the batch's steps, which pause meanwhile
(``Batcher.paused``).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from ..cpu.machine import release_thread_pool
from ..errors import GenerationError
from .block_namespaces import BlockNamespaces, namespaces_supported, separate_namespaces
from .run import GenerationRun

PAGE_SIZE = 32  # tokens a KV block holds: small, so that a shared system prompt shares whole blocks
MAX_BATCH_TOKENS = 256  # tokens one step reads at most (longer prompts are prefilled in chunks)
DEFAULT_CACHE_BYTES = 512 * 2**20


def batch_pool_bytes(budget_bytes: int) -> int:
    """The batch's share of a KV budget: half of it, at most DEFAULT_CACHE_BYTES (the prefix
    caches of recent replies take the rest)."""
    return min(DEFAULT_CACHE_BYTES, budget_bytes // 2)


def batching_refused(loaded: Any) -> str | None:
    """Why this model cannot decode in a batch, or None."""
    from ..families.traits import traits_of

    refused = traits_of(loaded.info.family).no_batching
    if refused is not None:
        return refused
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


def context_tokens(config: Any) -> int | None:
    """The model's context length from its config (ChatGLM's ``seq_length``), or None."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("max_position_embeddings", "seq_length"):
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class Batcher:
    """One continuous-batching manager for the loaded model, and a thread routing its outputs
    to the runs that are in the batch. ``on_change`` is called whenever a run leaves it."""

    def __init__(
        self, model: Any, cache_bytes: int, max_batch: int, on_change: Callable[[], None], share_blocks: bool = True
    ):
        self.model = model
        self.max_batch = max_batch
        self.share_blocks = share_blocks
        per_token = kv_bytes_per_token(model.config, next(model.parameters()).element_size())
        blocks = cache_bytes // (per_token * PAGE_SIZE)
        context = context_tokens(model.config)
        if context:  # never more than its replies can fill: max_batch whole contexts
            blocks = min(blocks, -(-max_batch * context // PAGE_SIZE))
        self.num_blocks = max(blocks, 4)
        self.capacity_tokens = self.num_blocks * PAGE_SIZE
        self.pool_bytes = self.num_blocks * PAGE_SIZE * per_token
        self.broken: str | None = None  # set when the manager failed: the model decodes alone from then on
        # Per-request repetition penalties and seeds (batch_sampling); False once this transformers has none.
        self.per_request = True
        self._processors: Any = None
        self._next_id = 0
        self._on_change = on_change
        self._manager: Any = None
        self._runs: dict[str, _Route] = {}
        self._namespaces = BlockNamespaces()  # of the requests in the batch, whose blocks are kept apart
        self._lock = threading.Lock()
        self._dispatcher: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._manager is not None

    @property
    def active(self) -> int:
        """Runs decoding in the batch now."""
        return len(self._runs)

    @property
    def prefilling(self) -> bool:
        """Some run in the batch has no token yet (its prompt is being read)."""
        with self._lock:
            return any(route.seen == 0 for route in self._runs.values())

    @property
    def has_room(self) -> bool:
        return self.active < self.max_batch

    @property
    def pausable(self) -> bool:
        """Whether a run may decode alone while the batch pauses: the model kept its own
        attention (a manager that swapped it for a paged one must stop first)."""
        manager = self._manager
        return manager is None or getattr(manager, "_original_attn_impl", None) is None

    def fits(self, run: GenerationRun) -> bool:
        return len(run.prompt_ids) + run.max_new_tokens <= self.capacity_tokens

    def start(self) -> None:
        """Start the batch with no request yet: its manager makes the paged pool in its own
        thread, so the first replies that batch do not wait for it."""
        with self._lock:
            self._start()

    def submit(self, run: GenerationRun) -> None:
        """Decode the rest of ``run`` in the batch: its prompt and what it made so far are the
        request's prompt (a run that decoded alone until now is prefilled again)."""
        from ..quant.layers import decode_path

        with self._lock:
            self._start()
            self._next_id += 1
            request_id = f"glmrepl-{self._next_id}"
            sampling = batch_sampling(run.generate_kwargs, self.model, run.seed if self.per_request else None)
            if "seed" in sampling and run.rng_state is not None:
                self._processors[1].start_from(request_id, run.rng_state[0])  # it decoded alone until now
            self._namespaces.add(request_id, run.cache_namespace)  # before the batch's thread can see it
            added = self._manager.add_request(
                run.prompt_ids + run.made,
                request_id=request_id,
                max_new_tokens=run.remaining,
                streaming=True,
                eos_token_id=list(run.stop_ids) or None,
                **sampling,
            )
            if added is None:
                self._forget(request_id)
                raise GenerationError("generation failed: the batch is not running")
            self._runs[request_id] = _Route(run)
        run.cache = None  # its blocks are the batch's from now on
        run.note_path(f"{decode_path(self.model)}, continuous batching")

    def cancel(self, run: GenerationRun) -> bool:
        """Take ``run`` out of the batch (it ends as cancelled); False when it is not in it."""
        if not self._take_out(run):
            return False
        run.finish()
        self._on_change()
        return True

    def withdraw(self, run: GenerationRun) -> bool:
        """Take ``run`` out of the batch to decode alone from what it made so far (a token the
        batch made after this is dropped, never shown); False when it is not in the batch."""
        return self._take_out(run, keep_draws=True)

    def _take_out(self, run: GenerationRun, keep_draws: bool = False) -> bool:
        with self._lock:
            request_id = next((rid for rid, route in self._runs.items() if route.run is run), None)
            if request_id is None:
                return False
            route = self._runs.pop(request_id)
            if self._manager is not None:
                self._manager.cancel_request(request_id)
            if keep_draws and run.seed is not None and self._processors is not None:
                # Where its draws go on alone: after the tokens it received, not any the batch made since.
                state = self._processors[1].state_of(request_id, route.seen)
                run.rng_state = (state, None) if state is not None else run.rng_state
            self._forget(request_id)
        return True

    def only_run(self) -> GenerationRun | None:
        """The run in the batch when it is the only one."""
        with self._lock:
            routes = list(self._runs.values())
        return routes[0].run if len(routes) == 1 else None

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The batch stops between two steps, keeping its requests and blocks, while the caller
        uses the model."""
        manager = self._manager
        if manager is None or not manager.is_running():
            yield
            return
        with manager.pause():
            yield

    def stop(self) -> None:
        """Stop the manager (the model gets its own attention back); open requests end as failed."""
        with self._lock:
            manager, self._manager = self._manager, None
            routes, self._runs = self._runs, {}
            self._namespaces.clear()
        if manager is not None:
            manager.stop(block=True, timeout=30, hard_stop=True)
        for route in routes.values():
            route.run.finish(GenerationError("generation failed: the batch was stopped"))
        if self._dispatcher is not None:
            self._dispatcher.join(5)
            self._dispatcher = None
        if routes:
            self._on_change()

    def _start(self) -> None:
        if self._manager is not None:
            return
        from transformers import ContinuousBatchingConfig, GenerationConfig

        from .batch_sampling import add_request_processors, speed_up_draws, speed_up_warpers

        vocabulary = self.model.config.get_text_config().vocab_size
        # Sampling on, with every processor present, so that each request sets its own values
        # (greedy is top_k 1); the stop ids come with each request.
        generation = GenerationConfig(
            do_sample=True, temperature=0.999, top_k=vocabulary, top_p=0.9999, eos_token_id=-1, pad_token_id=0
        )
        # Blocks are shared only where they can be kept apart by namespace: else never.
        separable = namespaces_supported()
        batching = ContinuousBatchingConfig(
            allow_block_sharing=separable and self.share_blocks,
            num_blocks=self.num_blocks,
            page_size=PAGE_SIZE,
            max_batch_tokens=MAX_BATCH_TOKENS,
            max_requests_per_batch=self.max_batch,
            per_request_processors=True,
            seed=None,  # a seed here would reseed the whole process
        )
        manager = self.model.init_continuous_batching(generation_config=generation, continuous_batching_config=batching)
        if separable:
            separate_namespaces(manager, self._namespaces)
        speed_up_warpers(manager)
        speed_up_draws(manager)
        release_pool_when_parked(manager)
        self._processors = add_request_processors(manager)
        self.per_request = self._processors is not None
        manager.start()
        self._manager = manager
        self._dispatcher = threading.Thread(target=self._dispatch, args=(manager,), name="glmrepl-batch", daemon=True)
        self._dispatcher.start()

    def _dispatch(self, manager: Any) -> None:
        """Route each output to its run (one reader: the manager's queue is shared)."""
        while manager is self._manager:
            output = manager.get_result(timeout=0.1)
            if output is None:
                failure = getattr(manager.background_thread_status, "fatal_error", None)
                if failure is not None:
                    self._fail_all(manager, failure)
                    return
                continue
            with self._lock:  # delivered under the lock: a run taken out of the batch gets nothing after
                route = self._runs.get(output.request_id)
                first = route is not None and route.seen == 0
                over = route is not None and route.deliver(output, time.perf_counter())
                if over:
                    self._runs.pop(output.request_id, None)
                    self._forget(output.request_id)
            if route is not None and over:
                route.run.finish(route.error)
                self._on_change()
            elif first and route is not None and route.seen:
                self._on_change()  # a first token: a run waiting for the newcomers' prefill may join

    def _forget(self, request_id: str) -> None:
        self._namespaces.forget(request_id)
        for keeper in self._processors or ():
            keeper.forget(request_id)

    def _fail_all(self, manager: Any, failure: Any) -> None:
        with self._lock:
            if manager is not self._manager:
                return
            self.broken = f"the batch failed ({failure})"
            self._manager = None
            routes, self._runs = self._runs, {}
            self._namespaces.clear()
        for route in routes.values():
            route.run.finish(GenerationError(f"generation failed: {failure}"))
        self._on_change()


def release_pool_when_parked(manager: Any) -> None:
    """The batch's thread lets its OpenMP helpers go before it parks for a pause, so that a reply
    decoding alone meanwhile is the only thread with a pool (see ``release_thread_pool``: with
    the batch's pool kept, the lone reply's helpers slept between regions instead of spinning)."""
    status = manager.background_thread_status
    park = status.pause_and_wait

    def release_then_park() -> None:
        release_thread_pool()
        park()

    status.pause_and_wait = release_then_park


class _Route:
    """Where one request's outputs go: its run, fed the tokens it has not had yet."""

    def __init__(self, run: GenerationRun):
        self.run = run
        self.seen = 0
        self.error: BaseException | None = None

    def deliver(self, output: Any, made_at: float) -> bool:
        """Feed the run its new tokens; True when the request is over."""
        from transformers.generation.continuous_batching.requests import RequestStatus

        if output.status == RequestStatus.FAILED:
            self.error = GenerationError(f"generation failed: {output.error}")
            return True
        tokens = output.generated_tokens
        if len(tokens) > self.seen:
            self.run.emit(list(tokens[self.seen :]), made_at)
            self.seen = len(tokens)
        return output.is_finished()


def batch_sampling(kwargs: dict, model: Any, seed: int | None = None) -> dict:
    """A request's own sampling values, as the batch's per-request processors take them."""
    values: dict[str, Any] = {}
    penalty = kwargs.get("repetition_penalty", 1.0)
    if penalty != 1.0:
        values["repetition_penalty"] = float(penalty)
    if not kwargs.get("do_sample"):
        return {**values, "top_k": 1, "top_p": 1.0}  # no nucleus to sort for, nothing to draw
    vocabulary = model.config.get_text_config().vocab_size
    values.update(
        temperature=float(kwargs.get("temperature") or 1.0),
        top_p=float(kwargs.get("top_p") or 1.0),
        top_k=int(kwargs.get("top_k") or vocabulary),
    )
    if seed is not None:
        values["seed"] = int(seed)
    return values


def unbatchable(run: GenerationRun, per_request: bool = True) -> str | None:
    """Why a reply with these settings decodes alone, or None (``per_request``: the batch takes
    seeds and repetition penalties per request)."""
    if not per_request and run.seed is not None:
        return "a seed (this batch samples all replies with one generator)"
    if not per_request and run.generate_kwargs.get("repetition_penalty", 1.0) != 1.0:
        return "a repetition penalty"
    if "min_new_tokens" in run.generate_kwargs:
        return "a minimum length"
    if run.processors:
        return "a response format (its mask follows one reply)"
    if run.recorder is not None:
        return "logprobs"
    return None
