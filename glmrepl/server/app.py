"""The FastAPI application: routes, error handlers, middleware, over one backend."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from importlib import resources
from typing import Any, TextIO

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response

from .. import __version__
from . import chatglm_api, openai_api
from .errors import install_error_handlers
from .middleware import AccessLog, CheckHost, ContainErrors, HostRule, LimitBody, RequireApiKey
from .openapi import document_as_answered
from .state import ServerState, state_of

MAX_BODY_BYTES = 4 * 2**20


def create_app(
    state: ServerState,
    api_keys: Sequence[str] = (),
    max_body_bytes: int = MAX_BODY_BYTES,
    log_stream: TextIO | None = None,
    hosts: HostRule | None = None,
    body_timeout: float | None = None,
) -> FastAPI:
    """The app; ``hosts`` defaults to the loopback rule (a server bound to 127.0.0.1), and a body
    has ``body_timeout`` seconds after its head to arrive (None: as long as it takes). With
    ``api_keys``, a request needs one of them, and each key's requests share no cache with another's."""
    app = FastAPI(
        title="glmrepl",
        version=__version__,
        docs_url=None,
        redoc_url=None,
        description="OpenAI-compatible chat and completions, and ChatGLM's api.py, on one local model.",
    )
    app.state.glmrepl = state
    app.include_router(openai_api.router)
    app.include_router(chatglm_api.router)
    app.add_api_route("/health", health, methods=["GET"])
    # HEAD answers as GET does, headers only (the server drops the body); left out of the document.
    app.add_api_route("/health", health, methods=["HEAD"], include_in_schema=False)
    app.add_api_route("/", chat_page, methods=["GET"], response_class=HTMLResponse, summary="The chat page")
    app.add_api_route("/", chat_page, methods=["HEAD"], include_in_schema=False)
    app.add_api_route("/favicon.ico", no_icon, methods=["GET", "HEAD"], include_in_schema=False)
    install_error_handlers(app)
    document_as_answered(app, keyed=any(api_keys))
    # Added last is outermost: the log sees every answer, including 403, 401, 413 and 500.
    app.add_middleware(LimitBody, limit=max_body_bytes, timeout=body_timeout)
    app.add_middleware(RequireApiKey, api_keys=api_keys)
    app.add_middleware(CheckHost, rule=hosts or HostRule("127.0.0.1"))
    app.add_middleware(ContainErrors)
    app.add_middleware(AccessLog, stream=log_stream)
    return app


async def health(request: Request) -> dict[str, Any]:
    """``ready`` with the model and its device, or ``loading``; open without a key."""
    backend = state_of(request).backend
    status = backend.status()
    ready = status is not None and not backend.loading()
    batching = backend.batching_status()
    return {
        "status": "ready" if ready else "loading",
        "model": status.name if status else None,
        "device": status.placement.describe() if status else None,
        "context_length": status.context_length if status else None,
        "replies": backend.replies_status(),
        "batching": {key: batching[key] for key in ("enabled", "max_batch", "why_not")},
        "kv_cache": backend.kv_status(),
    }


async def no_icon() -> Response:
    """Browsers ask for /favicon.ico with every page: no icon, and no 404 in the log for it."""
    return Response(status_code=204)


async def chat_page() -> HTMLResponse:
    """The self-contained chat page shipped in the package (no CDN, no build step)."""
    return HTMLResponse(
        _page_html(),
        headers={
            "Content-Security-Policy": PAGE_POLICY,
            "X-Content-Type-Options": "nosniff",
            "Cache-Control": "no-cache",
        },
    )


# The page's own inline style and script, and requests to this server only: even if a reply's
# text ever reached the DOM as markup, nothing from elsewhere could load or run.
PAGE_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


@lru_cache(maxsize=1)
def _page_html() -> str:
    return resources.files("glmrepl").joinpath("web/index.html").read_text(encoding="utf-8")
