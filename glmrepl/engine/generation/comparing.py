"""A comparison run: the loaded model first, then the other model, in a background thread.

The loaded model writes its greedy reply (or reads the text) through the scheduler that owns it,
and its log-probabilities of the tokens read are kept on the CPU (compare.py). Then the other
model is loaded outside the model manager, used, and freed:

- beside the loaded one when its weights fit in the memory free now (the manager's swap policy:
  ``ROOM_FACTOR`` of it); the loaded model is never touched;
- otherwise one after the other: the loaded model is unloaded first and loaded again from its
  options afterwards, whatever happened (an error, Ctrl-C). ``/device``, ``/quantize``,
  ``/adapter`` and ``/mode`` are part of those options, so it comes back as it was.

The conversation is only read. A ``CompareJob`` shows the stage and its progress and can be
cancelled between two tokens or two windows, and while the other model loads.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from ...common.units import human_bytes
from ..conversation.chat import ChatSession, FittedPrompt
from ..errors import GlmreplError, first_line
from ..models.loading import LoadedModel, LoadJob, LoadOptions
from ..models.manager import fits_beside
from ..models.variants import variant_label, variant_request
from ..request import Variant
from .compare import (
    CompareCancelled,
    CompareError,
    Divergence,
    ReplyComparison,
    TextComparison,
    greedy_agreement,
    greedy_ids,
    log_prob_rows,
    rows_bytes,
)
from .perplexity import PerplexityError, plan_windows, text_ids, text_prefix
from .scheduler import Scheduler

T = TypeVar("T")
ROWS_SHARE = 4  # the reference's rows may take at most a quarter of the memory free now


class ModelOwner(Protocol):
    """What a comparison needs of the backend: the model manager, and the scheduler that owns its model."""

    @property
    def manager(self) -> Any: ...

    @property
    def scheduler(self) -> Scheduler: ...


class CompareJob:
    """A comparison in a background thread: front ends show ``status`` and may ``cancel``."""

    def __init__(self, other: str):
        self.other = other
        self.stage = "starting"
        self.done_count = 0
        self.total: int | None = None
        self.loading: LoadJob | None = None  # the other model's load, or the loaded one's reload
        self.cancel_event = threading.Event()
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.result: ReplyComparison | TextComparison | None = None

    @property
    def fraction(self) -> float | None:
        if self.loading is not None:
            return self.loading.fraction
        return self.done_count / self.total if self.total else None

    @property
    def status(self) -> str:
        if self.loading is not None:
            return f"compare with {self.other}: {self.loading.status}"
        counts = f" {self.done_count:,}/{self.total:,}" if self.total else ""
        return f"compare with {self.other}: {self.stage}{counts}"

    def step(self, stage: str) -> Callable[[int, int], None]:
        """Begin a stage; returns its progress callback (done, to do)."""
        self.stage, self.done_count, self.total, self.loading = stage, 0, None, None

        def progress(done: int, total: int) -> None:
            self.done_count, self.total = done, total

        return progress

    def check_cancelled(self) -> None:
        if self.cancel_event.is_set():
            raise CompareCancelled("cancelled")

    def cancel(self) -> None:
        self.cancel_event.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)

    def start(self, work: Callable[[CompareJob], ReplyComparison | TextComparison]) -> CompareJob:
        threading.Thread(target=self._run, args=(work,), name="glmrepl-compare", daemon=True).start()
        return self

    def _run(self, work: Callable[[CompareJob], ReplyComparison | TextComparison]) -> None:
        try:
            self.result = work(self)
        except BaseException as error:  # one line for the front end, never a traceback
            self.error = self._one_line(error)
        finally:
            self.loading = None
            self.done.set()

    def _one_line(self, error: BaseException) -> GlmreplError:
        if self.cancel_event.is_set() and not isinstance(error, CompareError):
            return CompareCancelled(f"compare with {self.other} cancelled")
        if isinstance(error, GlmreplError):
            return error
        return CompareError(f"compare with {self.other} failed: {first_line(error)}")


# -- what is compared -------------------------------------------------------------------


def require_idle_model(manager: Any) -> LoadedModel:
    """The loaded model, with no load under way (the comparison may unload and reload it)."""
    job = manager.job
    if job is not None and not job.done.is_set():
        raise CompareError(f"still {job.status}: compare once it is done")
    if manager.current is None:
        raise CompareError("no model is loaded")
    return manager.current


def last_turn(conversation: ChatSession) -> ChatSession:
    """A copy of the conversation up to its last user message (what came after it left out)."""
    users = [i for i, message in enumerate(conversation.messages) if message.role == "user"]
    if not users:
        raise CompareError("the conversation has no message to reply to: say something first")
    turn = ChatSession(conversation.system)
    turn.tools = conversation.tools
    turn.messages = list(conversation.messages[: users[-1] + 1])
    return turn


def turn_prompt(loaded: LoadedModel, turn: ChatSession, max_new_tokens: int) -> FittedPrompt:
    """The prompt that asks for a reply to ``turn``, as the model reads it, within its context."""
    from .service import fit_prompt

    fitted = fit_prompt(turn, loaded.prompt_format, loaded.info.context_length, max_new_tokens)
    if not fitted.ids or fitted.max_new_tokens < 1:
        raise CompareError("the conversation leaves no room for a reply in the model's context")
    return fitted


@dataclass(frozen=True)
class Reference:
    """What the comparison keeps of the loaded model: never the model itself, which may have to be
    unloaded to make room for the other one (on_other_model); its steps take it from the manager."""

    name: str
    tokenizer: Any
    stop_ids: list[int]

    @classmethod
    def of(cls, loaded: LoadedModel) -> Reference:
        return cls(loaded.info.name, loaded.tokenizer, list(loaded.prompt_format.stop_token_ids))


def loaded_model(manager: Any) -> Any:
    """The loaded model's weights, for one step on the model thread (kept by no one afterwards)."""
    if manager.current is None:
        raise CompareError("no model is loaded")
    return manager.current.model


def same_vocabulary(first: Any, second: Any) -> bool:
    """Whether an id means the same token to both tokenizers."""
    if first is second:
        return True
    try:
        return bool(vocabulary(first) == vocabulary(second))
    except Exception:  # a tokenizer that cannot list its vocabulary: nothing can be said
        return False


def vocabulary(tokenizer: Any) -> Any:
    """Token to id as transformers' tokenizers give it; the tokens in id order for a family's own
    tokenizer without ``get_vocab`` (GLM-4's)."""
    if hasattr(tokenizer, "get_vocab"):
        return tokenizer.get_vocab()
    return tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))


def reply_text(tokenizer: Any, ids: list[int]) -> str:
    return str(tokenizer.decode(ids, skip_special_tokens=True)).strip()


# -- the reply ---------------------------------------------------------------------------


def compare_replies(owner: ModelOwner, variant: Variant, conversation: ChatSession, max_new_tokens: int) -> CompareJob:
    """Start comparing the replies to the conversation's last message (see the module docstring).
    What cannot be compared (no message, no model) is said here, before anything runs."""
    loaded = require_idle_model(owner.manager)
    request = variant_request(loaded, variant)
    turn = last_turn(conversation)
    prompt, reference = turn_prompt(loaded, turn, max_new_tokens), Reference.of(loaded)
    job = CompareJob(variant_label(request, variant))
    return job.start(lambda job: _replies(owner, reference, request, turn, prompt, job))


def _replies(
    owner: ModelOwner, reference: Reference, request: LoadOptions, turn: ChatSession, prompt: FittedPrompt, job
) -> ReplyComparison:
    started, cancel, name = time.monotonic(), job.cancel_event, reference.name

    def reference_side():
        model, progress = loaded_model(owner.manager), job.step(f"{name}'s reply")
        ids = greedy_ids(model, prompt.ids, prompt.max_new_tokens, reference.stop_ids, cancel, progress)
        check_rows_fit(len(ids), model)
        return ids, log_prob_rows(model, prompt.ids + ids, len(ids))

    with owner.scheduler.reading():
        ids, rows = owner.scheduler.call(reference_side)

    def other_side(other: LoadedModel):
        stop, progress = other.prompt_format.stop_token_ids, job.step(f"{job.other}'s reply")
        if not same_vocabulary(reference.tokenizer, other.tokenizer):  # its own prompt; only the texts compare
            own = turn_prompt(other, turn, prompt.max_new_tokens)
            return greedy_ids(other.model, own.ids, own.max_new_tokens, stop, cancel, progress), None
        room = within_context(other, len(prompt.ids), len(ids), prompt.max_new_tokens)
        other_ids = greedy_ids(other.model, prompt.ids, room, stop, cancel, progress)
        job.step(f"{job.other} reads {name}'s reply")
        divergence = Divergence()
        divergence.add(rows, log_prob_rows(other.model, prompt.ids + ids, len(ids)), ids)
        return other_ids, divergence.figures()

    order, (other_ids, figures), other_tokenizer = on_other_model(owner, request, job, other_side)
    agreeing, longest = greedy_agreement(ids, other_ids) if figures is not None else (0, 0)
    return ReplyComparison(
        name,
        job.other,
        reply_text(reference.tokenizer, ids),
        reply_text(other_tokenizer, other_ids),
        agreeing,
        longest,
        figures,
        order,
        time.monotonic() - started,
    )


# -- a text ------------------------------------------------------------------------------


def compare_on_text(owner: ModelOwner, variant: Variant, text: str, window: int, stride: int) -> CompareJob:
    """Start comparing the two models on a text, in perplexity's windows (``window`` and
    ``stride`` as perplexity.choose_window makes them)."""
    loaded = require_idle_model(owner.manager)
    request, reference = variant_request(loaded, variant), Reference.of(loaded)
    job = CompareJob(variant_label(request, variant))
    return job.start(lambda job: _text(owner, reference, request, text, (window, stride), job))


def _text(
    owner: ModelOwner, reference: Reference, request: LoadOptions, text: str, sizes: tuple[int, int], job
) -> TextComparison:
    started, (window, stride), tokenizer = time.monotonic(), sizes, reference.tokenizer

    def reference_side():
        model = loaded_model(owner.manager)
        ids, prefix = text_ids(tokenizer, text), text_prefix(tokenizer, model)
        if len(ids) < 2:
            raise PerplexityError(f"the text is {len(ids)} token{'s' if len(ids) != 1 else ''}: it needs at least 2")
        step = min(stride, window - len(prefix))  # as perplexity_of_ids: a longer one would skip tokens
        plan = plan_windows(len(ids), len(prefix), window, step)
        progress, total, rows = job.step(f"{reference.name} reads the text"), sum(w.targets for w in plan), []
        for piece in plan:
            job.check_cancelled()
            rows.append(log_prob_rows(model, prefix + ids[piece.begin : piece.end], piece.targets))
            if len(rows) == 1:  # now the width of a row is known
                check_rows_fit(total, model, rows[0].shape[-1])
            progress(sum(len(r) for r in rows), total)
        return ids, prefix, plan, rows, step

    with owner.scheduler.reading():
        ids, prefix, plan, rows, step = owner.scheduler.call(reference_side)

    def other_side(other: LoadedModel):
        if not same_vocabulary(tokenizer, other.tokenizer):
            raise CompareError(f"{job.other} has another tokenizer: comparing on a text needs the same one")
        within_context(other, window)
        progress, total = job.step(f"{job.other} reads the text"), sum(w.targets for w in plan)
        divergence = Divergence()
        for piece, reference_rows in zip(plan, rows):
            job.check_cancelled()
            other_rows = log_prob_rows(other.model, prefix + ids[piece.begin : piece.end], piece.targets)
            divergence.add(reference_rows, other_rows, ids[piece.first_target : piece.end])
            progress(len(divergence.kl), total)
        return divergence.figures()

    order, figures, _ = on_other_model(owner, request, job, other_side)
    return TextComparison(
        reference.name, job.other, figures, len(plan), window, step, order, time.monotonic() - started
    )


def check_rows_fit(tokens: int, model: Any, width: int | None = None) -> None:
    """Refuse to keep more of the reference's rows than a share of the memory free now."""
    from ..models.manager import memory_available_bytes

    width = width or int(model.get_output_embeddings().weight.shape[0])
    needed = rows_bytes(tokens, width)
    if needed * ROWS_SHARE > memory_available_bytes():
        raise CompareError(
            f"comparing {tokens:,} tokens keeps {human_bytes(needed)} of this model's probabilities, "
            f"more than 1/{ROWS_SHARE} of the memory free now: give a shorter text"
        )


def within_context(other: LoadedModel, prompt: int, read: int = 0, reply: int = 0) -> int:
    """Refuse when the other model's context is shorter than what it reads; returns the room for
    its reply (at most ``reply`` tokens)."""
    context = other.info.context_length
    if context is None:
        return reply
    if prompt + read > context:
        raise CompareError(f"{prompt + read:,} tokens are read, more than {other.info.name}'s context ({context:,})")
    return min(reply, context - prompt)


# -- the other model ---------------------------------------------------------------------


def on_other_model(
    owner: ModelOwner, request: LoadOptions, job: CompareJob, work: Callable[[LoadedModel], T]
) -> tuple[str, T, Any]:
    """Load the other model, run ``work`` on it and free it: beside the loaded model when both
    fit, else after unloading it (and loading it again afterwards). Returns (the order, what
    ``work`` returned, the other model's tokenizer)."""
    manager = owner.manager
    beside = fits_beside(manager.current, request)
    reload = None if beside else make_room(manager, job)
    try:
        result, tokenizer = run_on_other(request, job, work)
    finally:
        if reload is not None:
            bring_back(manager, reload, job)
    return ("beside" if beside else "after"), result, tokenizer


def make_room(manager: Any, job: CompareJob) -> LoadOptions:
    """Unload the loaded model; returns the options to load it again as it is. Nothing here keeps
    a reference to it: the manager frees its memory."""
    request, name = manager.current.request, manager.current.info.name
    if request is None:
        raise CompareError(f"{job.other} does not fit beside {name}, which cannot be loaded again")
    job.step(f"unloading {name} to make room")
    manager.unload()
    return request


def bring_back(manager: Any, request: LoadOptions, job: CompareJob) -> None:
    """Load the model that made room again (not cancellable: the session needs it back)."""
    job.loading = LoadJob(request)
    try:
        manager.reload(request, job.loading)
    except GlmreplError as error:
        raise CompareError(f"{request.name} could not be loaded again ({error}): /model loads it") from None


def run_on_other(request: LoadOptions, job: CompareJob, work: Callable[[LoadedModel], T]) -> tuple[T, Any]:
    from ..models.loading import load_model
    from ..models.manager import free_memory

    job.loading = LoadJob(request)
    job.loading.cancel_event = job.cancel_event  # Ctrl-C stops the load between two tensors
    other: LoadedModel | None = None
    try:
        other = load_model(request, job.loading)
        job.loading = None
        return work(other), other.tokenizer
    except BaseException as error:
        error.__traceback__ = None  # its frames hold the other model, which goes now
        raise
    finally:
        other = None
        free_memory()
