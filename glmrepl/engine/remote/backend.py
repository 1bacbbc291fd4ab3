"""A backend on an OpenAI-compatible server: glmrepl serve, transformers serve, vLLM, Ollama, llama-server.

The same protocol as ``LocalBackend`` (see backend.py), so the REPL, its
commands and its rendering do not change: ``plan_reply`` sends the
conversation and returns a reply that streams text deltas, can be cancelled
(the HTTP stream is closed, so the server stops), and records like a local one.
The reply is never asked for more tokens than the server's context holds: a
server that refuses a reply that does not fit is asked once more with the
room it says is left (or without a limit when it does not say).

HTTP and server-sent events go through the ``openai`` client library: it
speaks this API to any base URL, lists ``/v1/models``, and gives typed errors
that carry the status and headers (Retry-After). It is imported in the
background, never at module level. Only the URL the user gave is contacted:
environment proxies, netrc and OpenAI environment settings are ignored.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..contract import Abilities, NextToken
from ..conversation.chat import ChatSession
from ..conversation.tool_calls import wire_messages
from ..errors import GlmreplError, LoadCancelled
from ..request import GenerateRequest, LoadOptions, OutputFormat, SamplingParams
from ..status import ModelStatus
from .errors import ContextRefusal, RemoteError, explain
from .reply import RemoteReply

# Settings the OpenAI chat API has a field for; the others stay in this process.
SENT_SETTINGS = ("max_new_tokens", "temperature", "top_p", "seed", "do_sample")
LOCAL_ONLY_SETTINGS = ("stats",)
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 300.0  # between two chunks: a busy CPU server may take long for a first token


def normalize_url(url: str) -> str:
    """The API base URL: ``host:port`` and ``http://host:port`` mean ``http://host:port/v1``."""
    text = url.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in text):
        raise ValueError(f"--connect needs an http(s) URL like http://127.0.0.1:8000/v1, not {url!r}")
    try:
        _ = parts.port  # raises on a port that is not a number
    except ValueError:
        raise ValueError(f"--connect: {url!r} has an invalid port") from None
    path = parts.path.rstrip("/") or "/v1"
    return f"{parts.scheme}://{parts.netloc}{path}"


@dataclass(frozen=True)
class ServerModel:
    """One entry of the server's /v1/models."""

    name: str
    owned_by: str | None = None
    context_length: int | None = None

    @property
    def path(self) -> str:  # listings compare entries with the current model by path
        return self.name


@dataclass
class ServerPlacement:
    """Where the model runs, as front ends show a placement."""

    server: str
    reason: str | None = None
    mode: str = "remote"
    summary: str | None = None
    dtype: str = ""  # the server does not say

    def describe(self) -> str:
        return f"at {self.server}"


class ServerJob:
    """Choosing a model on the server in the background, shown like a load (Ctrl-C cancels)."""

    request: LoadOptions | None = None  # no local load to try again

    def __init__(self, status: str, work: Callable[[Callable[[], bool]], None]):
        self.status = status
        self.done = threading.Event()
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        threading.Thread(target=self._run, args=(work,), name="glmrepl-connect", daemon=True).start()

    def _run(self, work) -> None:
        try:
            work(self._still_wanted)
        except BaseException as error:  # handed to the front end, which reports it in one line
            with self._lock:
                if not self.done.is_set():
                    self.error = error
        finally:
            self.done.set()

    def _still_wanted(self) -> bool:
        """Called by the work just before it applies its result; False once cancelled."""
        with self._lock:
            return not self.done.is_set()

    def cancel(self) -> None:
        with self._lock:
            if not self.done.is_set():
                self.error = LoadCancelled(f"{self.status} was cancelled")
                self.done.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)


class RemoteBackend(Abilities):
    """The model of an OpenAI-compatible server; nothing is loaded in this process."""

    abilities = frozenset({"next_tokens", "server_models"})
    unavailable_where = "on a remote server (the model runs in the server's process)"

    def __init__(self, url: str, api_key: str | None = None, model: str | None = None):
        self.base_url = normalize_url(url)
        parts = urlsplit(self.base_url)
        self.server = parts.netloc + ("" if parts.path == "/v1" else parts.path)
        self.api_key = api_key or None
        self.model = model
        self.context_length: int | None = None
        self.serial = 0
        self._reason: str | None = None
        self._job: ServerJob | None = None
        self._client = None
        self._client_lock = threading.Lock()
        self._usage_supported: bool | None = None  # stream_options.include_usage accepted?
        self._usage_mark: tuple | None = None

    # -- the client ----------------------------------------------------------------
    @property
    def client(self):
        with self._client_lock:
            if self._client is None:
                self._client = self._build_client()
            return self._client

    def _build_client(self):
        import openai

        timeout = openai.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
        # trust_env=False: no proxy from the environment, no netrc: the given URL is the only host contacted.
        return openai.OpenAI(
            base_url=self.base_url,
            api_key=self.api_key or "unused",
            max_retries=0,
            timeout=timeout,
            http_client=openai.DefaultHttpxClient(trust_env=False, timeout=timeout),
        )

    def _headers(self) -> dict:
        """Per-request headers: no Authorization without a key, no OpenAI account ids from the environment."""
        import openai

        omitted = ["OpenAI-Organization", "OpenAI-Project"] + ([] if self.api_key else ["Authorization"])
        return {name: openai.Omit() for name in omitted}

    def _call(self, action: str, request: Callable[[], Any]):
        """Run one request; library errors become one-line RemoteErrors."""
        try:
            return request()
        except GlmreplError:
            raise
        except KeyboardInterrupt:
            raise RemoteError(f"{action} was interrupted before the server answered") from None
        except Exception as error:
            raise explain(error, self, action) from None

    # -- models ---------------------------------------------------------------------
    def list_models(self, models_dir: Path | None = None, beside: Path | None = None) -> list[ServerModel]:
        """The server's /v1/models (``models_dir`` is a local notion and is ignored)."""
        raw = self._call(
            "listing the server's models",
            lambda: self.client.models.with_raw_response.list(extra_headers=self._headers()),
        )
        return parse_models(raw.headers.get("content-type", ""), raw.text, self.base_url)

    def select_model(self, name: str | None = None) -> ServerJob:
        """Check ``name`` against the server's list (the first listed when None) and use it."""
        job = ServerJob(f"connecting to {self.server}", lambda still_wanted: self._select(name, still_wanted))
        self._job = job
        return job

    def load(self, request: LoadOptions) -> ServerJob:
        """The protocol's load: on a server it only chooses among the served models."""
        return self.select_model(request.name or str(request.path))

    def _select(self, name: str | None, still_wanted: Callable[[], bool]) -> None:
        try:
            models = self.list_models()
        except RemoteError as error:
            if name is not None and error.status is None and still_wanted():
                self._use(name, None, None)  # unreachable for now: a later message asks for this model
            raise
        if not models:
            raise RemoteError(f"the server at {self.base_url} lists no models")
        chosen = models[0] if name is None else find_model(models, name, self.base_url)
        reason = f"{len(models)} models on the server: /model lists them" if len(models) > 1 else None
        if still_wanted():
            self._use(chosen.name, chosen.context_length, reason)

    def _use(self, name: str | None, context_length: int | None, reason: str | None) -> None:
        if name != self.model:
            self.serial += 1
        self.model, self.context_length, self._reason = name, context_length, reason

    @property
    def job(self) -> ServerJob | None:
        return self._job

    def loading(self) -> bool:
        return self._job is not None and not self._job.done.is_set()

    def status(self) -> ModelStatus:
        """Always a status: a server is there to ask even before it answered (a message retries)."""
        # transformers serve names models by their folder: show the folder's name, keep the id as the path.
        name = (
            (self.model.rstrip("/").rsplit("/", 1)[-1] if self.model.startswith("/") else self.model)
            if self.model
            else "no model chosen yet"
        )
        return ModelStatus(
            self.serial,
            name,
            self.model or "",
            "remote",
            None,
            None,
            ServerPlacement(self.server, self._reason),
            "server's chat template",
            True,
            self.context_length,
            tool_syntax="server",  # the server parses the calls
        )

    def refuse(self, ability: str, command: str) -> GlmreplError:
        if ability == "perplexity":  # every token's probability, which a chat API does not give for a text
            return GlmreplError(
                f"perplexity needs a local model: the model at {self.server} runs in the server's process "
                "(start glmrepl with the checkpoint folder instead of --connect)"
            )
        return super().refuse(ability, command)

    def where(self) -> str:
        return self.base_url

    # -- replies ----------------------------------------------------------------------
    def generate(self, request: GenerateRequest) -> RemoteReply:
        """Send the conversation; the returned reply streams the answer.

        The server applies its own context policy (an error when it does not
        fit), so the request's fit policy does not apply here.
        """
        if request.completion:
            raise RemoteError("completion mode is not available on a remote server")
        if request.force_call is not None:
            raise RemoteError("a forced tool call is not available on a remote server")
        if self.model is None:
            self._select(None, lambda: True)
        messages, tools = wire_messages(request.conversation.as_dicts())
        params = request_params(request.sampling, self.context_length)
        if tools:  # the server builds the prompt, and reads the calls back from the model's reply
            params["tools"] = tools
        if request.stop:
            params["stop"] = list(request.stop)
        if request.output_format is not None:
            params["response_format"] = response_format(request.output_format)
        sent_at = time.perf_counter()
        stream, sent = self._open_fitted_stream(messages, params)
        requested = request.sampling.max_new_tokens
        return RemoteReply(self, stream, sent_at, requested, sent.get("max_tokens"), messages)

    def _open_fitted_stream(self, messages: list[dict], params: dict) -> tuple[Any, dict]:
        """The stream and the parameters that opened it.

        Servers refuse (400) a max_tokens that does not fit beside the prompt, and only
        they can count the prompt's tokens: so ask once more with the room they say is left.
        """
        try:
            return self._open_stream(messages, params), params
        except RemoteError as error:
            fitted = refitted(params, error.context_refusal)
            if fitted is None:
                raise
            return self._open_stream(messages, fitted), fitted

    def _open_stream(self, messages: list[dict], params: dict):
        def create(with_usage: bool):
            extra = {"stream_options": {"include_usage": True}} if with_usage else {}
            return self.client.chat.completions.create(
                model=self.model, messages=messages, stream=True, extra_headers=self._headers(), **extra, **params
            )

        if self._usage_supported is False:
            stream = self._call("sending the message", lambda: create(False))
        else:
            try:
                stream = self._call("sending the message", lambda: create(True))
                self._usage_supported = True
            except RemoteError as error:
                if self._usage_supported or error.status not in (400, 422) or "stream_options" not in str(error):
                    raise
                # Some servers reject stream_options (and name it): ask again without it, and remember.
                stream = self._call("sending the message", lambda: create(False))
                self._usage_supported = False
        check_stream(stream, self.base_url)
        return stream

    def context_usage(self, conversation: ChatSession, max_new_tokens: int = 0) -> tuple[int, int | None] | None:
        """Tokens the server counted for the conversation as it stands after the last reply, if it did
        (the server fits the context itself, so the reply's room changes nothing here)."""
        if self._usage_mark is None or not conversation.messages:
            return None
        count, last, system, tokens = self._usage_mark
        if (len(conversation.messages), conversation.messages[-1].content, conversation.system) != (
            count,
            last,
            system,
        ):
            return None
        return tokens, self.context_length

    def note_usage(self, messages: list[dict], reply_text: str, total_tokens: int) -> None:
        system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
        count = sum(1 for m in messages if m["role"] != "system") + 1
        self._usage_mark = (count, reply_text, system, total_tokens)

    def next_tokens(self, conversation: ChatSession, k: int) -> list[NextToken]:
        """/next from a server that returns top_logprobs (vLLM, llama-server...): (text, "-", probability)."""
        if not conversation.messages:
            raise GlmreplError("the conversation is empty: there is nothing to continue")
        if self.model is None:
            self._select(None, lambda: True)
        unavailable = f"/next is not available: the server at {self.base_url} returns no top_logprobs"
        try:
            answer = self._call(
                "asking for the next tokens",
                lambda: self.client.chat.completions.create(
                    model=self.model,
                    messages=conversation.as_dicts(),
                    max_tokens=1,
                    temperature=0,
                    logprobs=True,
                    top_logprobs=k,
                    extra_headers=self._headers(),
                ),
            )
        except RemoteError as error:
            if error.status in (400, 422):
                raise RemoteError(f"{unavailable} ({error.status}: {error.detail})", error.status) from None
            raise
        try:
            top = answer.choices[0].logprobs.content[0].top_logprobs
        except (AttributeError, IndexError, TypeError):
            top = None
        if not top:
            raise RemoteError(unavailable)
        return [(entry.token, "-", math.exp(entry.logprob)) for entry in top]  # token ids are the server's

    # -- what a server cannot do ------------------------------------------------------------
    @staticmethod
    def setting_note(key: str) -> str | None:
        """One line for /set when a setting does not reach the server."""
        if key in SENT_SETTINGS or key in LOCAL_ONLY_SETTINGS:
            return None
        return "not sent to a remote server: the OpenAI chat API has no field for it"


def response_format(output_format: OutputFormat) -> dict[str, Any]:
    """OpenAI's response_format for the format (the server holds the reply to it)."""
    if output_format.schema is None:
        return {"type": "json_object"}
    schema = {"name": "reply", "schema": json.loads(output_format.schema), "strict": output_format.strict}
    return {"type": "json_schema", "json_schema": schema}


def request_params(sampling: SamplingParams, context_length: int | None = None) -> dict:
    """OpenAI chat parameters from the sampling parameters; temperature 0 (or do_sample off) means greedy.

    A reply is never asked for more than the server's context, when the server said it.
    """
    max_tokens = sampling.max_new_tokens
    if context_length:
        max_tokens = min(max_tokens, context_length)
    params: dict[str, Any] = {"max_tokens": max_tokens}
    if not sampling.do_sample or sampling.temperature == 0:
        params["temperature"] = 0
    else:
        params.update(temperature=sampling.temperature, top_p=sampling.top_p)
    if sampling.seed is not None:
        params["seed"] = sampling.seed
    return params


def refitted(params: dict, refusal: ContextRefusal | None) -> dict | None:
    """The parameters to ask again with after the server refused them for the context, or None
    when asking again cannot help (another error, no max_tokens to give up, the prompt alone too long)."""
    asked = params.get("max_tokens")
    if refusal is None or asked is None:
        return None
    room = refusal.room
    if room is not None and not 0 < room < asked:
        return None
    fitted = {key: value for key, value in params.items() if key != "max_tokens"}
    if room is not None:
        fitted["max_tokens"] = room
    # else the server did not say how many tokens the prompt has: it picks the reply's length itself
    return fitted


def parse_models(content_type: str, text: str, base_url: str) -> list[ServerModel]:
    """Entries of a /v1/models answer; anything else means the URL is not such a server."""
    import json

    not_api = RemoteError(
        f"{base_url} is not an OpenAI-compatible API: GET /models answered "
        f"{_describe_body(content_type, text)} (most servers serve the API under /v1)"
    )
    try:
        data = json.loads(text)
    except ValueError:
        raise not_api from None
    entries = data.get("data") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise not_api
    models = []
    for entry in entries:
        if isinstance(entry, dict) and isinstance(entry.get("id"), str):
            length = entry.get("max_model_len") or entry.get("context_length")
            models.append(ServerModel(entry["id"], entry.get("owned_by"), length if isinstance(length, int) else None))
    return models


def _describe_body(content_type: str, text: str) -> str:
    if "html" in content_type or text.lstrip()[:1] == "<":
        return "with an HTML page"
    return f"with {content_type or 'an unknown content type'}, not a model list"


def find_model(models: list[ServerModel], name: str, base_url: str) -> ServerModel:
    """The served model called ``name``: its id, else its folder name or its name without a tag, when unique."""
    for model in models:
        if model.name == name:
            return model
    wanted = name.lower()
    for short in (_folder_name, _untagged):  # /srv/models/qwen as qwen; Ollama's qwen2.5:latest as qwen2.5
        matches = [m for m in models if short(m.name).lower() == wanted]
        if len(matches) == 1:
            return matches[0]
    listed = ", ".join(m.name for m in models[:8]) + (", ..." if len(models) > 8 else "")
    raise RemoteError(f"no model {name!r} on the server at {base_url} (it serves: {listed})")


def _folder_name(model_id: str) -> str:
    return model_id.rstrip("/").rsplit("/", 1)[-1]


def _untagged(model_id: str) -> str:
    return model_id.rsplit(":", 1)[0]


def check_stream(stream, base_url: str) -> None:
    """A chat stream must be server-sent events; an HTML page means the URL is something else."""
    content_type = stream.response.headers.get("content-type", "")
    if "text/event-stream" in content_type:
        return
    text = ""
    if "html" in content_type:
        stream.close()
    else:
        text = stream.response.read().decode("utf-8", "replace")[:200]
        stream.close()
    raise RemoteError(
        f"{base_url} did not stream the reply: POST /chat/completions answered {_describe_body(content_type, text)}"
    )
