"""What a response format's mask and logprobs cost a decoded token: part of `make bench`.

    python benchmarks/structured.py [--repeats 3] [--new-tokens 64] [--quantize 4|8] [--threads N] [--smoke]

On the Qwen2-0.5B-shaped checkpoint (benchmarks/checkpoint.py, a 151,936-token vocabulary), in
this process through ``LocalBackend.generate`` as the REPL and the server ask for a reply,
greedy, one reply at a time, three variants taking turns each round so that drift on the
machine hits all of them:

- plain: free text;
- schema: held to ``{"text": string of at least 100,000 characters}``, so that the random
  model writes the whole --new-tokens inside the string and the mask works at every step;
- logprobs: free text, each token's log-probability and 5 alternatives recorded.

Decode tokens/s are taken after the first token (the prompt and, for the schema, its compile
are not in them). Target: schema >= 0.9x plain. The schema's first compile and a cached one
are timed too. Figures go to the terminal and to benchmarks/results/<date>-structured.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import smoke

HERE = Path(__file__).resolve().parent
TARGET = 0.9
SCHEMA = {"type": "object", "properties": {"text": {"type": "string", "minLength": 100_000}}, "required": ["text"]}
VARIANTS = ("plain", "schema", "logprobs")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the three variants")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens each reply generates")
    parser.add_argument("--quantize", type=int, choices=(4, 8), help="load int4 or int8 (default float32)")
    parser.add_argument("--threads", type=int, help="compute threads (default: the physical cores)")
    parser.add_argument("--cache", type=Path, default=HERE / "cache", help="where the checkpoint is built")
    parser.add_argument("--results", type=Path, help="where the JSON goes (default benchmarks/results)")
    smoke.add_flag(parser)
    args = parser.parse_args()
    if args.smoke:
        args.repeats, args.new_tokens = smoke.REPEATS, smoke.NEW_TOKENS
    return args


def request_for(variant: str, new_tokens: int):
    from glmrepl.engine import ChatSession, GenerateRequest, OutputFormat, SamplingParams

    conversation = ChatSession()
    conversation.add_user("Write a long story about a lighthouse keeper and the ships that passed.")
    sampling = SamplingParams(max_new_tokens=new_tokens, do_sample=False)
    held = OutputFormat(json.dumps(SCHEMA)) if variant == "schema" else None
    return GenerateRequest(conversation, sampling, output_format=held, logprobs=5 if variant == "logprobs" else None)


def decode_rate(backend, variant: str, new_tokens: int) -> dict:
    with backend.generate(request_for(variant, new_tokens)) as reply:
        for _ in reply:
            pass
        stats = reply.stats
    decoding = (stats.total_s or 0.0) - (stats.first_token_s or 0.0)
    rate = (stats.new_tokens - 1) / decoding if decoding > 0 and stats.new_tokens > 1 else 0.0
    return {"tokens": stats.new_tokens, "tok_s": rate, "first_token_s": stats.first_token_s, "path": stats.path}


def compile_times(backend) -> dict:
    """Seconds to compile the schema for the model's tokenizer: the first time, and from the cache."""
    from glmrepl.engine import OutputFormat
    from glmrepl.engine.generation.grammar import compile_format
    from glmrepl.engine.generation.service import logits_width

    loaded = backend.manager.current
    held = OutputFormat(json.dumps({**SCHEMA, "title": "first"}))
    times = []
    for _ in range(2):
        started = time.perf_counter()
        compile_format(loaded.tokenizer, logits_width(loaded.model), held)
        times.append(time.perf_counter() - started)
    return {"first_s": times[0], "cached_s": times[1]}


def measure(args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(HERE.parent))
    from checkpoint import ensure_checkpoint

    from glmrepl.engine import LoadOptions, LocalBackend, request_threads

    if args.threads:
        request_threads(args.threads)
    path = ensure_checkpoint(args.cache, args.smoke)
    backend = LocalBackend()
    options = LoadOptions(mode="cpu", dtype="float32", quantize=args.quantize)
    backend.load_and_wait(options.for_model(path, path.name))
    try:
        results: dict = {"load_average_before": os.getloadavg(), "compile": compile_times(backend)}
        decode_rate(backend, "schema", 4)  # warm: kernels, the schema's grammar
        rounds: dict[str, list[dict]] = {variant: [] for variant in VARIANTS}
        for _ in range(args.repeats):
            for variant in VARIANTS:
                rounds[variant].append(decode_rate(backend, variant, args.new_tokens))
        results["rounds"] = rounds
        results["median_tok_s"] = {v: statistics.median(r["tok_s"] for r in rounds[v]) for v in VARIANTS}
        results["load_average_after"] = os.getloadavg()
        return results
    finally:
        backend.stop()


def report(results: dict) -> str:
    medians = results["median_tok_s"]
    plain = medians["plain"] or float("nan")
    lines = [
        "| variant | decode tok/s (median) | / plain | tokens a reply |",
        "| --- | --- | --- | --- |",
    ]
    for variant in VARIANTS:
        tokens = sorted({r["tokens"] for r in results["rounds"][variant]})
        lines.append(f"| {variant} | {medians[variant]:.2f} | {medians[variant] / plain:.2f} | {tokens} |")
    ratio = medians["schema"] / plain
    verdict = "met" if ratio >= TARGET else "MISSED"
    compiled = results["compile"]
    lines += [
        f"schema / plain: {ratio:.2f} (target >= {TARGET}: {verdict})",
        f"schema compile: {compiled['first_s'] * 1000:.1f} ms the first time, {compiled['cached_s'] * 1000:.2f} ms cached",
        f"load average {results['load_average_before'][0]:.2f} before, {results['load_average_after'][0]:.2f} after",
    ]
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    results = measure(args)
    results["date"] = datetime.date.today().isoformat()
    results["args"] = {"repeats": args.repeats, "new_tokens": args.new_tokens, "threads": args.threads}
    results["args"]["quantize"] = args.quantize
    print(report(results) + (f"\n{smoke.NOTE}" if args.smoke else ""))
    folder = smoke.results_folder(args, HERE / "results")
    folder.mkdir(parents=True, exist_ok=True)
    precision = f"-int{args.quantize}" if args.quantize else ""
    out = folder / f"{results['date']}-structured{precision}.json"
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"results: {out}")


if __name__ == "__main__":
    main()
