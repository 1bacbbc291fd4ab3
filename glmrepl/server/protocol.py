"""Request and response shapes of the OpenAI API (the subset glmrepl serves) and ChatGLM's api.py.

Requests are pydantic models, so the app's OpenAPI document describes them; the rules checked
here in code are documented by request_schemas. Values have JSON's own types ("5" is no number).
A parameter glmrepl does not implement gets a 400 naming it, never silence:
unknown names land in ``model_extra`` and are refused by ``refuse_unsupported``
(unless null), and the OpenAI parameters we accept only at their neutral value are
checked there too. Responses are plain dicts shaped exactly as OpenAI's (responses.py).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictStr, WithJsonSchema

from ..engine import (
    MAX_TOP_LOGPROBS,
    InvalidOutputFormat,
    InvalidTools,
    OutputFormat,
    check_schema,
    first_line,
    load_arguments,
    normalize_tools,
)
from . import request_schemas as documented
from .errors import APIError

MAX_STOP_STRINGS = 4
MAX_STOP_CHARACTERS = 1024  # per string: a stop string is a marker, not a document
MAX_CACHE_SALT_CHARACTERS = 256  # a secret (vLLM suggests 43 base64 characters), not a document

# The value each of these may have; anything else is a feature glmrepl does not have.
NEUTRAL: dict[str, tuple] = {
    "n": (None, 1),
    "frequency_penalty": (None, 0),  # 0.0 too: it equals 0, in Python as in JSON Schema's enum
    "presence_penalty": (None, 0),
    "echo": (None, False),
}

STRICT = ConfigDict(extra="allow", strict=True)
# A request, or a part of one, whose unknown fields refuse_unsupported refuses unless null.
UNKNOWN_ONLY_AS_NULL = ConfigDict(extra="allow", strict=True, json_schema_extra=documented.UNKNOWN_ONLY_AS_NULL)


def _integral_as_int(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


# Integers as JSON Schema has them: 2.0 is one (some clients' JSON writes it so), "2" and true are not.
Count = Annotated[int, Field(ge=1), BeforeValidator(_integral_as_int)]
Seed = Annotated[int, Field(ge=0, le=2**32 - 1), BeforeValidator(_integral_as_int)]
StopStrings = Annotated[str | list[str] | None, WithJsonSchema(documented.stop(MAX_STOP_STRINGS, MAX_STOP_CHARACTERS))]


def neutral(name: str) -> WithJsonSchema:
    return WithJsonSchema(documented.only(NEUTRAL[name]))


class TextPart(BaseModel):
    model_config = STRICT
    type: str
    text: str | None = None


class CalledFunction(BaseModel):
    model_config = UNKNOWN_ONLY_AS_NULL
    name: str
    arguments: str


class RequestToolCall(BaseModel):
    model_config = UNKNOWN_ONLY_AS_NULL
    id: str
    type: str = "function"
    function: CalledFunction


class ChatMessage(BaseModel):
    model_config = UNKNOWN_ONLY_AS_NULL
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[RequestToolCall] | None = None
    tool_call_id: str | None = None


class StreamOptions(BaseModel):
    model_config = UNKNOWN_ONLY_AS_NULL
    include_usage: bool = False


class JSONSchemaFormat(BaseModel):
    model_config = UNKNOWN_ONLY_AS_NULL
    name: Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: StrictStr | None = None
    # "schema" is a name pydantic's BaseModel keeps for itself: the field is read under it.
    json_schema: Annotated[dict[str, Any] | None, WithJsonSchema(documented.json_schema())] = Field(
        None, alias="schema"
    )
    strict: StrictBool | None = None


class ResponseFormat(BaseModel):
    model_config = UNKNOWN_ONLY_AS_NULL
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


TopLogprobs = Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS), BeforeValidator(_integral_as_int)]


class SamplingRequest(BaseModel):
    """What chat and completions share."""

    model_config = UNKNOWN_ONLY_AS_NULL
    model: str = Field(description="The served model's name, its folder's, or dummy, tgi or default; else a 404")
    max_tokens: Count | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    seed: Seed | None = None
    stop: StopStrings = None  # checked by stop_strings
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[Count | None, neutral("n")] = None
    user: str | None = None
    # vLLM's: requests with different salts never reuse each other's caches (state.cache_namespace).
    cache_salt: Annotated[StrictStr, Field(min_length=1, max_length=MAX_CACHE_SALT_CHARACTERS)] | None = None
    # OpenAI parameters glmrepl accepts only at their neutral value (see NEUTRAL)
    frequency_penalty: Annotated[float | None, neutral("frequency_penalty")] = None
    presence_penalty: Annotated[float | None, neutral("presence_penalty")] = None
    response_format: ResponseFormat | None = None  # checked by output_format


class ChatCompletionRequest(SamplingRequest):
    messages: Annotated[list[ChatMessage], WithJsonSchema(documented.messages())]
    max_completion_tokens: Count | None = None
    # Checked by normalize_tools and chosen_tools, which name the bad field.
    tools: Annotated[list[Any] | None, WithJsonSchema(documented.tools())] = None
    tool_choice: Annotated[str | dict[str, Any] | None, WithJsonSchema(documented.tool_choice())] = None
    # False: a reply that makes several calls returns its first only. Strict, as a bool's
    # lax parsing would read "no" or 0 as a choice the client never spelled out.
    parallel_tool_calls: StrictBool | None = None
    # glmrepl's own: leave out the oldest turns that do not fit and shorten the reply to the room
    # left, as the REPL does, instead of a 400 (the web page sends it); usage says how many went.
    truncate_history: StrictBool | None = None
    logprobs: StrictBool | None = None
    top_logprobs: TopLogprobs | None = None  # with logprobs: the alternatives listed for each token


class CompletionRequest(SamplingRequest):
    prompt: Annotated[str | list[str], WithJsonSchema(documented.one_prompt())]
    echo: Annotated[bool | None, neutral("echo")] = None
    logprobs: TopLogprobs | None = None  # the alternatives listed for each token (0: the token's own alone)


class ChatGLMRequest(BaseModel):
    """ChatGLM's api.py: ``{"prompt", "history", "max_length", "top_p", "temperature"}``."""

    model_config = UNKNOWN_ONLY_AS_NULL
    prompt: str = Field(min_length=1)
    history: Annotated[list[list[str] | dict[str, str]] | None, WithJsonSchema(documented.history())] = None
    max_length: Count | None = None
    top_p: float | None = Field(None, ge=0, le=1)
    temperature: float | None = Field(None, ge=0, le=2)


def refuse_unsupported(request: BaseModel) -> None:
    for name, allowed in NEUTRAL.items():
        value = getattr(request, name, None)
        if value not in allowed:
            reason = " (glmrepl generates one choice per request)" if name == "n" else ""
            raise APIError(
                400, f"'{name}' = {value!r} is not supported{reason}", param=name, code="unsupported_parameter"
            )
    refuse_unknown(request)
    refuse_unknown(getattr(request, "stream_options", None), "stream_options")


def refuse_unknown(part: BaseModel | None, where: str = "") -> None:
    """A 400 naming the first field of ``part`` (at ``where``) that the API does not know, unless null."""
    for name, value in (part.model_extra or {}).items() if part is not None else ():
        if value is not None:
            field = f"{where}.{name}" if where else name
            raise APIError(400, f"unsupported parameter '{field}'", param=field, code="unsupported_parameter")


def output_format(request: SamplingRequest) -> OutputFormat | None:
    """The engine's OutputFormat of ``response_format`` (None: free text); 400s name the field."""
    chosen = request.response_format
    if chosen is None or chosen.type == "text":
        if chosen is not None and chosen.json_schema is not None:
            raise APIError(
                400, "'response_format.json_schema' is only for type json_schema", param="response_format.type"
            )
        return None
    refuse_unknown(chosen, "response_format")
    if chosen.type == "json_object":
        if chosen.json_schema is not None:
            raise APIError(
                400, "'response_format.json_schema' is only for type json_schema", param="response_format.type"
            )
        return OutputFormat()
    if chosen.json_schema is None:
        raise APIError(
            400, "'response_format.json_schema' is required with type json_schema", param="response_format.json_schema"
        )
    wanted = chosen.json_schema
    refuse_unknown(wanted, "response_format.json_schema")
    if wanted.json_schema is None:
        return OutputFormat()
    where = "response_format.json_schema.schema"
    try:  # the grammar engine reads it when the reply is planned, in the pool (a 400 naming it too)
        text = check_schema(wanted.json_schema, where, bool(wanted.strict), convert=False)
    except InvalidOutputFormat as error:
        raise APIError(400, str(error), param=error.where) from None
    return OutputFormat(text, strict=bool(wanted.strict), where=where)


def logprobs_asked(request: SamplingRequest) -> int | None:
    """How many alternatives each token lists (None: no logprobs); chat's top_logprobs needs logprobs."""
    if isinstance(request, CompletionRequest):
        return request.logprobs
    chat = request if isinstance(request, ChatCompletionRequest) else None
    if chat is None or not chat.logprobs:
        if chat is not None and chat.top_logprobs is not None:
            raise APIError(400, "'top_logprobs' needs 'logprobs' = true", param="top_logprobs")
        return None
    return chat.top_logprobs or 0


def refuse_invalid_text(value: Any, where: str = "") -> None:
    """400 naming the first field (or key) holding a lone UTF-16 surrogate.

    JSON's ``\\ud800`` escapes parse into such strings, which no tokenizer can
    encode and no response can carry: refused before anything else sees them.
    """
    if isinstance(value, str):
        if not _encodable(value):
            raise APIError(400, f"'{where or 'body'}' holds a lone UTF-16 surrogate: send valid Unicode", param=where)
    elif isinstance(value, dict):
        for key, item in value.items():
            name = f"{where}.{key}" if where else str(key)
            if not _encodable(str(key)):
                raise APIError(400, "a parameter name holds a lone UTF-16 surrogate: send valid Unicode")
            refuse_invalid_text(item, name)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            refuse_invalid_text(item, f"{where}[{index}]")


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def stop_strings(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise APIError(400, f"'stop' takes at most {MAX_STOP_STRINGS} strings", param="stop")
    if any(not s for s in stops):
        raise APIError(400, "'stop' strings must not be empty", param="stop")
    if any(len(s) > MAX_STOP_CHARACTERS for s in stops):
        raise APIError(400, f"'stop' strings must be at most {MAX_STOP_CHARACTERS} characters long", param="stop")
    return stops


def message_dicts(messages: list[ChatMessage]) -> list[dict]:
    """API messages as the engine's {"role", "content"} dicts; refuses what it cannot carry."""
    if not messages:
        raise APIError(400, "'messages' must contain at least one message", param="messages")
    out = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        refuse_unknown(message, where)
        role = "system" if message.role == "developer" else message.role
        # A tool message's name is its function's, which the call it answers already gives.
        if message.name is not None and role != "tool":  # no prompt format glmrepl builds has a place for it
            raise APIError(
                400,
                f"'{where}.name' is not supported (message names are not part of any prompt format glmrepl builds)",
                param=f"{where}.name",
                code="unsupported_parameter",
            )
        if role not in ("system", "user", "assistant", "tool"):
            raise APIError(
                400,
                f"'{where}.role' must be system, user, assistant or tool, not {message.role!r}",
                param=f"{where}.role",
            )
        out.append(_message_dict(message, role, where))
    return out


def _message_dict(message: ChatMessage, role: str, where: str) -> dict:
    for field in ("tool_calls", "tool_call_id"):
        if getattr(message, field) is not None and role != ("assistant" if field == "tool_calls" else "tool"):
            raise APIError(400, f"'{where}.{field}' is only for {_role_of(field)} messages", param=f"{where}.{field}")
    if role == "tool" and not message.tool_call_id:
        raise APIError(400, f"'{where}.tool_call_id' is missing", param=f"{where}.tool_call_id")
    if role == "assistant" and message.tool_calls:
        content = "" if message.content is None else _text_content(message.content, where)
        return {"role": role, "content": content, "tool_calls": _calls(message.tool_calls, where)}
    out = {"role": role, "content": _text_content(message.content, where)}
    return {**out, "tool_call_id": message.tool_call_id} if role == "tool" else out


def check_tool_history(messages: list[dict], request: ChatCompletionRequest) -> None:
    """A 400 naming the field for a tool message that answers no call of the assistant message
    before it, and for a history call of a function that the request's tools do not list."""
    listed = {tool["name"] for tool in normalize_tools(request.tools)} if request.tools else set()
    open_calls: set[str] = set()
    for index, message in enumerate(messages):
        if message["role"] == "tool":
            where = f"messages[{index}]"
            if not open_calls:
                raise APIError(
                    400, f"'{where}' is a tool message but no assistant message before it makes a call",
                    param=f"{where}.role",
                )  # fmt: skip
            if message["tool_call_id"] not in open_calls:
                raise APIError(
                    400, f"'{where}.tool_call_id' answers no call of the assistant message before it",
                    param=f"{where}.tool_call_id",
                )  # fmt: skip
            continue
        open_calls = {call["id"] for call in message.get("tool_calls") or ()}
        for number, call in enumerate(message.get("tool_calls") or ()):
            if listed and call["name"] not in listed:
                field = f"messages[{index}].tool_calls[{number}].function.name"
                raise APIError(400, f"'{field}' names {call['name']!r}, which 'tools' does not list", param=field)


def _role_of(field: str) -> str:
    return "assistant" if field == "tool_calls" else "tool"


def _calls(calls: list[RequestToolCall], where: str) -> list[dict]:
    out = []
    for index, call in enumerate(calls):
        here = f"{where}.tool_calls[{index}]"
        for name, value in {**(call.model_extra or {}), **(call.function.model_extra or {})}.items():
            if value is not None:
                raise APIError(400, f"unsupported parameter '{here}.{name}'", param=f"{here}.{name}")
        if call.type != "function":
            raise APIError(400, f"'{here}.type' must be 'function', not {call.type!r}", param=f"{here}.type")
        try:
            load_arguments(call.function.arguments)
        except ValueError as error:
            raise APIError(
                400,
                f"'{here}.function.arguments' must be a JSON object ({first_line(error)})",
                param=f"{here}.function.arguments",
            ) from None
        out.append({"id": call.id, "name": call.function.name, "arguments": call.function.arguments})
    return out


def chosen_tools(request: ChatCompletionRequest) -> tuple[list[dict] | None, str | None]:
    """(the functions a reply may call, the call it must make), by ``tools`` and ``tool_choice``.

    No tools offered: (None, None). ``auto``: (tools, None). ``required``: (tools, "") and a
    named function: ([that function], its name), offered alone as GLM-4's own demo does; the
    engine then begins the call in the prompt, so the model goes on with it.
    """
    choice = request.tool_choice
    if choice is not None and request.tools is None:
        raise APIError(400, "'tool_choice' is only allowed when 'tools' are given", param="tool_choice")
    if request.tools is None:
        return None, None
    try:
        functions = normalize_tools(request.tools)
    except InvalidTools as error:
        raise APIError(400, str(error), param=error.where) from None
    if choice not in (None, "auto", "none") and not functions:
        raise APIError(400, "'tool_choice' asks for a call but 'tools' lists no function", param="tool_choice")
    if choice in (None, "auto", "none"):
        return (functions or None) if choice != "none" else None, None
    if choice == "required":
        return functions, ""
    name = _named_choice(choice)
    named = [f for f in functions if f["name"] == name]
    if not named:
        raise APIError(400, f"'tool_choice' names {name!r}, which 'tools' does not list", param="tool_choice")
    return named, name


def _named_choice(choice: Any) -> str:
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(name, str):
        raise APIError(
            400,
            '\'tool_choice\' must be \'auto\', \'none\' or {"type": "function", "function": {"name": ...}}',
            param="tool_choice",
        )
    return name


def _text_content(content: str | list[TextPart] | None, where: str) -> str:
    if content is None:
        raise APIError(400, f"'{where}.content' is missing", param=f"{where}.content")
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.type != "text" or part.text is None:
            raise APIError(
                400,
                f"'{where}.content' part of type {part.type!r} is not supported (text only)",
                param=f"{where}.content",
                code="unsupported_parameter",
            )
        texts.append(part.text)
    return "".join(texts)
