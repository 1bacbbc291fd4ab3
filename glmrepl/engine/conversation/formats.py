"""Turning a conversation into prompt token ids, per kind of checkpoint.

A *prompt format* knows how one family of checkpoints expects its
conversation: the checkpoint's own chat template, plain text continuation for
base language models, or a native family's format (ChatGLM's rounds, role
tokens). Everything else (history, budgets, generation) is format-agnostic.

Protocol every format follows::

    name: str                       # shown in the toolbar and /model
    is_chat: bool                   # False: completion mode (continue the text)
    stop_token_ids: list[int]       # generation stops at any of these
    sampling_defaults: dict         # the family's own defaults (top_p, ...)
    build(messages) -> list[int]    # messages: [{"role", "content"}], system first if any
    clean_reply(text) -> str        # final touch on a finished reply

A family may add ``history_reply(ids) -> dict``: a finished reply's message
fields as its own chat() keeps them for the next prompt (see service.Reply.kept).
"""

from __future__ import annotations

from typing import Any

from ..errors import InvalidTools, first_line
from ..protocols import PromptFormat


class _TransformersTokenizerFormat:
    """Shared by the generic formats: stop at the tokenizer's eos, no family defaults."""

    def __init__(self, tokenizer: Any, extra_stop_ids: list[int] | None = None):
        self.tokenizer = tokenizer
        # Instruct checkpoints often end turns with a token other than the
        # tokenizer's eos (Llama 3's <|eot_id|>), listed in generation_config.
        self.stop_token_ids = list(dict.fromkeys(eos_ids(tokenizer) + list(extra_stop_ids or [])))
        self.sampling_defaults: dict = {}

    # The next prompt may hold a reply as the ids the model wrote (reply_tokens.splice_replies).
    splices_replies = True


class ChatTemplateFormat(_TransformersTokenizerFormat):
    """The checkpoint's own Jinja chat template (``tokenizer.apply_chat_template``)."""

    name = "chat template"
    is_chat = True

    @property
    def tool_syntax(self) -> str | None:
        """How the template's model writes a call (tool_calls.py), or None: it takes no tools."""
        template = self.tokenizer.chat_template
        template = template if isinstance(template, str) else str(template or "")
        if "tools" not in template:
            return None
        return "hermes" if "<tool_call>" in template else "json"

    def build(self, messages: list[dict]) -> list[int]:
        from .tool_calls import template_messages

        tools, messages = template_messages(messages)
        extra = {"tools": tools} if tools else {}
        try:
            encoded = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=True, **extra
            )
        except Exception as error:  # jinja's raise_exception() and errors of the template's own code
            if not (tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages)):
                raise
            raise InvalidTools(
                f"the chat template refused the tool messages: {first_line(error)}", "messages"
            ) from None
        return list(encoded["input_ids"])

    def clean_reply(self, text: str) -> str:
        # Trailing spaces go; a leading one stays: it is what was streamed, and the ids the
        # model wrote can stand for the reply in the next prompt only with it (reply_tokens).
        return text.rstrip()


class CompletionFormat(_TransformersTokenizerFormat):
    """Base language models: the conversation is one text that the model continues.

    The system prompt, if any, is the beginning of the text; each user message
    and each reply are appended as written, so ``/retry`` and history keep
    working exactly as in chat mode.
    """

    name = "completion"
    is_chat = False

    def build(self, messages: list[dict]) -> list[int]:
        text = "".join(message["content"] for message in messages)
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        bos = getattr(self.tokenizer, "bos_token_id", None)
        if getattr(self.tokenizer, "add_bos_token", False) and bos is not None:
            ids = [bos] + ids
        return ids

    def clean_reply(self, text: str) -> str:
        return text


def eos_ids(source: Any) -> list[int]:
    """The end ids a tokenizer or a generation_config names (one id, a list, or none)."""
    eos = getattr(source, "eos_token_id", None)
    if eos is None:
        return []
    return [int(i) for i in eos] if isinstance(eos, (list, tuple)) else [int(eos)]


def format_for(tokenizer: Any, mode: str | None = None, extra_stop_ids: list[int] | None = None) -> PromptFormat:
    """The generic format for a transformers tokenizer: chat when it has a template.

    ``mode`` ("chat" or "complete") is the user's ``/mode`` override.
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if mode == "complete" or (mode is None and not has_template):
        return CompletionFormat(tokenizer, extra_stop_ids)
    return ChatTemplateFormat(tokenizer, extra_stop_ids)
