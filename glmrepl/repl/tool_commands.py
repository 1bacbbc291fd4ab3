"""The REPL's tool commands: /tools loads function schemas, /observe answers the model's call.

The calls themselves are shown by ``describe_call``, one escaped line each, so
nothing a model writes in them acts on the terminal.
"""

from __future__ import annotations

from ..engine import GlmreplError
from .app import App
from .results import Error, Generate, Table, Text


def cmd_tools(app: App, args: str):
    """/tools FILE loads a JSON list of function schemas for the conversation; /tools off drops them."""
    if not args:
        if not app.session.tools:
            return Text("no tools (/tools FILE loads a JSON list of functions)")
        rows = [[f["name"], f.get("description", "")] for f in app.session.tools]
        return Table(["function", "description"], rows, title="Tools the model may call (/tools off drops them)")
    if args.lower() == "off":
        app.session.tools = None
        return Text("tools off: replies are text again", "dim")
    tools = read_tools(args)
    status = app.status()
    if status is not None and status.tool_syntax is None:
        return Error(
            f"{status.name}'s prompt format ({status.format_name}) has no place for tools: the tools were not kept"
        )
    app.session.tools = tools
    names = ", ".join(f["name"] for f in app.session.tools)
    return Text(f"{len(app.session.tools)} tool(s) for this conversation: {names}", "dim")


def read_tools(path: str) -> list[dict]:
    from ..engine import normalize_tools, read_json_file

    file, data = read_json_file(path)
    tools = normalize_tools([data] if isinstance(data, dict) else data, where=file.name)
    if not tools:
        raise GlmreplError(f"{file}: the list of functions is empty (/tools off drops the tools)")
    return tools


def cmd_observe(app: App, args: str):
    """The result of the model's oldest unanswered call; the reply comes once every call has one."""
    pending = app.session.pending_calls
    if not pending:
        return Error("no tool call is waiting for a result")
    if not args:
        return Error(f"usage: /observe TEXT (the result of {pending[0]['name']})")
    app.require_model()
    app.session.add_tool_result(args, pending[0]["id"])
    if len(pending) > 1:
        return Text(f"result kept; {len(pending) - 1} more call(s) wait: next is {pending[1]['name']}", "dim")
    return Generate()


def describe_call(call: dict) -> str:
    """A call in one line: its JSON escapes line breaks and control characters, so nothing the
    model wrote can act on the terminal or pass for glmrepl's own lines."""
    import json

    try:
        arguments = json.dumps(json.loads(call["arguments"]), ensure_ascii=False)
    except (TypeError, ValueError):
        arguments = json.dumps(call.get("arguments"), ensure_ascii=False)
    # What JSON leaves as is but a terminal acts on (C1 controls, bidi overrides, line separators).
    arguments = "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in arguments)
    return f"{call['name']}({arguments})"
