"""The one owner of the loaded model: every reply, and every change to the model, goes through it.

As llama.cpp's server queue or vLLM's engine core: front ends submit work and
read results; one thread (``glmrepl-model``) decides, between two decoding
steps, what the model does next.

- A reply that finds the model idle decodes alone, with the fastest
  one-sequence path (fused one-row kernels, exact prefix reuse).
- A reply that arrives while another decodes is placed at the next token:
  when both may batch, the running one moves into the batch (its prompt and
  what it made so far are prefilled there) and the newcomer joins it; when one
  of them may not (a seed, a repetition penalty, a model that cannot batch),
  they take turns in stretches of ``STRETCH_TOKENS``, each continuing from its
  own cache, and the batch pauses while a stretch decodes alone.
- No reply ever waits for another's whole reply.

Admission bounds the waiting requests (503 with Retry-After in the server).
Changes to the model (load, move, quantize, adapter, prompt mode) are tasks on
the model thread too (``change``): they wait for the admitted replies to end
and keep new ones out meanwhile, so nothing else touches the model.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from ..cpu.machine import release_freed_memory, release_thread_pool
from ..errors import QueueFull, first_line
from .batching import DEFAULT_CACHE_BYTES, Batcher, batching_refused, unbatchable
from .run import GenerationRun, decode_alone, translate_error

# Tokens a reply decodes alone before it lets another have the model (when others wait).
STRETCH_TOKENS = 16
# The fewest tokens left for which the last reply of a batch goes back to decoding alone (it
# reads its context again first, so a reply about to end stays where it is).
LEAVE_BATCH_TOKENS = 32

T = TypeVar("T")


class Task:
    """Work for the model thread that is not a reply (the next-token table, perplexity)."""

    def __init__(self, work: Callable[[], Any]):
        self.work = work
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.cancel_event = threading.Event()

    def run(self) -> None:
        try:
            self.result = self.work()
        except BaseException as error:  # handed to the caller's thread
            self.error = error
        finally:
            release_thread_pool()
            self.done.set()


class Scheduler:
    """Admission, the model thread, the batch, and the gate for changes to the model."""

    def __init__(self, max_waiting: int | None = None):
        self.max_waiting = max_waiting
        self.max_batch = 1  # replies that decode together (more than one once batching is on)
        self.cache_bytes = DEFAULT_CACHE_BYTES
        self.share_prompt_blocks = True  # replies in the batch may share their prompts' blocks
        self.batching = False
        self.tokens_generated = 0  # by the replies that ended, for /health and the tests
        self.mean_reply_s: float | None = None  # moving average of a reply's time
        self._admitted = 0
        self._changing = False
        self._changes_waiting = 0
        self._inbox: deque[GenerationRun | Task] = deque()
        self._alone: deque[GenerationRun | Task] = deque()
        self._batcher: Batcher | None = None
        self._decoding_alone = False  # a run decodes alone on the model thread now
        self._batch_turn_until = 0.0  # after a stretch alone beside the batch, the batch's own turn
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    # -- admission ---------------------------------------------------------------
    @property
    def admitted(self) -> int:
        """Replies planned and not yet finished (the running ones included)."""
        return self._admitted

    @property
    def running(self) -> int:
        """Replies decoding now (alone or in the batch)."""
        batch = self._batcher.active if self._batcher is not None else 0
        return batch + (1 if self._decoding_alone else 0)

    @property
    def changes_waiting(self) -> int:
        """Changes to the model waiting for the admitted replies to end."""
        return self._changes_waiting

    def admit(self, bounded: bool = True) -> None:
        """Take a place (raises QueueFull when too many wait); waits while the model changes."""
        with self._changed:
            while self._changing or self._changes_waiting:
                self._changed.wait()
            slots = self.max_batch if self.batching else 1
            if bounded and self.max_waiting is not None and self._admitted >= self.max_waiting + slots:
                raise QueueFull(
                    f"{self._admitted - slots} requests are already waiting for the model; retry shortly",
                    self.retry_after_s(),
                )
            self._admitted += 1

    def leave(self, tokens: int = 0, seconds: float | None = None) -> None:
        with self._changed:
            self._admitted -= 1
            self.tokens_generated += tokens
            if seconds is not None:
                previous = self.mean_reply_s
                self.mean_reply_s = seconds if previous is None else 0.7 * previous + 0.3 * seconds
            self._changed.notify_all()

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """A place for work other than a reply (/next, perplexity, a comparison): a model change
        waits for it, and the queue's bound never refuses it."""
        self.admit(bounded=False)
        try:
            yield
        finally:
            self.leave()

    def retry_after_s(self) -> int:
        """Seconds until a place is likely free: one reply's time at the recent pace (1 to 600)."""
        pace = self.mean_reply_s if self.mean_reply_s is not None else 1.0
        return max(1, min(600, math.ceil(pace)))

    # -- changes to the model ----------------------------------------------------------
    @contextlib.contextmanager
    def _exclusive(self, on_wait: Callable[[int], None] | None = None) -> Iterator[None]:
        """Wait for admitted replies to end, then hold the model alone (new ones wait).

        ``on_wait(n)`` is called once, before waiting, when n replies are admitted.
        """
        running = self._admitted
        if running and on_wait is not None:
            on_wait(running)
        with self._changed:
            self._changes_waiting += 1
            try:
                while self._admitted or self._changing:
                    self._changed.wait()
                self._changing = True
            finally:
                self._changes_waiting -= 1
        try:
            self.stop_batch()  # the batch belongs to the model as it was
            yield
        finally:
            with self._changed:
                self._changing = False
                self._changed.notify_all()

    def change(self, work: Callable[[], T], on_wait: Callable[[int], None] | None = None) -> T:
        """A change to the model: a task on the model thread, once the admitted replies end
        (new ones wait until it is done)."""
        with self._exclusive(on_wait):
            return self.call(work)

    def enable_batching(self, max_batch: int, cache_bytes: int | None = None) -> None:
        self.batching = max_batch > 1
        self.max_batch = max_batch
        self.cache_bytes = cache_bytes or DEFAULT_CACHE_BYTES

    def warm_batch(self, loaded: Any) -> None:
        """Start the loaded model's batch now, on the model thread, so that the first replies
        that meet do not wait for its paged pool to be made: nothing when batching is off or
        the model cannot batch."""
        if self.batching and loaded is not None and batching_refused(loaded) is None:
            self.submit(Task(lambda: self._start_batch(loaded.model)))

    def why_not_batching(self, loaded: Any) -> str | None:
        """Why the loaded model's replies decode one at a time, or None when they batch."""
        if not self.batching:
            return "off"
        if loaded is None:
            return None
        refused = batching_refused(loaded)
        batcher = self._batcher
        if refused is None and batcher is not None and batcher.model is loaded.model:
            refused = batcher.broken
        return refused

    @property
    def batch_pool_bytes(self) -> int:
        """Bytes of the batch's paged KV pool while a batch runs (0 when none does)."""
        batcher = self._batcher
        return batcher.pool_bytes if batcher is not None and batcher.running else 0

    @property
    def batch_running(self) -> bool:
        return self._batcher is not None and self._batcher.running

    def stop_batch(self) -> None:
        batcher, self._batcher = self._batcher, None
        if batcher is not None:
            batcher.stop()

    # -- work ----------------------------------------------------------------------
    def submit(self, item: GenerationRun | Task) -> None:
        """Hand a run (or a task) to the model thread."""
        with self._changed:
            self._inbox.append(item)
            self._start_thread()
            self._changed.notify_all()

    def call(self, work: Callable[[], Any]) -> Any:
        """Run ``work`` on the model thread, between two decoding steps; returns its result."""
        if threading.current_thread() is self._thread:
            return work()  # already there (a task's own work): queueing it would wait for itself
        task = Task(work)
        self.submit(task)
        while not task.done.is_set():
            try:
                task.done.wait()
            except KeyboardInterrupt:  # the work checks its own cancel event; wait for it to stop
                task.cancel_event.set()
        if task.error is not None:
            raise task.error
        return task.result

    def cancelled(self, run: GenerationRun) -> None:
        """A run was cancelled (its event is set): out of the batch now, else at its next token."""
        batcher = self._batcher
        if batcher is None or not batcher.cancel(run):
            with self._changed:
                self._changed.notify_all()

    def _start_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="glmrepl-model", daemon=True)
            self._thread.start()

    # -- the model thread ----------------------------------------------------------
    def _loop(self) -> None:
        while True:
            try:
                item = self._next_alone()
            except Exception as error:  # noqa: BLE001 - placing failed: the waiting runs fail, the thread lives on
                self._fail_waiting(translate_error(error))
                continue
            try:
                if isinstance(item, Task):
                    self._with_batch_paused(item.run)
                else:
                    self._decode_stretch(item)
            except Exception as error:  # noqa: BLE001 - the batch could not pause: this item fails, not the thread
                if isinstance(item, Task):
                    item.error = error
                    item.done.set()
                else:
                    item.finish(translate_error(error))
            # Not kept while waiting for the next: a finished run holds its model and its cache.
            del item

    def _fail_waiting(self, error: BaseException) -> None:
        with self._changed:
            waiting = [*self._inbox, *self._alone]
            self._inbox.clear()
            self._alone.clear()
        for item in waiting:
            if isinstance(item, Task):
                item.error = error
                item.done.set()
            else:
                item.finish(error)

    def _next_alone(self) -> GenerationRun | Task:
        """Wait for what decodes alone next; meanwhile place arrivals (into the batch when they may)."""
        idle = False
        with self._changed:
            while True:
                self._place_arrivals()
                item = self._pick_alone()
                if item is not None:
                    return item
                if not idle:
                    idle = True
                    release_thread_pool()  # the batch's thread, or the next reply, computes now
                timeout = max(0.0, self._batch_turn_until - time.monotonic()) if self._alone else None
                self._changed.wait(timeout if timeout else (0.05 if self._alone else None))

    def _place_arrivals(self) -> None:
        self._alone.extend(self._inbox)
        self._inbox.clear()
        self._leave_a_batch_of_one()
        for run in [r for r in self._alone if isinstance(r, GenerationRun) and r.cancel_event.is_set()]:
            self._alone.remove(run)  # cancelled while it waited: it ends here, never decoded again
            run.finish()
        batchable = [r for r in self._alone if isinstance(r, GenerationRun) and self._may_batch(r)]
        if self._batch_is_worth_it(batchable):
            for run in batchable:
                batcher = self._batcher_for(run)
                if not batcher.has_room:
                    break
                if run.made and batcher.prefilling:
                    continue  # under way: it is read again in the batch once the newcomers have a first token
                self._alone.remove(run)
                self._join_batch(run)

    def _leave_a_batch_of_one(self) -> None:
        """The last reply of a batch goes back to the one-sequence path when nothing else waits and
        enough of it is left to pay for reading its context again (the path is faster alone)."""
        batcher = self._batcher
        if batcher is None or self._alone:
            return
        run = batcher.only_run()
        if run is None or run.cancel_event.is_set():
            return
        context = len(run.prompt_ids) + len(run.made)
        if run.remaining >= max(LEAVE_BATCH_TOKENS, context // 4) and batcher.withdraw(run):
            self._alone.append(run)

    def _batch_is_worth_it(self, batchable: list[GenerationRun]) -> bool:
        """A batch runs, or two replies that may batch wait (one alone is faster alone)."""
        return bool(self._batcher is not None and self._batcher.active) or len(batchable) >= 2

    def _pick_alone(self) -> GenerationRun | Task | None:
        """The first waiting item that may decode alone now."""
        batcher = self._batcher
        batch_busy = batcher is not None and batcher.active > 0
        if batcher is not None and batch_busy and (not batcher.pausable or time.monotonic() < self._batch_turn_until):
            return None
        for item in self._alone:
            if isinstance(item, GenerationRun) and batch_busy and self._may_batch(item):
                continue  # it waits for room in the batch
            self._alone.remove(item)
            return item
        return None

    def _decode_stretch(self, run: GenerationRun) -> None:
        """Decode ``run`` alone until it ends or another needs the model; then place it again."""
        if run.cancel_event.is_set():
            run.finish()
            return
        started = time.monotonic()
        self._decoding_alone = True
        try:
            ended = self._with_batch_paused(lambda: decode_alone(run, self._should_yield))
        finally:
            self._decoding_alone = False
        if ended:
            if not self._inbox and not self._alone and (self._batcher is None or not self._batcher.active):
                # Nothing waits: the prompt's scratch (a quantized layer's dequantized blocks)
                # goes back to the OS now, not when glibc next trims its heap (it may never).
                release_freed_memory()
            run.finish(run.error)
            return
        with self._changed:
            if self._batcher is not None and self._batcher.active:
                self._batch_turn_until = time.monotonic() + (time.monotonic() - started)
            self._inbox.append(run)  # placed after the newcomers (into the batch with them, when it may)

    def _should_yield(self, stretch_tokens: int) -> bool:
        """Called after every token a run makes alone: whether it should give the model back."""
        if self._inbox:
            return True  # a newcomer is placed at the next token
        others = bool(self._alone) or (self._batcher is not None and self._batcher.active > 0)
        return others and stretch_tokens >= STRETCH_TOKENS

    def _with_batch_paused(self, work: Callable[[], Any]) -> Any:
        batcher = self._batcher
        if batcher is None or not batcher.running:
            return work()
        if not batcher.pausable:
            self.stop_batch()  # only reached when the batch is empty (see _pick_alone)
            return work()
        with batcher.paused():
            return work()

    # -- the batch ---------------------------------------------------------------
    def _may_batch(self, run: GenerationRun) -> bool:
        if not self.batching or not run.may_batch:
            return False
        if unbatchable(run, self._batcher.per_request if self._batcher is not None else True) is not None:
            return False
        batcher = self._batcher
        if batcher is not None and batcher.model is run.model and batcher.broken:
            return False
        try:
            return self._batcher_for(run).fits(run)
        except Exception as error:  # noqa: BLE001 - no batch for this model: its replies decode alone
            self._batcher = _NoBatch(run.model, f"the batch could not start ({first_line(error)})")
            return False

    def _batcher_for(self, run: GenerationRun) -> Batcher:
        return self._batcher_of(run.model)

    def _batcher_of(self, model: Any) -> Batcher:
        if self._batcher is None or self._batcher.model is not model:
            self.stop_batch()
            self._batcher = Batcher(model, self.cache_bytes, self.max_batch, self._wake, self.share_prompt_blocks)
        return self._batcher

    def _start_batch(self, model: Any) -> None:
        batcher = self._batcher
        if batcher is not None and batcher.model is model and (batcher.running or batcher.broken):
            return  # started already, or known not to start
        try:
            self._batcher_of(model).start()
        except Exception as error:  # noqa: BLE001 - no batch for this model: its replies decode alone
            self._batcher = _NoBatch(model, f"the batch could not start ({first_line(error)})")

    def _join_batch(self, run: GenerationRun) -> None:
        batcher = self._batcher_for(run)
        try:
            batcher.submit(run)
        except Exception as error:  # noqa: BLE001 - the batch failed to start: this model decodes alone
            batcher.broken = f"the batch could not start ({first_line(error)})"
            self._alone.append(run)

    def _wake(self) -> None:
        with self._changed:
            self._changed.notify_all()


class _NoBatch(Batcher):
    """What stands for the batch of a model whose batch could not be made: it says why."""

    def __init__(self, model: Any, reason: str):  # noqa: D107 - nothing of Batcher's is set up
        self.model = model
        self.broken = reason
        self.per_request = False
        self._lock = threading.Lock()
        self._runs = {}
        self._manager = None
        self.pool_bytes = 0

    def stop(self) -> None:
        pass


_PRIVATE: list[Scheduler] = []
_PRIVATE_LOCK = threading.Lock()


def private_scheduler() -> Scheduler:
    """The scheduler of runs made without one (a benchmark, a test of one run): they take turns."""
    with _PRIVATE_LOCK:
        if not _PRIVATE:
            _PRIVATE.append(Scheduler())
        return _PRIVATE[0]


def scheduler_for(manager: Any) -> Scheduler:
    """The scheduler that owns ``manager``'s model (made on first use; every backend on one
    manager shares it)."""
    if not isinstance(manager.gate, Scheduler):
        manager.gate = Scheduler()
    return manager.gate
