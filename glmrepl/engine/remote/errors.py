"""What went wrong between glmrepl and an OpenAI-compatible server, in one line each.

The client library's typed errors (status, headers, parsed body) become
``RemoteError``s that say what happened and what to do: start the server,
fix the key, pick a served model, wait as long as Retry-After says, or fix
the URL when it is not such a server at all. A refusal because the request
does not fit the model's context keeps the numbers the server gave, so the
backend can ask again with a reply that fits.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

from ..errors import GlmreplError, first_line

RETRY_HINT = "a message tries again"
# How servers word a context refusal: OpenAI, glmrepl and older vLLM say "maximum context length
# is N tokens. However, you requested M tokens (X in the messages, Y in the completion)" (or
# "X tokens in the messages" when the prompt alone is too long); newer vLLM "... maximum context
# length is N tokens and your request has X input tokens (Y > N - X)".
CONTEXT_LENGTH_WORDS = re.compile(r"maximum context length is (\d+)")
PROMPT_TOKENS_WORDS = re.compile(r"\((\d+) in the messages|(\d+) tokens in the messages|(\d+) input tokens")


@dataclass(frozen=True)
class ContextRefusal:
    """The server refused a request that does not fit the model's context; the numbers it gave."""

    context_length: int | None = None
    prompt_tokens: int | None = None

    @property
    def room(self) -> int | None:
        """Tokens left for the reply, when the server said both numbers (0 or less: none)."""
        if self.context_length is None or self.prompt_tokens is None:
            return None
        return self.context_length - self.prompt_tokens


class RemoteError(GlmreplError):
    """A request to the server failed; ``status`` is the HTTP status when there was one."""

    def __init__(self, message: str, status: int | None = None, retry_after_s: int | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s
        self.detail = ""  # the server's own words, when it answered with an error
        self.context_refusal: ContextRefusal | None = None


def explain(error: BaseException, backend: Any, action: str) -> RemoteError:
    """The one-line error for a failed request (``action`` says what was being done)."""
    import openai

    url = backend.base_url
    if isinstance(error, openai.APITimeoutError):
        return RemoteError(f"the server at {url} did not answer in time ({action}): is it overloaded? ({RETRY_HINT})")
    if isinstance(error, openai.APIConnectionError):
        return RemoteError(f"cannot reach the server at {url} ({_root_cause(error)}): is it running? ({RETRY_HINT})")
    if isinstance(error, openai.APIStatusError):
        explained = _status_error(error, backend)
        explained.detail = _detail(error)
        explained.context_refusal = context_refusal(error)
        return explained
    return RemoteError(f"{action} failed: {type(error).__name__}: {first_line(error)}")


def lost_mid_reply(error: BaseException | None, backend: Any) -> RemoteError:
    """The stream broke off: the server died, the network went, or the server sent an error event."""
    import openai

    if error is None:
        reason = "the stream ended before the reply did"
    elif isinstance(error, openai.APIError) and not isinstance(error, openai.APIConnectionError):
        reason = f"the server stopped the reply: {first_line(error)}"
    else:
        reason = _root_cause(error)
    return RemoteError(f"the connection to {backend.base_url} was lost mid-reply ({reason})")


def _status_error(error: Any, backend: Any) -> RemoteError:
    status, url = error.status_code, backend.base_url
    headers = error.response.headers
    content_type = headers.get("content-type", "")
    detail = _detail(error)
    said = f": {detail}" if detail else ""
    if status == 401:
        if backend.api_key:
            return RemoteError(
                f"the server at {url} refused the API key (401{said}): check --api-key or $GLMREPL_API_KEY", status
            )
        return RemoteError(
            f"the server at {url} needs an API key (401): pass --api-key KEY or set GLMREPL_API_KEY", status
        )
    if status in (429, 503):
        wait = retry_after(headers.get("retry-after"))
        when = "retry shortly" if wait is None else f"retry in {wait} s" if wait < 120 else f"retry in {wait // 60} min"
        return RemoteError(f"the server at {url} is busy ({status}{said}): {when}", status, wait)
    if "html" in content_type:
        return RemoteError(
            f"{url} is not an OpenAI-compatible API: it answered {status} with an HTML page "
            "(most servers serve the API under /v1)",
            status,
        )
    if status == 404 and "model" in detail.lower():
        return RemoteError(f"the server has no model {backend.model!r} (404{said}): /model lists its models", status)
    if status == 404:
        return RemoteError(
            f"{url} is not an OpenAI-compatible API (404 on {error.request.url.path}): "
            "check the URL (most servers serve the API under /v1)",
            status,
        )
    if status == 400 and "context" in detail.lower():
        return RemoteError(f"the server refused the conversation{said} (/clear or /undo makes room)", status)
    hint = " (/model lists the server's models)" if "model" in detail.lower() else ""
    return RemoteError(
        f"the server at {url} answered {status}{said or ' ' + error.response.reason_phrase}{hint}", status
    )


def context_refusal(error: Any) -> ContextRefusal | None:
    """A 400 saying the request does not fit the context (OpenAI's code, or words about the context)."""
    words = _server_words(error)
    if error.status_code != 400 or (error.code != "context_length_exceeded" and "context" not in words.lower()):
        return None
    body = error.body if isinstance(error.body, dict) else {}
    # llama-server says it in fields; the others only in words.
    return ContextRefusal(
        _count(body.get("n_ctx")) or _number_in(CONTEXT_LENGTH_WORDS, words),
        _count(body.get("n_prompt_tokens")) or _number_in(PROMPT_TOKENS_WORDS, words),
    )


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _number_in(pattern: re.Pattern, words: str) -> int | None:
    found = pattern.search(words)
    return int(next(group for group in found.groups() if group)) if found else None


def _detail(error: Any) -> str:
    return _server_words(error)[:200]


def _server_words(error: Any) -> str:
    """The server's own words: OpenAI {"error": {"message"}}, FastAPI {"detail"}, Ollama {"error": "..."}."""
    body = error.body
    if isinstance(body, dict):
        body = body.get("message") or body.get("detail") or body.get("error") or ""
    if isinstance(body, str):
        text = body
    elif body:
        text = json.dumps(body)
    else:
        text = ""
        if "html" not in error.response.headers.get("content-type", ""):
            try:
                text = error.response.text
            except Exception:  # a streamed body that was not read: no detail then
                text = ""
    return first_line(RuntimeError(text), "") if text.strip() else ""


def retry_after(value: str | None) -> int | None:
    """Seconds to wait from a Retry-After header (seconds or an HTTP date), or None."""
    if not value:
        return None
    try:
        return max(0, math.ceil(float(value)))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0, math.ceil((when - datetime.now(UTC)).total_seconds()))


def _root_cause(error: BaseException) -> str:
    """The innermost reason ("connection refused"), without errno prefixes."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__  # type: ignore[assignment]
    text = re.sub(r"^\[Errno -?\d+\]\s*", "", first_line(error))
    return text[:1].lower() + text[1:] if text else type(error).__name__
