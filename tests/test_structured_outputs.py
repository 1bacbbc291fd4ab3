"""Replies held to JSON (``response_format``) and each token's log-probability (``logprobs``).

Through a real `glmrepl serve` with the openai package as the client, on the random tiny Qwen2:
a random model writes whatever its mask leaves it, so every reply that parses and validates
does so because of the mask. The ChatGLM fixtures go through the engine itself (every
generation's own tokenizer and prompt format). Log-probabilities are checked against the
model's own logits, computed here by transformers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jsonschema_rs
import pytest
from serving import error_of, openai_client, request, started_server

from glmrepl.engine import ChatSession, GenerateRequest, LoadOptions, LocalBackend, OutputFormat, SamplingParams

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

DATA = Path(__file__).parent / "data" / "chatglm"
# Every kind of value, each bounded so that a random model's reply ends within the tokens given.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "kind": {"enum": ["cat", "dog", 3, None]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2},
        "inner": {
            "type": "object",
            "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": -5, "maximum": 5}},
            "required": ["ok", "n"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "score", "kind", "tags", "inner"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "record", "schema": SCHEMA, "strict": True}}
ASK = [{"role": "user", "content": "Describe a pet as JSON."}]


@pytest.fixture(scope="module")
def server(qwen_checkpoint, tmp_path_factory):
    server = started_server([str(qwen_checkpoint), "--device", "cpu"], tmp_path_factory.mktemp("logs") / "serve.log")
    yield server
    server.stop()


def _valid(text: str, schema: dict) -> bool:
    return jsonschema_rs.validator_for(schema).is_valid(json.loads(text))


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_every_reply_under_a_schema_parses_and_validates(server, seed):
    client = openai_client(server)
    answer = client.chat.completions.create(
        model="default", messages=ASK, response_format=FORMAT, max_tokens=200, temperature=1.0, seed=seed
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    assert _valid(choice.message.content, SCHEMA), choice.message.content
    streamed = client.chat.completions.create(
        model="default", messages=ASK, response_format=FORMAT, max_tokens=200, temperature=1.0, seed=seed, stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices)
    assert text == choice.message.content  # the same seed, the same reply


def test_without_the_format_the_same_model_writes_no_json(server):
    answer = openai_client(server).chat.completions.create(model="default", messages=ASK, max_tokens=40, temperature=0)
    with pytest.raises(ValueError):
        json.loads(answer.choices[0].message.content)


def test_the_openai_parse_helper_reads_a_pydantic_model(server):
    from typing import Literal

    from pydantic import BaseModel, Field

    class Pet(BaseModel):
        kind: Literal["cat", "dog"]
        legs: int = Field(ge=0, le=8)
        tame: bool

    answer = openai_client(server).chat.completions.parse(
        model="default", messages=ASK, response_format=Pet, max_tokens=100, temperature=0
    )
    pet = answer.choices[0].message.parsed
    assert isinstance(pet, Pet) and pet.kind in ("cat", "dog")


def test_json_object_is_any_object_and_completions_take_it_too(server):
    client = openai_client(server)
    for seed in range(3):
        answer = client.chat.completions.create(
            model="default", messages=ASK, response_format={"type": "json_object"}, max_tokens=120, seed=seed
        )
        if answer.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(answer.choices[0].message.content), dict)
        else:  # cut short: still the start of an object
            assert answer.choices[0].message.content.startswith("{")
    completion = client.completions.create(
        model="default", prompt="A pet:", max_tokens=200, temperature=0, extra_body={"response_format": FORMAT}
    )
    assert completion.choices[0].finish_reason == "stop"
    assert _valid(completion.choices[0].text, SCHEMA)


def test_a_reply_cut_by_max_tokens_ends_with_length_streamed_or_not(server):
    client = openai_client(server)
    answer = client.chat.completions.create(
        model="default", messages=ASK, response_format=FORMAT, max_tokens=6, temperature=0
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "length" and answer.usage.completion_tokens == 6
    assert choice.message.content == '{"name"'  # the schema's first property, cut after 6 tokens
    chunks = list(
        client.chat.completions.create(
            model="default", messages=ASK, response_format=FORMAT, max_tokens=6, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert chunks[-1].choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    ("response_format", "param", "words"),
    [
        ({"type": "json_schema"}, "response_format.json_schema", "required"),
        ({"type": "xml"}, "response_format.type", ""),
        (
            {"type": "json_schema", "json_schema": {"name": "bad name!", "schema": SCHEMA}},
            "response_format.json_schema.name",
            "",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}},
            "response_format.json_schema.schema",
            'Unsupported type "strin"',
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"properties": {"a": {"not": {}}}}}},
            "response_format.json_schema.schema.properties.a.not",
            "'not' cannot be held to",
        ),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"allOf": [{"type": "object"}]}}},
            "response_format.json_schema.schema.allOf",
            "not supported",
        ),
        ({"type": "json_object", "grammar": "root ::= x"}, "response_format.grammar", "unsupported"),
    ],
)
def test_a_bad_response_format_is_a_400_naming_the_field(server, response_format, param, words):
    body = {"model": "default", "messages": ASK, "response_format": response_format, "max_tokens": 4}
    status, _, raw = request(server.port, "POST", "/v1/chat/completions", body)
    error = error_of(raw)
    assert status == 400 and error["param"] == param, error
    assert words in error["message"]


# -- logprobs -----------------------------------------------------------------


def _model_logprobs(checkpoint: Path, prompt_ids: list[int], reply_ids: list[int]):
    """log_softmax of the model's logits at each reply token, teacher-forced, by transformers alone."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32)
    ids = torch.tensor([prompt_ids + reply_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt_ids) - 1 : -1]
    return torch.log_softmax(logits.float(), dim=-1)


@pytest.fixture(scope="module")
def qwen_backend(qwen_checkpoint):
    backend = LocalBackend()
    backend.load_and_wait(LoadOptions(mode="cpu", dtype="float32").for_model(qwen_checkpoint, "q"))
    yield backend
    backend.stop()


def test_greedy_logprobs_are_the_models_log_softmax(qwen_backend, qwen_checkpoint):
    backend = qwen_backend
    conversation = ChatSession()
    conversation.add_user("Hello there")
    with backend.generate(
        GenerateRequest(conversation, SamplingParams(max_new_tokens=8, do_sample=False), logprobs=5)
    ) as reply:
        "".join(reply)
        entries, prompt_ids = reply.logprobs, reply.prompt_ids
    expected = _model_logprobs(qwen_checkpoint, prompt_ids, [e.token_id for e in entries])
    for step, entry in enumerate(entries):
        assert entry.logprob == pytest.approx(float(expected[step, entry.token_id]), abs=1e-4)
        best = expected[step].topk(5)
        assert [other.token_id for other in entry.top] == best.indices.tolist()
        assert [other.logprob for other in entry.top] == pytest.approx(best.values.tolist(), abs=1e-4)
        assert entry.top[0].token_id == entry.token_id  # greedy: the best one was drawn
    table = backend.next_tokens(conversation, 5)  # /next: the same first distribution
    assert [token_id for _, token_id, _ in table] == [other.token_id for other in entries[0].top]
    assert [p for _, _, p in table] == pytest.approx([math.exp(o.logprob) for o in entries[0].top], abs=1e-4)


def test_sampled_logprobs_are_those_of_the_filtered_distribution(qwen_backend):
    """top_k 3: every listed alternative is one of the 3 kept, their probabilities sum to 1."""
    backend = qwen_backend
    conversation = ChatSession()
    conversation.add_user("Hello there")
    sampling = SamplingParams(max_new_tokens=6, do_sample=True, temperature=0.7, top_k=3, top_p=1.0, seed=3)
    with backend.generate(GenerateRequest(conversation, sampling, logprobs=10)) as reply:
        "".join(reply)
        entries = reply.logprobs
    assert entries
    for entry in entries:
        assert len(entry.top) == 3 and entry.token_id in [other.token_id for other in entry.top]
        assert sum(math.exp(other.logprob) for other in entry.top) == pytest.approx(1.0, abs=1e-5)


def test_the_api_lists_logprobs_in_openais_shape_streamed_or_not(server):
    client = openai_client(server)
    answer = client.chat.completions.create(
        model="default", messages=ASK, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens
    joined = bytes(byte for item in content for byte in item.bytes).decode("utf-8", "replace")
    assert joined.rstrip("\ufffd") == answer.choices[0].message.content  # the tokens' bytes are the text
    for item in content:
        listed = [other.logprob for other in item.top_logprobs]
        assert listed == sorted(listed, reverse=True) and len(listed) == 3
        assert item.logprob == pytest.approx(listed[0]) and item.logprob <= 0
    chunks = list(
        client.chat.completions.create(
            model="default", messages=ASK, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3, stream=True
        )
    )
    streamed = [item for c in chunks if c.choices and c.choices[0].logprobs for item in c.choices[0].logprobs.content]
    assert [i.token for i in streamed] == [i.token for i in content]
    # within float noise: the second request reads its prompt from the first one's cache
    assert [i.logprob for i in streamed] == pytest.approx([i.logprob for i in content], abs=1e-5)
    completion = client.completions.create(model="default", prompt="Hello", max_tokens=4, temperature=0, logprobs=2)
    listed = completion.choices[0].logprobs
    assert len(listed.tokens) == len(listed.token_logprobs) == len(listed.top_logprobs) == 4
    assert all(len(alternatives) == 2 for alternatives in listed.top_logprobs)


@pytest.mark.parametrize(
    ("extra", "param"),
    [({"top_logprobs": 2}, "top_logprobs"), ({"logprobs": True, "top_logprobs": 21}, "top_logprobs")],
)
def test_bad_logprobs_are_a_400_naming_the_field(server, extra, param):
    body = {"model": "default", "messages": ASK, "max_tokens": 2, **extra}
    status, _, raw = request(server.port, "POST", "/v1/chat/completions", body)
    assert status == 400 and error_of(raw)["param"] == param


# -- every ChatGLM generation ---------------------------------------------------


@pytest.mark.parametrize("family", ["chatglm1", "chatglm2", "chatglm3", "glm4"])
def test_chatglm_replies_under_a_schema_parse_and_validate(family):
    backend = LocalBackend()
    backend.load_and_wait(LoadOptions(mode="cpu", dtype="float32").for_model(DATA / f"{family}-tiny", family))
    try:
        for seed in range(3):
            conversation = ChatSession()
            conversation.add_user("你好, JSON please")
            sampling = SamplingParams(max_new_tokens=200, do_sample=True, temperature=1.0, seed=seed)
            held = OutputFormat(json.dumps(SCHEMA), strict=True)
            with backend.generate(GenerateRequest(conversation, sampling, output_format=held)) as reply:
                "".join(reply)
            assert reply.finish_reason == "stop", reply.text
            assert _valid(reply.text, SCHEMA), reply.text
    finally:
        backend.stop()


def test_a_length_limited_string_admits_no_control_character(qwen_checkpoint):
    """xgrammar's own grammar for such strings lets U+0000 to U+001F in (invalid JSON): mended."""
    import xgrammar
    from transformers import AutoTokenizer

    from glmrepl.engine.generation.grammar import compile_format

    tokenizer = AutoTokenizer.from_pretrained(str(qwen_checkpoint))
    schema = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 4}}, "required": ["a"]}
    compiled = compile_format(tokenizer, len(tokenizer), OutputFormat(json.dumps(schema), strict=True))
    for text, whole in (('{"a": "ab\x0e', False), ('{"a": "ab\x7f"}', True), ('{"a": "abcde"}', False)):
        matcher = xgrammar.GrammarMatcher(compiled)
        assert (matcher.accept_string(text) and matcher.is_completed()) is whole, text


@pytest.mark.parametrize("family", ["chatglm3", "glm4"])
def test_chatglm_servers_hold_replies_to_a_schema(family, tmp_path):
    server = started_server([str(DATA / f"{family}-tiny"), "--device", "cpu"], tmp_path / "serve.log")
    try:
        client = openai_client(server)
        for stream in (False, True):
            created = client.chat.completions.create(
                model="default", messages=ASK, response_format=FORMAT, max_tokens=200, seed=1, stream=stream
            )
            if stream:
                text = "".join(chunk.choices[0].delta.content or "" for chunk in created if chunk.choices)
            else:
                text = created.choices[0].message.content
            assert _valid(text, SCHEMA), text
    finally:
        server.stop()


def test_a_length_past_any_reply_is_refused_before_any_work(server):
    schema = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 10**9}}}
    body = {
        "model": "default",
        "messages": ASK,
        "max_tokens": 4,
        "response_format": {**FORMAT, "json_schema": {"name": "x", "schema": schema}},
    }
    status, _, raw = request(server.port, "POST", "/v1/chat/completions", body)
    assert status == 400 and error_of(raw)["param"] == "response_format.json_schema.schema.properties.a.maxLength"


# -- a forced tool call's arguments ----------------------------------------------


@pytest.fixture(scope="module")
def random_caller(tmp_path_factory):
    """The random tiny Qwen2 with a chat template in Qwen2.5's tool format (Hermes calls)."""
    from scripted import TOOLS_TEMPLATE

    from glmrepl.tiny import build_qwen2_chat

    folder = build_qwen2_chat(tmp_path_factory.mktemp("checkpoints") / "random-caller")
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config_file.write_text(json.dumps({**config, "chat_template": TOOLS_TEMPLATE}), encoding="utf-8")
    return folder


def test_a_forced_call_of_a_random_model_has_arguments_its_schema_accepts(random_caller, tmp_path):
    parameters = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 8},
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
        },
        "required": ["city", "days"],
        "additionalProperties": False,
    }
    tool = {"type": "function", "function": {"name": "forecast", "parameters": parameters}}
    server = started_server([str(random_caller), "--device", "cpu"], tmp_path / "serve.log")
    try:
        client = openai_client(server)
        for seed in range(4):
            answer = client.chat.completions.create(
                model="default",
                messages=ASK,
                tools=[tool],
                tool_choice={"type": "function", "function": {"name": "forecast"}},
                max_tokens=80,
                seed=seed,
            )
            choice = answer.choices[0]
            assert choice.finish_reason == "tool_calls", choice.message.content
            call = choice.message.tool_calls[0]
            assert call.function.name == "forecast" and _valid(call.function.arguments, parameters)
    finally:
        server.stop()
