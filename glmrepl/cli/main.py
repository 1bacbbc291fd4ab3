"""Command line: parse arguments, build the app, run the REPL or one-shot mode.

Only light modules are imported here; torch and transformers load in the
background after the prompt is on screen.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .. import __version__
from ..engine import stay_offline, use_one_heap

if TYPE_CHECKING:
    from ..engine import Backend
from .arguments import add_model_arguments, generation_settings, load_options

EPILOG = """\
other commands (each has --help):
  glmrepl list               list the local checkpoints and whether each is ready
  glmrepl check DIR          verify a checkpoint folder offline; say what to fix
                             (--ppl FILE: then load it and print its perplexity on a text)
  glmrepl download REPO_ID   fetch what offline use of a hub repository needs (needs network)
  glmrepl serve MODEL        serve a model over HTTP (an OpenAI-style chat API)
  glmrepl quantize SRC DST --bits 4|8
                             write an int4/int8 copy of a checkpoint that loads as it is

In the REPL, /help lists the commands. Ctrl-C stops a reply, Ctrl-D exits."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="glmrepl",
        description="Chat in the terminal with a Hugging Face checkpoint on local disk (offline).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--connect",
        metavar="URL",
        help="chat with a model on an OpenAI-compatible server "
        "(glmrepl serve, transformers serve, vLLM, Ollama, llama-server), e.g. "
        "http://127.0.0.1:8000/v1; MODEL then names one of its models (default: the first)",
    )
    parser.add_argument("--api-key", metavar="KEY", help="--connect: the server's API key (default: $GLMREPL_API_KEY)")
    parser.add_argument("-p", "--prompt", metavar="TEXT", help="print one reply to TEXT and exit")
    parser.add_argument("--no-history", action="store_true", help="do not keep typed lines between sessions")
    parser.add_argument("--system", metavar="TEXT", help="system prompt")
    parser.add_argument("--version", action="version", version=f"glmrepl {__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        return dispatch(argv)
    except KeyboardInterrupt:  # Ctrl-C at any moment of a start-up: one line, the shell's convention
        print("error: interrupted", file=sys.stderr)
        return 130


def dispatch(argv: list[str] | None = None) -> int:
    """The command line's subcommand or the REPL."""
    stay_offline()  # before anything can import huggingface_hub
    use_one_heap()  # before any compute thread starts
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("download", "check", "list", "quantize"):
        from . import tools

        return tools.main(argv)
    if argv and argv[0] == "serve":
        from .serve import main as serve

        return serve(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    from ..repl.config import load_config

    config = load_config()
    try:
        app = build_app(args, config)
    except ValueError as error:
        parser.error(str(error))  # exits with status 2
    for problem in config.problems:
        print(f"warning: {problem}", file=sys.stderr)
    if args.family and args.model:
        _warn_if_family_ignored(app, args.model, args.family)
    if args.prompt is not None and not args.prompt.strip():
        parser.error("-p needs a message: TEXT is empty")
    # Output to a pipe or a file (`glmrepl MODEL | tee log`) is plain text, lines read as typed.
    plain = not (sys.stdin.isatty() and sys.stdout.isatty())
    if not args.model and not args.connect and (args.prompt is not None or plain):
        parser.error("give a MODEL (a checkpoint folder or name) for non-interactive use")
    try:
        if args.prompt is not None:
            # -p text is always a message, even when it starts with "/".
            return run_script(app, args, ["/" + args.prompt if args.prompt.startswith("/") else args.prompt])
        if plain:
            return run_script(app, args, sys.stdin)
    except KeyboardInterrupt:  # Ctrl-C while loading: the shell's convention for an interrupted command
        return 130
    return run_interactive(app, args, config)


def build_app(args, config):
    from ..engine import ChatSession
    from ..repl.app import App

    settings = generation_settings(args, config)  # ValueError names the valid range
    models_dir = args.models_dir or config.get("model", "models_dir") or None
    options = load_options(args, config)
    return App(
        build_backend(args), settings, ChatSession(args.system), Path(models_dir) if models_dir else None, options
    )


# Flags about loading a model here, which a server decides for itself.
LOCAL_ONLY_FLAGS = (
    "device",
    "dtype",
    "gpus",
    "max_gpu_memory",
    "offload",
    "quantize",
    "group_size",
    "family",
    "trust_remote_code",
)


def build_backend(args) -> Backend:
    """The model here (LocalBackend), or on a server with --connect (RemoteBackend)."""
    if not args.connect:
        if args.api_key:
            raise ValueError("--api-key goes with --connect URL")
        from ..engine import LocalBackend

        return LocalBackend()
    used = [f"--{flag.replace('_', '-')}" for flag in LOCAL_ONLY_FLAGS if getattr(args, flag)]
    if used:
        raise ValueError(f"{used[0]} cannot be used with --connect: the server loads and places the model")
    from ..engine import RemoteBackend

    # The variable may hold several keys for `glmrepl serve` (separated by commas): the first is this client's.
    return RemoteBackend(args.connect, args.api_key or os.environ.get("GLMREPL_API_KEY", "").split(",")[0].strip())


def _warn_if_family_ignored(app, target: str, family: str) -> None:
    import json

    from ..engine import GlmreplError, ignored_family_override, resolve_model

    try:
        config = json.loads((resolve_model(target, app.models_dir) / "config.json").read_text(encoding="utf-8"))
    except (GlmreplError, OSError, ValueError):
        return  # the load itself says what is wrong with the folder
    note = ignored_family_override(config, family)
    if note:
        print(f"warning: {note}", file=sys.stderr)


def load_or_report(app, target: str | None) -> bool:
    """Load synchronously for non-interactive use; the reason goes to stderr."""
    from ..engine import GlmreplError
    from ..repl.hints import explain, flag_words

    if app.backend.can("server_models"):
        return _choose_on_server(app, target)
    if target is None:
        print("error: give a MODEL (a checkpoint folder or name) for non-interactive use", file=sys.stderr)
        return False
    try:
        app.backend.load_and_wait(app.load_request(target))
    except GlmreplError as error:
        print(f"error: {explain(error, flag_words)}", file=sys.stderr)
        return False
    return True


def _choose_on_server(app, target: str | None) -> bool:
    job = app.start_load(target)
    job.wait()
    if job.error is not None:
        print(f"error: {job.error}", file=sys.stderr)
        return False
    return True


def run_script(app, args, lines) -> int:
    """Non-interactive use (-p, piped stdin): plain replies on stdout, no stats line
    unless a /set in the input turns it on."""
    from ..repl.loop import run_piped

    if not load_or_report(app, args.model):
        return 1
    app.settings.set("stats", False, "command line")
    return run_piped(app, lines, sys.stdout, sys.stderr)


def run_interactive(app, args, config) -> int:
    from ..engine import GlmreplError
    from ..repl.commands import TABLE
    from ..repl.config import history_file
    from ..repl.hints import explain
    from ..repl.loop import Repl

    keep_history = config.get("ui", "history", True) and not args.no_history
    history_path = history_file() if keep_history else None
    if history_path:
        try:
            history_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:  # a read-only or full disk costs the history, not the session
            print(
                f"warning: cannot keep the input history in {history_path.parent} ({error.strerror or error}); "
                "history is off",
                file=sys.stderr,
            )
            history_path = None
    repl = Repl(app, history_path=history_path)
    repl.renderer.text(f"glmrepl {__version__} · /help for commands · Ctrl-C stops a reply · Ctrl-D exits", "dim")
    if args.model or args.connect:
        try:
            app.start_load(args.model)
        except GlmreplError as error:
            repl.renderer.error(explain(error))
    else:
        repl.renderer.result(TABLE.dispatch(app, "/model"))
    repl.run()
    return 0
