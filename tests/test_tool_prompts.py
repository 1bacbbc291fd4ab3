"""Tool prompts of ChatGLM3 and GLM-4 against their released prompt building, and reading calls back.

ChatGLM3's reference is its tokenizer's ``build_chat_input`` fed by the OpenAI demo's
``process_chatglm_messages`` (re-implemented below from that code's documented behaviour); GLM-4's
is its own chat template, the jinja text in glm4-tiny's tokenizer_config.json (copied from the
release), rendered by transformers as the released tokenizer's apply_chat_template did.
"""

from __future__ import annotations

import json
import re

import pytest
from chatglm_reference import DATA, expected, load_reference

from glmrepl.engine.conversation.chat import ChatSession
from glmrepl.engine.conversation.tool_calls import ToolStream, glm_call_text, normalize_tools, parse_reply
from glmrepl.engine.generation.service import conversation_from_messages

WEATHER = {
    "name": "get_weather",
    "description": "今天的天气 in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
QUESTION = "What's the weather in Paris?"
OBSERVATION = '{"temperature": 21, "sky": "clear"}'


@pytest.fixture(scope="module")
def chatglm3():
    return load_reference("chatglm3")


@pytest.fixture(scope="module")
def glm4():
    return load_reference("glm4")


def _conversation(with_call: bool, system: str | None = None) -> ChatSession:
    messages = [{"role": "user", "content": QUESTION}]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    if with_call:
        call = {"id": "call_1", "name": "get_weather", "arguments": json.dumps({"city": "Paris"})}
        messages += [
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": OBSERVATION, "tool_call_id": "call_1"},
        ]
    return conversation_from_messages(messages, normalize_tools([{"type": "function", "function": WEATHER}]))


# -- ChatGLM3 -------------------------------------------------------------------------


def _chatglm3_reference(tokenizer, history: list[dict], query: str, role: str) -> list[int]:
    """build_chat_input: a tools system message gets its tools as indented JSON after the content."""

    def single(role: str, metadata: str, text: str) -> list[int]:
        return [tokenizer.get_command(f"<|{role}|>")] + tokenizer.encode(f"{metadata}\n") + tokenizer.encode(text)

    ids = [tokenizer.get_command("[gMASK]"), tokenizer.get_command("sop")]
    for item in history:
        content = item["content"]
        if item["role"] == "system" and "tools" in item:
            content = content + "\n" + json.dumps(item["tools"], indent=4, ensure_ascii=False)
        ids += single(item["role"], item.get("metadata", ""), content)
    return ids + single(role, "", query) + [tokenizer.get_command("<|assistant|>")]


CHATGLM3_SYSTEM = {
    "role": "system",
    "content": "Answer the following questions as best as you can. You have access to the following tools:",
    "tools": [WEATHER],
}


def test_chatglm3_tokenizer_is_the_reference_one(chatglm3):
    case = expected("chatglm3")["cases"][0]
    assert chatglm3.prompt_format.build([{"role": "user", "content": case["query"]}]) == case["prompt_ids"]
    assert _chatglm3_reference(chatglm3.tokenizer, [], case["query"], "user") == case["prompt_ids"]


def test_chatglm3_tools_prompt_is_build_chat_input(chatglm3):
    ids = chatglm3.prompt_format.build(_conversation(False).as_dicts())
    assert ids == _chatglm3_reference(chatglm3.tokenizer, [CHATGLM3_SYSTEM], QUESTION, "user")


def test_chatglm3_observation_follows_the_call(chatglm3):
    history = [
        CHATGLM3_SYSTEM,
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "metadata": "get_weather", "content": "```python\ntool_call(city='Paris')\n```"},
    ]
    reference = _chatglm3_reference(chatglm3.tokenizer, history, OBSERVATION, "observation")
    assert chatglm3.prompt_format.build(_conversation(True).as_dicts()) == reference
    text = chatglm3.tokenizer.decode(reference, skip_special_tokens=False)
    assert text.index("get_weather") < text.index("<|observation|>") < text.index("temperature")


def test_chatglm3_call_is_read_back():
    call_text = glm_call_text({"name": "f", "arguments": '{"city": "Paris", "days": 2, "metric": true}'}, "chatglm3")
    assert call_text == "```python\ntool_call(city='Paris', days=2, metric=True)\n```"
    parsed = parse_reply("get_weather\n" + call_text, "chatglm3", {"get_weather"})
    assert parsed is not None and parsed.content is None
    assert [(c.name, json.loads(c.arguments)) for c in parsed.calls] == [
        ("get_weather", {"city": "Paris", "days": 2, "metric": True})
    ]
    assert parsed.calls[0].id.startswith("call_")


@pytest.mark.parametrize(
    "reply",
    [
        "\nIt is sunny.",  # an ordinary reply: empty metadata
        "get_weather\n```python\nos.system('rm -rf /')\n```",  # not a tool_call(): never evaluated
        "get_weather\n```python\ntool_call(city=open('x'))\n```",
        "get_weather\n```python\ntool_call(city='Paris'\n```",  # cut short
        "unknown_tool\n```python\ntool_call(city='Paris')\n```",
    ],
)
def test_chatglm3_non_calls_are_text(reply):
    assert parse_reply(reply, "chatglm3", {"get_weather"}) is None


# -- GLM-4 ------------------------------------------------------------------------------


def _glm4_reference(tokenizer, messages: list[dict]) -> list[int]:
    """The released template rendered as transformers renders it, then tokenized with the
    special tokens as tokens (the released tokenizer's apply_chat_template)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    template = json.loads((DATA / "glm4-tiny" / "tokenizer_config.json").read_text(encoding="utf-8"))["chat_template"]
    text = render_jinja_template([messages], chat_template=template, add_generation_prompt=True)[0][0]
    ids = []
    for piece in re.split(r"(\[gMASK\]|<sop>|<\|system\|>|<\|user\|>|<\|assistant\|>|<\|observation\|>)", text):
        if piece in tokenizer.special_tokens:
            ids.append(tokenizer.get_command(piece))
        elif piece:
            ids += tokenizer.encode(piece)
    return ids


def test_glm4_tools_prompt_is_the_chat_template(glm4):
    # What GLM-4's OpenAI demo (process_messages) hands its template for the same request.
    reference = [
        {"role": "system", "content": None, "tools": [{"type": "function", "function": WEATHER}]},
        {"role": "user", "content": QUESTION},
    ]
    assert glm4.prompt_format.build(_conversation(False).as_dicts()) == _glm4_reference(glm4.tokenizer, reference)


def test_glm4_observation_follows_the_call(glm4):
    reference = [
        {"role": "system", "content": None, "tools": [{"type": "function", "function": WEATHER}]},
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "metadata": "get_weather", "content": '{"city": "Paris"}'},
        {"role": "observation", "content": OBSERVATION},
    ]
    ids = glm4.prompt_format.build(_conversation(True).as_dicts())
    assert ids == _glm4_reference(glm4.tokenizer, reference)
    assert ids[-1] == glm4.tokenizer.get_command("<|assistant|>")


def test_glm4_template_header_is_the_checkpoints(glm4):
    text = glm4.tokenizer.decode(glm4.prompt_format.build(_conversation(False).as_dicts()), skip_special_tokens=True)
    assert "你是一个名为 ChatGLM 的人工智能助手" in text  # glm4-tiny's template revision says ChatGLM


def test_glm4_call_is_read_back():
    parsed = parse_reply('get_weather\n{"city": "Paris"}', "glm4", {"get_weather"})
    assert parsed is not None and json.loads(parsed.calls[0].arguments) == {"city": "Paris"}
    assert parse_reply('get_weather\n{"city": ', "glm4", {"get_weather"}) is None
    assert parse_reply("\nParis is sunny", "glm4", {"get_weather"}) is None


@pytest.mark.parametrize(
    "text, syntax",
    [
        ('get_weather\n{"city": "Paris", "days": NaN}', "glm4"),
        ('get_weather\n{"city": "Paris", "days": 1e999}', "glm4"),
        ("get_weather\n```python\ntool_call(city='Paris', days=1e999)\n```", "chatglm3"),
        ('<tool_call>\n{"name": "get_weather", "arguments": {"days": -Infinity}}\n</tool_call>', "hermes"),
    ],
)
def test_a_call_whose_arguments_are_not_strict_json_is_plain_text(text, syntax):
    """NaN and infinities, which JavaScript's, Go's and Rust's JSON parsers refuse."""
    assert parse_reply(text, syntax, {"get_weather"}) is None
    assert parse_reply(
        text.replace("NaN", "3").replace("-Infinity", "3").replace("1e999", "3"), syntax, {"get_weather"}
    )


# -- other syntaxes and streaming ------------------------------------------------------------


def test_hermes_calls_keep_the_text_before_them():
    text = 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    parsed = parse_reply(
        text + "\n<tool_call>\n" + '{"name": "get_weather", "arguments": {"city": "Rome"}}', "hermes", {"get_weather"}
    )
    assert parsed is not None and parsed.content == "Let me look."
    assert [json.loads(c.arguments)["city"] for c in parsed.calls] == ["Paris", "Rome"]
    assert parse_reply("<tool_call>\n{not json}\n</tool_call>", "hermes", {"get_weather"}) is None


def test_json_call_of_llama():
    parsed = parse_reply('{"name": "get_weather", "parameters": {"city": "Paris"}}', "json", {"get_weather"})
    assert parsed is not None and json.loads(parsed.calls[0].arguments) == {"city": "Paris"}
    assert parse_reply('{"name": "other", "parameters": {}}', "json", {"get_weather"}) is None


@pytest.mark.parametrize(
    "syntax, pieces, shown_while_streaming",
    [
        ("hermes", ["Sure", ". <tool", "_call>", '{"name"'], ["Sure", ". ", "", ""]),
        ("hermes", ["a <", "b"], ["a ", "<b"]),
        ("glm4", ["get_", "weather", "\n{"], ["", "", ""]),
        ("glm4", ["\n", "Hi"], ["\n", "Hi"]),
        ("json", [" ", "{", '"name"'], ["", "", ""]),
        ("json", ["Hello", " there"], ["Hello", " there"]),
    ],
)
def test_stream_holds_back_what_may_be_a_call(syntax, pieces, shown_while_streaming):
    stream = ToolStream(syntax)
    assert [stream.push(piece) for piece in pieces] == shown_while_streaming
    rest = stream.finish(made_calls=False)
    assert "".join(shown_while_streaming) + rest == "".join(pieces)


def test_tool_lists_are_validated():
    from glmrepl.engine.errors import InvalidTools

    assert normalize_tools([WEATHER]) == normalize_tools([{"type": "function", "function": WEATHER}])
    for bad, where in [
        ([{"type": "function"}], "tools[0].function"),
        ([{"type": "retrieval"}], "tools[0].type"),
        ([{"name": "bad name"}], "tools[0].name"),
        ([{"name": "name_then_a_line\n"}], "tools[0].name"),  # a name is one line of a prompt
        ([{"name": "f", "parameters": "x"}], "tools[0].parameters"),
        ([WEATHER, WEATHER], "tools"),
    ]:
        with pytest.raises(InvalidTools) as error:
            normalize_tools(bad)
        assert error.value.where == where


def test_a_conversation_with_tools_saves_restores_and_undoes():
    session = _conversation(True)
    session.add_assistant("It is 21 degrees.")
    restored = ChatSession()
    restored.restore(json.loads(json.dumps(session.to_dict())))
    assert restored.as_dicts() == session.as_dicts()
    assert restored.tools == [WEATHER]
    assert restored.undo() == 4 and restored.messages == []  # the reply, the result, the call, the question

    waiting = _conversation(True)
    waiting.messages.pop()  # the result again unanswered
    assert [c["id"] for c in waiting.pending_calls] == ["call_1"]
    waiting.add_tool_result("21", "call_1")
    assert waiting.pending_calls == []


def test_forced_calls_begin_in_each_syntax():
    from glmrepl.engine.conversation.tool_calls import forced_prefix
    from glmrepl.engine.errors import InvalidTools

    one, two = [WEATHER], [WEATHER, {"name": "get_time"}]
    assert forced_prefix("glm4", "", one) == forced_prefix("chatglm3", "get_weather", two) == "get_weather\n"
    assert forced_prefix("hermes", "", two) == "<tool_call>\n"
    assert forced_prefix("hermes", "get_time", two) == '<tool_call>\n{"name": "get_time", "arguments": '
    assert forced_prefix("json", "", two) == '{"name": "'
    with pytest.raises(InvalidTools) as error:
        forced_prefix("glm4", "", two)
    assert error.value.where == "tool_choice"
    # What the model writes after a forced start parses with the start in front of it.
    parsed = parse_reply("get_weather\n" + '{"city": "Paris"}', "glm4", {"get_weather"})
    assert parsed is not None and parsed.calls[0].name == "get_weather"
