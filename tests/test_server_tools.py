"""Tool calls through `glmrepl serve`, with the openai package as the client.

A scripted Qwen2 checkpoint (tests/scripted.py) with a Qwen2.5-style tool template answers every
prompt with one call of get_weather in that template's syntax, so the server's parsing, response
shapes and stream are checked against a known reply.
"""

from __future__ import annotations

import json

import pytest
from scripted import TOOLS_TEMPLATE, build_scripted_qwen2
from serving import error_of, openai_client, request, started_server, wait_idle

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

# Split where a forced call's start ends (tool_calls.forced_prefix), so that start is whole tokens.
CALL_PIECES = [
    "Checking.",
    "<tool_call>",
    '\n{"name": "get_weather", "arguments": ',
    '{"city": "Paris"}}\n',
    "</tool_call>",
]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def tool_checkpoint(tmp_path_factory):
    return build_scripted_qwen2(tmp_path_factory.mktemp("checkpoints") / "tiny-caller", CALL_PIECES, TOOLS_TEMPLATE)


@pytest.fixture(scope="module")
def tool_server(tool_checkpoint, tmp_path_factory):
    server = started_server([str(tool_checkpoint), "--device", "cpu"], tmp_path_factory.mktemp("logs") / "serve.log")
    yield server
    server.stop()


def test_a_call_comes_back_as_tool_calls(tool_server):
    answer = openai_client(tool_server).chat.completions.create(
        model="tiny-caller", messages=QUESTION, tools=[WEATHER], max_tokens=16, temperature=0
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Checking."  # the text before the call, as the format gives it
    [call] = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}


def test_a_streamed_call_never_shows_its_syntax_as_text(tool_server):
    stream = openai_client(tool_server).chat.completions.create(
        model="tiny-caller", messages=QUESTION, tools=[WEATHER], max_tokens=16, temperature=0, stream=True
    )
    chunks = list(stream)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == "Checking."
    deltas = [d for chunk in chunks if chunk.choices for d in chunk.choices[0].delta.tool_calls or []]
    # OpenAI's incremental shape: index, id, type and name first (empty arguments), then the arguments.
    first, rest = deltas[0], deltas[1:]
    assert (first.index, first.type, first.function.name, first.function.arguments) == (
        0,
        "function",
        "get_weather",
        "",
    )
    assert first.id.startswith("call_")
    assert rest and all(d.index == 0 and d.id is None and d.type is None and d.function.name is None for d in rest)
    assert json.loads("".join(d.function.arguments for d in rest)) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_the_openai_stream_helper_assembles_the_call(tool_server):
    """The client's own accumulator (chat.completions.stream) reads the deltas back into the call."""
    with openai_client(tool_server).chat.completions.stream(
        model="tiny-caller", messages=QUESTION, tools=[WEATHER], max_tokens=16, temperature=0
    ) as stream:
        done = [event for event in stream if event.type == "tool_calls.function.arguments.done"]
        final = stream.get_final_completion()
    [call] = final.choices[0].message.tool_calls
    assert final.choices[0].finish_reason == "tool_calls" and final.choices[0].message.content == "Checking."
    assert call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert [(e.name, e.index, json.loads(e.arguments)) for e in done] == [("get_weather", 0, {"city": "Paris"})]


def test_without_tools_the_same_reply_is_text(tool_server):
    answer = openai_client(tool_server).chat.completions.create(
        model="tiny-caller", messages=QUESTION, max_tokens=16, temperature=0
    )
    assert answer.choices[0].finish_reason == "stop" and not answer.choices[0].message.tool_calls
    assert "<tool_call>" in answer.choices[0].message.content
    none = openai_client(tool_server).chat.completions.create(
        model="tiny-caller", messages=QUESTION, tools=[WEATHER], tool_choice="none", max_tokens=16, temperature=0
    )
    assert none.choices[0].finish_reason == "stop" and not none.choices[0].message.tool_calls


@pytest.mark.parametrize(
    "choice", ["required", {"type": "function", "function": {"name": "get_weather"}}], ids=["required", "named"]
)
def test_a_forced_call_begins_in_the_prompt(tool_server, choice):
    client = openai_client(tool_server)
    free = client.chat.completions.create(model="tiny-caller", messages=QUESTION, tools=[WEATHER], temperature=0)
    forced = client.chat.completions.create(
        model="tiny-caller", messages=QUESTION, tools=[WEATHER], tool_choice=choice, temperature=0
    )
    [call] = forced.choices[0].message.tool_calls
    assert forced.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert forced.choices[0].message.content is None  # the text before the call is skipped by the forcing
    # The forced start (with one tool, "required" names it too) is prompt, not reply: two tokens.
    assert forced.usage.prompt_tokens == free.usage.prompt_tokens + 2
    assert forced.usage.completion_tokens == free.usage.completion_tokens - 3  # nor "Checking."


def test_a_call_of_an_unlisted_function_is_text(tool_server):
    other = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
    answer = openai_client(tool_server).chat.completions.create(
        model="tiny-caller", messages=QUESTION, tools=[other], max_tokens=16, temperature=0
    )
    assert answer.choices[0].finish_reason == "stop" and not answer.choices[0].message.tool_calls
    assert '"get_weather"' in answer.choices[0].message.content


def test_the_tool_result_goes_into_the_next_prompt(tool_checkpoint):
    from serving import InProcessServer

    from glmrepl.engine.backend import LocalBackend
    from glmrepl.engine.models.loading import LoadOptions
    from glmrepl.server.app import create_app
    from glmrepl.server.state import ServerState

    backend = LocalBackend()
    backend.load_and_wait(LoadOptions(mode="cpu").for_model(tool_checkpoint, "tiny-caller"))
    prompts: list[str] = []
    plan = backend.generate

    def recording_plan(request):  # the prompt text each request is given
        reply = plan(request)
        loaded = backend.manager.current
        prompts.append(loaded.tokenizer.decode(loaded.prompt_format.build(request.conversation.as_dicts())))
        return reply

    backend.generate = recording_plan
    with InProcessServer(create_app(ServerState(backend))) as server:
        client = openai_client(server)
        first = client.chat.completions.create(model="tiny-caller", messages=QUESTION, tools=[WEATHER], max_tokens=16)
        call = first.choices[0].message.tool_calls[0]
        follow_up = [
            *QUESTION,
            first.choices[0].message,  # as clients send it back: the whole message object
            {"role": "tool", "tool_call_id": call.id, "content": "21 degrees and sunny"},
        ]
        client.chat.completions.create(model="tiny-caller", messages=follow_up, tools=[WEATHER], max_tokens=16)
    prompt = prompts[-1]
    order = [
        prompt.index('"name": "get_weather"'),  # the tools block
        prompt.index("What is the weather in Paris?"),
        prompt.index('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'),
        prompt.index("<tool_response>\n21 degrees and sunny\n</tool_response>"),
    ]
    assert order == sorted(order)
    assert prompt.endswith("<|im_start|>assistant\n")


TWO_CALL_PIECES = [
    "<tool_call>",
    '\n{"name": "get_weather", "arguments": ',
    '{"city": "Paris"}}\n',
    "</tool_call>",
    # One token (a scripted reply never repeats one), so the second call is a single piece.
    '\n<tool_call>\n{"name": "get_time", "arguments": {"city": "Rome"}}\n</tool_call>',
]
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}


@pytest.fixture(scope="module")
def two_call_server(tmp_path_factory):
    from serving import InProcessServer

    from glmrepl.engine.backend import LocalBackend
    from glmrepl.engine.models.loading import LoadOptions
    from glmrepl.server.app import create_app
    from glmrepl.server.state import ServerState

    folder = build_scripted_qwen2(tmp_path_factory.mktemp("checkpoints") / "tiny-two", TWO_CALL_PIECES, TOOLS_TEMPLATE)
    backend = LocalBackend()
    backend.load_and_wait(LoadOptions(mode="cpu").for_model(folder, "tiny-two"))
    with InProcessServer(create_app(ServerState(backend))) as server:
        yield server


def _two_call_request(server, stream: bool, **extra):
    """(finish_reason, [(name, arguments)], ids) of a reply that writes two calls."""
    answer = openai_client(server).chat.completions.create(
        model="tiny-two", messages=QUESTION, tools=[WEATHER, TIME], max_tokens=16, temperature=0, stream=stream, **extra
    )
    if not stream:
        calls, finish = answer.choices[0].message.tool_calls, answer.choices[0].finish_reason
        return finish, [(c.function.name, json.loads(c.function.arguments)) for c in calls], {c.id for c in calls}
    chunks = [chunk for chunk in answer if chunk.choices]
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == ""
    deltas = [d for chunk in chunks for d in chunk.choices[0].delta.tool_calls or []]
    named = [d for d in deltas if d.function.name]  # each call's first delta
    assert [d.index for d in named] == list(range(len(named)))
    arguments = ["".join(d.function.arguments for d in deltas if d.index == n.index) for n in named]
    calls = [(n.function.name, json.loads(a)) for n, a in zip(named, arguments)]
    return chunks[-1].choices[0].finish_reason, calls, {n.id for n in named}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_parallel_tool_calls_false_returns_the_first_call_only(two_call_server, stream):
    both = [("get_weather", {"city": "Paris"}), ("get_time", {"city": "Rome"})]
    for parallel in ({}, {"parallel_tool_calls": True}):
        finish, calls, ids = _two_call_request(two_call_server, stream, **parallel)
        assert (finish, calls, len(ids)) == ("tool_calls", both, 2)
    finish, calls, _ = _two_call_request(two_call_server, stream, parallel_tool_calls=False)
    assert (finish, calls) == ("tool_calls", both[:1])


@pytest.mark.parametrize("value", ["false", 0, None, [False]], ids=["string", "zero", "null-ok", "list"])
def test_parallel_tool_calls_must_be_a_boolean(two_call_server, value):
    body = {
        "model": "tiny-two",
        "messages": QUESTION,
        "tools": [WEATHER],
        "max_tokens": 4,
        "parallel_tool_calls": value,
    }
    status, _, raw = request(two_call_server.port, "POST", "/v1/chat/completions", body)
    if value is None:  # null is the field left out
        assert status == 200, raw
        return
    assert status == 400, raw
    error = error_of(raw)
    assert error["param"] == "parallel_tool_calls" and "parallel_tool_calls" in error["message"]


def CALLED(name: str) -> dict:  # noqa: N802 - reads as the constants around it
    """An assistant message of the history that called ``name`` (id "c")."""
    call = {"id": "c", "type": "function", "function": {"name": name, "arguments": "{}"}}
    return {"role": "assistant", "tool_calls": [call]}


BAD_TOOL_REQUESTS = [
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"tools": "get_weather"}, "tools"),
    (
        {
            "messages": [
                *QUESTION,
                {
                    "role": "assistant",
                    "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1]"}}],
                },
            ]
        },
        "messages[1].tool_calls[0].function.arguments",
    ),
    *[
        (
            {
                "messages": [
                    *QUESTION,
                    {
                        "role": "assistant",
                        "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": bad}}],
                    },
                ]
            },
            "messages[1].tool_calls[0].function.arguments",
        )
        for bad in ('{"x": ' + "[" * 100_000 + "]" * 100_000 + "}", '{"x": NaN}', '{"x": 1e999}')
    ],
    ({"messages": [*QUESTION, {"role": "tool", "content": "x"}]}, "messages[1].tool_call_id"),
    ({"messages": [*QUESTION, {"role": "tool", "tool_call_id": "c", "content": "x"}]}, "messages[1].role"),
    (
        {
            "tools": [WEATHER],
            "messages": [*QUESTION, CALLED("get_weather"), {"role": "tool", "tool_call_id": "other", "content": "x"}],
        },
        "messages[2].tool_call_id",
    ),
    ({"tools": [WEATHER], "messages": [*QUESTION, CALLED("get_time")]}, "messages[1].tool_calls[0].function.name"),
    ({"tools": [], "tool_choice": "required"}, "tool_choice"),
    ({"messages": [{"role": "user", "content": "x", "tool_call_id": "c"}]}, "messages[0].tool_call_id"),
]


@pytest.mark.parametrize("extra, param", BAD_TOOL_REQUESTS)
def test_bad_tool_fields_get_a_400_naming_them(tool_server, extra, param):
    body = {"model": "tiny-caller", "messages": QUESTION, "max_tokens": 4, **extra}
    status, _, raw = request(tool_server.port, "POST", "/v1/chat/completions", body)
    assert status == 400, raw
    assert error_of(raw)["param"] == param
    wait_idle(tool_server)


def test_a_template_without_tools_refuses_them(qwen_checkpoint, tmp_path):
    server = started_server([str(qwen_checkpoint), "--device", "cpu"], tmp_path / "serve.log")
    try:
        body = {"model": "tiny-qwen2-chat", "messages": QUESTION, "max_tokens": 4, "tools": [WEATHER]}
        status, _, raw = request(server.port, "POST", "/v1/chat/completions", body)
        assert status == 400 and error_of(raw)["param"] == "tools"
        assert "has no place for tools" in error_of(raw)["message"]
        body = {
            "model": "tiny-qwen2-chat",
            "messages": [*QUESTION, {"role": "tool", "tool_call_id": "c", "content": "x"}],
        }
        status, _, raw = request(server.port, "POST", "/v1/chat/completions", body)
        assert status == 400 and error_of(raw)["param"] == "messages[1].role"
    finally:
        server.stop()


@pytest.mark.parametrize("family", ["chatglm3", "glm4"])
def test_chatglm_tool_requests_build_the_familys_prompt(family):
    """ChatGLM3 and GLM-4 through the server: the call and its result in the family's roles."""
    from chatglm_reference import DATA
    from serving import InProcessServer

    from glmrepl.engine.backend import LocalBackend
    from glmrepl.engine.models.loading import LoadOptions
    from glmrepl.server.app import create_app
    from glmrepl.server.state import ServerState

    # glm4-tiny's context is 512 tokens of a small vocabulary: a short schema leaves room.
    small_weather = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    backend = LocalBackend()
    backend.load_and_wait(LoadOptions(mode="cpu").for_model(DATA / f"{family}-tiny", family))
    prompts: list[str] = []
    plan = backend.generate

    sent: list[list[int]] = []

    def recording_plan(request):
        loaded = backend.manager.current
        prompts.append(
            loaded.tokenizer.decode(
                loaded.prompt_format.build(request.conversation.as_dicts()), skip_special_tokens=False
            )
        )
        reply = plan(request)
        sent.append(reply.prompt_ids)
        return reply

    backend.generate = recording_plan
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [
        *QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees"},
    ]
    with InProcessServer(create_app(ServerState(backend))) as server:
        answer = openai_client(server).chat.completions.create(
            model=family, messages=messages, tools=[small_weather], max_tokens=8, temperature=0
        )
        named = {"type": "function", "function": {"name": "get_weather"}}
        openai_client(server).chat.completions.create(
            model=family, messages=QUESTION, tools=[small_weather], tool_choice=named, max_tokens=8, temperature=0
        )
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")  # random weights: any reply
    # A named function is forced by writing its name as the reply's first line, after <|assistant|>.
    tokenizer = backend.manager.current.tokenizer
    name_line = tokenizer.encode("get_weather\n")
    assert sent[-1][-len(name_line) - 1 :] == [tokenizer.get_command("<|assistant|>"), *name_line]
    prompt = prompts[-2]
    call_text = '{"city": "Paris"}' if family == "glm4" else "tool_call(city='Paris')"
    order = [
        prompt.index("get_weather"),  # the tools block
        prompt.index("What is the weather in Paris?"),
        prompt.index(call_text),
        prompt.index("<|observation|>"),
        prompt.index("21 degrees"),
    ]
    assert order == sorted(order)
    assert prompt.rstrip().endswith("<|assistant|>")


def test_a_forced_call_cut_short_is_the_same_text_streamed_or_not(tool_server):
    client = openai_client(tool_server)
    asked = {"model": "tiny-caller", "messages": QUESTION, "tools": [WEATHER], "tool_choice": "required"}
    whole = client.chat.completions.create(**asked, temperature=0, max_tokens=2)
    stream = client.chat.completions.create(**asked, temperature=0, max_tokens=2, stream=True)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert whole.choices[0].finish_reason == "length" and not whole.choices[0].message.tool_calls
    assert whole.choices[0].message.content.startswith("<tool_call>")  # the forced start is part of the text
    assert streamed == whole.choices[0].message.content
