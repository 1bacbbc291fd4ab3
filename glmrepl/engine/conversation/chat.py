"""The conversation: messages, system prompt, undo/retry, save/load, context budget."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ...common.atomic import write_text_atomic
from ..errors import GlmreplError
from ..protocols import PromptFormat

SAVE_FORMAT_VERSION = 1


@dataclass
class Message:
    role: str  # "user", "assistant" or "tool" (a tool's result)
    content: str
    cut: bool = False  # the reply was interrupted (Ctrl-C or length) before it ended
    # A reply as its family's own chat() keeps it for the next prompt, where that differs from the
    # text shown (a cut character's fragment, ChatGLM3's first line): the message fields, given
    # only to the prompt format named ``kept_for`` (another model gets the text shown).
    kept: dict[str, str] | None = None
    kept_for: str | None = None
    tool_calls: list[dict] | None = None  # a reply's calls: [{"id", "name", "arguments" (JSON)}]
    tool_call_id: str | None = None  # a tool result: the call it answers


@dataclass
class FittedPrompt:
    """Prompt ids that fit the context, and how many old turns had to go."""

    ids: list[int]
    dropped_turns: int
    max_new_tokens: int  # the reply budget, shortened when one long message leaves less room
    messages: list[dict] = field(default_factory=list)  # what the ids were built from


class ChatSession:
    def __init__(self, system: str | None = None):
        self.system = system or None
        self.messages: list[Message] = []
        self.tools: list[dict] | None = None  # bare function dicts (tool_calls.normalize_tools)

    # -- editing -------------------------------------------------------------
    def add_user(self, text: str) -> None:
        self.messages.append(Message("user", text))

    def add_assistant(
        self,
        text: str,
        cut: bool = False,
        kept: tuple[str, dict[str, str]] | None = None,
        tool_calls: list[dict] | None = None,
    ) -> None:
        """``kept``: (prompt format name, message fields), see Message.kept."""
        kept_for, fields = kept if kept else (None, None)
        self.messages.append(Message("assistant", text, cut, fields, kept_for, tool_calls or None))

    def add_tool_result(self, text: str, tool_call_id: str | None = None) -> None:
        self.messages.append(Message("tool", text, tool_call_id=tool_call_id))

    @property
    def pending_calls(self) -> list[dict]:
        """The last reply's calls that no tool result answers yet."""
        answered = set()
        for message in reversed(self.messages):
            if message.role == "tool":
                answered.add(message.tool_call_id)
            elif message.role == "assistant":
                return [c for c in message.tool_calls or [] if c.get("id") not in answered]
            else:
                break
        return []

    def clear(self) -> None:
        self.messages.clear()

    @property
    def turns(self) -> int:
        return sum(1 for m in self.messages if m.role == "user")

    @property
    def last_reply(self) -> Message | None:
        return self.messages[-1] if self.messages and self.messages[-1].role == "assistant" else None

    def undo(self) -> int:
        """Remove the last exchange (the reply and the message it answered, with the tool calls
        and results between them); returns messages removed."""
        removed = 0
        while self.messages and self.messages[-1].role in ("assistant", "tool"):
            self.messages.pop()
            removed += 1
        if self.messages and self.messages[-1].role == "user":
            self.messages.pop()
            removed += 1
        return removed

    def prepare_retry(self) -> str:
        """Drop the last reply so it can be generated again; returns the message it answers."""
        if self.last_reply:
            self.messages.pop()
        if not self.messages or self.messages[-1].role not in ("user", "tool"):
            raise GlmreplError("nothing to retry: send a message first")
        return self.messages[-1].content

    # -- prompt building -----------------------------------------------------
    def as_dicts(self, messages: list[Message] | None = None, for_format: str | None = None) -> list[dict]:
        """The messages as dicts, each reply as shown, or as kept for ``for_format`` (a prompt
        format's name) where it kept one: the next prompt is then the one its family's chat() builds."""
        out: list[dict] = [{"role": "system", "content": None, "tools": self.tools}] if self.tools else []
        out += [{"role": "system", "content": self.system}] if self.system else []
        for m in self.messages if messages is None else messages:
            kept = m.kept if m.kept and for_format is not None and m.kept_for == for_format else {}
            extra: dict = {"tool_calls": m.tool_calls} if m.tool_calls else {}
            if m.role == "tool":
                extra = {"tool_call_id": m.tool_call_id}
            out.append({"role": m.role, "content": m.content, **extra, **kept})
        return out

    def fit(
        self,
        prompt_format: PromptFormat,
        context_length: int | None,
        max_new_tokens: int,
        build: Callable[[list[dict]], list] | None = None,
    ) -> FittedPrompt:
        """Build prompt ids for the current conversation within the context budget.

        Oldest turns are dropped first (the system prompt stays); the caller
        tells the user how many. When only the newest message is left and it
        still leaves less room than max_new_tokens, the reply gets the room
        there is. The conversation itself is not changed, so a later model
        with a longer context sees everything again. ``build`` makes the ids of some messages
        (default: the format's own; the engine's puts replies back as their generated ids), so
        what is counted is what is sent.
        """
        make_ids = build or prompt_format.build
        starts = _turn_starts(self.messages)
        built: dict[int, tuple[list[dict], list]] = {}

        def built_without(dropped: int) -> tuple[list[dict], list]:
            if dropped not in built:
                dicts = self.as_dicts(self.messages[starts[dropped] :], prompt_format.name)
                built[dropped] = dicts, make_ids(dicts)
            return built[dropped]

        def ids_without(dropped: int) -> list:
            return built_without(dropped)[1]

        def fitted(dropped: int, room: int) -> FittedPrompt:
            dicts, ids = built_without(dropped)
            return FittedPrompt(ids, dropped, room, dicts)

        def fits(dropped: int) -> bool:
            return context_length is None or len(ids_without(dropped)) + max_new_tokens <= context_length

        # Fewer turns never make a longer prompt, so the fewest turns to drop are found by
        # bisection: a few prompt builds, not one per turn (a long history would be quadratic).
        if fits(0):
            return fitted(0, max_new_tokens)
        low, high = 0, len(starts) - 1  # low does not fit; high is the newest turn alone
        if fits(high):
            while high - low > 1:
                middle = (low + high) // 2
                low, high = (low, middle) if fits(middle) else (middle, high)
            return fitted(high, max_new_tokens)
        ids = ids_without(high)
        assert context_length is not None  # fits() is always true without a limit
        if len(ids) < context_length:
            return fitted(high, context_length - len(ids))
        raise GlmreplError(f"the message needs {len(ids)} tokens but the context holds {context_length}: shorten it")

    # -- persistence ---------------------------------------------------------
    def to_dict(self) -> dict:
        # kept and kept_for only where a reply has them: most messages are as shown.
        messages = [{k: v for k, v in asdict(m).items() if v is not None} for m in self.messages]
        saved = {"system": self.system, "messages": messages}
        return {**saved, "tools": self.tools} if self.tools else saved

    def restore(self, data: dict) -> None:
        from .tool_calls import normalize_tools

        messages = [
            Message(m["role"], m["content"], bool(m.get("cut", False)), *_kept_fields(m), *_tool_fields(m))
            for m in data.get("messages", [])
        ]
        if any(m.role not in ("user", "assistant", "tool") for m in messages):
            raise GlmreplError("the file has messages with unknown roles; it was not written by glmrepl")
        tools = data.get("tools")
        self.tools = normalize_tools(tools) if tools else None
        self.system = data.get("system") or None
        self.messages = messages


def _kept_fields(message: dict) -> tuple[dict[str, str] | None, str | None]:
    """A saved reply's kept fields, or none where the file's are not strings (edited by hand)."""
    kept, kept_for = message.get("kept"), message.get("kept_for")
    if not isinstance(kept, dict) or not isinstance(kept_for, str):
        return None, None
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in kept.items()):
        return None, None
    return kept, kept_for


def _tool_fields(message: dict) -> tuple[list[dict] | None, str | None]:
    """A saved message's tool calls and call id, or none where the file's are malformed."""
    calls, call_id = message.get("tool_calls"), message.get("tool_call_id")
    keys = {"id", "name", "arguments"}
    if not (isinstance(calls, list) and all(isinstance(c, dict) and set(c) == keys for c in calls)):
        calls = None
    return calls or None, call_id if isinstance(call_id, str) else None


def _turn_starts(messages: list[Message]) -> list[int]:
    """Where the conversation starts with 0, 1, 2 ... oldest turns dropped (a turn: a user
    message and the reply that followed it), down to the last user message."""
    users_from = [0] * (len(messages) + 1)  # user messages in messages[i:]
    for index in range(len(messages) - 1, -1, -1):
        users_from[index] = users_from[index + 1] + (messages[index].role == "user")
    starts = [0]
    while users_from[starts[-1]] > 1:
        start = starts[-1] + 1
        while start < len(messages) and messages[start].role in ("assistant", "tool"):
            start += 1
        starts.append(start)
    return starts


def save_conversation(
    path: str | Path, session: ChatSession, settings: dict, model: str | None, adapter: str | None = None
) -> Path:
    payload = {"glmrepl": SAVE_FORMAT_VERSION, "model": model, "settings": settings, **session.to_dict()}
    if adapter:
        payload["adapter"] = adapter
    return write_text_atomic(path, json.dumps(payload, ensure_ascii=False, indent=2) + "\n")


def read_json_file(path: str | Path, invalid: str = "not JSON ({error})") -> tuple[Path, Any]:
    """(the file, its JSON); one-line errors for a missing, unreadable or invalid file
    (``invalid`` says what it is not, with the parser's ``{error}``)."""
    file = Path(path).expanduser()
    try:
        return file, json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GlmreplError(f"{file}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise GlmreplError(f"{file}: " + invalid.format(error=error)) from None
    except OSError as error:
        raise GlmreplError(f"{file}: cannot read it ({error.strerror})") from None


def read_conversation(path: str | Path) -> dict:
    """Read a saved conversation; one-line errors for missing or foreign files."""
    file, data = read_json_file(path, "not a glmrepl conversation (invalid JSON: {error})")
    if not isinstance(data, dict) or "messages" not in data or not isinstance(data["messages"], list):
        raise GlmreplError(f"{file}: not a glmrepl conversation (no 'messages' list)")
    for index, message in enumerate(data["messages"], 1):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise GlmreplError(f"{file}: message {index} has no role; it was not written by glmrepl")
        if not isinstance(message.get("content"), str):
            raise GlmreplError(f"{file}: message {index} has no text ('content'); it was not written by glmrepl")
    return data
