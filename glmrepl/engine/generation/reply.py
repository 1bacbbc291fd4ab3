"""One reply being generated: its text deltas (stop strings applied, tool calls held back),
cancellation from any thread, and what it leaves: text, tool calls, stats, the form its family keeps.

Made by ``service.plan_reply``; nothing here knows about terminals or HTTP.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from typing import Any

from ..conversation.chat import FittedPrompt
from ..conversation.stops import StopStrings
from ..conversation.tool_calls import ParsedReply, ToolCall, ToolStream, parse_reply
from ..errors import GlmreplError
from ..protocols import PromptFormat
from ..status import TokenLogprob


class Reply:
    """One reply being generated: iterate for text deltas, then read the results.

    Iterate it in one thread; ``cancel`` may come from any thread and stops
    generation within one token. Ending the iteration (or ``close``) gives the
    queue place and the model lease back.
    """

    def __init__(
        self,
        run: Any,
        fitted: FittedPrompt,
        requested_max_new_tokens: int,
        prompt_format: PromptFormat,
        stop: list[str] | tuple[str, ...],
        release,
        keep_cache=None,
        tools: list[dict] | None = None,
        prefix: str = "",
    ):
        self.run = run
        self.prompt_ids = fitted.ids
        self._prefix = prefix  # the start of a forced call, already in the prompt (tool_calls.forced_prefix)
        # The functions the reply may call, and how its model writes a call (tool_calls.py).
        self.tool_names = {f["name"] for f in tools or []}
        self.tool_syntax = getattr(prompt_format, "tool_syntax", None) if tools else None
        self._parsed: ParsedReply | None | bool = False  # False: not read yet
        self._keep_cache = keep_cache
        self.prompt_tokens = len(fitted.ids)
        self.dropped_turns = fitted.dropped_turns
        self.max_new_tokens = fitted.max_new_tokens
        self.requested_max_new_tokens = requested_max_new_tokens
        self.prompt_format = prompt_format
        self._stops = StopStrings(stop)
        self._emitted: list[str] = []
        self._release = release
        self._closed = False
        self._deltas: Generator[str, None, None] | None = None

    # -- streaming -----------------------------------------------------------
    def __iter__(self) -> Iterator[str]:
        if self._deltas is not None or self._closed:
            raise GlmreplError("a reply can be streamed only once")
        self._deltas = iter(self.run)
        held = ToolStream(self.tool_syntax) if self.tool_syntax else None
        if held:
            held.push(self._prefix)
            held.shown = len(self._prefix)  # in the prompt, never streamed: only what follows is text
        yielded = False
        try:
            for delta in self._deltas:
                delta = self._stops.push(delta)
                if delta:
                    self._emitted.append(delta)
                    shown = held.push(delta) if held else delta
                    if shown:
                        yielded = True
                        yield shown
                if self._stops.hit:
                    self.run.cancel()
                    break
            tail = "" if self._stops.hit else self._stops.flush()
            if tail:
                self._emitted.append(tail)
            if held:  # the reply has ended: what was held back is text unless it is a call
                if not yielded and not self.tool_calls:
                    held.shown = 0  # a forced call that did not parse is text from its start, as unstreamed
                tail = held.push(tail) + held.finish(bool(self.tool_calls))
            if tail:
                yield tail
        finally:
            self.close()

    def cancel(self) -> None:
        self.run.cancel()

    def close(self) -> None:
        """Stop generating (if it still runs) and give the lease and queue place back."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._deltas is not None:
                self._deltas.close()  # waits for the worker to stop: the model is free after this
                if self._keep_cache is not None:
                    self._keep_cache(self)
        finally:
            ran = self._deltas is not None
            self._release(self.stats.new_tokens, self.stats.total_s if ran else None)

    def __enter__(self) -> Reply:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- results ---------------------------------------------------------------
    @property
    def stats(self):
        return self.run.stats

    @property
    def logprobs(self) -> list[TokenLogprob] | None:
        """The reply's tokens read so far, each with its log-probability (None: not asked for).
        The end-of-turn token is no part of the text and is not listed."""
        return self.logprobs_after(0)

    def logprobs_after(self, listed: int) -> list[TokenLogprob] | None:
        """``logprobs`` past the first ``listed`` of them (a stream's next chunk reads only those).
        Only a reply's last token can be an end-of-turn one, so the listed keep their positions."""
        if self.run.recorder is None:
            return None
        entries = self.run.token_logprobs[listed : len(self.stats.new_ids)]
        return [entry for entry in entries if entry is not None and entry.token_id not in self.run.stop_ids]

    @property
    def stopped_by_string(self) -> bool:
        return self._stops.hit

    @property
    def finish_reason(self) -> str:
        """ "stop" (end of turn or a stop string), "tool_calls", "length", or "cancelled"."""
        if self._stops.hit or self.stats.stop_reason == "end":
            return "tool_calls" if self.tool_calls else "stop"
        return self.stats.stop_reason

    @property
    def tool_calls(self) -> list[ToolCall]:
        """The calls the finished reply makes: none unless it ended by itself (a call cut by
        max_tokens is not one) and its text parses as calls of the listed functions."""
        if self._parsed is False:
            self._parsed = None
            ended = self._stops.hit or self.stats.stop_reason == "end"
            if self.tool_syntax and ended:
                self._parsed = parse_reply(self._raw_text(), self.tool_syntax, self.tool_names)
        return self._parsed.calls if isinstance(self._parsed, ParsedReply) else []

    def _raw_text(self) -> str:
        return self._prefix + self.streamed_text  # a forced call's start is in the prompt, not the deltas

    @property
    def hit_context_end(self) -> bool:
        """The reply stopped because the context was full, not at the asked length."""
        return self.finish_reason == "length" and self.max_new_tokens < self.requested_max_new_tokens

    @property
    def text(self) -> str:
        """The whole reply, decoded at once (authoritative over the deltas), tidied by its format;
        of a reply that makes tool calls, the text before them."""
        if self.tool_calls and isinstance(self._parsed, ParsedReply):
            return self._parsed.content or ""
        return self.prompt_format.clean_reply(self._raw_text())

    @property
    def streamed_text(self) -> str:
        """The reply as its deltas give it, before the format tidies it."""
        return "".join(self._emitted) if self._stops.hit else self.run.text()

    @property
    def kept(self) -> tuple[str, dict[str, str]] | None:
        """(prompt format name, message fields): the reply as the family's own chat() keeps it
        for the next prompt, where that differs from ``text``; None where the text is what it keeps.

        ChatGLM's chat() keeps a reply cut inside a character with the fragment's U+FFFD, which the
        text shown leaves out: the next prompt's ids match the release's only with it.
        """
        history_reply = getattr(self.prompt_format, "history_reply", None)
        # A stop string is glmrepl's own cut: kept as shown. A forced call's start is not in the ids.
        if history_reply is None or self._stops.hit or self._prefix:
            return None
        fields = history_reply(list(self.stats.new_ids))
        if self.tool_calls and "metadata" not in fields:  # the calls themselves are the reply kept
            return None
        return None if fields == {"content": self.text} else (self.prompt_format.name, fields)
