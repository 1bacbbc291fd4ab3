"""The folder tools: ``glmrepl download``, ``check``, ``list`` and ``quantize``.

They share the checks the loader makes (:mod:`glmrepl.engine.models.checkpoint`) and
the catalog the REPL's ``/model`` listing shows (:mod:`glmrepl.engine.models.catalog`).
Nothing heavy is imported at module level: ``glmrepl --help`` stays instant,
and ``check`` and ``list`` never import torch (``quantize`` does, once it runs).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from ..common.units import counted

COMMANDS = ("download", "check", "list", "quantize")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glmrepl", description="Get, verify and list checkpoint folders.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    download = commands.add_parser("download", help="download what offline use of a hub repository needs")
    download.add_argument("repo_id", metavar="REPO_ID", help="the repository, e.g. THUDM/chatglm3-6b")
    download.add_argument(
        "--to", metavar="DIR", help="destination folder (default: the models dir, under the repository's name)"
    )
    download.add_argument("--revision", metavar="REV", help="branch, tag or commit (default: main)")
    download.add_argument(
        "--weights",
        choices=("safetensors", "bin", "all"),
        default="safetensors",
        help="which weight files to fetch: 'safetensors' (default) takes the .safetensors "
        "files, or the .bin files when the repository has none; 'bin' prefers the .bin files "
        "the same way; 'all' takes every weights file in every format (TensorFlow, Flax, "
        "ONNX and GGUF too)",
    )
    download.add_argument("--models-dir", metavar="DIR", help="models dir for the default destination")

    check = commands.add_parser("check", help="verify a checkpoint folder offline (exit 1 when not ready)")
    check.add_argument("folder", metavar="DIR")
    check.add_argument(
        "--trust-remote-code", action="store_true", help="accept a checkpoint that needs its own Python code"
    )
    add_perplexity_arguments(check)

    listing = commands.add_parser("list", help="list local checkpoints (models dir and Hugging Face cache)")
    listing.add_argument(
        "--models-dir",
        metavar="DIR",
        help="where checkpoints are kept (default: $GLMREPL_MODELS, else the XDG data dir)",
    )
    listing.add_argument(
        "--trust-remote-code", action="store_true", help="count checkpoints that need their own Python code as ready"
    )
    add_quantize_parser(commands)
    return parser


def add_quantize_parser(commands) -> None:
    quantize = commands.add_parser(
        "quantize", help="write an int4/int8 copy of a checkpoint folder that loads without re-quantizing"
    )
    quantize.add_argument("source", metavar="SRC", help="the float checkpoint folder")
    quantize.add_argument("dest", metavar="DST", help="the folder to write (must not exist, unless --force)")
    quantize.add_argument("--bits", type=int, choices=(4, 8), required=True, help="bits per weight")
    quantize.add_argument(
        "--group-size",
        type=int,
        choices=(32, 64, 128),
        help="input columns sharing one scale (default: 32 for int4, 64 for int8)",
    )
    quantize.add_argument(
        "--head", action="store_true", help="quantize the output head too (a tied head gets its own copy)"
    )
    quantize.add_argument("--force", action="store_true", help="replace DST if it exists")
    quantize.add_argument(
        "--trust-remote-code", action="store_true", help="run the checkpoint's own Python code to build the model"
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "models_dir", None) is None and args.command in ("download", "list"):
        args.models_dir = configured_models_dir(sys.stderr)
    handler = {"download": run_download, "check": run_check, "list": run_list, "quantize": run_quantize}[args.command]
    return handler(args, sys.stdout, sys.stderr)


def configured_models_dir(err) -> str | None:
    """config.toml's models_dir, as the REPL reads it (the command line's --models-dir wins)."""
    from ..repl.config import load_config

    config = load_config()
    for problem in config.problems:
        print(f"warning: {problem}", file=err)
    return config.get("model", "models_dir") or None


# -- download --------------------------------------------------------------------


def run_download(args, out, err) -> int:
    from ..engine import GlmreplError, download_checkpoint

    try:
        result = download_checkpoint(
            args.repo_id, args.to, revision=args.revision, weights=args.weights, models_dir=args.models_dir
        )
    except GlmreplError as error:
        print(f"error: {error}", file=err)
        return 1
    print(
        f"downloaded {counted(len(result.files), 'file')} of {result.repo_id} at {result.revision[:12]} to {result.path}",
        file=out,
    )
    return run_check(argparse.Namespace(folder=str(result.path), trust_remote_code=True), out, err)


# -- check -----------------------------------------------------------------------


def folder_problems(folder, *, trust_remote_code: bool = False) -> list[str]:
    """The manifest's verdict on every file, then the loader's structural checks, without repeats."""
    from ..engine import find_problems, manifest_problems

    problems = manifest_problems(folder) + find_problems(folder, trust_remote_code=trust_remote_code)
    return list(dict.fromkeys(problems))


def run_check(args, out, err) -> int:
    stray = [flag for flag in PERPLEXITY_FLAGS if getattr(args, flag, None) not in (None, "auto")]
    if stray and not getattr(args, "ppl", None):
        print(f"error: --{stray[0]} goes with --ppl FILE (it is about loading the model)", file=err)
        return 2
    misplaced = misplaced_compare_flag(args)
    if misplaced:
        print(f"error: {misplaced}", file=err)
        return 2
    problems = folder_problems(args.folder, trust_remote_code=args.trust_remote_code)
    for problem in problems:
        print(problem, file=out)
    if problems:
        return 1
    print("ready", file=out)
    if getattr(args, "compare", None):
        return run_comparison(args, out, err)
    return run_perplexity(args, out, err) if getattr(args, "ppl", None) else 0


# -- check --ppl: load the model and score a text ----------------------------------


PERPLEXITY_FLAGS = ("window", "stride", "device", "dtype", "quantize", "adapter")
COMPARE_FLAGS = ("compare_quantize", "compare_dtype", "compare_adapter")


def add_perplexity_arguments(check: argparse.ArgumentParser) -> None:
    scoring = check.add_argument_group("perplexity (loads the model)")
    scoring.add_argument("--ppl", metavar="FILE", help="print the model's perplexity on a UTF-8 text file")
    scoring.add_argument(
        "--window", type=_positive, metavar="N", help="tokens per forward (default: the context, at most 1024)"
    )
    scoring.add_argument("--stride", type=_positive, metavar="N", help="tokens between windows (default: half)")
    scoring.add_argument(
        "--device", choices=("cpu", "gpu", "sharded", "auto"), default="auto", help="where the model runs"
    )
    scoring.add_argument(
        "--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto", help="weight precision"
    )
    scoring.add_argument("--quantize", type=int, choices=(4, 8), help="quantize ChatGLM layers to int4 or int8")
    scoring.add_argument("--adapter", metavar="DIR", help="a LoRA or P-tuning v2 folder to put on the model")
    comparing = check.add_argument_group("comparison on the --ppl text (loads both models)")
    comparing.add_argument(
        "--compare",
        metavar="DIR",
        help="print the KL divergence per token and the same top-1 share of another checkpoint folder "
        "(or of the same one with --compare-quantize, --compare-dtype or --compare-adapter) against the model",
    )
    comparing.add_argument("--compare-quantize", type=int, choices=(4, 8), help="quantize the other model")
    comparing.add_argument(
        "--compare-dtype", choices=("auto", "float32", "bfloat16", "float16"), help="the other model's precision"
    )
    comparing.add_argument("--compare-adapter", metavar="DIR", help="an adapter to put on the other model")


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of tokens")
    return int(text)


def run_perplexity(args, out, err) -> int:
    """Load the folder as the REPL would and print its perplexity on ``args.ppl``; 130 on Ctrl-C."""
    from pathlib import Path

    return _text_job(args, lambda backend: backend.start_perplexity(Path(args.ppl), args.window, args.stride), out, err)


def _text_job(args, start, out, err) -> int:
    """Load the folder, run ``start(backend)``'s job over ``args.ppl`` with a progress bar and print
    its result; 1 on an error, 130 on Ctrl-C (a bad text file is said before the model loads)."""
    from pathlib import Path

    from ..engine import GlmreplError, LocalBackend, read_text
    from ..repl.hints import explain, flag_words

    folder, backend = Path(args.folder), LocalBackend()
    try:
        read_text(args.ppl)
        backend.load_and_wait(check_load_options(args).for_model(folder, folder.name))
        job = start(backend)
        _wait_with_progress(job, err)
    except GlmreplError as error:
        print(f"error: {explain(error, flag_words)}", file=err)
        return 1
    except KeyboardInterrupt:  # while loading: the shell's convention for an interrupted command
        print("error: interrupted", file=err)
        return 130
    if job.error is not None:
        print(f"error: {explain(job.error, flag_words)}", file=err)
        return 130 if job.cancel_event.is_set() else 1
    assert job.result is not None  # a job that ended without an error has its result
    print(job.result.describe(), file=out)
    return 0


def check_load_options(args):
    """How ``check --ppl`` loads the model: --device, --dtype, --quantize, --adapter."""
    from pathlib import Path

    from ..engine import LoadOptions

    return LoadOptions(
        mode=args.device,
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
        quantize=args.quantize,
        adapter=Path(args.adapter).expanduser() if args.adapter else None,
    )


# -- check --ppl FILE --compare DIR: the two models on one text ----------------------


def misplaced_compare_flag(args) -> str | None:
    """Why the comparison flags cannot be used as given, or None."""
    if getattr(args, "compare", None) and not getattr(args, "ppl", None):
        return "--compare goes with --ppl FILE (the text the two models are compared on)"
    stray = [flag for flag in COMPARE_FLAGS if getattr(args, flag, None) is not None]
    if stray and not getattr(args, "compare", None):
        return f"--{stray[0].replace('_', '-')} goes with --compare DIR (it is about the other model)"
    return None


def run_comparison(args, out, err) -> int:
    """Load the folder, then the --compare one, and print their figures on ``args.ppl``; 130 on Ctrl-C."""
    from pathlib import Path

    from ..engine import Variant

    other = Path(args.compare).expanduser()
    problems = folder_problems(other, trust_remote_code=args.trust_remote_code)
    if problems:
        print(f"error: --compare {args.compare}: {problems[0]}", file=err)
        return 1
    options = check_load_options(args)
    variant = Variant(
        options=replace(options, quantize=None, adapter=None).for_model(other, other.name),
        quantize=args.compare_quantize,
        dtype=args.compare_dtype,
        adapter=Path(args.compare_adapter).expanduser() if args.compare_adapter else None,
    )
    return _text_job(
        args, lambda backend: backend.start_compare_text(variant, Path(args.ppl), args.window, args.stride), out, err
    )


def _wait_with_progress(job, err) -> None:
    """Wait for the job, redrawing a bar on a terminal's stderr; Ctrl-C cancels it."""
    from ..repl.render import progress_bar

    terminal = hasattr(err, "isatty") and err.isatty()
    try:
        while not job.wait(0.2):
            if terminal:
                err.write(f"\r\x1b[K{progress_bar(job.fraction)} {job.status}")
                err.flush()
    except KeyboardInterrupt:
        job.cancel()
        job.wait()
    if terminal:
        err.write("\r\x1b[K")


# -- list ------------------------------------------------------------------------


def run_list(args, out, err) -> int:
    from ..engine import LISTING_COLUMNS, default_models_dir, find_checkpoints, listing_cells

    models_dir = default_models_dir(args.models_dir)
    entries = find_checkpoints(models_dir, trust_remote_code=args.trust_remote_code)
    if not entries:
        print(f"no checkpoints in {models_dir} or the Hugging Face cache", file=out)
        return 0
    headings = [column.upper() for column in LISTING_COLUMNS] + ["PATH"]
    rows = [headings] + [listing_cells(entry) + [str(entry.path)] for entry in entries]
    for line in format_table(rows):
        print(line, file=out)
    if not all(entry.ready for entry in entries):
        print("glmrepl check PATH says what is wrong with a checkpoint and how to fix it", file=err)
    return 0


def format_table(rows) -> list[str]:
    """Left-aligned columns; the last column (the path) is never padded."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return ["  ".join([cell.ljust(width) for cell, width in zip(row, widths)] + [row[-1]]) for row in rows]


# -- quantize ----------------------------------------------------------------------


def run_quantize(args, out, err) -> int:
    from ..engine import GlmreplError, quantize_checkpoint

    try:
        layout = quantize_checkpoint(
            args.source,
            args.dest,
            args.bits,
            args.group_size,
            include_head=args.head,
            overwrite=args.force,
            trust_remote_code=args.trust_remote_code,
        )
    except GlmreplError as error:
        print(f"error: {error}", file=err)
        return 1
    head = ", the head too" if layout.head else ""
    print(
        f"wrote {args.dest}: {len(layout.modules)} linears at int{layout.bits}, "
        f"groups of {layout.group_size} columns{head}",
        file=out,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
