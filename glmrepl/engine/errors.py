"""Errors the user sees as one line.

Every message names what is wrong and, where there is one, the fix. The REPL
prints ``str(error)`` and carries on with its model and conversation intact.
"""


def first_line(error: BaseException, fallback: str | None = None) -> str:
    """The first line of an exception's message (library errors can span pages)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else (fallback or type(error).__name__)


class GlmreplError(Exception):
    """Base class: ``str(error)`` is a complete one-line message."""


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


class QueueFull(GlmreplError):
    """As many replies wait for the generation worker as the front end allows."""

    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(message)
        self.retry_after_s = retry_after_s
