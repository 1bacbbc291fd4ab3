"""What command handlers return; the REPL (or one-shot mode) renders or acts on it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..engine import BackgroundTask, LoadProgress


@dataclass
class Text:
    text: str
    style: str = "info"  # "info", "dim", "warning"


@dataclass
class Error:
    message: str


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    title: str | None = None


@dataclass
class Exit:
    pass


@dataclass
class Generate:
    """Generate a reply to the conversation as it stands (used by /retry)."""


@dataclass
class WaitForLoad:
    """A model load was started; wait for it with progress (Ctrl-C cancels)."""

    job: LoadProgress
    then: list = field(default_factory=list)  # results to handle once the load succeeded


@dataclass
class WaitForTask:
    """A task runs in the background (a perplexity run): show its progress bar; Ctrl-C cancels it.

    ``job`` has ``status``, ``fraction``, ``wait``, ``cancel``, ``error`` and ``result``;
    ``report`` turns the result into what is shown."""

    job: BackgroundTask
    report: Callable[[Any], object]


@dataclass
class TerminalEscape:
    """Raw bytes for the terminal itself (OSC 52 clipboard), never for a pipe."""

    sequence: str
    done_message: str
