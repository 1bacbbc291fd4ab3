"""What the REPL and `glmrepl serve` share on their command lines: the model flags, and the
settings and load options built from them and the config file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SETTING_FLAGS = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed")


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
        "--float-head",
        action="store_true",
        help="keep a quantized model's output head float on the CPU (default: int8, "
        "a tied embedding reading the same bytes)",
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


def generation_settings(args, config):
    """Settings from the defaults, the config file and the command line; ValueError names the valid range."""
    from ..engine import Settings

    flags = {key: getattr(args, key) for key in SETTING_FLAGS if getattr(args, key) is not None}
    return Settings(defaults=config.settings("defaults"), config_file=config.settings("user"), command_line=flags)


def load_options(args, config):
    """The one LoadOptions of a front end, from the command line and the config file."""
    from ..engine import LoadOptions

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
        float_head=args.float_head,
        adapter=Path(args.adapter).expanduser() if args.adapter else None,
        merge_adapter=args.merge_adapter,
    )
    if args.group_size and not args.quantize:
        raise ValueError("--group-size goes with --quantize 4|8")
    from ..engine import request_threads

    too_many = request_threads(args.threads)  # ValueError -> usage error
    if too_many:
        print(f"warning: {too_many}", file=sys.stderr)
    if args.max_gpu_memory:
        from ..engine import parse_gpu_memory

        parse_gpu_memory(args.max_gpu_memory, args.gpus or [0])  # ValueError -> usage error
    return options
