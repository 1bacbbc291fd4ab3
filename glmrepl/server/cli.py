"""``glmrepl serve MODEL``: load the model, then open the port.

Only the standard library is imported before the arguments are checked, so
``glmrepl serve --help`` and the bind-address refusal are instant.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

DEFAULT_MAX_QUEUE = 16


def build_parser() -> argparse.ArgumentParser:
    from ..main import add_model_arguments

    parser = argparse.ArgumentParser(
        prog="glmrepl serve",
        description="Serve one local checkpoint over HTTP: the OpenAI chat and completions API (/v1) and "
        "ChatGLM's api.py protocol (POST /).",
        epilog="Binds 127.0.0.1 unless told otherwise; any other address needs an API key. "
        "From another machine, forward the port over SSH (ssh -L 8000:127.0.0.1:8000 HOST).",
    )
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument(
        "--api-key",
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' (default: $GLMREPL_API_KEY; none on loopback)",
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=DEFAULT_MAX_QUEUE,
        metavar="N",
        help=f"requests that may wait for the model; the next gets 503 (default {DEFAULT_MAX_QUEUE})",
    )
    return parser


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    api_key = args.api_key if args.api_key is not None else os.environ.get("GLMREPL_API_KEY") or None
    if not is_loopback(args.host) and not api_key:
        print(
            f"error: refusing to serve on {args.host} without an API key: set --api-key or $GLMREPL_API_KEY, "
            "or keep 127.0.0.1 and forward the port over SSH",
            file=sys.stderr,
        )
        return 2
    if args.max_queue < 0:
        parser.error("--max-queue must be 0 or more")
    if args.model is None:
        parser.error("give a MODEL (a checkpoint folder or name) to serve")
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        print("error: glmrepl serve needs FastAPI and uvicorn: pip install 'glmrepl[serve]'", file=sys.stderr)
        return 1
    from ..config import load_config
    from ..main import generation_settings, load_options

    config = load_config()
    for problem in config.problems:
        print(f"warning: {problem}", file=sys.stderr)
    try:
        settings = generation_settings(args, config)
        options = load_options(args, config)
    except ValueError as error:
        parser.error(str(error))
    return serve(args, options, settings, api_key, config)


def serve(args, options, settings, api_key: str | None, config) -> int:
    from pathlib import Path

    from ..app import display_name
    from ..engine.backend import LocalBackend
    from ..engine.catalog import resolve_model
    from ..engine.errors import GlmreplError

    models_dir = args.models_dir or config.get("model", "models_dir") or None
    backend = LocalBackend(max_queue=args.max_queue)
    print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    try:
        path = resolve_model(args.model, Path(models_dir) if models_dir else None)
        status = backend.load_and_wait(options.for_model(path, display_name(args.model, path)))
    except GlmreplError as error:
        from ..hints import explain, flag_words

        print(f"error: {explain(error, flag_words)}", file=sys.stderr)
        return 1
    return run_server(backend, settings, api_key, args.host, args.port, status)


def run_server(backend, settings, api_key, host: str, port: int, status) -> int:
    import uvicorn

    from .app import create_app
    from .state import ServerState

    app = create_app(ServerState(backend, settings), api_key=api_key)
    where = f"[{host}]" if ":" in host else host
    print(
        f"serving {status.name} ({status.placement.describe()}, {status.format_name}) on http://{where}:{port} "
        f"· OpenAI API at /v1 · ChatGLM api.py at / · {'API key required' if api_key else 'no API key'}",
        file=sys.stderr,
        flush=True,
    )
    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", access_log=False, timeout_graceful_shutdown=5
    )
    server = uvicorn.Server(config)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    return 0 if server.started else 1
