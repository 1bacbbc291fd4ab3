"""ChatGLM's api.py protocol: ``POST /`` with ``{prompt, history, max_length, top_p, temperature}``.

Answers ``{"response", "history", "status": 200, "time": "YYYY-mm-dd HH:MM:SS"}`` as the
released api.py does, with its defaults (max_length 2048 counting prompt and reply,
top_p 0.7, temperature 0.95). ``history`` is a list of [query, response] pairs (ChatGLM-6B,
ChatGLM2) or of {"role", "content"} messages (ChatGLM3); the answer keeps the style it got.
"""

from __future__ import annotations

import datetime

from fastapi import APIRouter, Request

from ..engine import ChatSession, FitPolicy, GenerateRequest
from .errors import APIError
from .openapi import answers
from .protocol import ChatGLMRequest, refuse_invalid_text
from .state import cache_namespace, state_of

router = APIRouter()

DEFAULT_MAX_LENGTH = 2048
DEFAULT_TOP_P = 0.7
DEFAULT_TEMPERATURE = 0.95


@router.post("/", responses=answers(500))
async def chatglm_api(body: ChatGLMRequest, request: Request) -> dict:
    refuse_invalid_text(body.model_dump(exclude_none=True))
    for name, value in (body.model_extra or {}).items():
        if value is not None:
            raise APIError(400, f"unsupported parameter '{name}'", param=name, code="unsupported_parameter")
    state = state_of(request)
    status = state.require_model()
    history = body.history or []
    conversation = _conversation(history, body.prompt)
    max_length = body.max_length or DEFAULT_MAX_LENGTH
    sampling = state.sampling_for(
        status,
        max_tokens=max_length,  # at most; the plan leaves max_length minus the prompt
        temperature=body.temperature if body.temperature is not None else DEFAULT_TEMPERATURE,
        top_p=body.top_p if body.top_p is not None else DEFAULT_TOP_P,
    )
    # The prompt is built and counted once, in the pool: a long history never holds the event loop.
    fit = FitPolicy(drop_oldest=False, shorten_reply=True, max_length=max_length)
    reply = await state.plan(GenerateRequest(conversation, sampling, fit=fit, cache_namespace=cache_namespace(request)))
    response = await state.collect(reply, request)
    return {
        "response": response,
        "history": _extended(history, body.prompt, response),
        "status": 200,
        "time": datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
    }


def _conversation(history: list, prompt: str) -> ChatSession:
    session = ChatSession()
    for index, item in enumerate(history):
        if isinstance(item, dict):
            role, content = item.get("role"), item.get("content", "")
            if role == "system":
                session.system = content
            elif role in ("user", "assistant"):
                (session.add_user if role == "user" else session.add_assistant)(content)
            else:
                raise APIError(
                    400,
                    f"'history[{index}].role' must be system, user or assistant, not {role!r}",
                    param=f"history[{index}].role",
                )
        elif len(item) == 2:
            session.add_user(item[0])
            session.add_assistant(item[1])
        else:
            raise APIError(400, f"'history[{index}]' must be a [query, response] pair", param=f"history[{index}]")
    session.add_user(prompt)
    return session


def _extended(history: list, prompt: str, response: str) -> list:
    if history and isinstance(history[0], dict):
        return [*history, {"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    return [*[list(item) for item in history], [prompt, response]]
