"""What every route shares: the backend, the defaults from the command line, the thread pool.

Planning a reply can wait (for a move that holds the model, for the queue),
and a Reply is iterated in a thread: both happen in the server's own pool,
never on the event loop.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

from fastapi import Request

from ..engine import (
    SETTINGS,
    GenerateRequest,
    GlmreplError,
    LocalBackend,
    ModelStatus,
    NoModelLoaded,
    Reply,
    SamplingParams,
    Settings,
)
from .errors import APIError, api_error_from_engine
from .streaming import stream_deltas


@dataclass
class ServerState:
    backend: LocalBackend
    defaults: Settings = field(default_factory=Settings)  # --temperature, --max-new-tokens ... of `glmrepl serve`
    executor: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(64, "glmrepl-request"))
    started: int = field(default_factory=lambda: int(time.time()))

    def require_model(self, name: str | None = None) -> ModelStatus:
        """The loaded model; 404 when a request names another one (see ``answers_to``)."""
        status = self.backend.status()
        if status is None:
            raise api_error_from_engine(NoModelLoaded("no model is loaded"))
        if name is not None and not answers_to(status, name):
            raise APIError(
                404,
                f"The model '{name}' does not exist: this server serves '{status.name}'",
                param="model",
                code="model_not_found",
            )
        return status

    def sampling_for(
        self,
        status: ModelStatus,
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
    ) -> SamplingParams:
        """Sampling parameters: glmrepl's defaults < the model's < the command line's < the request's."""
        chosen = self.defaults.layers
        settings = Settings(
            chosen["/set"],
            defaults=chosen["default"],
            config_file=chosen["config file"],
            command_line=chosen["command line"],
        )
        settings.set_model_defaults(status.checkpoint_defaults, status.sampling_defaults)
        if max_tokens is not None:  # beyond the table's range the context check answers, naming the context
            settings.user["max_new_tokens"] = min(max_tokens, int(SETTINGS["max_new_tokens"].high or max_tokens))
        try:
            if temperature is not None:
                settings.set("temperature", temperature)
                settings.set("do_sample", temperature > 0)
            if top_p is not None:
                settings.set("top_p", top_p)
                if top_p == 0:
                    settings.set("do_sample", False)  # the limit of nucleus sampling: the top token
            if seed is not None:
                settings.set("seed", seed)
        except ValueError as error:
            raise APIError(400, str(error)) from None
        return SamplingParams.from_settings(settings)

    async def plan(self, request: GenerateRequest) -> Reply:
        """Plan in the pool (it may wait for a move); a reply nobody will read is closed."""
        future = self.executor.submit(partial(self.backend.generate, request))
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.add_done_callback(_close_if_planned)
            raise
        except GlmreplError as error:
            translated = api_error_from_engine(error)
            if request.completion and translated.param == "messages":
                translated.param = "prompt"  # /v1/completions has no messages
            raise translated from None

    async def collect(self, reply: Reply, request: Request) -> str:
        """The whole reply (non-streaming responses); a client that leaves cancels it within one token."""
        watcher = asyncio.create_task(_cancel_on_disconnect(request, reply))
        try:
            async for _ in stream_deltas(reply, self.executor):
                pass
        except GlmreplError as error:
            raise api_error_from_engine(error) from None
        finally:
            watcher.cancel()
            request.state.tokens = reply.stats.new_tokens
        return reply.text


async def _cancel_on_disconnect(request: Request, reply: Reply) -> None:
    """Wait for the client's disconnect (the body is read by now) and stop the reply at once."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            reply.cancel()
            return


# What common clients send as the model of a single-model server: huggingface_hub's
# InferenceClient(base_url=...) sends "dummy", TGI's own clients "tgi".
PLACEHOLDER_MODEL_NAMES = frozenset({"dummy", "tgi", "default"})


def answers_to(status: ModelStatus, name: str) -> bool:
    """The served model's name, its folder's name, or a placeholder (compared without case)."""
    wanted = name.strip().casefold()
    folder = getattr(status.path, "name", None)
    known = {status.name.casefold(), *((folder.casefold(),) if folder else ())}
    return wanted in known or wanted in PLACEHOLDER_MODEL_NAMES


def _close_if_planned(future) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().close()


def cache_namespace(request: Request, salt: str | None = None) -> str:
    """Whose caches a request may reuse: those of requests with its API key (named by its index,
    never the key) and its ``cache_salt``. Else a client could tell what another's prompt begins
    with from the cached tokens reported, or from how soon the first token comes. "" with neither."""
    key_index = getattr(request.state, "api_key_index", None)
    if key_index is None and salt is None:
        return ""
    return f"{'' if key_index is None else key_index}\0{salt or ''}"


def state_of(request: Request) -> ServerState:
    return request.app.state.glmrepl
