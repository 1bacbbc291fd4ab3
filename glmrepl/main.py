"""Command line: parse arguments, build the app, run the REPL or one-shot mode.

Only light modules are imported here; torch and transformers load in the
background after the prompt is on screen.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import __version__

# Offline, always, before anything can import huggingface_hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

SETTING_FLAGS = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="glmrepl",
        description="Chat in the terminal with a Hugging Face checkpoint on local disk (offline).",
        epilog="In the REPL, /help lists the commands. Ctrl-C stops a reply, Ctrl-D exits.",
    )
    parser.add_argument("model", nargs="?", metavar="MODEL",
                        help="checkpoint folder, or a name in the models dir or the Hugging Face cache")
    parser.add_argument("--models-dir", metavar="DIR", help="where to look for checkpoints by name "
                        "(default: $GLMREPL_MODELS, else the XDG data dir)")
    parser.add_argument("--device", choices=("cpu", "gpu", "sharded", "auto"), help="where the model runs (default auto)")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), help="weight precision")
    parser.add_argument("--gpu", type=int, default=0, metavar="N", help="gpu mode: which GPU (default 0)")
    parser.add_argument("--gpus", type=_gpu_list, metavar="0,1,...", help="sharded mode: which GPUs (default all)")
    parser.add_argument("--max-gpu-memory", metavar="SIZE", help="sharded mode: budget per GPU, "
                        "e.g. 20GiB, or per GPU 0:20GiB,1:10GiB (default: 90%% of what is free)")
    parser.add_argument("--offload", action="store_true",
                        help="sharded mode: put layers that fit on no GPU on the CPU (slower)")
    parser.add_argument("--quantize", type=int, choices=(4, 8), metavar="{4,8}",
                        help="quantize a float ChatGLM checkpoint's layers to int4 or int8 while loading it")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="CPU compute threads (default: the physical cores available)")
    parser.add_argument("--family", choices=("chatglm1", "chatglm2", "chatglm3", "glm4"),
                        help="force the ChatGLM generation when detection is wrong")
    parser.add_argument("--system", metavar="TEXT", help="system prompt")
    parser.add_argument("--max-new-tokens", type=int, metavar="N")
    parser.add_argument("--temperature", type=float, metavar="T", help="0 means greedy")
    parser.add_argument("--top-p", type=float, metavar="P")
    parser.add_argument("--top-k", type=int, metavar="K")
    parser.add_argument("--repetition-penalty", type=float, metavar="R")
    parser.add_argument("--seed", type=int, metavar="S")
    parser.add_argument("-p", "--prompt", metavar="TEXT", help="print one reply to TEXT and exit")
    parser.add_argument("--no-history", action="store_true", help="do not keep typed lines between sessions")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow a checkpoint's own Python code to run (only for folders you trust)")
    parser.add_argument("--version", action="version", version=f"glmrepl {__version__}")
    return parser


def _gpu_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of GPU numbers like 0,1") from None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("download", "check", "list"):
        from . import tools

        return tools.main(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    from .config import load_config

    config = load_config()
    try:
        app = build_app(args, config)
    except ValueError as error:
        parser.error(str(error))  # exits with status 2
    if config.problem:
        print(f"warning: {config.problem}", file=sys.stderr)
    if args.prompt is not None:
        # -p text is always a message, even when it starts with "/".
        return run_script(app, args, ["/" + args.prompt if args.prompt.startswith("/") else args.prompt])
    if not sys.stdin.isatty():
        return run_script(app, args, sys.stdin)
    return run_interactive(app, args, config)


def build_app(args, config):
    from pathlib import Path

    from .app import App, LoadOptions
    from .engine.chat import ChatSession
    from .engine.manager import ModelManager
    from .engine.settings import Settings

    settings = Settings({"max_new_tokens": config.get("generation", "max_new_tokens", 512),
                         "stats": config.get("ui", "stats", True)})
    for key in SETTING_FLAGS:
        value = getattr(args, key)
        if value is not None:
            settings.set(key, value)  # ValueError names the valid range
    models_dir = args.models_dir or config.get("model", "models_dir") or None
    options = LoadOptions(mode=args.device or config.get("model", "device", "auto"),
                          dtype=args.dtype or config.get("model", "dtype", "auto"),
                          trust_remote_code=args.trust_remote_code, family=args.family,
                          gpu=args.gpu, gpus=args.gpus, max_gpu_memory=args.max_gpu_memory, offload=args.offload,
                          quantize=args.quantize)
    from .engine.cpu import request_threads

    request_threads(args.threads)  # ValueError -> usage error
    if args.max_gpu_memory:
        from .engine.placement import parse_gpu_memory

        parse_gpu_memory(args.max_gpu_memory, args.gpus or [0])  # ValueError -> usage error
    return App(ModelManager(), settings, ChatSession(args.system), Path(models_dir) if models_dir else None, options)


def load_or_report(app, target: str | None) -> bool:
    """Load synchronously for non-interactive use; the reason goes to stderr."""
    from .engine.errors import GlmreplError

    if target is None:
        print("error: give a MODEL (a checkpoint folder or name) for non-interactive use", file=sys.stderr)
        return False
    try:
        app.manager.load(app.load_request(target))
    except GlmreplError as error:
        print(f"error: {error}", file=sys.stderr)
        return False
    return True


def run_script(app, args, lines) -> int:
    """Non-interactive use (-p, piped stdin): plain replies on stdout, no stats line
    unless a /set in the input turns it on."""
    from .repl import run_piped

    if not load_or_report(app, args.model):
        return 1
    app.settings.user["stats"] = False
    return run_piped(app, lines, sys.stdout, sys.stderr)


def run_interactive(app, args, config) -> int:
    from .commands import TABLE
    from .config import history_file
    from .engine.errors import GlmreplError
    from .repl import Repl

    keep_history = config.get("ui", "history", True) and not args.no_history
    history_path = history_file() if keep_history else None
    if history_path:
        history_path.parent.mkdir(parents=True, exist_ok=True)
    repl = Repl(app, history_path=history_path)
    repl.renderer.text(f"glmrepl {__version__} · /help for commands · Ctrl-C stops a reply · Ctrl-D exits", "dim")
    if args.model:
        try:
            app.start_load(args.model)
        except GlmreplError as error:
            repl.renderer.error(str(error))
    else:
        repl.renderer.result(TABLE.dispatch(app, "/model"))
    repl.run()
    return 0
