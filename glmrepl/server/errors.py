"""Every error the server answers, as JSON in the OpenAI error shape.

``{"error": {"message", "type", "param", "code"}}`` with the HTTP status that
fits: 400 bad input, 401 key, 403 host name, 404 route or model, 405 method, 408
body too slow, 413 body too large, 503 the queue or the connections are full, 500 what
failed, in one line. No traceback ever reaches a client, and nothing a client wrote reaches the
log or an error message with its control characters live.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from ..engine import (
    ContextLengthExceeded,
    EmptyPrompt,
    GlmreplError,
    InvalidOutputFormat,
    InvalidTools,
    MaxLengthExceeded,
    NoModelLoaded,
    QueueFull,
    ToolsUnsupported,
    first_line,
)

log = logging.getLogger("glmrepl.server")

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    503: "server_overloaded",
    500: "server_error",
}


# What a terminal would act on instead of showing: C0 and C1 controls (escape sequences clear the
# screen, set the title, write the clipboard; CR and LF forge lines), DEL, the Unicode line and
# paragraph separators, and the bidi controls that show text in another order. The backslash too,
# so that an escape a client typed cannot pass for one written here.
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\\\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def loggable(text: str) -> str:
    """``text`` with each character of ``_UNPRINTABLE`` written as Python writes it (``\\x1b``, ``\\n``)."""
    return _UNPRINTABLE.sub(_escaped, text)


_NAMED_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped(match: re.Match[str]) -> str:
    character = match.group()
    if character in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[character]
    return f"\\x{ord(character):02x}" if ord(character) < 0x100 else f"\\u{ord(character):04x}"


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": ERROR_TYPES.get(status, "invalid_request_error"),
            "param": param,
            "code": code,
        }
    }


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def api_error_from_engine(error: GlmreplError) -> APIError:
    """Engine errors, worded by the engine, with the status each one means over HTTP."""
    if isinstance(error, ToolsUnsupported):
        return APIError(400, error.message, param="tools", code="unsupported_parameter")  # no REPL hint
    if isinstance(error, (InvalidTools, InvalidOutputFormat)):
        return APIError(400, str(error), param=error.where)
    if isinstance(error, MaxLengthExceeded):
        return APIError(400, str(error), param="max_length", code="context_length_exceeded")
    if isinstance(error, ContextLengthExceeded):
        return APIError(400, str(error), param="messages", code="context_length_exceeded")
    if isinstance(error, EmptyPrompt):
        return APIError(400, str(error), param="prompt", code="empty_prompt")
    if isinstance(error, QueueFull):
        return APIError(503, str(error), code="queue_full", headers={"Retry-After": str(error.retry_after_s)})
    if isinstance(error, NoModelLoaded):
        return APIError(
            503, "the model is not loaded yet; retry shortly", code="model_loading", headers={"Retry-After": "5"}
        )
    return APIError(500, first_line(error.worded(request_words)), code="generation_failed")


# The request parameter that carries each setting a hint may name.
REQUEST_PARAMETERS = {"max_new_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p", "seed": "seed"}


def request_words(hint) -> str:
    """A hint in an API client's words: a request parameter, else how the server is started."""
    if hint.action == "setting":
        return f"the request's {REQUEST_PARAMETERS.get(hint.value, hint.value)}"
    return f"glmrepl serve --{hint.action} {hint.value}".rstrip()


HTTP_ERROR_CODES = {408: "request_timeout", 413: "request_too_large"}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return error_response(error.status, error.message, error.param, error.code, error.headers)

    @app.exception_handler(GlmreplError)
    async def engine_error(request: Request, error: GlmreplError):
        translated = api_error_from_engine(error)
        return error_response(
            translated.status, translated.message, translated.param, translated.code, translated.headers
        )

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError):
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if request.method == "POST" and media != "application/json":
            # Required, not guessed: a page on another site can send a form or plain text to a
            # local server without asking, but not JSON (curl -d sends a form's type).
            sent = f"'{media[:60]}'" if media else "none"
            message = f"send the body as JSON with the header 'Content-Type: application/json' (it was {sent})"
            return error_response(400, message, None)
        message, param = describe_validation_error(error.errors())
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        path = loggable(request.url.path)  # the client's own path, escaped as the log writes it
        if error.status_code == 404:
            return error_response(404, f"no route {request.method} {path}", code="not_found")
        if error.status_code == 405:
            return error_response(
                405,
                f"{request.method} is not allowed on {path}",
                code="method_not_allowed",
                headers={"Allow": ", ".join(allowed_methods(request))},
            )
        code = HTTP_ERROR_CODES.get(error.status_code)  # a chunked body over the limit, a body too slow
        headers = dict(error.headers) if error.headers else None
        return error_response(error.status_code, str(error.detail), code=code, headers=headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception):
        return error_response(500, log_unexpected(request.method, request.url.path, error))


def log_unexpected(method: str, path: str, error: Exception) -> str:
    """One log line for an exception nothing else answered; returns the message for the client."""
    what = loggable(f"{type(error).__name__}: {first_line(error)}")
    log.error("%s %s failed: %s", loggable(method), loggable(path), what)
    return f"internal error: {what}"


# The methods a 405's Allow may name: each is tried against the routes (FastAPI nests included
# routers, so the routes' own method sets are not all in sight).
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route answers on this path (Starlette's 405 names the first route's only)."""
    routes = request.app.router.routes
    return [
        method
        for method in METHODS
        if any(route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes)
    ]


def describe_validation_error(errors: Sequence[Any]) -> tuple[str, str | None]:
    """One line for the first problem pydantic found, naming the parameter."""
    if not errors:
        return "invalid request", None
    first = errors[0]
    kind = first.get("type", "")
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    if kind == "json_invalid":
        return "We could not parse the JSON body of your request: it is not valid JSON", None
    if not location:
        return f"the request body must be a JSON object ({first.get('msg', 'invalid')})", None
    param = _dotted(location)
    if kind == "missing":
        return f"missing required parameter '{param}'", param
    if kind == "string_too_short" and first.get("ctx", {}).get("min_length") == 1:
        return f"'{param}' must not be an empty string", param
    if kind == "string_unicode":  # a field with a length bound: pydantic counts, and so refuses, first
        return f"'{param}' holds a lone UTF-16 surrogate: send valid Unicode", param
    return f"invalid value for '{param}': {first.get('msg', 'invalid')}", param


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}
_TYPE_TAG_PREFIXES = ("list[", "dict[", "function-", "union[", "literal[")


def _dotted(location: list[str]) -> str:
    out = ""
    for part in location:
        if part.isdigit():
            out += f"[{part}]"
        elif not out:
            out = part
        elif part in _TYPE_TAGS or part.startswith(_TYPE_TAG_PREFIXES):
            continue  # pydantic names the union member it tried; the client did not write it
        else:
            out += f".{part}"
    return out
