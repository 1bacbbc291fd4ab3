"""The OpenAPI document (/openapi.json) as the server answers.

FastAPI documents a 422 with its own validation body for every route that takes
input; this server answers bad input with 400 in the OpenAI error shape (errors.py),
so the document says that instead.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

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
BAD_REQUEST = {
    "description": "Bad request (a body that is not JSON, a missing or invalid parameter), in the OpenAI error shape",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
}


def document_errors_as_answered(app: FastAPI) -> None:
    generate = app.openapi  # builds the document once and keeps it

    def openapi() -> dict[str, Any]:
        return with_400_for_422(generate())

    app.openapi = openapi  # type: ignore[method-assign]


def with_400_for_422(document: dict[str, Any]) -> dict[str, Any]:
    """``document`` with each documented 422 replaced by the 400 the server answers (in place; idempotent)."""
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.get("responses", {})
            if responses.pop("422", None) is not None:
                responses.setdefault("400", BAD_REQUEST)
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):  # referred to by the 422s only
        schemas.pop(unused, None)
    schemas["Error"] = ERROR_SCHEMA
    return document
