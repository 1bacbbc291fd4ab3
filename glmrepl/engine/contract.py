"""What a front end (the REPL, the HTTP server) may ask of a backend, and what it gets back.

``Backend`` is the protocol both backends keep: ``LocalBackend`` (the model in
this process) and ``RemoteBackend`` (an OpenAI-compatible server). A request
goes in as a ``GenerateRequest``; a ``ReplyHandle`` comes out. What only some
backends can do is declared in ``abilities`` (names from ``ABILITIES``); a
front end asks ``backend.can(ability)`` before offering a command, and a
backend without the ability refuses in one line (``Abilities``), so no front
end probes for methods.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

from .conversation.chat import ChatSession
from .conversation.tool_calls import ToolCall
from .errors import GlmreplError
from .request import GenerateRequest, LoadOptions, Variant
from .status import GenerationStats, ModelStatus, Placement

# What a backend may be able to do, and the words a refusal uses for it.
ABILITIES = {
    "move": "moving the model",
    "quantize": "quantizing the model",
    "adapters": "adapters",
    "prompt_mode": "changing the prompt mode",
    "next_tokens": "the next-token table",
    "perplexity": "perplexity",
    "compare": "comparing with another model",
    "memory_report": "the memory report",
    "server_models": "choosing among a server's models",
}


class ReplyHandle(Protocol):
    """One reply: iterate it for text deltas (once); cancel from any thread; then read the results."""

    def __iter__(self) -> Iterator[str]: ...

    def cancel(self) -> None: ...

    def close(self) -> None: ...

    def __enter__(self) -> ReplyHandle: ...

    def __exit__(self, *exc: object) -> None: ...

    @property
    def stats(self) -> GenerationStats: ...

    @property
    def text(self) -> str: ...

    @property
    def finish_reason(self) -> str: ...

    @property
    def tool_calls(self) -> list[ToolCall]: ...

    @property
    def hit_context_end(self) -> bool: ...

    @property
    def kept(self) -> tuple[str, dict[str, str]] | None: ...

    @property
    def dropped_turns(self) -> int: ...


class LoadProgress(Protocol):
    """A load (or a server's model choice) under way."""

    done: threading.Event

    @property
    def request(self) -> LoadOptions | None:
        """What was loaded, to load it again; None for a server's model choice."""

    @property
    def status(self) -> str: ...

    @property
    def error(self) -> BaseException | None: ...

    def cancel(self) -> None: ...

    def wait(self, timeout: float | None = None) -> bool: ...


class Describable(Protocol):
    def describe(self) -> str: ...


class BackgroundTask(Protocol):
    """Work under way in the background (a perplexity run): front ends show its status and
    progress, may cancel it, and show its result's description once done."""

    done: threading.Event
    cancel_event: threading.Event
    error: BaseException | None

    @property
    def result(self) -> Describable | None: ...

    @property
    def status(self) -> str: ...

    @property
    def fraction(self) -> float | None: ...

    def cancel(self) -> None: ...

    def wait(self, timeout: float | None = None) -> bool: ...


# A row of the next-token table: the token's text, its id (a server that sends no ids: "-"),
# its probability.
NextToken = tuple[str, int | str, float]


class Backend(Protocol):
    abilities: frozenset[str]

    def can(self, ability: str) -> bool: ...

    def refuse(self, ability: str, command: str) -> GlmreplError: ...

    # -- models --------------------------------------------------------------------
    def list_models(self, models_dir: Path | None = None, beside: Path | None = None) -> list: ...

    def load(self, request: LoadOptions) -> LoadProgress: ...

    def select_model(self, name: str | None = None) -> LoadProgress: ...

    @property
    def job(self) -> LoadProgress | None: ...

    def status(self) -> ModelStatus | None: ...

    def load_notes(self) -> list[str]: ...

    def where(self) -> str: ...

    # -- replies ---------------------------------------------------------------------
    def generate(self, request: GenerateRequest) -> ReplyHandle: ...

    def context_usage(self, conversation: ChatSession, max_new_tokens: int = 0) -> tuple[int, int | None] | None: ...

    def setting_note(self, key: str) -> str | None: ...

    # -- abilities -------------------------------------------------------------------
    def move(self, mode: str, dtype: str = "auto", on_wait: Callable[[int], None] | None = None) -> Placement: ...

    def quantize(self, bits: int, on_wait: Callable[[int], None] | None = None) -> Placement: ...

    def set_adapter(
        self, path: Path | None, merge: bool = False, on_wait: Callable[[int], None] | None = None
    ) -> str | None: ...

    def set_prompt_mode(self, mode: str | None) -> str: ...

    def next_tokens(self, conversation: ChatSession, k: int) -> list[NextToken]: ...

    def start_perplexity(self, path: Path, window: int | None = None, stride: int | None = None) -> BackgroundTask: ...

    def start_compare(self, variant: Variant, conversation: ChatSession, max_new_tokens: int) -> BackgroundTask: ...

    def start_compare_text(
        self, variant: Variant, path: Path, window: int | None = None, stride: int | None = None
    ) -> BackgroundTask: ...

    def memory_report(self) -> list[tuple[str, str]]: ...


class Abilities:
    """Refusals for what a backend cannot do, and the answers of one that has nothing to add."""

    abilities: frozenset[str] = frozenset()
    # Where the model runs, for a refusal: "is not available {unavailable_where}".
    unavailable_where = "here: the model runs in another process that does not offer it"

    def can(self, ability: str) -> bool:
        return ability in self.abilities

    def refuse(self, ability: str, command: str) -> GlmreplError:
        return GlmreplError(f"{command} is not available {self.unavailable_where}")

    def _refuse(self, ability: str) -> GlmreplError:
        return GlmreplError(f"{ABILITIES[ability]} is not available {self.unavailable_where}")

    def select_model(self, name: str | None = None) -> LoadProgress:
        raise self._refuse("server_models")

    def load_notes(self) -> list[str]:
        return []

    def where(self) -> str:
        return "this process"

    def setting_note(self, key: str) -> str | None:
        return None

    def move(self, mode: str, dtype: str = "auto", on_wait: Callable[[int], None] | None = None) -> Placement:
        raise self._refuse("move")

    def quantize(self, bits: int, on_wait: Callable[[int], None] | None = None) -> Placement:
        raise self._refuse("quantize")

    def set_adapter(
        self, path: Path | None, merge: bool = False, on_wait: Callable[[int], None] | None = None
    ) -> str | None:
        raise self._refuse("adapters")

    def set_prompt_mode(self, mode: str | None) -> str:
        raise self._refuse("prompt_mode")

    def next_tokens(self, conversation: ChatSession, k: int) -> list[NextToken]:
        raise self._refuse("next_tokens")

    def start_perplexity(self, path: Path, window: int | None = None, stride: int | None = None) -> BackgroundTask:
        raise self._refuse("perplexity")

    def start_compare(self, variant: Variant, conversation: ChatSession, max_new_tokens: int) -> BackgroundTask:
        raise self._refuse("compare")

    def start_compare_text(
        self, variant: Variant, path: Path, window: int | None = None, stride: int | None = None
    ) -> BackgroundTask:
        raise self._refuse("compare")

    def memory_report(self) -> list[tuple[str, str]]:
        return []


def record_reply(session: ChatSession, reply: ReplyHandle) -> str:
    """Keep what was generated; an interrupted reply stays, marked as cut. Returns the text shown
    (the next prompt may hold the reply as its family keeps it: ``ReplyHandle.kept``)."""
    text = reply.text
    calls = [call.as_dict() for call in reply.tool_calls]
    session.add_assistant(text, cut=reply.finish_reason in ("cancelled", "length"), kept=reply.kept, tool_calls=calls)
    return text
