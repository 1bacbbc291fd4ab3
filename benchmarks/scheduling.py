"""How `glmrepl serve` shares the model between concurrent replies: part of `make bench`.

    python benchmarks/scheduling.py [--repeats 3] [--smoke] [--results DIR] [--cache DIR]

A reply that arrives while another decodes is placed at the next token: into the continuous
batch with the running reply when both may batch, else the two take turns 16 tokens at a time.
Measured against a real `glmrepl serve` process (benchmarks/serve.py's server and client):

1. head-of-line, tiny model (glmrepl's tiny Qwen2 chat checkpoint): client A streams a
   1,500-token greedy reply; 1 s after A's first token client B sends a 3-token request.
   B's total time against the same request on the idle server; target: within 1.0 s. Once with
   the default batching, once with --no-batching (the two take turns);
2. head-of-line, the Qwen2-0.5B-shaped checkpoint: a 16-token request sent 1 s into a 512-token
   reply, its time to first token against its time alone; target: at most 2x;
3. mixed traffic on that checkpoint (float32, default threads): aggregate tokens/s of 8 concurrent
   greedy streaming clients against 8 where one sends a seed and temperature 0.8 (it decodes in the
   batch with its own generator); target: mixed at least 0.8x all-greedy.

Each figure is the median of --repeats runs. --smoke runs everything on the tiny model with few
tokens and one repeat: a check that the script works, not a measurement. Figures go to the
terminal and to benchmarks/results/<date>-scheduling.json (smoke: under --cache).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from serve import HERE, PROMPT, Server, concurrent_clients, streamed_request

SHORT_PROMPT = "Say hello."
DELAY_S = 1.0  # from the long reply's first token to sending the short request
SEEDED = {"seed": 7, "temperature": 0.8}  # a reply with its own random sequence, in the batch
CLIENTS = 8
# The tiny checkpoint is built with 512 positions; its rotary embedding does not depend on the
# figure, so widening it lets a 1,500-token reply through the server's context check.
TINY_CONTEXT = 4096
TOTAL_TARGET_S = 1.0
FIRST_TOKEN_TARGET = 2.0
MIXED_TARGET = 0.8


@dataclass(frozen=True)
class Plan:
    """Token counts of one run: the measured figures, or a smoke check's few tokens."""

    tiny_long: int = 1500
    tiny_short: int = 3
    bench_long: int = 512
    bench_short: int = 16
    client_tokens: int = 64
    delay_s: float = DELAY_S


SMOKE = Plan(tiny_long=300, bench_long=300, client_tokens=16, delay_s=0.1)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each figure (median taken)")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny model only, few tokens, one repeat: not a measurement"
    )
    parser.add_argument("--cache", type=Path, default=HERE / "cache", help="where the checkpoints are built")
    parser.add_argument("--results", type=Path, help="where the JSON goes (default benchmarks/results)")
    args = parser.parse_args()
    if args.smoke:
        args.repeats = 1
    if args.results is None:
        args.results = args.cache / "smoke-results" if args.smoke else HERE / "results"
    return args


def tiny_checkpoint(cache: Path) -> Path:
    """glmrepl's tiny Qwen2 chat checkpoint with TINY_CONTEXT positions, built once."""
    import checkpoint

    from glmrepl.tiny import build_qwen2_chat

    dest = cache / "tiny-qwen2-chat-long"
    if (dest / checkpoint.READY_MARKER).exists():
        return dest
    build_qwen2_chat(dest)
    for name, key in (("config.json", "max_position_embeddings"), ("tokenizer_config.json", "model_max_length")):
        data = json.loads((dest / name).read_text(encoding="utf-8"))
        data[key] = TINY_CONTEXT
        (dest / name).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    (dest / checkpoint.READY_MARKER).write_text("")  # last: a half-built folder is built again
    return dest


# -- head-of-line --------------------------------------------------------------------


def short_during_long(server: Server, long_tokens: int, short_tokens: int, delay_s: float) -> dict:
    """A streams ``long_tokens``; ``delay_s`` after A's first token, B sends ``short_tokens``."""
    first_token = threading.Event()
    long_run: dict = {}

    def client_a() -> None:
        long_run["sent"] = time.perf_counter()
        long_run.update(streamed_request(server, PROMPT, long_tokens, on_first_token=first_token.set))

    thread = threading.Thread(target=client_a)
    thread.start()
    if not first_token.wait(600):
        raise SystemExit("the long reply made no token in 600 s")
    time.sleep(delay_s)
    b_sent = time.perf_counter()
    short = streamed_request(server, SHORT_PROMPT, short_tokens)
    thread.join()
    short.pop("content_at")
    a_end = long_run["sent"] + long_run["total_s"]
    return {
        **short,
        "long_tokens": long_run["new_tokens"],
        "long_total_s": long_run["total_s"],
        # False: A had ended before B was sent, so B waited for nothing (not a head-of-line figure)
        "long_running_at_send": a_end > b_sent,
        "long_running_at_end": a_end > b_sent + short["total_s"],
    }


def alone(server: Server, short_tokens: int) -> dict:
    run = streamed_request(server, SHORT_PROMPT, short_tokens)
    run.pop("content_at")
    return run


def head_of_line(server: Server, long_tokens: int, short_tokens: int, delay_s: float, repeats: int) -> dict:
    """B alone and B during A, in turns, ``repeats`` times; medians."""
    load = os.getloadavg()[0]
    # Warm-ups: kernels and pages, and the batch's first start (which a busy server pays once).
    alone(server, short_tokens)
    warm_up = short_during_long(server, min(long_tokens, 64), short_tokens, 0.0)
    runs = [
        (alone(server, short_tokens), short_during_long(server, long_tokens, short_tokens, delay_s))
        for _ in range(repeats)
    ]
    solo, during = [r[0] for r in runs], [r[1] for r in runs]
    return {
        "long_tokens_asked": long_tokens,
        "short_tokens_asked": short_tokens,
        "delay_s": delay_s,
        "load_before": load,
        "alone_total_s": median(solo, "total_s"),
        "alone_first_token_s": median(solo, "first_token_s"),
        "during_total_s": median(during, "total_s"),
        "during_first_token_s": median(during, "first_token_s"),
        "long_tokens": median(during, "long_tokens"),
        "long_total_s": median(during, "long_total_s"),
        "overlapped_runs": sum(r["long_running_at_send"] for r in during),
        "warm_up": warm_up,
        "runs": {"alone": solo, "during": during},
    }


def median(runs: list[dict], key: str) -> float | None:
    values = [run[key] for run in runs if run.get(key) is not None]
    return statistics.median(values) if values else None


# -- mixed traffic -------------------------------------------------------------------


def mixed_traffic(server: Server, tokens: int, repeats: int) -> dict:
    """All-greedy and one-seeded rounds of CLIENTS clients, in turns (which goes first alternates)."""
    load = os.getloadavg()[0]
    concurrent_clients(server, 2, 8)  # warm-up: the batch started once
    greedy, mixed = [], []
    for i in range(repeats):
        order = [(greedy, None), (mixed, {0: SEEDED})]
        for into, sampling in order if i % 2 == 0 else order[::-1]:
            into.append(concurrent_clients(server, CLIENTS, tokens, sampling))
    figures = {
        "clients": CLIENTS,
        "client_tokens": tokens,
        "seeded_client": SEEDED,
        "load_before": load,
        "greedy_tokens_per_s": median(greedy, "aggregate_tokens_per_s"),
        "mixed_tokens_per_s": median(mixed, "aggregate_tokens_per_s"),
        "runs": {"greedy": greedy, "mixed": mixed},
    }
    figures["ratio"] = figures["mixed_tokens_per_s"] / figures["greedy_tokens_per_s"]
    return figures


# -- the run -------------------------------------------------------------------------


def with_server(model: Path, extra: tuple[str, ...], work: Callable[[Server], dict]) -> dict:
    """``work`` against a fresh `glmrepl serve` of ``model`` (cpu float32, default threads)."""
    server = Server(model, "cpu", "float32", None, extra)
    try:
        return work(server)
    finally:
        server.stop()


def measure(args: argparse.Namespace, plan: Plan) -> dict:
    import checkpoint

    tiny = tiny_checkpoint(args.cache)
    bench = tiny if args.smoke else checkpoint.ensure_checkpoint(args.cache)

    def tiny_head_of_line(server: Server) -> dict:
        return head_of_line(server, plan.tiny_long, plan.tiny_short, plan.delay_s, args.repeats)

    def bench_figures(server: Server) -> dict:
        print(f"  {plan.bench_short}-token request during a {plan.bench_long}-token reply ...", flush=True)
        hol = head_of_line(server, plan.bench_long, plan.bench_short, plan.delay_s, args.repeats)
        print(f"  {CLIENTS} clients, all greedy and one seeded ...", flush=True)
        return {"bench_head_of_line": hol, "mixed": mixed_traffic(server, plan.client_tokens, args.repeats)}

    results: dict = {"tiny_model": tiny.name, "bench_model": bench.name}
    print(f"tiny model, batching: {plan.tiny_short} tokens during {plan.tiny_long} ...", flush=True)
    results["tiny_batching"] = with_server(tiny, (), tiny_head_of_line)
    print(f"tiny model, --no-batching: {plan.tiny_short} tokens during {plan.tiny_long} ...", flush=True)
    results["tiny_turns"] = with_server(tiny, ("--no-batching",), tiny_head_of_line)
    print(f"{bench.name} (cpu float32) ...", flush=True)
    results.update(with_server(bench, (), bench_figures))
    return results


def table(results: dict, plan: Plan) -> str:
    rows = [("figure", "measured", "alone / all greedy", "target", "met"), *rows_of(results, plan)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines + notes(results))


def rows_of(results: dict, plan: Plan) -> list[tuple[str, ...]]:
    rows = []
    for key, how in (("tiny_batching", "batching"), ("tiny_turns", "--no-batching")):
        hol = results[key]
        during = hol["during_total_s"]
        what = f"{plan.tiny_short}-token request {plan.delay_s:g} s into a {plan.tiny_long}-token reply, total"
        met = yes_no(during <= TOTAL_TARGET_S)
        rows.append(
            (
                f"tiny, {how}: {what}",
                f"{during:.2f} s",
                f"{hol['alone_total_s']:.2f} s",
                f"<= {TOTAL_TARGET_S:.1f} s",
                met,
            )
        )
    model = results["bench_model"]
    hol = results["bench_head_of_line"]
    ratio = hol["during_first_token_s"] / hol["alone_first_token_s"]
    what = f"{plan.bench_short}-token request {plan.delay_s:g} s into a {plan.bench_long}-token reply, first token"
    measured = f"{hol['during_first_token_s']:.2f} s ({ratio:.2f}x)"
    alone_s = f"{hol['alone_first_token_s']:.2f} s"
    rows.append(
        (
            f"{model}: {what}",
            measured,
            alone_s,
            f"<= {FIRST_TOKEN_TARGET:.0f}x alone",
            yes_no(ratio <= FIRST_TOKEN_TARGET),
        )
    )
    mixed = results["mixed"]
    measured = f"{mixed['mixed_tokens_per_s']:.1f} ({mixed['ratio']:.2f}x)"
    greedy = f"{mixed['greedy_tokens_per_s']:.1f}"
    met = yes_no(mixed["ratio"] >= MIXED_TARGET)
    rows.append(
        (
            f"{model}: {CLIENTS} clients, one seeded, aggregate tok/s",
            measured,
            greedy,
            f">= {MIXED_TARGET}x all greedy",
            met,
        )
    )
    return rows


def notes(results: dict) -> list[str]:
    """How long the long replies really ran, and the 1-minute load average before each part
    (which still counts the previous part's own decoding)."""
    lines = [""]
    for key in ("tiny_batching", "tiny_turns", "bench_head_of_line"):
        hol = results[key]
        lines.append(
            f"{key}: the long reply made {hol['long_tokens']:.0f} of {hol['long_tokens_asked']} tokens in "
            f"{hol['long_total_s']:.2f} s (median); it was still running when the request was sent in "
            f"{hol['overlapped_runs']} of {len(hol['runs']['during'])} runs; load before {hol['load_before']:.2f}"
        )
    lines.append(f"mixed: load before {results['mixed']['load_before']:.2f}")
    return lines


def yes_no(met: bool) -> str:
    return "yes" if met else "NO"


def main() -> int:
    args = parse_args()
    import machine

    plan = SMOKE if args.smoke else Plan()
    figures = {
        "machine": machine.describe_machine(),
        "smoke": args.smoke,
        "repeats": args.repeats,
        "load_average_before": os.getloadavg(),
    }
    figures.update(measure(args, plan))
    figures["load_average_after"] = os.getloadavg()
    print()
    print(table(figures, plan))
    if args.smoke:
        print("\n(smoke: not a measurement)")
    args.results.mkdir(parents=True, exist_ok=True)
    suffix = "-smoke" if args.smoke else ""
    path = args.results / f"{datetime.date.today().isoformat()}-scheduling{suffix}.json"
    path.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    print(f"\nwritten: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
