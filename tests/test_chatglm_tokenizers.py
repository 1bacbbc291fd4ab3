"""The sentencepiece tokenizers and prompt formats of the ChatGLM generations."""

from __future__ import annotations

from pathlib import Path

import pytest

from glmrepl.engine.families.chatglm.prompts import ChatGLM1Format, ChatGLM2Format, ChatGLM3Format, split_rounds
from glmrepl.engine.families.chatglm.tokenizers import ChatGLM1Tokenizer, ChatGLM2Tokenizer

DATA = Path(__file__).parent / "data" / "chatglm"


@pytest.fixture(scope="module")
def glm1():
    return ChatGLM1Tokenizer(DATA / "chatglm1-tiny" / "ice_text.model", num_image_tokens=0)


@pytest.fixture(scope="module")
def glm2():
    return ChatGLM2Tokenizer(DATA / "chatglm2-tiny" / "tokenizer.model")


@pytest.fixture(scope="module")
def glm3():
    return ChatGLM2Tokenizer(DATA / "chatglm3-tiny" / "tokenizer.model", role_tokens=True)


def test_glm1_whitespace_pieces(glm1):
    ids = glm1.encode("a\tb    c\nd")
    tokens = glm1.convert_ids_to_tokens(ids)
    assert "<|tab|>" in tokens and "<|blank_4|>" in tokens and "<n>" in tokens
    assert glm1.decode(ids) == "a\tb    c\nd"


def test_glm1_special_ids_and_cleanup(glm1):
    assert glm1.encode("x", add_special_tokens=True)[-2:] == [glm1.gmask_token_id, glm1.bos_token_id]
    assert glm1.convert_ids_to_tokens([glm1.gmask_token_id, glm1.bos_token_id, glm1.eos_token_id]) == [
        "[gMASK]",
        "<sop>",
        "<eop>",
    ]
    assert glm1.decode(glm1.encode("Who was Jim Henson ?")) == "Who was Jim Henson?"
    assert glm1.decode([glm1.bos_token_id, glm1.eos_token_id], skip_special_tokens=False) == ""
    assert len(glm1) == glm1.vocab_size == 600


def test_glm1_control_text_stays_text(glm1):
    assert glm1.bos_token_id not in glm1.encode("<sop>")


def test_glm2_special_tokens_follow_the_vocabulary(glm2, glm3):
    assert glm2.vocab_size == len(glm2) == 405
    assert glm3.vocab_size == len(glm3) == 409
    assert glm2.get_command("[gMASK]") == 401 and glm2.get_command("sop") == 403
    assert glm3.get_command("<|user|>") == 406 and glm3.convert_ids_to_tokens(407) == "<|assistant|>"
    assert glm2.eos_token_id == 2 and glm2.pad_token_id == 0


def test_glm3_role_tokens_decode_by_name_unless_skipped(glm3):
    ids = glm3.encode("hello") + [glm3.get_command("<|user|>")]
    assert glm3.decode(ids, skip_special_tokens=False).endswith("<|user|>")
    assert glm3.decode(ids) == glm3.decode(ids[:-1])
    assert glm3.get_command("<|user|>") not in glm3.encode("<|user|>")


def test_split_rounds_pairs_turns():
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
        {"role": "user", "content": "q3"},
    ]
    assert split_rounds(messages) == ("S", [("q1", "a1"), ("q2", "")], "q3")


def test_formats_follow_the_protocol(glm1, glm2, glm3):
    formats = [ChatGLM1Format(glm1), ChatGLM2Format(glm2), ChatGLM3Format(glm3)]
    for prompt_format in formats:
        assert prompt_format.is_chat and prompt_format.name
        assert prompt_format.build([{"role": "user", "content": "hi"}])
    assert formats[0].stop_token_ids == [glm1.eos_token_id]
    assert formats[0].sampling_defaults == {"do_sample": True, "top_p": 0.7, "temperature": 0.95}
    assert formats[1].stop_token_ids == [2]
    assert formats[2].stop_token_ids == [2, 406, 409 - 1]
    assert formats[2].sampling_defaults == {"do_sample": True, "top_p": 0.8, "temperature": 0.8}


def test_system_messages(glm2, glm3):
    with_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    ids = ChatGLM3Format(glm3).build(with_system)
    assert ids[:3] == [401, 403, glm3.get_command("<|system|>")]
    assert ChatGLM2Format(glm2).build(with_system)[2:] == glm2.encode("Be brief.\n\n[Round 1]\n\n问：hi\n\n答：")


def test_clean_reply(glm1, glm2, glm3):
    assert ChatGLM3Format(glm3).clean_reply("\n hello<|user|>") == "hello"
    assert ChatGLM1Format(glm1).clean_reply(" 你好,世界 ") == "你好，世界"
    assert ChatGLM2Format(glm2).clean_reply(" [[训练时间]] ") == "2023年"
