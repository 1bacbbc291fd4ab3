"""Errors the user sees as one line.

Every message names what is wrong and, where there is one, the fix. The fix is
a ``Hint`` kept apart from the message, because each front end words it for
its own user: ``Hint("device", "cpu")`` is ``/device cpu`` in the REPL and
``--device cpu`` on the command line. ``str(error)`` words it plainly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


def first_line(error: BaseException | str, fallback: str | None = None) -> str:
    """The first line of an exception's message, or of a message (library errors can span pages)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else (fallback or type(error).__name__)


@dataclass(frozen=True)
class Hint:
    """What the user can do about an error: change ``action`` (device, setting, mode, model) to ``value``.

    ``sentence`` places the front end's words for it: "use {}" becomes "use /device cpu".
    """

    action: str
    value: str = ""
    sentence: str = "use {}"

    def worded(self, words: Callable[[Hint], str]) -> str:
        return self.sentence.format(words(self))


def plain_words(hint: Hint) -> str:
    """Words for no front end in particular: "device cpu"."""
    return f"{hint.action} {hint.value}".strip()


class GlmreplError(Exception):
    """Base class: ``str(error)`` is a complete one-line message."""

    def __init__(self, message: str, hint: Hint | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.worded(plain_words)

    def worded(self, words: Callable[[Hint], str]) -> str:
        """The message with its hint in a front end's words."""
        return self.message if self.hint is None else f"{self.message}: {self.hint.worded(words)}"


class CheckpointError(GlmreplError):
    """A checkpoint folder is missing, incomplete or unusable."""


class ModelLoadError(GlmreplError):
    """Loading failed for a reason other than the folder's layout."""


class DeviceError(GlmreplError):
    """A device mode cannot be used on this machine (no CUDA, too few GPUs, no room)."""


class LoadCancelled(GlmreplError):
    """The user interrupted a load; the previous model stays in place."""


class GenerationError(GlmreplError):
    """Generation failed (for example out of memory); the conversation is kept."""


class NoModelLoaded(GlmreplError):
    """A reply was asked for while no model is loaded."""


class EmptyPrompt(GlmreplError):
    """The conversation formats to no tokens at all: there is nothing to answer or continue."""


class ContextLengthExceeded(GlmreplError):
    """The prompt (and the reply asked for) does not fit the model's context."""

    def __init__(self, message: str, prompt_tokens: int, context_length: int):
        super().__init__(message)
        self.prompt_tokens = prompt_tokens
        self.context_length = context_length


class MaxLengthExceeded(ContextLengthExceeded):
    """The prompt reaches the total length a request allows (ChatGLM api.py's max_length)."""


class QueueFull(GlmreplError):
    """As many replies wait for the generation worker as the front end allows."""

    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ToolsUnsupported(GlmreplError):
    """Tools (or tool messages) for a prompt format that has no place for them."""


class InvalidTools(GlmreplError):
    """A tool list, a tool call or a tool message that is not well formed; ``where`` names the field."""

    def __init__(self, message: str, where: str = "tools"):
        super().__init__(message)
        self.where = where


class InvalidOutputFormat(GlmreplError):
    """A response format or JSON schema that cannot be held to; ``where`` names the field."""

    def __init__(self, message: str, where: str = "response_format"):
        super().__init__(message)
        self.where = where


class AdapterError(GlmreplError):
    """An adapter folder is unusable, or does not fit the loaded model."""
