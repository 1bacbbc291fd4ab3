"""The OpenAI routes: /v1/models, /v1/chat/completions, /v1/completions.

The API's conversation policy is OpenAI's: nothing is dropped to make room,
a prompt that does not fit is a 400 ``context_length_exceeded``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ..engine import (
    API_FIT,
    REPL_FIT,
    ChatSession,
    FitPolicy,
    GenerateRequest,
    GlmreplError,
    ModelStatus,
    Reply,
    ToolCall,
    conversation_from_messages,
    first_line,
)
from .errors import APIError, error_body
from .openapi import STREAMED, answers
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    SamplingRequest,
    check_tool_history,
    chosen_tools,
    logprobs_asked,
    message_dicts,
    output_format,
    refuse_invalid_text,
    refuse_unsupported,
    stop_strings,
)
from .responses import ResponseShape
from .state import ServerState, cache_namespace, state_of
from .streaming import stream_deltas

router = APIRouter()


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    state = state_of(request)
    status = state.backend.status()
    data = [_model_card(state, status)] if status is not None else []
    return {"object": "list", "data": data}


@router.get("/v1/models/{model:path}", responses=answers(404))
async def retrieve_model(model: str, request: Request) -> dict:
    state = state_of(request)
    return _model_card(state, state.require_model(model))


def _model_card(state: ServerState, status: ModelStatus) -> dict:
    card = {"id": status.name, "object": "model", "created": state.started, "owned_by": "glmrepl"}
    if status.context_length:
        # Under both names clients read (vLLM's and the common one), so they can fit max_tokens.
        card.update(context_length=status.context_length, max_model_len=status.context_length)
    return card


@router.post("/v1/chat/completions", responses={200: STREAMED, **answers(404, 500)})
async def chat_completions(body: ChatCompletionRequest, request: Request):
    refuse_invalid_text(body.model_dump(exclude_none=True))
    refuse_unsupported(body)
    messages = message_dicts(body.messages)
    tools, force_call = chosen_tools(body)
    check_tool_history(messages, body)
    try:
        conversation = conversation_from_messages(messages, tools)
    except GlmreplError as error:
        raise APIError(400, str(error), param="messages") from None
    _refuse_tools_without_syntax(state_of(request).require_model(body.model), messages, tools)
    max_tokens = body.max_completion_tokens or body.max_tokens
    fit = REPL_FIT if body.truncate_history else None
    return await _respond(request, body, conversation, max_tokens, "chat", force_call, fit)


def _refuse_tools_without_syntax(status: ModelStatus, messages: list[dict], tools: list[dict] | None) -> None:
    """A 400 before any work when the model's prompt format has no place for tools: dropping
    them would answer as if the client had sent none."""
    if status.tool_syntax is not None:
        return
    why = f"the model's prompt format ({status.format_name}) has no place for tools"
    if tools:
        raise APIError(400, f"'tools' are not supported: {why}", param="tools", code="unsupported_parameter")
    for index, message in enumerate(messages):
        if message["role"] == "tool" or message.get("tool_calls"):
            field = "tool_calls" if message.get("tool_calls") else "role"
            raise APIError(
                400,
                f"'messages[{index}].{field}' is not supported: {why}",
                param=f"messages[{index}].{field}",
                code="unsupported_parameter",
            )


@router.post("/v1/completions", responses={200: STREAMED, **answers(404, 500)})
async def completions(body: CompletionRequest, request: Request):
    refuse_invalid_text(body.model_dump(exclude_none=True))
    refuse_unsupported(body)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1:
        raise APIError(400, "'prompt' must be one string (glmrepl completes one prompt per request)", param="prompt")
    if not prompts[0]:
        raise APIError(400, "'prompt' must not be empty", param="prompt")
    conversation = ChatSession()
    conversation.add_user(prompts[0])
    max_tokens = body.max_tokens if body.max_tokens is not None else 16  # OpenAI's default for completions
    return await _respond(request, body, conversation, max_tokens, "text")


async def _respond(
    request: Request,
    body: SamplingRequest,
    conversation: ChatSession,
    max_tokens: int | None,
    kind: Literal["chat", "text"],
    force_call: str | None = None,
    fit: FitPolicy | None = None,
):
    state = state_of(request)
    status = state.require_model(body.model)
    shape = ResponseShape(kind, status.name)  # the model that answers, whatever placeholder was asked for
    completion = kind == "text"
    stops = stop_strings(body.stop)
    held_to, logprobs = output_format(body), logprobs_asked(body)
    sampling = state.sampling_for(
        status, max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed
    )
    fit = fit or (API_FIT if max_tokens is not None else FitPolicy(drop_oldest=False, shorten_reply=True))
    namespace = cache_namespace(request, body.cache_salt)
    reply = await state.plan(
        GenerateRequest(
            conversation,
            sampling,
            tuple(stops),
            fit,
            completion=completion,
            force_call=force_call,
            cache_namespace=namespace,
            output_format=held_to,
            logprobs=logprobs,
        )
    )
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        # Generation starts now: the pump owns the reply even if the response is never sent.
        deltas = stream_deltas(reply, state.executor)
        return StreamingResponse(
            _events(request, reply, deltas, shape, include_usage, lambda: _calls_of(body, reply), fit is REPL_FIT),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    text = await state.collect(reply, request)
    answer = shape.complete(
        text,
        reply.finish_reason,
        reply.prompt_tokens,
        reply.stats.new_tokens,
        reply.stats.reused_tokens,
        tool_calls=_calls_of(body, reply),
        logprobs=reply.logprobs,
    )
    return _with_dropped_turns(answer, reply) if fit is REPL_FIT else answer


def _with_dropped_turns(payload: dict, reply: Reply) -> dict:
    """usage.dropped_turns: the oldest turns left out to fit (``truncate_history``)."""
    payload["usage"]["dropped_turns"] = reply.dropped_turns
    return payload


def _calls_of(body: SamplingRequest, reply: Reply) -> list[ToolCall]:
    """The reply's calls, or only its first where the request set ``parallel_tool_calls`` false."""
    calls = reply.tool_calls
    return calls[:1] if getattr(body, "parallel_tool_calls", None) is False else calls


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _events(
    request: Request,
    reply: Reply,
    deltas: AsyncIterator[str],
    shape: ResponseShape,
    include_usage: bool,
    calls_of: Callable[[], list[ToolCall]],
    say_dropped: bool = False,
) -> AsyncIterator[str]:
    """OpenAI's stream: the role first (chat), content deltas, the finish reason, usage if asked, [DONE]."""
    listed = 0

    def new_logprobs() -> list | None:  # those of the tokens read since the chunk before
        nonlocal listed
        new = reply.logprobs_after(listed)
        listed += len(new or ())
        return new

    try:
        if shape.kind == "chat":
            yield _event(shape.chunk(first=True, with_usage=include_usage))
        try:
            async for delta in deltas:
                yield _event(shape.chunk(delta, with_usage=include_usage, logprobs=new_logprobs()))
        except GlmreplError as error:  # the status line is gone: say it in the stream, as OpenAI does
            yield _event(error_body(500, first_line(error), code="generation_failed"))
            return
        calls = calls_of() if shape.kind == "chat" else []  # read when the reply has ended, so whole
        for chunk in shape.tool_call_chunks(calls, with_usage=include_usage):
            yield _event(chunk)
        rest = new_logprobs()
        yield _event(shape.chunk(finish_reason=reply.finish_reason, with_usage=include_usage, logprobs=rest or None))
        if include_usage:
            used = shape.usage_chunk(reply.prompt_tokens, reply.stats.new_tokens, reply.stats.reused_tokens)
            yield _event(_with_dropped_turns(used, reply) if say_dropped else used)
        yield "data: [DONE]\n\n"
    finally:
        reply.cancel()  # the client went away (or it already ended): stop within one token
        request.state.tokens = reply.stats.new_tokens
