"""Command line: parse arguments, build the app, run the REPL or one-shot mode.

Only light modules are imported here; torch and transformers load in the
background after the prompt is on screen.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import __version__
from .engine import stay_offline

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

SETTING_FLAGS = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed")


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


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """MODEL and the load and generation options, shared by the REPL and `glmrepl serve`."""
    parser.add_argument(
        "model",
        nargs="?",
        metavar="MODEL",
        help="checkpoint folder, or a name in the models dir or the Hugging Face cache",
    )
    parser.add_argument(
        "--models-dir",
        metavar="DIR",
        help="where to look for checkpoints by name (default: $GLMREPL_MODELS, else the XDG data dir)",
    )
    parser.add_argument(
        "--device", choices=("cpu", "gpu", "sharded", "auto"), help="where the model runs (default auto)"
    )
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), help="weight precision")
    parser.add_argument("--gpu", type=int, default=0, metavar="N", help="gpu mode: which GPU (default 0)")
    parser.add_argument("--gpus", type=_gpu_list, metavar="0,1,...", help="sharded mode: which GPUs (default all)")
    parser.add_argument(
        "--max-gpu-memory",
        metavar="SIZE",
        help="sharded mode: budget per GPU, e.g. 20GiB, or per GPU 0:20GiB,1:10GiB (default: 90%% of what is free)",
    )
    parser.add_argument(
        "--offload", action="store_true", help="sharded mode: put layers that fit on no GPU on the CPU (slower)"
    )
    parser.add_argument(
        "--quantize",
        type=int,
        choices=(4, 8),
        metavar="{4,8}",
        help="quantize a float checkpoint's linear layers to int4 or int8 while loading it "
        "(group-wise scales; ChatGLM keeps THUDM's per-row layout)",
    )
    parser.add_argument(
        "--group-size",
        type=int,
        choices=(32, 64, 128),
        metavar="{32,64,128}",
        help="with --quantize: input columns sharing one scale (default 32 for int4, 64 for int8)",
    )
    parser.add_argument(
        "--adapter", metavar="DIR", help="a LoRA (PEFT) or ChatGLM P-tuning v2 folder to put on the model"
    )
    parser.add_argument(
        "--merge-adapter",
        action="store_true",
        help="fold the --adapter LoRA into the float weights (faster; /adapter off then needs a reload)",
    )
    parser.add_argument(
        "--threads", type=int, metavar="N", help="CPU compute threads (default: the physical cores available)"
    )
    parser.add_argument(
        "--family",
        choices=("chatglm1", "chatglm2", "chatglm3", "glm4"),
        help="force the ChatGLM generation when detection is wrong",
    )
    parser.add_argument("--max-new-tokens", type=int, metavar="N")
    parser.add_argument("--temperature", type=float, metavar="T", help="0 means greedy")
    parser.add_argument("--top-p", type=float, metavar="P")
    parser.add_argument("--top-k", type=int, metavar="K")
    parser.add_argument("--repetition-penalty", type=float, metavar="R")
    parser.add_argument("--seed", type=int, metavar="S")
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow a checkpoint's own Python code to run (only for folders you trust)",
    )


def _gpu_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of GPU numbers like 0,1") from None


def main(argv: list[str] | None = None) -> int:
    stay_offline()  # before anything can import huggingface_hub
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("download", "check", "list", "quantize"):
        from . import tools

        return tools.main(argv)
    if argv and argv[0] == "serve":
        from .server.cli import main as serve

        return serve(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    from .config import load_config

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
    if not args.model and not args.connect and (args.prompt is not None or not sys.stdin.isatty()):
        parser.error("give a MODEL (a checkpoint folder or name) for non-interactive use")
    try:
        if args.prompt is not None:
            # -p text is always a message, even when it starts with "/".
            return run_script(app, args, ["/" + args.prompt if args.prompt.startswith("/") else args.prompt])
        if not sys.stdin.isatty():
            return run_script(app, args, sys.stdin)
    except KeyboardInterrupt:  # Ctrl-C while loading: the shell's convention for an interrupted command
        return 130
    return run_interactive(app, args, config)


def generation_settings(args, config):
    """Settings from the defaults, the config file and the command line; ValueError names the valid range."""
    from .engine.settings import Settings

    flags = {key: getattr(args, key) for key in SETTING_FLAGS if getattr(args, key) is not None}
    return Settings(defaults=config.settings("defaults"), config_file=config.settings("user"), command_line=flags)


def build_app(args, config):
    from .app import App
    from .engine.chat import ChatSession

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


def build_backend(args):
    """The model here (LocalBackend), or on a server with --connect (RemoteBackend)."""
    if not args.connect:
        if args.api_key:
            raise ValueError("--api-key goes with --connect URL")
        from .engine.backend import LocalBackend

        return LocalBackend()
    used = [f"--{flag.replace('_', '-')}" for flag in LOCAL_ONLY_FLAGS if getattr(args, flag)]
    if used:
        raise ValueError(f"{used[0]} cannot be used with --connect: the server loads and places the model")
    from .engine.remote import RemoteBackend

    return RemoteBackend(args.connect, args.api_key or os.environ.get("GLMREPL_API_KEY"))


def load_options(args, config):
    """The one LoadOptions of a front end, from the command line and the config file."""
    from .engine.loading import LoadOptions

    options = LoadOptions(
        mode=args.device or config.get("model", "device", "auto"),
        dtype=args.dtype or config.get("model", "dtype", "auto"),
        trust_remote_code=args.trust_remote_code,
        family=args.family,
        gpu=args.gpu,
        gpus=args.gpus,
        max_gpu_memory=args.max_gpu_memory,
        offload=args.offload,
        quantize=args.quantize,
        group_size=args.group_size,
        adapter=Path(args.adapter).expanduser() if args.adapter else None,
        merge_adapter=args.merge_adapter,
    )
    if args.group_size and not args.quantize:
        raise ValueError("--group-size goes with --quantize 4|8")
    from .engine.cpu import request_threads

    request_threads(args.threads)  # ValueError -> usage error
    if args.max_gpu_memory:
        from .engine.placement import parse_gpu_memory

        parse_gpu_memory(args.max_gpu_memory, args.gpus or [0])  # ValueError -> usage error
    return options


def _warn_if_family_ignored(app, target: str, family: str) -> None:
    import json

    from .engine.catalog import resolve_model
    from .engine.errors import GlmreplError
    from .engine.families import ignored_family_override

    try:
        config = json.loads((resolve_model(target, app.models_dir) / "config.json").read_text(encoding="utf-8"))
    except (GlmreplError, OSError, ValueError):
        return  # the load itself says what is wrong with the folder
    note = ignored_family_override(config, family)
    if note:
        print(f"warning: {note}", file=sys.stderr)


def load_or_report(app, target: str | None) -> bool:
    """Load synchronously for non-interactive use; the reason goes to stderr."""
    from .engine.errors import GlmreplError
    from .hints import explain, flag_words

    if hasattr(app.backend, "select_model"):
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
    from .repl import run_piped

    if not load_or_report(app, args.model):
        return 1
    app.settings.set("stats", False, "command line")
    return run_piped(app, lines, sys.stdout, sys.stderr)


def run_interactive(app, args, config) -> int:
    from .commands import TABLE
    from .config import history_file
    from .engine.errors import GlmreplError
    from .hints import explain
    from .repl import Repl

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
