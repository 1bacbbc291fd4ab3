"""``glmrepl serve MODEL``: load the model, then open the port.

Only the standard library is imported before the arguments are checked, so
``glmrepl serve --help`` and the bind-address refusal are instant.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import sys

DEFAULT_MAX_QUEUE = 16
DEFAULT_MAX_BATCH = 8
PREFIX_CACHE_ENTRIES = 64
DEFAULT_IDLE_TIMEOUT = 10.0
MIN_MAX_CONNECTIONS = 64  # the default cap, raised with --max-queue: every waiting reply is a connection


def build_parser() -> argparse.ArgumentParser:
    from .arguments import add_model_arguments

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
        action="append",
        metavar="KEY",
        help="require 'Authorization: Bearer KEY'; repeatable, any of the keys is accepted and the requests of "
        "one key never reuse the caches of another's (default: $GLMREPL_API_KEY, several separated by commas; "
        "none on loopback)",
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=DEFAULT_MAX_QUEUE,
        metavar="N",
        help=f"requests that may wait for the model; the next gets 503 (default {DEFAULT_MAX_QUEUE})",
    )
    parser.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also answer requests whose Host is NAME (repeatable); others get 403, so that a web page "
        "re-pointed at this address cannot use the server (default: localhost, loopback addresses, --host)",
    )
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=DEFAULT_IDLE_TIMEOUT,
        metavar="SECONDS",
        help="a connection must send a whole request head this long after connecting or after its last "
        "answer, and the body this long after its head (else 408); an answer its client leaves unread "
        f"this long is cut off (default {DEFAULT_IDLE_TIMEOUT:g})",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        metavar="N",
        help="requests answered at once, each from its whole arrival to the end of its answer: idle and "
        "slow connections never count; one more gets 503, /health excepted. Idle connections are held "
        f"up to 16 per N, the longest idle closed first (default {MIN_MAX_CONNECTIONS}, or --max-queue + 16 "
        "when that is more)",
    )
    parser.add_argument(
        "--max-batch",
        type=int,
        default=DEFAULT_MAX_BATCH,
        metavar="N",
        help="concurrent replies decoded together in one batch (transformers' continuous batching); a reply "
        f"alone keeps the one-sequence path (default {DEFAULT_MAX_BATCH})",
    )
    parser.add_argument(
        "--no-batching",
        action="store_true",
        help="no batch: concurrent replies take turns, 16 tokens at a time",
    )
    parser.add_argument(
        "--kv-budget-mb",
        type=int,
        metavar="MB",
        help="memory for KV caches: the batch's paged pool (half, at most 512 MB) and the caches of recent "
        "requests (the rest) share it (default: a quarter of the memory available at start, 256 to 2048)",
    )
    parser.add_argument(
        "--prefix-cache-mb",
        type=int,
        metavar="MB",
        help="at most this much of the KV budget for the caches of recent requests, so a client resending its "
        "conversation has only the new tokens read; least recently used dropped first, 0 turns them off",
    )
    return parser


def bind_name(host: str) -> str:
    """The address to bind: an IPv6 address may be written in brackets, as in a URL."""
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def shown_host(host: str) -> str:
    """The host as a URL writes it: an IPv6 address in brackets."""
    name = bind_name(host)
    return f"[{name}]" if ":" in name else name


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
    api_keys = api_keys_of(args.api_key, os.environ.get("GLMREPL_API_KEY"))
    if not is_loopback(args.host) and not api_keys:
        print(
            f"error: refusing to serve on {args.host} without an API key: set --api-key or $GLMREPL_API_KEY, "
            "or keep 127.0.0.1 and forward the port over SSH",
            file=sys.stderr,
        )
        return 2
    check_numbers(parser, args)
    if args.model is None:
        parser.error("give a MODEL (a checkpoint folder or name) to serve")
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        print("error: glmrepl serve needs FastAPI and uvicorn: pip install 'glmrepl[serve]'", file=sys.stderr)
        return 1
    from ..repl.config import load_config
    from .arguments import generation_settings, load_options

    config = load_config()
    for problem in config.problems:
        print(f"warning: {problem}", file=sys.stderr)
    try:
        settings = generation_settings(args, config)
        options = load_options(args, config)
    except ValueError as error:
        parser.error(str(error))
    return serve(args, options, settings, api_keys, config)


def api_keys_of(given: list[str] | None, environment: str | None) -> list[str]:
    """The keys to accept: each --api-key, else those of $GLMREPL_API_KEY (separated by commas);
    blank ones dropped (``--api-key ''`` asks for none), each once, in order: a key's place is its cache's name."""
    keys = given if given is not None else (environment or "").split(",")
    return list(dict.fromkeys(key.strip() for key in keys if key.strip()))


def check_numbers(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.max_queue < 0:
        parser.error("--max-queue must be 0 or more")
    if not 0 <= args.port <= 65535:
        parser.error("--port must be between 0 and 65535")
    if not args.idle_timeout > 0 or math.isinf(args.idle_timeout):
        parser.error("--idle-timeout must be a number of seconds above 0")
    if args.max_connections is None:
        args.max_connections = max(MIN_MAX_CONNECTIONS, args.max_queue + 16)
    elif args.max_connections < 1:
        parser.error("--max-connections must be 1 or more")
    if args.prefix_cache_mb is not None and args.prefix_cache_mb < 0:
        parser.error("--prefix-cache-mb must be 0 or more")
    if args.kv_budget_mb is not None and args.kv_budget_mb < 1:
        parser.error("--kv-budget-mb must be 1 or more")
    if args.max_batch < 1:
        parser.error("--max-batch must be 1 or more")


def serve(args, options, settings, api_keys: list[str], config) -> int:
    from pathlib import Path

    from ..engine import GlmreplError, LocalBackend, default_kv_budget_mb, resolve_model
    from ..repl.app import display_name

    models_dir = args.models_dir or config.get("model", "models_dir") or None
    try:
        path = resolve_model(args.model, Path(models_dir) if models_dir else None)
    except GlmreplError as error:
        return load_failed(error)
    # Bound before the load, so a taken port is said at once; listening (and so answering) after it.
    sockets = bind_port(args.host, args.port)
    if sockets is None:
        return 1
    backend = LocalBackend(max_queue=args.max_queue)
    if not args.no_batching and args.max_batch > 1:
        backend.enable_batching(args.max_batch)
    # Many conversations share one server: up to PREFIX_CACHE_ENTRIES caches within the budget.
    budget_mb = args.kv_budget_mb or default_kv_budget_mb()
    cap = None if args.prefix_cache_mb is None else args.prefix_cache_mb * 2**20
    backend.set_kv_budget(budget_mb * 2**20, cap, PREFIX_CACHE_ENTRIES)
    print(f"loading {args.model} ...", file=sys.stderr, flush=True)
    try:
        status = backend.load_and_wait(options.for_model(path, display_name(args.model, path)))
    except GlmreplError as error:
        return load_failed(error)
    backend.warm_batch()
    return run_server(backend, settings, api_keys, args, sockets, status)


def load_failed(error) -> int:
    from ..repl.hints import explain, flag_words

    print(f"error: {explain(error, flag_words)}", file=sys.stderr)
    return 1


def bind_port(host: str, port: int):
    """The bound sockets, or None after saying in one line why the port cannot be had."""
    from ..server.listening import bind

    try:
        return bind(bind_name(host), port)
    except OSError as error:
        cannot_listen(host, port, error)
        return None


def listen(sockets, backlog: int, host: str, port: int) -> bool:
    try:
        for sock in sockets:
            sock.listen(backlog)
    except OSError as error:  # another process took the port while the model loaded
        cannot_listen(host, port, error)
        return False
    return True


def cannot_listen(host: str, port: int, error: OSError) -> None:
    reason = error.strerror or str(error)
    print(f"error: cannot listen on {shown_host(host)}:{port}: {reason[:1].lower()}{reason[1:]}", file=sys.stderr)


def run_server(backend, settings, api_keys: list[str], args, sockets, status) -> int:
    from ..server.app import create_app
    from ..server.listening import AnnouncedServer
    from ..server.middleware import HostRule
    from ..server.state import ServerState

    hosts = HostRule(bind_name(args.host), args.allow_host)
    state = ServerState(backend, settings)
    app = create_app(state, api_keys=api_keys, hosts=hosts, body_timeout=args.idle_timeout)
    config = uvicorn_config(app, args)
    port = sockets[0].getsockname()[1]  # the port asked for, or the one given for --port 0
    line = start_line(status, f"http://{shown_host(args.host)}:{port}", api_keys, backend.batching_status())
    server = AnnouncedServer(config, line)
    if not listen(sockets, config.backlog, args.host, port):
        return 1
    try:
        server.run(sockets=sockets)
    except KeyboardInterrupt:
        pass
    finally:
        backend.stop()
    return 0 if server.started else 1


def uvicorn_config(app, args):
    import uvicorn

    from ..server.listening import guarded_settings

    return uvicorn.Config(
        app,
        **guarded_settings(args.idle_timeout, args.max_connections),
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
    )


def start_line(status, url: str, api_keys: list[str], batching: dict) -> str:
    return (
        f"serving {status.name} ({status.placement.describe()}, {status.format_name}) on {url} "
        f"· chat page at / · OpenAI API at /v1 · ChatGLM api.py at POST / · "
        f"{key_words(api_keys)} · {batching_words(batching)}"
    )


def key_words(api_keys: list[str]) -> str:
    if len(api_keys) > 1:
        return f"API key required (any of {len(api_keys)}, each with caches of its own)"
    return "API key required" if api_keys else "no API key"


def batching_words(batching: dict) -> str:
    if batching["enabled"]:
        return f"up to {batching['max_batch']} replies decoded together"
    if batching["why_not"] == "off":
        return "replies take turns"
    return f"replies take turns ({batching['why_not']})"
