"""Resident memory of `glmrepl serve` while concurrent requests share a long cached start: part of `make bench`.

    python benchmarks/kv_memory.py [--budget-mb 1024] [--clients 12] [--start-tokens 3000] [--smoke]

1. The memory everything but the KV caches takes: a `glmrepl serve --no-batching
   --prefix-cache-mb 0` process on the benchmark checkpoint answers one short request; its
   resident memory is the baseline.
2. A `glmrepl serve --kv-budget-mb B` process on the same checkpoint reads a system prompt of
   --start-tokens tokens once (its prefix cache keeps it), then --clients streamed requests
   with that system prompt and each its own question arrive at once. The server's resident
   memory is sampled every 20 ms from the first request to the last reply, and once more after.

The figure: (peak - baseline) / budget; target at most 1.10 (the KV caches stay within their
budget, plus 10% for everything a request holds besides). /health's KV section at the end
says what the caches held. --smoke runs it on the tiny checkpoint with few tokens: a check
that the script works, not a measurement. Figures go to the terminal and to
benchmarks/results/<date>-kv-memory.json.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import sys
import threading
import time
from pathlib import Path

import smoke
from serve import HERE, Server, streamed_request

TARGET = 1.10
SAMPLE_S = 0.02
WORDS = "the keeper of the lighthouse wrote down every ship that passed and every storm".split()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-mb", type=int, default=1024, help="the server's --kv-budget-mb")
    parser.add_argument("--clients", type=int, default=12, help="concurrent requests sharing the start")
    parser.add_argument("--start-tokens", type=int, default=3000, help="tokens of the shared system prompt")
    parser.add_argument("--new-tokens", type=int, default=16, help="tokens each request generates")
    parser.add_argument("--threads", type=int, help="compute threads (default: the physical cores)")
    parser.add_argument("--cache", type=Path, default=HERE / "cache", help="where the checkpoint is built")
    parser.add_argument("--results", type=Path, help="where the JSON goes (default benchmarks/results)")
    smoke.add_flag(parser)
    args = parser.parse_args()
    if args.smoke:
        args.budget_mb, args.clients, args.start_tokens, args.new_tokens = 64, 4, 200, smoke.NEW_TOKENS
    return args


def resident_bytes(pid: int) -> int:
    """VmRSS of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def long_start(model: Path, tokens: int) -> str:
    """A system prompt of about ``tokens`` tokens of the checkpoint's own tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    words: list[str] = []
    while len(tokenizer(" ".join(words))["input_ids"]) < tokens:
        words.extend(WORDS)
    return " ".join(words)


class PeakSampler:
    """The largest resident memory a process reaches while the sampler runs."""

    def __init__(self, pid: int):
        self.pid, self.peak = pid, resident_bytes(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self.peak = max(self.peak, resident_bytes(self.pid))


def health(server: Server) -> dict:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.request("GET", "/health")
    return json.loads(connection.getresponse().read())


def baseline(model: Path, threads: int | None) -> int:
    """Resident memory of a server with no KV cache kept, after one short reply."""
    server = Server(model, "cpu", "float32", threads, ("--no-batching", "--prefix-cache-mb", "0"))
    try:
        streamed_request(server, "Say hello.", 4)
        return resident_bytes(server.process.pid)
    finally:
        server.stop()


def shared_start(model: Path, args: argparse.Namespace, system: str) -> dict:
    """The budgeted server: the start read once, then the clients at once, memory sampled."""
    server = Server(model, "cpu", "float32", args.threads, ("--kv-budget-mb", str(args.budget_mb)))
    try:
        streamed_request(server, "Who are you?", 4, system=system)  # the prefix cache keeps the start
        primed = resident_bytes(server.process.pid)
        results: list[dict] = []
        questions = [f"Question {i}: which ship came last?" for i in range(args.clients)]

        def ask(question: str) -> None:
            results.append(streamed_request(server, question, args.new_tokens, system=system))

        threads = [threading.Thread(target=ask, args=(q,)) for q in questions]
        with PeakSampler(server.process.pid) as sampler:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        return {
            "primed_bytes": primed,
            "peak_bytes": sampler.peak,
            "after_bytes": resident_bytes(server.process.pid),
            "replies": len(results),
            "max_total_s": max(r["total_s"] for r in results),
            "kv": health(server).get("kv_cache"),
        }
    finally:
        server.stop()


def main() -> int:
    args = parse_args()
    import checkpoint
    import machine

    model = checkpoint.ensure_checkpoint(args.cache, args.smoke)
    print(
        f"KV memory benchmark on {model.name}: {args.clients} clients, {args.start_tokens}-token start ...", flush=True
    )
    system = long_start(model, args.start_tokens)
    started = time.perf_counter()
    base = baseline(model, args.threads)
    run = shared_start(model, args, system)
    budget = args.budget_mb * 2**20
    results = {
        "machine": machine.describe_machine(),
        "model": model.name,
        "load_average_before": os.getloadavg(),
        "budget_bytes": budget,
        "clients": args.clients,
        "start_tokens": args.start_tokens,
        "new_tokens": args.new_tokens,
        "baseline_bytes": base,
        **run,
        "peak_over_budget": (run["peak_bytes"] - base) / budget,
        "after_over_budget": (run["after_bytes"] - base) / budget,
        "seconds": time.perf_counter() - started,
    }
    print(table(results))
    folder = smoke.results_folder(args, HERE / "results")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{datetime.date.today().isoformat()}-kv-memory.json"
    path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"\nwritten: {path}")
    if args.smoke:
        print(smoke.NOTE)
    return 0


def table(results: dict) -> str:
    mib = 2**20
    met = "yes" if results["peak_over_budget"] <= TARGET else "no"
    kv = results.get("kv") or {}
    return "\n".join(
        [
            "",
            f"| {results['clients']} clients, a {results['start_tokens']}-token start | MiB |",
            "| --- | --- |",
            f"| baseline (no KV kept) | {results['baseline_bytes'] / mib:.0f} |",
            f"| KV budget | {results['budget_bytes'] / mib:.0f} |",
            f"| after reading the start once | {results['primed_bytes'] / mib:.0f} |",
            f"| peak while the clients run | {results['peak_bytes'] / mib:.0f} |",
            f"| after they end | {results['after_bytes'] / mib:.0f} |",
            "",
            f"(peak - baseline) / budget: {results['peak_over_budget']:.2f} (target <= {TARGET:.2f}: {met}); "
            f"after: {results['after_over_budget']:.2f}",
            f"/health: batch pool {kv.get('batch_pool_bytes', 0) / mib:.0f} MiB, "
            f"prefix caches {(kv.get('prefix_cache') or {}).get('bytes', 0) / mib:.0f} MiB, "
            f"{(kv.get('prefix_cache') or {}).get('tokens_reused', 0)} tokens reused",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
