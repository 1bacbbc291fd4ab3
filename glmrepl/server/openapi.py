"""The OpenAPI document (/openapi.json) as the server answers.

FastAPI documents a 422 with its own validation body for every route that takes input; this
server answers bad input with 400 in the OpenAI error shape (errors.py), so the document says
that instead. It also documents what the routes do not answer themselves: the key (a bearer
security scheme, when the server has keys), and the refusals of the middleware and the listener
(401, 403, 408, 413, 503). The routes name their own (``answers``: 404, 500).
"""

from __future__ import annotations

import json
import re
from typing import Any

from fastapi import FastAPI

from .listening import ALWAYS_ANSWERED
from .middleware import needs_key

_NULLABLE_STRING = {"anyOf": [{"type": "string"}, {"type": "null"}]}
ERROR_SCHEMA: dict[str, Any] = {
    "title": "Error",
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": _NULLABLE_STRING,
                "code": _NULLABLE_STRING,
            },
        }
    },
}
SECURITY_SCHEME = "apiKey"


def _error(description: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """A documented error answer; ``headers``: the header each answer carries, and what it says."""
    answer: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    if headers:
        answer["headers"] = {
            name: {"description": said, "required": True, "schema": {"type": "string"}}
            for name, said in headers.items()
        }
    return answer


ERRORS: dict[int, dict[str, Any]] = {
    400: _error("Bad request (a body that is not JSON, a missing or invalid parameter), in the OpenAI error shape"),
    401: _error("invalid_api_key: a missing or wrong key", {"WWW-Authenticate": "Bearer"}),
    403: _error("host_not_allowed: the Host header names a host the server does not answer to"),
    404: _error("model_not_found: the request names a model the server does not serve"),
    408: _error("request_timeout: the body did not all arrive within the server's --idle-timeout of its head"),
    413: _error("request_too_large: a body larger than the server's limit"),
    500: _error("generation_failed: what failed, in one line"),
    503: _error(
        "queue_full, model_loading or too_many_connections: retry after the seconds Retry-After says",
        {"Retry-After": "seconds to wait before retrying"},
    ),
}
STREAMED = {
    "description": "The completion: JSON, or with 'stream': true, server-sent events of its chunks ending with [DONE]",
    "content": {"text/event-stream": {"schema": {"type": "string"}}},
}


def answers(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """A route's own documented errors (its ``responses``)."""
    return {status: ERRORS[status] for status in statuses}


def document_as_answered(app: FastAPI, keyed: bool) -> None:
    """``app``'s document as the server answers; ``keyed``: the server requires an API key."""
    generate = app.openapi  # builds the document once and keeps it

    def openapi() -> dict[str, Any]:
        return as_answered(generate(), keyed)

    app.openapi = openapi  # type: ignore[method-assign]


def as_answered(document: dict[str, Any], keyed: bool = False) -> dict[str, Any]:
    """``document`` with each 422 replaced by the 400 the server answers, and the answers that come
    from outside the routes added (in place; idempotent)."""
    for path, operations in document.get("paths", {}).items():
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            if responses.pop("422", None) is not None:
                responses.setdefault("400", ERRORS[400])
            for status in _refusals_outside_the_route(method, path, "requestBody" in operation, keyed):
                responses.setdefault(str(status), ERRORS[status])
            operation["responses"] = dict(sorted(responses.items()))
            if keyed:
                operation["security"] = [{SECURITY_SCHEME: []}] if needs_key(method.upper(), path) else []
    components = document.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas["Error"] = ERROR_SCHEMA
    _drop_unreferenced(schemas, document)
    if keyed:
        components["securitySchemes"] = {
            SECURITY_SCHEME: {"type": "http", "scheme": "bearer", "description": "one of the keys of --api-key"}
        }
    return document


def _refusals_outside_the_route(method: str, path: str, has_body: bool, keyed: bool) -> list[int]:
    """The statuses the middleware and the listener may answer for an operation."""
    statuses = [403]  # every path checks the Host header
    if keyed and needs_key(method.upper(), path):
        statuses.append(401)
    if has_body:
        statuses += [408, 413]
    if path not in ALWAYS_ANSWERED:
        statuses.append(503)  # over --max-connections
    return statuses


_REFERENCE = re.compile(r'"#/components/schemas/([^"]+)"')


def _drop_unreferenced(schemas: dict[str, Any], document: dict[str, Any]) -> None:
    """Leave out the schemas nothing refers to: the 422's, and the models of fields whose schema
    request_schemas writes (a reader would take them for what the server checks)."""
    while unused := set(schemas) - set(_REFERENCE.findall(json.dumps(document))):
        for name in unused:
            del schemas[name]
