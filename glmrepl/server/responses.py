"""The response bodies and stream chunks of the OpenAI API, plain dicts shaped exactly as OpenAI's."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from ..engine import TokenLogprob


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage, with the prompt tokens whose KV came from an earlier request's cache."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


class ResponseShape:
    """Builds the bodies and stream chunks of one chat or completions response."""

    def __init__(self, kind: Literal["chat", "text"], model: str):
        self.kind = kind
        self.model = model
        self.id = new_id("chatcmpl" if kind == "chat" else "cmpl")
        self.created = int(time.time())

    def _envelope(self, object_name: str, choices: list) -> dict[str, Any]:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model, "choices": choices}

    def complete(
        self,
        text: str,
        finish_reason: str,
        prompt_tokens: int,
        completion_tokens: int,
        cached_tokens: int = 0,
        tool_calls: list | None = None,
        logprobs: list[TokenLogprob] | None = None,
    ) -> dict:
        listed = self.logprobs(logprobs)
        if self.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if tool_calls:  # OpenAI's shape: content null when the reply is only calls
                message = {"role": "assistant", "content": text or None, "tool_calls": _calls_out(tool_calls)}
            choice = {"index": 0, "message": message, "logprobs": listed, "finish_reason": finish_reason}
            body = self._envelope("chat.completion", [choice])
        else:
            body = self._envelope(
                "text_completion", [{"index": 0, "text": text, "logprobs": listed, "finish_reason": finish_reason}]
            )
        body["usage"] = usage(prompt_tokens, completion_tokens, cached_tokens)
        return body

    def chunk(
        self,
        delta: str | None = None,
        *,
        first: bool = False,
        finish_reason: str | None = None,
        with_usage: bool = False,
        logprobs: list[TokenLogprob] | None = None,
    ) -> dict:
        """One streamed chunk: the role first (chat), then content deltas, then the finish reason;
        ``logprobs``: those of the tokens read since the chunk before (None: not asked for)."""
        listed = self.logprobs(logprobs)
        if self.kind == "chat":
            content: dict[str, Any] = {}
            if first:
                content = {"role": "assistant", "content": ""}
            elif delta is not None:
                content = {"content": delta}
            choice = {"index": 0, "delta": content, "logprobs": listed, "finish_reason": finish_reason}
            body = self._envelope("chat.completion.chunk", [choice])
        else:
            choice = {"index": 0, "text": delta or "", "logprobs": listed, "finish_reason": finish_reason}
            body = self._envelope("text_completion", [choice])
        if with_usage:
            body["usage"] = None  # every chunk carries it when asked; only the last one has figures
        return body

    text_offset = 0  # completions' text_offset of the next token listed

    def logprobs(self, entries: list[TokenLogprob] | None) -> dict[str, Any] | None:
        """OpenAI's logprobs object of these tokens: chat's ``content`` list, or the completions
        API's parallel lists (with each token's alternatives as a {token: logprob} map)."""
        if entries is None:
            return None
        if self.kind == "chat":
            return {"content": [_chat_logprob(entry) for entry in entries], "refusal": None}
        offsets = []
        for entry in entries:
            offsets.append(self.text_offset)
            self.text_offset += len(entry.token)
        return {
            "tokens": [entry.token for entry in entries],
            "token_logprobs": [entry.logprob for entry in entries],
            "top_logprobs": [{other.token: other.logprob for other in entry.top} for entry in entries],
            "text_offset": offsets,
        }

    def tool_call_chunks(self, tool_calls: list, with_usage: bool = False) -> list[dict]:
        """The calls in OpenAI's incremental shape: for each, a first delta with its index, id, type
        and name (arguments empty), then one with its arguments, which clients append by index.

        The arguments come whole: a reply is known to make a call only once it has ended and
        parsed (text that looks like a call may not be one), so there is nothing to send earlier.
        """
        chunks = []
        for index, call in enumerate(_calls_out(tool_calls)):
            name = {**call, "function": {"name": call["function"]["name"], "arguments": ""}}
            arguments = {"function": {"arguments": call["function"]["arguments"]}}
            chunks += [self._tool_call_chunk({"index": index, **part}, with_usage) for part in (name, arguments)]
        return chunks

    def _tool_call_chunk(self, delta: dict, with_usage: bool) -> dict:
        choice = {"index": 0, "delta": {"tool_calls": [delta]}, "logprobs": None, "finish_reason": None}
        body = self._envelope("chat.completion.chunk", [choice])
        if with_usage:
            body["usage"] = None
        return body

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
        object_name = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        body = self._envelope(object_name, [])
        body["usage"] = usage(prompt_tokens, completion_tokens, cached_tokens)
        return body


def _chat_logprob(entry: TokenLogprob) -> dict[str, Any]:
    top = [{"token": other.token, "logprob": other.logprob, "bytes": list(other.bytes)} for other in entry.top]
    return {"token": entry.token, "logprob": entry.logprob, "bytes": list(entry.bytes), "top_logprobs": top}


def _calls_out(tool_calls: list) -> list[dict]:
    return [
        {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
        for call in tool_calls
    ]
