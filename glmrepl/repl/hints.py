"""The engine's hints in each terminal front end's words.

An engine error says what to change (``Hint("device", "cpu")``); the REPL
tells its user to type ``/device cpu``, the command line to pass
``--device cpu``. Non-interactive use (``-p``, piped input) reads flags.
"""

from __future__ import annotations

from ..engine import GlmreplError, Hint


def slash_words(hint: Hint) -> str:
    """The REPL command that applies the hint."""
    if hint.action == "setting":
        return f"/set {hint.value}"
    if hint.action == "model":
        return "/model NAME (or /model to list them)"
    return f"/{hint.action} {hint.value}".rstrip()


def flag_words(hint: Hint) -> str:
    """The command-line option that applies the hint."""
    if hint.action == "setting":
        return "--" + hint.value.replace("_", "-")
    if hint.action == "model":
        return "a MODEL argument"
    if hint.action in ("mode", "clear", "tools"):  # no flag: a line of piped input does it
        return f"an input line /{hint.action} {hint.value}".rstrip()
    return f"--{hint.action} {hint.value}".rstrip()


def explain(error: BaseException, words=slash_words) -> str:
    """An error as one line, its hint in ``words``."""
    return error.worded(words) if isinstance(error, GlmreplError) else str(error)
