"""What /openapi.json says of the request fields whose rules protocol.py checks itself.

pydantic documents what it enforces (types, bounds). The rules checked in code, for messages
that name the field and say what to send instead, are written here as JSON Schema, so that the
document refuses what the server refuses: a value a parameter takes only at its neutral setting,
one prompt, up to four stop strings, each role's fields, tool definitions. What JSON Schema
cannot state (a tool message answers a call of the assistant message before it, a function's
name is listed once) is said in the descriptions.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..engine import MAX_TOOLS, TOOL_NAME_PATTERN

Schema = dict[str, Any]

NULL: Schema = {"type": "null"}
STRING: Schema = {"type": "string"}
NON_EMPTY_STRING: Schema = {"type": "string", "minLength": 1}

# Unknown parameters are refused with a 400 naming them, except as null: what some clients send
# for a parameter they leave out.
UNKNOWN_ONLY_AS_NULL: Schema = {"additionalProperties": NULL}


def nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, NULL]}


def only(values: Iterable[Any]) -> Schema:
    """The values a parameter glmrepl does not implement may take (its neutral ones), null included."""
    return {"enum": list(values)}


def one_prompt() -> Schema:
    return {
        "anyOf": [NON_EMPTY_STRING, {"type": "array", "items": NON_EMPTY_STRING, "minItems": 1, "maxItems": 1}],
        "description": "The text to continue: one non-empty string (a list of one is taken too)",
    }


def stop(max_strings: int, max_characters: int) -> Schema:
    string = {"type": "string", "minLength": 1, "maxLength": max_characters}
    return {"anyOf": [string, {"type": "array", "items": string, "maxItems": max_strings}, NULL]}


TEXT_CONTENT: Schema = {
    "anyOf": [
        STRING,
        {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["type", "text"],
                "properties": {"type": {"const": "text"}, "text": STRING},
            },
        },
    ],
    "description": "A string, or text parts joined in order (no other kind of part)",
}
TOOL_CALL: Schema = {
    "type": "object",
    "required": ["id", "function"],
    "properties": {
        "id": STRING,
        "type": {"const": "function"},
        "function": {
            "type": "object",
            "required": ["name", "arguments"],
            "properties": {
                "name": {**STRING, "description": "A function that 'tools' lists, when the request gives tools"},
                "arguments": {
                    **STRING,
                    "contentMediaType": "application/json",
                    "contentSchema": {"type": "object"},
                    "description": "The text of a JSON object",
                },
            },
            **UNKNOWN_ONLY_AS_NULL,
        },
    },
    **UNKNOWN_ONLY_AS_NULL,
}


def _message(roles: list[str], required: list[str], **fields: Schema) -> Schema:
    """A message of ``roles``: ``name``, ``tool_calls`` and ``tool_call_id`` only where ``fields`` allow them."""
    properties = {"role": {"enum": roles}, "content": TEXT_CONTENT, "name": NULL, "tool_calls": NULL}
    properties |= {"tool_call_id": NULL, **fields}
    return {"type": "object", "required": ["role", *required], "properties": properties, **UNKNOWN_ONLY_AS_NULL}


def messages() -> Schema:
    not_system = {"enum": ["user", "assistant", "tool"]}
    return {
        "type": "array",
        "minItems": 1,
        "items": {
            "anyOf": [
                _message(["system", "developer", "user"], ["content"]),
                _message(["assistant"], ["content"], tool_calls={"anyOf": [{"type": "array", "maxItems": 0}, NULL]}),
                _message(
                    ["assistant"],
                    ["tool_calls"],
                    content=nullable(TEXT_CONTENT),
                    tool_calls={"type": "array", "minItems": 1, "items": TOOL_CALL},
                ),
                _message(["tool"], ["content", "tool_call_id"], tool_call_id=NON_EMPTY_STRING, name=nullable(STRING)),
            ]
        },
        "contains": {"properties": {"role": not_system}},
        "description": "The conversation, with at least one user, assistant or tool message. Each tool message "
        "answers a call of the assistant message before it (by tool_call_id).",
    }


FUNCTION: Schema = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": f"^{TOOL_NAME_PATTERN}$"},
        "description": nullable(STRING),
        "parameters": {**nullable({"type": "object"}), "description": "A JSON Schema of the arguments"},
        "strict": {},
    },
    "additionalProperties": False,
}


def tools() -> Schema:
    wrapped = {
        "type": "object",
        "required": ["function"],
        "properties": {"type": {"const": "function"}, "function": FUNCTION},
    }
    return nullable(
        {
            "type": "array",
            "maxItems": MAX_TOOLS,
            "items": {"anyOf": [wrapped, FUNCTION]},
            "description": "Functions the reply may call, OpenAI's {type, function} or bare; each name once",
        }
    )


def tool_choice() -> Schema:
    named = {
        "type": "object",
        "required": ["type", "function"],
        "properties": {
            "type": {"const": "function"},
            "function": {"type": "object", "required": ["name"], "properties": {"name": STRING}},
        },
    }
    return {
        **nullable({"anyOf": [{"enum": ["auto", "none", "required"]}, named]}),
        "description": "Only with 'tools'; 'required' or a named function needs a function there (the named one)",
    }


def history() -> Schema:
    pair = {"type": "array", "items": STRING, "minItems": 2, "maxItems": 2}
    message = {
        "type": "object",
        "required": ["role"],
        "properties": {"role": {"enum": ["system", "user", "assistant"]}},
        "additionalProperties": STRING,
    }
    return {
        **nullable({"type": "array", "items": {"anyOf": [pair, message]}}),
        "description": "Earlier turns: [query, response] pairs, or {role, content} messages",
    }


def json_schema() -> Schema:
    return {
        **nullable({"type": "object"}),
        "description": "A JSON Schema the reply is held to while it is written. Keywords that cannot be held to "
        "that way (allOf, not, if/then/else, dependentSchemas) are refused, as are schemas the grammar "
        "engine cannot compile; the error names the keyword.",
    }
