"""One chat turn, the same for every front end: plan a reply, stream it, record it.

``plan_reply`` formats a conversation with the loaded model's prompt format,
fits it into the context (policy chosen by the front end: the REPL drops the
oldest turns, the API refuses), turns settings into generation arguments,
takes a place with the scheduler that owns the model. The returned ``Reply``
streams text deltas (stop strings applied), can be cancelled from any thread,
and gives its place back when it ends. ``record_reply`` keeps the finished reply in a ChatSession.

Nothing here knows about terminals or HTTP.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Protocol

from ..conversation.chat import ChatSession, FittedPrompt
from ..conversation.reply_tokens import ReplyTokens, reply_ids, splice_replies
from ..conversation.tool_calls import forced_prefix, uses_tools
from ..errors import (
    ContextLengthExceeded,
    EmptyPrompt,
    GlmreplError,
    Hint,
    MaxLengthExceeded,
    NoModelLoaded,
    ToolsUnsupported,
)
from ..protocols import PromptFormat
from ..request import GenerateRequest, OutputFormat
from ..status import ModelStatus
from .prefix_cache import PrefixCache, reuse_refused
from .reply import Reply
from .scheduler import Scheduler

ROLES = ("system", "user", "assistant", "tool")


def status_of(loaded: Any, serial: int) -> ModelStatus:
    info, prompt_format, adapter = loaded.info, loaded.prompt_format, getattr(loaded, "adapter", None)
    return ModelStatus(
        serial,
        info.name,
        info.path,
        info.architecture,
        info.family,
        info.family_reason,
        info.placement,
        prompt_format.name,
        prompt_format.is_chat,
        info.context_length,
        dict(info.checkpoint_defaults),
        dict(getattr(prompt_format, "sampling_defaults", {}) or {}),
        adapter.describe() if adapter else None,
        adapter.info.path if adapter else None,
        getattr(prompt_format, "tool_syntax", None),
    )


# -- planning -------------------------------------------------------------------


def plan_reply(backend: LocalBackendParts, request: GenerateRequest) -> Reply:
    """Set up the reply ``request`` asks for (not started: iterate the Reply to run it).

    The request's fit policy says what happens when the conversation and the reply
    do not fit (FitPolicy); ``completion`` continues the text as written, whatever
    the model's chat format; ``force_call`` begins a call of that function in the
    prompt ("": of any of the conversation's tools).
    """
    scheduler = backend.scheduler
    scheduler.admit()
    released = threading.Event()

    def release(tokens: int = 0, seconds: float | None = None) -> None:
        if not released.is_set():
            released.set()
            scheduler.leave(tokens, seconds)

    try:
        return _plan(backend.manager.current, request, release, backend)
    except BaseException:
        release()
        raise


class LocalBackendParts(Protocol):
    """What planning needs of the backend: the model, its scheduler, its caches."""

    @property
    def manager(self) -> Any: ...

    @property
    def scheduler(self) -> Scheduler: ...

    @property
    def prefixes(self) -> PrefixCache: ...

    @property
    def replies(self) -> ReplyTokens: ...


def _plan(loaded: Any, request: GenerateRequest, release: Callable[..., None], backend: LocalBackendParts) -> Reply:
    from .run import GenerationRun

    if loaded is None:
        raise NoModelLoaded("no model is loaded")
    conversation, fit = request.conversation, request.fit
    prefixes, replies, scheduler = backend.prefixes, backend.replies, backend.scheduler
    prompt_format = completion_format(loaded) if request.completion else loaded.prompt_format
    tools = None if request.completion else conversation.tools
    if not request.completion and getattr(prompt_format, "tool_syntax", None) is None:
        messages = conversation.as_dicts()
        if uses_tools(messages):
            calls = any(m["role"] == "tool" or m.get("tool_calls") for m in messages)
            raise ToolsUnsupported(
                f"the model's prompt format ({prompt_format.name}) has no place for tools or tool messages",
                Hint("clear", sentence="{} starts over (the conversation holds tool calls)")
                if calls
                else Hint("tools", "off", sentence="{} drops the tools"),
            )
    kwargs = request.sampling.generate_kwargs()
    requested = kwargs["max_new_tokens"]
    reusable = reuse_refused(loaded.info.family) is None
    try:
        fitted = fit_prompt(
            conversation,
            prompt_format,
            loaded.info.context_length,
            requested,
            drop_oldest=fit.drop_oldest,
            shorten_reply=fit.shorten_reply,
            build=reply_ids_builder(loaded, prompt_format, replies, request.cache_namespace),
        )
    except ContextLengthExceeded as error:
        if fit.max_length is not None and error.prompt_tokens >= fit.max_length:
            raise _max_length_exceeded(error.prompt_tokens, fit.max_length) from None
        raise
    if not fitted.ids:
        raise EmptyPrompt("the prompt is empty: there is nothing to continue")
    prefix = ""
    if tools and request.force_call is not None:
        fitted, prefix = _with_forced_call(loaded, prompt_format, fitted, tools, request.force_call)
    grammar, started = None, False
    if request.output_format is not None:
        grammar = _compiled_format(loaded, request.output_format, prefix)
        fitted, started = _with_reply_start(loaded, prompt_format, fitted)
    elif prefix and tools:
        grammar = _forced_call_grammar(loaded, prompt_format, tools, request.force_call or "")
    if fit.max_length is not None:
        fitted = _within_max_length(fitted, fit.max_length)
    kwargs["max_new_tokens"] = fitted.max_new_tokens
    run = GenerationRun(
        loaded.model,
        loaded.tokenizer,
        fitted.ids,
        kwargs,
        prompt_format.stop_token_ids,
        seed=request.sampling.seed,
        reuse=(lambda: prefixes.take(fitted.ids, request.cache_namespace)) if reusable else None,
        scheduler=scheduler,
        cache_namespace=request.cache_namespace,
        recorder=_recorder(loaded, request),
    )
    if grammar is not None:
        from .grammar import GrammarMask

        run.processors.append(GrammarMask(grammar, prompt_format.stop_token_ids, logits_width(loaded.model), run.made))
    run.may_batch = scheduler.why_not_batching(loaded) is None

    def keep_cache(reply: Reply) -> None:  # called while the reply still holds the model: all is for this model
        if not reusable:
            return
        if run.cache is not None:
            prefixes.put(run.cached_ids(), run.cache, len(fitted.ids), request.cache_namespace)
        # The next prompt renders calls, never the text they came as; a reply begun in the prompt
        # (a call's start, a format's first line) is not the ids the model wrote.
        if reply.tool_calls or prefix or started:
            return
        # A stop string cut the text short of the ids: reply_ids keeps those up to the cut.
        # As kept (tidied) and as streamed: an API client sends back the text it was given.
        for text in dict.fromkeys((reply.text, reply.streamed_text)):
            ids = reply_ids(loaded.tokenizer, run.stats.new_ids, prompt_format.stop_token_ids, text)
            if ids:
                replies.remember(text, ids, request.cache_namespace)

    return Reply(run, fitted, requested, prompt_format, request.stop, release, keep_cache, tools, prefix)


def _compiled_format(loaded: Any, output_format: OutputFormat, forced_prefix: str) -> Any:
    from ..errors import InvalidOutputFormat
    from .grammar import compile_format

    if forced_prefix:
        raise InvalidOutputFormat(
            f"'{output_format.where}' cannot be combined with a forced tool call ('tool_choice')", output_format.where
        )
    return compile_format(loaded.tokenizer, logits_width(loaded.model), output_format)


def _forced_call_grammar(loaded: Any, prompt_format: PromptFormat, tools: list[dict], force: str) -> Any:
    """A forced call's arguments held to their function's schema, where its syntax writes them as
    JSON (tool_calls.forced_arguments); None elsewhere."""
    from ..conversation.tool_calls import forced_arguments
    from .grammar import compile_call

    rest = forced_arguments(str(getattr(prompt_format, "tool_syntax", "")), force, tools)
    if rest is None:
        return None
    return compile_call(loaded.tokenizer, logits_width(loaded.model), *rest)


def _with_reply_start(loaded: Any, prompt_format: PromptFormat, fitted: FittedPrompt) -> tuple[FittedPrompt, bool]:
    """The prompt with the format's first line of a reply written after it (ChatGLM3's and GLM-4's
    empty metadata line), so that the held reply is the content alone; and whether one was."""
    start = getattr(prompt_format, "reply_start", "")
    if not start or fitted.max_new_tokens < 2:
        return fitted, False
    ids = list(loaded.tokenizer.encode(start, add_special_tokens=False))
    return replace(fitted, ids=fitted.ids + ids, max_new_tokens=fitted.max_new_tokens - len(ids)), True


def _recorder(loaded: Any, request: GenerateRequest) -> Any:
    if request.logprobs is None:
        return None
    from .logprobs import LogprobRecorder

    return LogprobRecorder(loaded.tokenizer, request.logprobs)


def logits_width(model: Any) -> int:
    """How many scores a step gives: the model's vocabulary (often padded past the tokenizer's)."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(getattr(text, "padded_vocab_size", None) or text.vocab_size)


def _with_forced_call(loaded, prompt_format, fitted: FittedPrompt, tools: list[dict], force: str):
    """The prompt with the start of the call written after it, and that start (the reply's room
    shrinks by its tokens where the context is the limit)."""
    prefix = forced_prefix(str(getattr(prompt_format, "tool_syntax", "")), force, tools)
    ids = fitted.ids + list(loaded.tokenizer.encode(prefix, add_special_tokens=False))
    room = fitted.max_new_tokens
    context_length = loaded.info.context_length
    if context_length is not None:
        room = min(room, context_length - len(ids))
        if room < 1:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {context_length} tokens; the messages and "
                f"the start of the forced tool call take {len(ids)}",
                len(ids),
                context_length,
            )
    return replace(fitted, ids=ids, max_new_tokens=room), prefix


def reply_ids_builder(
    loaded: Any, prompt_format: PromptFormat, replies: ReplyTokens, namespace: str = ""
) -> Callable[[list[dict]], list] | None:
    """Prompt ids with each remembered reply as the ids the model wrote (reply_tokens.py), for a
    model whose caches are reused and a format that allows it (None: replies go as text); the fit
    counts these, so the turns kept are those that fit as sent."""
    if reuse_refused(loaded.info.family) is not None or not getattr(prompt_format, "splices_replies", False):
        return None
    return lambda dicts: splice_replies(prompt_format, dicts, prompt_format.build(dicts), replies, namespace)


def _max_length_exceeded(prompt_tokens: int, max_length: int) -> MaxLengthExceeded:
    return MaxLengthExceeded(
        f"the prompt and history take {prompt_tokens} tokens, max_length is {max_length}", prompt_tokens, max_length
    )


def _within_max_length(fitted: FittedPrompt, max_length: int) -> FittedPrompt:
    if len(fitted.ids) >= max_length:
        raise _max_length_exceeded(len(fitted.ids), max_length)
    room = min(fitted.max_new_tokens, max_length - len(fitted.ids))
    return replace(fitted, max_new_tokens=room)


def completion_format(loaded: Any) -> PromptFormat:
    from ..models.loading import choose_format

    if not loaded.prompt_format.is_chat:
        return loaded.prompt_format
    return choose_format(loaded.tokenizer, loaded.native_format, "complete", loaded.extra_stop_ids)


def fit_prompt(
    conversation: ChatSession,
    prompt_format: PromptFormat,
    context_length: int | None,
    max_new_tokens: int,
    *,
    drop_oldest: bool = True,
    shorten_reply: bool = True,
    build: Callable[[list[dict]], list] | None = None,
) -> FittedPrompt:
    """Prompt ids for the conversation within the context, by the front end's policy (``build``:
    see ChatSession.fit)."""
    if drop_oldest and shorten_reply:
        return conversation.fit(prompt_format, context_length, max_new_tokens, build)
    dicts = conversation.as_dicts(for_format=prompt_format.name)
    ids = (build or prompt_format.build)(dicts)
    if context_length is None or len(ids) + max_new_tokens <= context_length:
        return FittedPrompt(ids, 0, max_new_tokens, dicts)
    if shorten_reply and len(ids) < context_length:
        return FittedPrompt(ids, 0, context_length - len(ids), dicts)
    asked = f"{len(ids) + max_new_tokens} tokens ({len(ids)} in the messages, {max_new_tokens} in the completion)"
    if len(ids) >= context_length:
        asked = f"{len(ids)} tokens in the messages"
    raise ContextLengthExceeded(
        f"This model's maximum context length is {context_length} tokens. However, you "
        f"requested {asked}. Please reduce the length of the messages or completion.",
        len(ids),
        context_length,
    )


def context_usage(
    loaded: Any, session: ChatSession, max_new_tokens: int = 0, replies: ReplyTokens | None = None
) -> tuple[int, int | None] | None:
    """(prompt tokens the next reply would be given, context length), or None when unknown.

    Counted as the REPL sends it: the oldest turns that leave no room for
    ``max_new_tokens`` are left out, so the figure never exceeds the context.
    """
    if loaded is None:
        return None
    context_length = loaded.info.context_length
    if not session.messages:
        return 0, context_length
    try:
        build = reply_ids_builder(loaded, loaded.prompt_format, replies) if replies is not None else None
        return len(session.fit(loaded.prompt_format, context_length, max_new_tokens, build).ids), context_length
    except GlmreplError:  # even the newest turn alone leaves no room: the context is full
        return context_length, context_length
    except Exception:  # a template that rejects a partial conversation: show nothing rather than fail
        return None


def conversation_from_messages(messages: list[dict], tools: list[dict] | None = None) -> ChatSession:
    """A ChatSession from API-style messages; system messages become the system prompt.

    An assistant message may carry ``tool_calls`` ([{"id", "name", "arguments"}]), a ``tool``
    message a ``tool_call_id``; ``tools`` are bare function dicts (tool_calls.normalize_tools).
    """
    session = ChatSession()
    session.tools = list(tools) if tools else None
    systems = []
    for index, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise GlmreplError(f"messages[{index}].role must be one of {', '.join(ROLES)}, not {role!r}")
        if not isinstance(content, str):
            raise GlmreplError(f"messages[{index}].content must be a string")
        if role == "system":
            systems.append(content)
        elif role == "user":
            session.add_user(content)
        elif role == "tool":
            session.add_tool_result(content, message.get("tool_call_id"))
        else:
            session.add_assistant(content, tool_calls=message.get("tool_calls"))
    session.system = "\n".join(systems) or None
    if not session.messages:
        raise GlmreplError("messages must contain at least one user or assistant message")
    return session
