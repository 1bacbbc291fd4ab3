"""A reply streaming from an OpenAI-compatible server, read as a local Reply is (remote.py sends it)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from ..conversation.tool_calls import StreamedCalls, ToolCall
from ..errors import GlmreplError
from ..status import GenerationStats
from .errors import lost_mid_reply


class Server(Protocol):
    """What a reply tells the backend that sent it (remote.RemoteBackend)."""

    base_url: str

    def note_usage(self, messages: list[dict], reply_text: str, total_tokens: int) -> None: ...


@dataclass
class RemoteStats(GenerationStats):
    """Timings measured here; token counts from the server's usage when it sends one."""

    usage_from_server: bool = False
    chunks: int = 0
    reused_tokens: int | None = None  # type: ignore[assignment]  # the server's cached_tokens, when it says


class RemoteReply:
    """One reply streaming from the server: iterate for text deltas, then read the results.

    Iterate it in one thread. Ctrl-C in that thread, ``close`` or ``cancel``
    (from any thread) close the HTTP stream at once; the partial reply stays,
    with finish_reason "cancelled".
    """

    dropped_turns = 0  # the server keeps or refuses the whole conversation
    stopped_by_string = False
    kept = None  # the server builds its own prompts: the reply is kept as shown

    def __init__(self, backend: Server, stream, sent_at: float, requested: int, sent: int | None, messages: list[dict]):
        self.backend = backend
        self.requested_max_new_tokens = requested
        self.max_new_tokens = requested if sent is None else sent  # less when fitted to the server's context
        self.stats = RemoteStats(prompt_tokens=None)  # type: ignore[arg-type]  # unknown until the server says
        self._stream = stream
        self._sent_at = sent_at
        self._messages = messages
        self._parts: list[str] = []
        self._calls = StreamedCalls()
        self._server_finish: str | None = None
        self._cancelled = threading.Event()
        self._started = self._ended = self._closed = False
        self._last_chunk_at: float | None = None

    def __iter__(self) -> Iterator[str]:
        if self._started or self._closed:
            raise GlmreplError("a reply can be streamed only once")
        self._started = True
        try:
            for chunk in self._stream:
                yield from self._take(chunk)
                if self._cancelled.is_set():
                    return
            self._ended = True
        except Exception as error:  # transport and protocol errors alike: the stream is gone
            if self._cancelled.is_set():
                return  # closed from another thread: a cancel, not a failure
            raise lost_mid_reply(error, self.backend) from None
        finally:
            self.close()
        if self._server_finish is None:
            raise lost_mid_reply(None, self.backend)

    def _take(self, chunk) -> Iterator[str]:
        usage = getattr(chunk, "usage", None)
        if usage is not None and getattr(usage, "completion_tokens", None) is not None:
            self.stats.usage_from_server = True
            self.stats.new_tokens = usage.completion_tokens
            self.stats.prompt_tokens = usage.prompt_tokens
            details = getattr(usage, "prompt_tokens_details", None)
            cached = getattr(details, "cached_tokens", None) if details is not None else None
            self.stats.reused_tokens = cached if isinstance(cached, int) else None
        for choice in getattr(chunk, "choices", None) or []:
            if getattr(choice, "index", 0) != 0:
                continue
            delta = getattr(choice, "delta", None)
            self._calls.add(getattr(delta, "tool_calls", None))
            text = getattr(delta, "content", None)
            if text:
                now = time.perf_counter()
                if self.stats.first_token_s is None:
                    self.stats.first_token_s = now - self._sent_at
                self._last_chunk_at = now
                self.stats.chunks += 1
                self._parts.append(text)
                yield text
            if getattr(choice, "finish_reason", None):
                self._server_finish = choice.finish_reason

    def cancel(self) -> None:
        self._cancelled.set()
        self._stream.close()  # the server sees the disconnect and stops generating

    def close(self) -> None:
        """Close the HTTP stream (if still open) and settle the figures."""
        if self._closed:
            return
        self._closed = True
        if not self._ended:
            self._cancelled.set()
        self._stream.close()
        end = self._last_chunk_at if self._ended and self._last_chunk_at else time.perf_counter()
        self.stats.total_s = end - self._sent_at
        if not self.stats.usage_from_server:
            self.stats.new_tokens = self.stats.chunks  # the best count there is: most servers send a token a chunk
        self.stats.stop_reason = "end" if self.finish_reason in ("stop", "tool_calls") else self.finish_reason
        if self.stats.usage_from_server and self.stats.prompt_tokens is not None:
            self.backend.note_usage(self._messages, self.text, self.stats.prompt_tokens + self.stats.new_tokens)

    def __enter__(self) -> RemoteReply:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def finish_reason(self) -> str:
        """ "stop", "tool_calls", "length", or "cancelled" (Ctrl-C, or the stream ended early)."""
        if self._server_finish is not None:
            if self._server_finish == "length":
                return "length"
            return "tool_calls" if self.tool_calls else "stop"
        return "cancelled" if self._cancelled.is_set() else "stop"

    @property
    def hit_context_end(self) -> bool:
        """Stopped for length with fewer tokens than asked: the server's context was full."""
        if self.finish_reason != "length":
            return False
        if self.max_new_tokens < self.requested_max_new_tokens:
            return True  # given only the room the context had, and it used it up
        return self.stats.usage_from_server and self.stats.new_tokens < self.requested_max_new_tokens

    @property
    def text(self) -> str:
        return "".join(self._parts)

    @property
    def tool_calls(self) -> list[ToolCall]:
        """The calls the server read from the reply (none for a reply cut short)."""
        return self._calls.calls() if self._server_finish not in (None, "length") else []
