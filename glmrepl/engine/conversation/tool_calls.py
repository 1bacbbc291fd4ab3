"""Tool (function) calls: the tool list, each family's call syntax, and reading calls back.

Tools are kept as bare function dicts (``{"name", "description", "parameters"}``);
OpenAI's ``{"type": "function", "function": {...}}`` is accepted and unwrapped.
A conversation carries them on a system message (``{"role": "system",
"content": None, "tools": [...]}``), where ChatGLM3's and GLM-4's own demos put
them, and each prompt format renders that message its family's way.

A reply is read back into calls by the syntax of the model's format:

* ``glm`` (ChatGLM3, GLM-4): the first line of the reply is its metadata. An
  ordinary reply has an empty one; a call names the function there and the rest
  is its arguments: GLM-4 writes a JSON object, ChatGLM3 a fenced block holding
  ``tool_call(name=value, ...)`` (read with ``ast``, never evaluated).
* ``hermes`` (Qwen2.5 and the templates that use its tags): text, then one or
  more ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``.
* ``json`` (Llama 3.1 and other templates that take ``tools``): the whole reply
  is one JSON object ``{"name": ..., "parameters": {...}}``.

A reply that does not parse as a call of a listed function is plain text: never
an error. ``ToolStream`` holds back streamed text that may still become a call,
so the call's raw syntax is never shown as text.
"""

from __future__ import annotations

import ast
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidTools

MAX_TOOLS = 128
# Levels of arrays and objects a call's arguments may nest (a client's deeper ones are a 400).
MAX_NESTING = 64


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as OpenAI's API carries it

    def as_dict(self) -> dict[str, str]:
        return {"id": self.id, "name": self.name, "arguments": self.arguments}

    def parsed_arguments(self) -> dict:
        try:
            return load_arguments(self.arguments)
        except ValueError:
            return {}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def make_call(name: str, arguments: Any) -> ToolCall:
    """A call with these arguments as strict JSON (ValueError for NaN or an infinity, which
    JavaScript's, Go's and Rust's parsers refuse: the reply is then plain text)."""
    return ToolCall(new_call_id(), name, json.dumps(arguments, ensure_ascii=False, allow_nan=False))


def load_arguments(text: str) -> dict:
    """A call's arguments read as strict JSON: an object, without NaN or infinities, nested at
    most MAX_NESTING levels (checked before parsing: the parser recurses). ValueError otherwise."""
    depth = nesting_depth(text)
    if depth > MAX_NESTING:
        raise ValueError(f"nested {depth} levels deep, more than {MAX_NESTING}")
    value = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def nesting_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in JSON text (strings skipped), without recursing."""
    depth = deepest = 0
    quoted = escaped = False
    for char in text:
        if quoted:
            escaped, quoted = (False, True) if escaped else (char == "\\", char != '"')
        elif char == '"':
            quoted = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"{text} is too large for a float")
    return value


# -- the tool list ------------------------------------------------------------------


def normalize_tools(raw: Any, where: str = "tools") -> list[dict]:
    """Bare function dicts from OpenAI-shaped or bare entries; InvalidTools names the bad field."""
    if not isinstance(raw, list):
        raise InvalidTools(f"'{where}' must be a list of functions", where)
    if len(raw) > MAX_TOOLS:
        raise InvalidTools(f"'{where}' takes at most {MAX_TOOLS} functions", where)
    functions: list[dict] = []
    for index, entry in enumerate(raw):
        here = f"{where}[{index}]"
        if not isinstance(entry, dict):
            raise InvalidTools(f"'{here}' must be an object", here)
        if "type" in entry or "function" in entry:
            if entry.get("type", "function") != "function":
                raise InvalidTools(f"'{here}.type' must be 'function', not {entry.get('type')!r}", f"{here}.type")
            entry, here = entry.get("function"), f"{here}.function"
            if not isinstance(entry, dict):
                raise InvalidTools(f"'{here}' must be an object", here)
        functions.append(_function(entry, here))
    names = [f["name"] for f in functions]
    for name in names:
        if names.count(name) > 1:
            raise InvalidTools(f"'{where}' names the function {name!r} twice", where)
    return functions


TOOL_NAME_PATTERN = r"[A-Za-z0-9_.\-]{1,64}"  # OpenAI's rule; a name is also a prompt's metadata line
_NAME = re.compile(TOOL_NAME_PATTERN)


def _function(entry: dict, where: str) -> dict:
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidTools(f"'{where}.name' must be 1 to 64 letters, digits, '_', '.' or '-'", f"{where}.name")
    description = entry.get("description")
    if description is not None and not isinstance(description, str):
        raise InvalidTools(f"'{where}.description' must be a string", f"{where}.description")
    parameters = entry.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise InvalidTools(f"'{where}.parameters' must be a JSON Schema object", f"{where}.parameters")
    unknown = sorted(set(entry) - {"name", "description", "parameters", "strict"})
    if unknown:
        raise InvalidTools(f"unsupported parameter '{where}.{unknown[0]}'", f"{where}.{unknown[0]}")
    # The client's own key order: GLM-4's prompt shows the function as JSON, as its demo did.
    return {k: v for k, v in entry.items() if k in ("name", "description", "parameters") and v is not None}


def openai_tools(functions: list[dict]) -> list[dict]:
    return [{"type": "function", "function": f} for f in functions]


def tools_message(functions: list[dict]) -> dict:
    return {"role": "system", "content": None, "tools": functions}


def split_tools(messages: list[dict]) -> tuple[list[dict] | None, list[dict]]:
    """(the tool list, the messages without the tools message)."""
    tools = None
    rest = []
    for message in messages:
        if message["role"] == "system" and "tools" in message:
            tools = list(message["tools"])
            if not message.get("content"):
                continue
            message = {k: v for k, v in message.items() if k != "tools"}
        rest.append(message)
    return tools, rest


def uses_tools(messages: list[dict]) -> bool:
    return any("tools" in m or m["role"] == "tool" or m.get("tool_calls") for m in messages)


# -- ChatGLM3 / GLM-4 messages -------------------------------------------------------------


def glm_messages(messages: list[dict], family: str, tools_text) -> list[dict]:
    """Messages as ChatGLM3's and GLM-4's demos give them to their prompt builders:
    the tools message as its system text (``tools_text(functions)``), a call as an assistant
    message whose metadata is the function's name, a tool result as an ``observation``."""
    out: list[dict] = []
    for message in messages:
        role = message["role"]
        if role == "system" and "tools" in message:
            out.append({"role": "system", "content": tools_text(message["tools"])})
            if message.get("content"):
                out.append({"role": "system", "content": message["content"]})
        elif role == "tool":
            out.append({"role": "observation", "content": message["content"]})
        elif role == "assistant" and message.get("tool_calls") and "metadata" not in message:
            if message.get("content"):
                out.append({"role": "assistant", "content": message["content"]})
            for call in message["tool_calls"]:
                out.append({"role": "assistant", "metadata": call["name"], "content": glm_call_text(call, family)})
        else:
            out.append(message)
    return out


def glm_call_text(call: dict, family: str) -> str:
    """A call's arguments as the model writes them after its name line."""
    try:
        arguments = load_arguments(call["arguments"])
    except (TypeError, ValueError):
        arguments = {}
    if family == "glm4":
        return json.dumps(arguments, ensure_ascii=False)
    items = arguments.items() if isinstance(arguments, dict) else ()
    keywords = ", ".join(f"{key}={_python_literal(value)}" for key, value in items)
    return f"```python\ntool_call({keywords})\n```"


def _python_literal(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_python_literal(k)}: {_python_literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_python_literal(v) for v in value) + "]"
    return repr(value)  # str, int, float, bool, None: Python's own literal


# -- reading replies ------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedReply:
    content: str | None  # the text before the calls, None when there is none
    calls: list[ToolCall]


# How a model writes its calls, by the syntax its prompt format names (formats.py, the families'
# prompts): GLM's metadata line and JSON (ChatGLM3 and GLM-4 render their prompts each their own
# way), Hermes' <tool_call> JSON, or bare JSON.
SYNTAX_KINDS = {"glm": "glm", "chatglm3": "glm", "glm4": "glm", "hermes": "hermes"}


def syntax_kind(syntax: str | None) -> str:
    return SYNTAX_KINDS.get(syntax or "", "json")


def parse_reply(text: str, syntax: str, names: set[str]) -> ParsedReply | None:
    """The calls a finished reply makes (None: it is plain text)."""
    parser = {"glm": _parse_glm, "hermes": _parse_hermes}.get(syntax_kind(syntax), _parse_json)
    try:
        return parser(text, names)
    except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
        return None  # what the model wrote is not a call after all


def _parse_glm(text: str, names: set[str]) -> ParsedReply | None:
    metadata, newline, body = text.partition("\n")
    name = metadata.strip()
    if not newline or name not in names:
        return None
    body = body.strip()
    if body.startswith("```"):  # ChatGLM3's fenced block: its first and last lines are the fences
        lines = body.split("\n")
        body = "\n".join(lines[1:-1] if lines[-1].strip() == "```" else lines[1:])
    arguments = _glm_arguments(body.strip())
    return None if arguments is None else ParsedReply(None, [make_call(name, arguments)])


def _glm_arguments(body: str) -> dict | None:
    if body.startswith("{"):
        value = json.loads(body)
        return value if isinstance(value, dict) else None
    tree = ast.parse(body, mode="eval").body
    if not (isinstance(tree, ast.Call) and isinstance(tree.func, ast.Name) and tree.func.id == "tool_call"):
        return None
    if tree.args or any(k.arg is None for k in tree.keywords):
        return None
    return {k.arg: _literal(k.value) for k in tree.keywords if k.arg is not None}


def _literal(node: ast.expr) -> Any:
    """A Python literal, or JSON's true/false/null, which ChatGLM3 sometimes writes."""
    if isinstance(node, ast.Name) and node.id in ("true", "false", "null"):
        return {"true": True, "false": False, "null": None}[node.id]
    if isinstance(node, ast.List):
        return [_literal(item) for item in node.elts]
    if isinstance(node, ast.Dict):
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values) if k is not None}
    value = ast.literal_eval(node)
    if isinstance(value, (tuple, set, bytes, complex)):
        raise ValueError("not a JSON value")
    return value


HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"


def _parse_hermes(text: str, names: set[str]) -> ParsedReply | None:
    start = text.find(HERMES_OPEN)
    if start < 0:
        return None
    calls = []
    rest = text[start:]
    while rest.strip():
        if not rest.startswith(HERMES_OPEN):
            return None  # text between or after calls: not the shape the template teaches
        end = rest.find(HERMES_CLOSE)
        body, rest = (
            (rest[len(HERMES_OPEN) :], "")
            if end < 0
            else (rest[len(HERMES_OPEN) : end], rest[end + len(HERMES_CLOSE) :])
        )
        rest = rest.lstrip()
        call = _named_object(body, "arguments", names)
        if call is None:
            return None
        calls.append(call)
    content = text[:start].strip() or None
    return ParsedReply(content, calls)


def _parse_json(text: str, names: set[str]) -> ParsedReply | None:
    body = text.strip().removeprefix("<|python_tag|>")
    call = _named_object(body, "parameters", names)
    return None if call is None else ParsedReply(None, [call])


def _named_object(body: str, key: str, names: set[str]) -> ToolCall | None:
    value = json.loads(body.strip())
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    arguments = value.get(key, value.get("arguments" if key == "parameters" else "parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        arguments = json.loads(arguments)
    if not isinstance(arguments, dict):
        return None
    return make_call(value["name"], arguments)


# -- streaming ----------------------------------------------------------------------


class ToolStream:
    """Streamed text with what may still turn out to be a call held back.

    ``push`` returns the text that can be shown now; ``finish(parsed)`` the rest,
    which is nothing when the reply made calls (their syntax is never text).
    """

    def __init__(self, syntax: str):
        self.syntax = syntax
        self.text = ""
        self.shown = 0

    def push(self, delta: str) -> str:
        self.text += delta
        safe = max(self.shown, self._safe_length())
        out, self.shown = self.text[self.shown : safe], safe
        return out

    def finish(self, made_calls: bool) -> str:
        out = "" if made_calls else self.text[self.shown :]
        self.shown = len(self.text)
        return out

    def _safe_length(self) -> int:
        text = self.text
        if syntax_kind(self.syntax) == "glm":
            metadata, newline, _ = text.partition("\n")
            return len(text) if newline and not metadata.strip() else 0
        if self.syntax == "hermes":
            start = text.find(HERMES_OPEN)
            if start >= 0:
                return start
            return len(text) - _partial_suffix(text, HERMES_OPEN)
        stripped = text.lstrip()
        if not stripped or stripped[0] == "{" or "<|python_tag|>".startswith(stripped[:14]):
            return 0
        return len(text)


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of ``text`` that begins ``marker``."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


# -- chat templates ------------------------------------------------------------------


def template_messages(messages: list[dict]) -> tuple[list[dict] | None, list[dict]]:
    """(OpenAI-shaped tools, messages) as transformers' chat templates take them: a call's
    arguments as a dict (Qwen2.5's and Llama 3.1's templates write them with ``tojson``)."""
    functions, rest = split_tools(messages)
    out = []
    for message in rest:
        if message.get("tool_calls"):
            calls = [
                {
                    "id": call["id"],
                    "type": "function",
                    "function": {"name": call["name"], "arguments": ToolCall(**call).parsed_arguments()},
                }
                for call in message["tool_calls"]
            ]
            message = {"role": "assistant", "content": message.get("content") or "", "tool_calls": calls}
        out.append(message)
    return (openai_tools(functions) if functions else None), out


# -- OpenAI's wire shape (a remote server) -------------------------------------------------


def wire_messages(messages: list[dict]) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools) for an OpenAI-compatible server: calls with their arguments as JSON text."""
    functions, rest = split_tools(messages)
    out = []
    for message in rest:
        if message.get("tool_calls"):
            calls = [
                {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                for c in message["tool_calls"]
            ]
            message = {"role": "assistant", "content": message.get("content") or None, "tool_calls": calls}
        elif message["role"] == "tool":
            message = {"role": "tool", "content": message["content"], "tool_call_id": message.get("tool_call_id")}
        else:
            message = {"role": message["role"], "content": message["content"]}
        out.append(message)
    return out, (openai_tools(functions) if functions else None)


class StreamedCalls:
    """Tool calls assembled from OpenAI stream deltas (``delta.tool_calls``), by index."""

    def __init__(self) -> None:
        self._parts: dict[int, dict[str, str]] = {}

    def add(self, deltas: Any) -> None:
        for delta in deltas or []:
            part = self._parts.setdefault(int(getattr(delta, "index", 0) or 0), {"id": "", "name": "", "arguments": ""})
            function = getattr(delta, "function", None)
            part["id"] = getattr(delta, "id", None) or part["id"]
            part["name"] += getattr(function, "name", None) or ""
            part["arguments"] += getattr(function, "arguments", None) or ""

    def calls(self) -> list[ToolCall]:
        return [
            ToolCall(part["id"] or new_call_id(), part["name"], part["arguments"] or "{}")
            for _, part in sorted(self._parts.items())
            if part["name"]
        ]


# -- forcing a call -----------------------------------------------------------------


def forced_prefix(syntax: str, force: str, functions: list[dict]) -> str:
    """The start of the reply that makes it a call (``force``: a function's name, or "" for any
    listed one), written into the prompt after the assistant's turn begins, so the model goes on
    with the call. InvalidTools where the format's syntax cannot begin a call without its name."""
    name = _forced_name(force, functions)
    if syntax == "hermes":
        return f'{HERMES_OPEN}\n{{"name": "{name}", "arguments": ' if name else f"{HERMES_OPEN}\n"
    if syntax_kind(syntax) != "glm":
        return f'{{"name": "{name}", "parameters": ' if name else '{"name": "'
    if not name:
        raise InvalidTools(
            "'tool_choice' = 'required' with several tools is not supported for this model "
            "(its call begins with the function's name): name one function",
            "tool_choice",
        )
    return f"{name}\n"


def _forced_name(force: str, functions: list[dict]) -> str:
    """The function a forced call names: the one asked for, or the only one listed ("": any)."""
    return force or (functions[0]["name"] if len(functions) == 1 else "")


# What closes a forced call after its arguments, where those are one JSON object: "json"
# templates write {"name", "parameters"} (closed by a brace), Hermes templates close the tag too.
# GLM-4 writes the arguments' JSON after the name's line; ChatGLM3's are Python (no entry).
_CALL_ENDS = {"hermes": "}\n" + HERMES_CLOSE, "json": "}", "glm4": ""}


def forced_arguments(syntax: str, force: str, functions: list[dict]) -> tuple[dict, str] | None:
    """(the JSON Schema of the forced call's arguments, the text that closes the call after them)
    where the forced prefix names the function and the syntax writes its arguments as JSON; None
    elsewhere (the call then goes unheld, as before)."""
    name = _forced_name(force, functions)
    end = _CALL_ENDS.get(syntax)
    function = next((f for f in functions if f["name"] == name), None)
    if not name or end is None or function is None:
        return None
    parameters = function.get("parameters")
    return (parameters if isinstance(parameters, dict) else {"type": "object"}), end
