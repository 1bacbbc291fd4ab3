"""The chat page of `glmrepl serve`, in a real browser (Debian's chromium driven by Playwright).

The server is a real `glmrepl serve` process on a free loopback port; the
browser starts with the flags that keep it off the network.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest
from scripted import TOOLS_TEMPLATE, build_scripted_qwen2
from serving import ServerProcess, request, started_server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
BROWSER_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
]
MARKUP = ["<img src=x onerror=\"document.title='pwned'\">", " and ", "<script>document.title='pwned'</script>"]
API_KEY = "page-test-key"

if not Path(CHROMIUM).exists():
    if os.environ.get("GLMREPL_REQUIRE_BROWSER"):
        raise RuntimeError(f"the page tests need chromium at {CHROMIUM}")
    pytest.skip("chromium is not installed (the page tests need a browser)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            tempfile.mkdtemp(prefix="glmrepl-browser-"),
            executable_path=CHROMIUM,
            headless=True,
            args=BROWSER_FLAGS,
            viewport={"width": 1100, "height": 720},
        )
        yield context
        context.close()


def _serve(checkpoint: Path, log: Path, *extra: str) -> ServerProcess:
    return started_server([str(checkpoint), "--device", "cpu", *extra], log)


@pytest.fixture(scope="module")
def chat_server(qwen_checkpoint, tmp_path_factory):
    server = _serve(qwen_checkpoint, tmp_path_factory.mktemp("logs") / "serve.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def markup_server(tmp_path_factory):
    checkpoint = build_scripted_qwen2(tmp_path_factory.mktemp("checkpoints") / "tiny-markup", MARKUP)
    server = _serve(checkpoint, tmp_path_factory.mktemp("logs") / "serve.log", "--api-key", API_KEY)
    yield server
    server.stop()


# A call whose arguments hold markup, after a line of text (Qwen2.5's tool syntax).
CALL_PIECES = [
    "Checking.",
    "<tool_call>",
    '\n{"name": "get_weather", "arguments": ',
    '{"city": "<b>Paris</b>"}}\n',
    "</tool_call>",
]
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


@pytest.fixture(scope="module")
def tool_server(tmp_path_factory):
    checkpoint = build_scripted_qwen2(
        tmp_path_factory.mktemp("checkpoints") / "tiny-caller", CALL_PIECES, TOOLS_TEMPLATE
    )
    server = _serve(checkpoint, tmp_path_factory.mktemp("logs") / "serve.log")
    yield server
    server.stop()


@pytest.fixture
def page(browser):
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("dialog", lambda dialog: (errors.append(f"dialog: {dialog.message}"), dialog.dismiss()))
    page.errors = errors
    yield page
    page.close()


def _open(page, server: ServerProcess) -> None:
    page.goto(server.base_url + "/")
    page.evaluate("localStorage.clear(); sessionStorage.clear()")
    page.reload()
    sync_api.expect(page.locator("#status")).not_to_have_text("connecting…")


def _send(page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


def _assistant(page):
    return page.locator(".msg.assistant")


def _wait_reply_done(page, count: int) -> None:
    sync_api.expect(_assistant(page)).to_have_count(count)
    sync_api.expect(_assistant(page).nth(count - 1).locator(".meta")).to_contain_text("token", timeout=60_000)


def test_a_message_streams_a_reply_and_shows_its_speed_model_and_device(chat_server, page):
    _open(page, chat_server)
    sync_api.expect(page.locator("#status")).to_have_text("ready")
    sync_api.expect(page.locator("#model")).to_contain_text("tiny-qwen2-chat")
    sync_api.expect(page.locator("#device")).to_contain_text("cpu")
    page.fill("#maxtokens", "12")
    page.fill("#temperature", "0")
    _send(page, "Hello, who are you?")
    _wait_reply_done(page, 1)
    reply = _assistant(page).first.locator(".body").inner_text()
    assert reply.strip(), "the reply stayed empty"
    assert "tok/s" in _assistant(page).first.locator(".meta").inner_text()
    sync_api.expect(page.locator("#context")).to_contain_text("/512 tokens")

    # The same request through the API gives the same greedy text: the page shows what the model said.
    status, _, body = request(
        chat_server.port,
        "POST",
        "/v1/chat/completions",
        {
            "model": "tiny-qwen2-chat",
            "messages": [{"role": "user", "content": "Hello, who are you?"}],
            "max_tokens": 12,
            "temperature": 0,
        },
    )
    assert status == 200, body
    assert json.loads(body)["choices"][0]["message"]["content"].strip() == reply.strip()

    # A second turn sends the whole conversation; Shift-Enter adds a line instead of sending.
    page.fill("#input", "first line")
    page.press("#input", "Shift+Enter")
    page.type("#input", "second line")
    assert page.locator(".msg.user").count() == 1
    page.press("#input", "Enter")
    _wait_reply_done(page, 2)
    assert page.locator(".msg.user").nth(1).inner_text() == "first line\nsecond line"
    assert page.errors == []


def test_reload_keeps_the_conversation_and_new_chat_clears_it(chat_server, page):
    _open(page, chat_server)
    page.fill("#maxtokens", "6")
    page.fill("#system", "You are terse.")
    _send(page, "remember me")
    _wait_reply_done(page, 1)
    reply = _assistant(page).first.locator(".body").inner_text()
    page.reload()
    sync_api.expect(page.locator(".msg.user")).to_have_text(["remember me"])
    assert _assistant(page).first.locator(".body").inner_text() == reply
    assert page.input_value("#system") == "You are terse."
    assert page.input_value("#maxtokens") == "6"
    page.click("#newchat")
    sync_api.expect(page.locator(".msg")).to_have_count(0)
    page.reload()
    sync_api.expect(page.locator(".msg")).to_have_count(0)


def test_stop_aborts_a_long_reply_and_the_server_stops_generating(chat_server, page):
    _open(page, chat_server)
    page.fill("#maxtokens", "400")
    page.fill("#temperature", "0")
    for attempt in range(10):  # the tiny model decodes 400 tokens in under a second
        before = chat_server.health()["replies"]["tokens_generated"]
        _send(page, f"tell me a long story ({attempt})")
        bubble = _assistant(page).last
        sync_api.expect(bubble.locator(".body")).not_to_have_text("", timeout=60_000)
        # Checked and clicked in one step of the page's own thread: no race with the reply's end.
        stopped = page.evaluate("""() => {
            if (document.getElementById('send').textContent !== 'Stop') return false;
            document.getElementById('send').click();
            return true;
        }""")
        sync_api.expect(bubble.locator(".meta")).to_contain_text("token")
        if stopped:
            break
        page.click("#newchat")
    assert stopped, "every reply ended before it could be stopped"
    assert "stopped" in bubble.locator(".meta").inner_text()
    sync_api.expect(page.locator("#send")).to_have_text("Send")
    # The server notices the closed stream and ends the generation well before 400 tokens.
    deadline_checks = 50
    while chat_server.health()["replies"]["running"] and deadline_checks:
        page.wait_for_timeout(100)
        deadline_checks -= 1
    assert chat_server.health()["replies"]["running"] == 0
    generated = chat_server.health()["replies"]["tokens_generated"] - before
    assert generated < 400, generated
    # The stopped reply stays and the chat goes on (a short reply: the stopped one may hold
    # most of the tiny model's 512-token context by the time Stop was pressed).
    page.fill("#maxtokens", "16")
    _send(page, "and then?")
    _wait_reply_done(page, 2)


def test_a_wrong_key_is_asked_again_and_markup_in_a_reply_is_shown_not_run(markup_server, page):
    _open(page, markup_server)
    sync_api.expect(page.locator("#keyform")).to_be_visible()
    sync_api.expect(page.locator("#status")).to_contain_text("API key")
    page.fill("#keyinput", "not-the-key")
    page.press("#keyinput", "Enter")
    # The page checks the key it was given at once (a refused /v1/models), then the message is refused too.
    sync_api.expect(page.locator("#status")).to_contain_text("wrong or missing API key")
    _send(page, "show me some html")
    # The status already says so from the check above: wait for the refused message itself to come back.
    sync_api.expect(page.locator("#input")).to_have_value("show me some html")  # the message is not lost
    sync_api.expect(page.locator("#status")).to_contain_text("wrong or missing API key")
    sync_api.expect(page.locator(".msg")).to_have_count(0)

    page.fill("#keyinput", API_KEY)
    page.press("#keyinput", "Enter")
    sync_api.expect(page.locator("#status")).to_have_text("ready")
    page.press("#input", "Enter")
    _wait_reply_done(page, 1)
    body = _assistant(page).first.locator(".body")
    assert body.inner_text() == "".join(MARKUP)
    assert body.locator("img, script").count() == 0
    assert page.title() == "glmrepl", "the reply's markup ran"
    # Also after a reload, from the stored conversation; and in a fenced code block.
    page.reload()
    assert _assistant(page).first.locator(".body").inner_text() == "".join(MARKUP)
    page.evaluate("""() => {
        const saved = JSON.parse(localStorage.getItem('glmrepl.chat'));
        saved.messages.push({role: 'assistant', content: 'code:\\n```html\\n<b onmouseover=x>bold</b>\\n```\\nend'});
        localStorage.setItem('glmrepl.chat', JSON.stringify(saved));
    }""")
    page.reload()
    code = _assistant(page).last.locator("pre code")
    sync_api.expect(code).to_have_text("<b onmouseover=x>bold</b>")
    assert _assistant(page).last.locator("b").count() == 0
    assert page.title() == "glmrepl"
    # The key lives in the tab only: a new tab asks again.
    other = page.context.new_page()
    other.goto(markup_server.base_url + "/")
    sync_api.expect(other.locator("#keyform")).to_be_visible()
    other.close()
    assert page.errors == []


def test_an_unreachable_server_is_said_plainly(page, tmp_path, qwen_checkpoint):
    server = _serve(qwen_checkpoint, tmp_path / "serve.log")
    try:
        _open(page, server)
        sync_api.expect(page.locator("#status")).to_have_text("ready")
    finally:
        server.stop()
    _send(page, "anyone there?")
    sync_api.expect(page.locator(".msg.error")).to_contain_text("server unreachable")
    assert page.input_value("#input") == "anyone there?"
    assert page.locator(".msg.user").count() == 0


def test_a_tool_call_is_shown_as_text_with_its_markup_literal(tool_server, page):
    _open(page, tool_server)
    page.fill("#tools", "[not json")
    _send(page, "weather?")
    sync_api.expect(page.locator(".msg.error")).to_contain_text("tools: not valid JSON")
    assert page.input_value("#input") == "weather?" and page.locator(".msg.user").count() == 0

    page.fill("#tools", json.dumps([WEATHER]))
    page.fill("#temperature", "0")
    page.press("#input", "Enter")
    _wait_reply_done(page, 1)
    shown = '[tool call] get_weather({"city": "<b>Paris</b>"})'
    reply = _assistant(page).first
    sync_api.expect(reply.locator(".toolcall")).to_have_text([shown])
    assert reply.locator(".body").inner_text() == "Checking.\n" + shown
    assert reply.locator("b").count() == 0, "the call's arguments were read as HTML"
    assert "tool call" in reply.locator(".meta").inner_text()
    # From the stored conversation as well; the next message sends the call back as tool_calls,
    # which the server accepts (a 400 would show as an error bubble).
    page.reload()
    bodies: list[str] = []
    page.on("request", lambda sent: bodies.append(sent.post_data) if sent.url.endswith("/completions") else None)
    sync_api.expect(_assistant(page).first.locator(".toolcall")).to_have_text([shown])
    assert page.input_value("#tools") == json.dumps([WEATHER])
    sync_api.expect(page.locator("#status")).to_have_text("ready")  # it knows the model's name again
    _send(page, "and tomorrow?")
    _wait_reply_done(page, 2)
    sync_api.expect(_assistant(page).nth(1).locator(".toolcall")).to_have_text([shown])
    [_, sent_back, _] = json.loads(bodies[-1])["messages"]
    assert sent_back["content"] == "Checking."
    [call] = sent_back["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "<b>Paris</b>"}'}
    assert page.locator(".msg.error").count() == 0 and page.locator("b").count() == 0 and page.errors == []


def test_a_conversation_past_the_context_leaves_out_its_oldest_turns_and_says_so(chat_server, page):
    _open(page, chat_server)
    page.fill("#maxtokens", "150")
    page.fill("#temperature", "0")
    long = "tell me about the lighthouse keeper and the sea " * 15
    for turn in (1, 2):
        _send(page, f"{turn}: {long}")
        _wait_reply_done(page, turn)
    meta = _assistant(page).nth(1).locator(".meta").inner_text()
    assert "oldest turn left out to fit the context" in meta, meta
    assert page.locator(".msg.error").count() == 0
    used = int(re.search(r"context (\d+)/512 tokens", page.locator("#context").inner_text())[1])
    assert used <= 512
    assert page.errors == []


def test_a_narrow_screen_folds_the_settings_into_a_menu_and_keeps_new_chat(chat_server, page):
    page.set_viewport_size({"width": 420, "height": 800})
    try:
        _open(page, chat_server)
        sync_api.expect(page.locator("#newchat")).to_be_visible()
        sync_api.expect(page.locator("#system")).to_be_hidden()
        page.click("#menu")
        sync_api.expect(page.locator("#system")).to_be_visible()
        assert page.get_attribute("#menu", "aria-expanded") == "true"
        page.fill("#maxtokens", "4")
        page.click("#menu")
        sync_api.expect(page.locator("#system")).to_be_hidden()
        _send(page, "hello")
        _wait_reply_done(page, 1)
        tokens = int(re.match(r"(\d+) tokens?", _assistant(page).first.locator(".meta").inner_text())[1])
        assert 1 <= tokens <= 4  # the max tokens set in the menu applied
        page.click("#newchat")
        sync_api.expect(_assistant(page)).to_have_count(0)
        page.set_viewport_size({"width": 1200, "height": 800})
        sync_api.expect(page.locator("#system")).to_be_visible()  # wide: the sidebar, no menu needed
        sync_api.expect(page.locator("#menu")).to_be_hidden()
        assert page.errors == []
    finally:
        page.set_viewport_size({"width": 1200, "height": 800})


def test_a_call_is_answered_on_the_page_and_the_model_goes_on(tool_server, page):
    _open(page, tool_server)
    page.fill("#tools", json.dumps([WEATHER]))
    page.fill("#temperature", "0")
    _send(page, "weather?")
    _wait_reply_done(page, 1)
    assert "Result of get_weather(" in page.get_attribute("#input", "placeholder")
    bodies: list[str] = []
    page.on("request", lambda sent: bodies.append(sent.post_data) if sent.url.endswith("/completions") else None)
    _send(page, "sunny, 21 degrees")
    _wait_reply_done(page, 2)
    result = page.locator(".msg.tool")
    sync_api.expect(result).to_have_count(1)
    assert result.locator(".body").inner_text() == "sunny, 21 degrees"
    assert "result of get_weather" in result.locator(".meta").inner_text()
    sent = json.loads(bodies[-1])["messages"]
    [call] = sent[1]["tool_calls"]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool"]  # no user message added
    assert sent[2] == {"role": "tool", "content": "sunny, 21 degrees", "tool_call_id": call["id"]}
    page.reload()  # the stored conversation keeps the result where it was
    sync_api.expect(page.locator(".msg.tool")).to_have_count(1)
    assert page.locator(".msg.error").count() == 0 and page.errors == []
