"""Every prompt format the engine builds, and its tokenizer, has the shape protocols.py names."""

from __future__ import annotations

from pathlib import Path

import pytest

from glmrepl.engine.conversation.formats import ChatTemplateFormat, CompletionFormat
from glmrepl.engine.families.chatglm.load import _glm2_tokenizer_and_format
from glmrepl.engine.families.chatglm.prompts import ChatGLM1Format, ChatGLM2Format, ChatGLM3Format, GLM4Format
from glmrepl.engine.families.chatglm.tokenizers import ChatGLM1Tokenizer
from glmrepl.engine.models.loading import choose_format
from glmrepl.engine.protocols import PromptFormat, Tokenizer

DATA = Path(__file__).parent / "data" / "chatglm"


def _transformers_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def _assert_follows_protocols(prompt_format, expected_class: type) -> None:
    assert type(prompt_format) is expected_class
    assert isinstance(prompt_format, PromptFormat)
    assert isinstance(prompt_format.tokenizer, Tokenizer)


def test_generic_formats_follow_the_protocols(qwen_checkpoint, gpt2_checkpoint):
    chat_tokenizer = _transformers_tokenizer(qwen_checkpoint)
    _assert_follows_protocols(choose_format(chat_tokenizer, None, None), ChatTemplateFormat)
    _assert_follows_protocols(choose_format(chat_tokenizer, None, "complete"), CompletionFormat)
    _assert_follows_protocols(choose_format(_transformers_tokenizer(gpt2_checkpoint), None, None), CompletionFormat)


def test_chatglm1_format_follows_the_protocols():
    tokenizer = ChatGLM1Tokenizer(DATA / "chatglm1-tiny" / "ice_text.model", num_image_tokens=0)
    _assert_follows_protocols(ChatGLM1Format(tokenizer), ChatGLM1Format)


@pytest.mark.parametrize(
    "folder, family, expected_class",
    [
        ("chatglm2-tiny", "chatglm2", ChatGLM2Format),
        ("chatglm3-tiny", "chatglm3", ChatGLM3Format),
        ("glm4-tiny", "glm4", GLM4Format),
    ],
)
def test_later_chatglm_formats_follow_the_protocols(folder, family, expected_class):
    tokenizer, prompt_format = _glm2_tokenizer_and_format(DATA / folder, family)
    assert prompt_format.tokenizer is tokenizer
    _assert_follows_protocols(prompt_format, expected_class)


def test_a_format_missing_a_member_is_not_a_prompt_format():
    tokenizer = ChatGLM1Tokenizer(DATA / "chatglm1-tiny" / "ice_text.model", num_image_tokens=0)
    prompt_format = ChatGLM1Format(tokenizer)
    del prompt_format.sampling_defaults
    assert not isinstance(prompt_format, PromptFormat)
    assert not isinstance(object(), Tokenizer)
