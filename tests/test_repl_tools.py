"""Tools in the REPL: /tools, the call shown, /observe; locally and against `glmrepl serve` (--connect)."""

from __future__ import annotations

import json

import pytest
from scripted import TOOLS_TEMPLATE, build_scripted_qwen2
from support import drive_repl, loaded_app

from glmrepl.engine.settings import Settings
from glmrepl.repl.app import App

ENTER = "\r"
# The scripted reply: a call whose argument holds an escape sequence and a bidi override, which
# must reach the terminal as visible text.
ARGUMENTS = {"city": "Paris\x1b[2J\u202e"}
CALL_PIECES = ["<tool_call>", "\n" + json.dumps({"name": "get_weather", "arguments": ARGUMENTS}) + "\n", "</tool_call>"]
SHOWN = '[tool call] get_weather({"city": "Paris\\u001b[2J\\u202e"})'
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


@pytest.fixture(scope="module")
def caller(tmp_path_factory):
    return build_scripted_qwen2(tmp_path_factory.mktemp("checkpoints") / "tiny-caller", CALL_PIECES, TOOLS_TEMPLATE)


@pytest.fixture
def tools_file(tmp_path):
    path = tmp_path / "tools.json"
    path.write_text(json.dumps(TOOLS), encoding="utf-8")
    return path


def test_a_call_is_shown_and_observe_sends_the_result(caller, tools_file):
    app = loaded_app(caller, max_new_tokens=16)
    out = drive_repl(app, f"/tools {tools_file}" + ENTER + "/tools" + ENTER + "weather?" + ENTER)
    assert "1 tool(s) for this conversation: get_weather" in out and "Tools the model may call" in out
    assert SHOWN in out and "\x1b[2J" not in out and "\u202e" not in out
    assert "<tool_call>" not in out  # the call's syntax is never shown as reply text
    call = app.session.messages[-1].tool_calls[0]
    assert call["name"] == "get_weather" and json.loads(call["arguments"]) == ARGUMENTS

    out = drive_repl(app, "/observe 21 degrees" + ENTER + "/history" + ENTER)
    roles = [(m.role, m.tool_call_id) for m in app.session.messages]
    assert roles[:3] == [("user", None), ("assistant", None), ("tool", call["id"])]
    assert len(roles) == 4 and roles[3][0] == "assistant"  # the model answered the result (here: another call)
    assert "tool: 21 degrees" in out

    out = drive_repl(app, "/tools off" + ENTER + "/observe again" + ENTER)
    assert app.session.tools is None and "tools off" in out


@pytest.mark.parametrize(
    "content, message",
    [
        ("{oops", "not JSON"),
        ('[{"name": "bad name"}]', "'tools.json[0].name' must be 1 to 64"),
        ("[]", "the list of functions is empty"),
    ],
)
def test_bad_tool_files_get_one_line_errors(qwen_checkpoint, tmp_path, content, message):
    path = tmp_path / "tools.json"
    path.write_text(content, encoding="utf-8")
    app = loaded_app(qwen_checkpoint)
    out = drive_repl(app, f"/tools {path}" + ENTER + "/observe x" + ENTER)
    assert message in out and "Traceback" not in out
    assert "no tool call is waiting for a result" in out and app.session.tools is None


def test_a_template_without_tools_says_so_when_given_them(qwen_checkpoint, tools_file):
    app = loaded_app(qwen_checkpoint, max_new_tokens=4)
    out = drive_repl(app, f"/tools {tools_file}" + ENTER + "hi" + ENTER)
    assert "has no place for tools: the tools were not kept" in out and app.session.tools is None
    assert app.session.turns == 1  # the next message is answered


def test_a_history_with_calls_on_a_model_without_tools_says_how_to_go_on(qwen_checkpoint):
    """As after /model from a model that called a tool: /tools off cannot help, /clear does."""
    app = loaded_app(qwen_checkpoint, max_new_tokens=4)
    app.session.add_user("weather?")
    app.session.add_assistant("", tool_calls=[{"id": "call_1", "name": "weather", "arguments": "{}"}])
    app.session.add_tool_result("sunny", "call_1")
    out = drive_repl(app, "/tools off" + ENTER + "and now?" + ENTER)
    assert "has no place for tools or tool messages: /clear starts over (the conversation holds tool calls)" in out
    out = drive_repl(app, "/clear" + ENTER + "and now?" + ENTER)
    assert app.session.turns == 1 and "error" not in out


def test_tools_go_to_the_server_with_connect(caller, tools_file, tmp_path):
    from serving import started_server

    from glmrepl.engine.remote.backend import RemoteBackend

    server = started_server([str(caller), "--device", "cpu"], tmp_path / "serve.log")
    try:
        app = App(RemoteBackend(server.base_url), Settings({"max_new_tokens": 16, "temperature": 0}))
        app.start_load(None).wait(30)
        out = drive_repl(app, f"/tools {tools_file}" + ENTER + "weather?" + ENTER + "/observe 21 degrees" + ENTER)
    finally:
        server.stop()
    assert out.count(SHOWN) == 2  # the call, then the model's answer to the result (the same call again)
    roles = [m.role for m in app.session.messages]
    assert roles == ["user", "assistant", "tool", "assistant"]
    assert app.session.messages[2].tool_call_id == app.session.messages[1].tool_calls[0]["id"]
