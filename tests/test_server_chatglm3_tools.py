"""A ChatGLM3 tool call end to end through `glmrepl serve`, with the openai package as the client.

The model is chatglm3-tiny scripted as tests/scripted.py scripts the Qwen2 checkpoints: its
weights map ``<|assistant|>`` to the call's pieces in turn, then ``<|observation|>``. Its
sentencepiece vocabulary is mostly single bytes, so the call's text cannot be written as a chain
of distinct existing tokens (a chain where each token picks the next may not repeat one); the
call's four pieces are added to ``tokenizer.model`` as user-defined pieces instead, and the
native ChatGLM3 loader, tokenizer and prompt format read the folder as any other.

The reply is what ChatGLM3 writes for a call: the function's name as the first (metadata) line,
then a fenced ``tool_call(...)``, ended by the ``<|observation|>`` role.
"""

from __future__ import annotations

import json

import pytest
from scripted import build_scripted_chatglm3
from serving import openai_client

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

CALL_PIECES = ["get_weather", "\n```python\n", "tool_call(city='Paris')", "\n```"]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
QUESTION = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(server, backend, the prompt ids of each request in order), the ids as the engine planned them."""
    from serving import InProcessServer

    from glmrepl.engine.backend import LocalBackend
    from glmrepl.engine.models.loading import LoadOptions
    from glmrepl.server.app import create_app
    from glmrepl.server.state import ServerState

    folder = build_scripted_chatglm3(tmp_path_factory.mktemp("checkpoints") / "chatglm3-caller", CALL_PIECES)
    backend = LocalBackend()
    backend.load_and_wait(LoadOptions(mode="cpu").for_model(folder, "chatglm3-caller"))
    assert backend.manager.current.info.family == "chatglm3"
    sent: list[list[int]] = []
    plan = backend.generate

    def recording_plan(request):  # the server exposes no prompt: read it here
        reply = plan(request)
        sent.append(list(reply.prompt_ids))
        return reply

    backend.generate = recording_plan
    with InProcessServer(create_app(ServerState(backend))) as server:
        yield server, backend, sent


def test_a_chatglm3_call_comes_back_as_tool_calls(served):
    server, _, _ = served
    answer = openai_client(server).chat.completions.create(
        model="chatglm3-caller", messages=QUESTION, tools=[WEATHER], max_tokens=16, temperature=0
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None  # nothing but the call: no fence or name line leaks as text
    [call] = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}


def test_a_streamed_chatglm3_call_shows_no_text(served):
    server, _, _ = served
    stream = openai_client(server).chat.completions.create(
        model="chatglm3-caller", messages=QUESTION, tools=[WEATHER], max_tokens=16, temperature=0, stream=True
    )
    chunks = [chunk for chunk in stream if chunk.choices]
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == ""
    [first, arguments] = [d for chunk in chunks for d in chunk.choices[0].delta.tool_calls or []]
    assert (first.index, first.function.name, first.function.arguments) == (0, "get_weather", "")
    assert arguments.index == 0 and json.loads(arguments.function.arguments) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_without_tools_the_call_syntax_is_text(served):
    server, _, _ = served
    answer = openai_client(server).chat.completions.create(
        model="chatglm3-caller", messages=QUESTION, max_tokens=16, temperature=0
    )
    assert answer.choices[0].finish_reason == "stop" and not answer.choices[0].message.tool_calls
    assert answer.choices[0].message.content == "".join(CALL_PIECES)


def test_the_tool_result_is_an_observation_in_the_next_prompt(served):
    """The follow-up prompt, id for id, as ChatGLM3's build_chat_input lays it out: each message
    is its role token, ``metadata + "\\n"`` encoded, then its content encoded; the call is the
    assistant's message with the function's name as metadata, the result an observation."""
    from glmrepl.engine.conversation.tool_calls import normalize_tools

    server, backend, sent = served
    client = openai_client(server)
    first = client.chat.completions.create(model="chatglm3-caller", messages=QUESTION, tools=[WEATHER], max_tokens=16)
    call = first.choices[0].message.tool_calls[0]
    follow_up = [
        *QUESTION,
        first.choices[0].message,  # as clients send it back: the whole message object
        {"role": "tool", "tool_call_id": call.id, "content": "21 degrees"},
    ]
    client.chat.completions.create(model="chatglm3-caller", messages=follow_up, tools=[WEATHER], max_tokens=16)

    loaded = backend.manager.current
    tokenizer = loaded.tokenizer
    command, encode = tokenizer.get_command, tokenizer.encode

    def message(role: str, content: str, metadata: str = "") -> list[int]:
        return [command(f"<|{role}|>"), *encode(f"{metadata}\n"), *encode(content)]

    tools = loaded.prompt_format.tools_text(normalize_tools([WEATHER]))
    head = [command("[gMASK]"), command("sop"), *message("system", tools), *message("user", QUESTION[0]["content"])]
    assert sent[-2] == [*head, command("<|assistant|>")]
    assert sent[-1] == [
        *head,
        *message("assistant", "```python\ntool_call(city='Paris')\n```", metadata="get_weather"),
        *message("observation", "21 degrees"),
        command("<|assistant|>"),
    ]
