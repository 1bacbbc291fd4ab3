"""The shapes the engine relies on, for readers and for mypy.

A prompt format and a tokenizer come from several places (transformers'
tokenizers, glmrepl's own ChatGLM tokenizers, the generic and the ChatGLM
prompt formats); these protocols name what the engine calls on them, so a new
family knows what to provide.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar, runtime_checkable

T = TypeVar("T")


@runtime_checkable
class Tokenizer(Protocol):
    """What streaming and prompt building call on a tokenizer."""

    eos_token_id: Any  # an id, a list of ids, or None

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...

    def convert_ids_to_tokens(self, ids: Any) -> Any: ...


@runtime_checkable
class PromptFormat(Protocol):
    """How one kind of checkpoint wants its conversation (see formats.py)."""

    name: str  # shown in the toolbar and /model
    is_chat: bool  # False: completion mode (continue the text)
    stop_token_ids: list[int]  # generation stops at any of these
    sampling_defaults: dict  # the family's own defaults (top_p, ...)

    def build(self, messages: list[dict]) -> list[int]:
        """Prompt ids for ``[{"role", "content"}]``, system first if any, ending where the reply begins."""
        ...

    def clean_reply(self, text: str) -> str:
        """The final touch on a finished reply (e.g. ChatGLM's punctuation)."""
        ...


class ModelGate(Protocol):
    """What lets a change to the loaded model happen: ``change`` waits for the running replies
    (``on_wait(n)`` first, when n run), keeps new ones out, and runs ``work`` where the model's
    owner runs it; returns what ``work`` returns."""

    def change(self, work: Callable[[], T], on_wait: Callable[[int], None] | None = None) -> T: ...
