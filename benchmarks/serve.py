"""`glmrepl serve` against the REPL's own path, on the benchmark checkpoint: part of `make bench`.

- decode tokens/s of one streamed /v1/chat/completions request vs the REPL path (the engine's
  generate/Reply in this process) on the same checkpoint and placement, alternating, median
  of --repeats (target: ratio >= 0.97);
- time to first byte (the response's first chunk, the role) vs time to first token (first
  content chunk) of a streamed request, beside the REPL path's time to first token;
- aggregate tokens/s with 1, 4 and 8 concurrent clients (decoded together up to --max-batch): over
  the whole run, and decoding (the sum of the clients' own decode rates, when they all decode at
  once; target at 8 clients: 3x one client's).

The server is a real `glmrepl serve` process on a free loopback port; the client reads the SSE
stream with http.client. Figures go to the terminal and to benchmarks/results/<date>-serve-<kind>.json.
``--smoke`` runs all of it on a tiny checkpoint (benchmarks/smoke.py).
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import smoke  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper who talks to the sea, with many details."


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per side (median taken)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens per reply for the decode comparison")
    parser.add_argument("--client-tokens", type=int, default=64, help="tokens per reply with concurrent clients")
    parser.add_argument("--device", default="cpu", help="device mode for both sides (default cpu)")
    parser.add_argument("--dtype", default="float32", help="dtype for both sides (default float32)")
    parser.add_argument("--threads", type=int, help="compute threads for both sides (default: the physical cores)")
    parser.add_argument("--model", type=Path, help="a checkpoint folder (default: the benchmark checkpoint)")
    parser.add_argument("--cache", type=Path, default=HERE / "cache", help="where the benchmark checkpoint is built")
    parser.add_argument("--results", type=Path, help="where the JSON goes (default benchmarks/results)")
    parser.add_argument(
        "--busy-core",
        action="store_true",
        help="another process keeps one core busy the whole run (the figure under load)",
    )
    smoke.add_flag(parser)
    args = parser.parse_args()
    args.results = smoke.results_folder(args, HERE / "results")
    if args.smoke:
        args.repeats = smoke.REPEATS
        args.new_tokens = args.client_tokens = smoke.NEW_TOKENS
    return args


# -- the server side ----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(
    model: Path, device: str, dtype: str, threads: int | None, extra: tuple[str, ...] = ()
) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("GLMREPL_API_KEY", None)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "glmrepl",
            "serve",
            str(model),
            "--port",
            str(port),
            "--device",
            device,
            "--dtype",
            dtype,
            "--max-queue",
            "16",
            *(["--threads", str(threads)] if threads else []),
            *extra,
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/health")
            if json.loads(connection.getresponse().read())["status"] == "ready":
                return process, port
        except OSError:
            pass
        time.sleep(0.5)
    process.kill()
    raise SystemExit("the server did not become ready")


def served_model(port: int) -> str:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("GET", "/v1/models")
    return json.loads(connection.getresponse().read())["data"][0]["id"]


class Server:
    """A `glmrepl serve` process and the model name it answers to."""

    def __init__(self, model: Path, device: str, dtype: str, threads: int | None, extra: tuple[str, ...] = ()):
        """``extra``: more `glmrepl serve` options (benchmarks/multiturn.py's --prefix-cache-mb)."""
        self.process, self.port = start_server(model, device, dtype, threads, extra)
        self.model_id = served_model(self.port)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def streamed_request(
    server: Server,
    prompt: str,
    new_tokens: int,
    sampling: dict | None = None,
    on_first_token: Callable[[], None] | None = None,
    system: str | None = None,
) -> dict:
    """One streamed chat request, timed from sending it: first byte, first content, last chunk.

    Greedy unless ``sampling`` overrides the body's fields (a seed, a temperature);
    ``on_first_token`` is called as the first content chunk arrives (benchmarks/scheduling.py
    sends a second request a while after it); ``system``: a system message before the prompt."""
    messages = [{"role": "system", "content": system}] if system else []
    body = json.dumps(
        {
            "model": server.model_id,
            "messages": [*messages, {"role": "user", "content": prompt}],
            "max_tokens": new_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
            **(sampling or {}),
        }
    )
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=600)
    started = time.perf_counter()
    connection.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    first_byte = first_content = last_content = None
    tokens = None
    content_at: list[float] = []  # when each content chunk came (about one a token)
    for line in response:
        now = time.perf_counter()
        first_byte = first_byte or now
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        if chunk["choices"] and (chunk["choices"][0]["delta"].get("content") or chunk["choices"][0]["finish_reason"]):
            if first_content is None and on_first_token is not None:
                on_first_token()
            first_content = first_content or now
            last_content = now
            if chunk["choices"][0]["delta"].get("content"):
                content_at.append(now)
    connection.close()
    decode = (tokens - 1) / (last_content - first_content) if tokens and tokens > 1 else None
    return {
        "first_byte_s": first_byte - started,
        "first_token_s": first_content - started,
        "decode_tokens_per_s": decode,
        "new_tokens": tokens,
        "total_s": last_content - started,
        "content_at": content_at,
    }


# -- the REPL side ------------------------------------------------------------------


def repl_backend(model: Path, device: str, dtype: str):
    from glmrepl.engine.backend import LocalBackend
    from glmrepl.engine.models.loading import LoadOptions

    backend = LocalBackend()
    backend.load_and_wait(LoadOptions(mode=device, dtype=dtype).for_model(model, model.name))
    return backend


def repl_reply(backend, prompt: str, new_tokens: int) -> dict:
    """What the REPL does for one message: generate, then consume the deltas it prints."""
    from glmrepl.engine import ChatSession, GenerateRequest, SamplingParams

    session = ChatSession()
    session.add_user(prompt)
    request = GenerateRequest(session, SamplingParams(max_new_tokens=new_tokens, temperature=0))
    with backend.generate(request) as reply:
        for _delta in reply:
            pass
    stats = reply.stats
    return {
        "first_token_s": stats.first_token_s,
        "decode_tokens_per_s": stats.decode_tokens_per_s,
        "new_tokens": stats.new_tokens,
    }


# -- measures -------------------------------------------------------------------------


def median_of(runs: list[dict], key: str) -> float | None:
    values = [run[key] for run in runs if run[key] is not None]
    return statistics.median(values) if values else None


def is_figure(value) -> bool:
    """A number a median can be taken of (a run also keeps lists, e.g. its token times)."""
    return value is None or isinstance(value, (int, float))


def compare_single(backend, server: Server, repeats: int, new_tokens: int) -> dict:
    streamed_request(server, PROMPT, 4)  # warm-ups: kernels, pages, thread pools on both sides
    repl_reply(backend, PROMPT, 4)
    served, repl = [], []
    for _ in range(repeats):
        served.append(streamed_request(server, PROMPT, new_tokens))
        repl.append(repl_reply(backend, PROMPT, new_tokens))
    figures = {
        "served": {key: median_of(served, key) for key in served[0] if is_figure(served[0][key])},
        "repl": {key: median_of(repl, key) for key in repl[0] if is_figure(repl[0][key])},
        "runs": {"served": served, "repl": repl},
    }
    figures["decode_ratio"] = figures["served"]["decode_tokens_per_s"] / figures["repl"]["decode_tokens_per_s"]
    return figures


def concurrent_clients(server: Server, clients: int, new_tokens: int, sampling: dict[int, dict] | None = None) -> dict:
    """``clients`` streamed requests at once; ``sampling`` maps a client's index to its own body fields."""
    results: list[dict] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        result = streamed_request(server, f"{PROMPT} (reader {i})", new_tokens, (sampling or {}).get(i))
        with lock:
            results.append(result)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    tokens = sum(r["new_tokens"] or 0 for r in results)
    return {
        "clients": clients,
        "tokens": tokens,
        "wall_s": wall,
        "aggregate_tokens_per_s": tokens / wall,
        "aggregate_decode_tokens_per_s": decoding_together(results),
        "median_first_byte_s": median_of(results, "first_byte_s"),
        "median_first_token_s": median_of(results, "first_token_s"),
        "max_first_token_s": max(r["first_token_s"] for r in results),
    }


def decoding_together(results: list[dict]) -> float | None:
    """Decode tokens/s of all clients together: the sum of each one's own rate (tokens after its
    first over the time to its last), counted only when all of them decode at the same time.
    (Content chunks cannot be counted instead: a random model's partial characters are held back.)"""
    times = [r.pop("content_at") for r in results]
    rates = [r["decode_tokens_per_s"] for r in results]
    if any(len(t) < 2 for t in times) or any(rate is None for rate in rates):
        return None
    if min(t[-1] for t in times) <= max(t[0] for t in times):
        return None  # one finished before another started: they did not decode together
    return sum(rates)


def table(figures: dict) -> str:
    single = figures["single"]
    served, repl = single["served"], single["repl"]
    rows = [
        ("measure", "REPL path", "served", "result", "target"),
        (
            "decode tok/s (streamed, 1 client)",
            f"{repl['decode_tokens_per_s']:.2f}",
            f"{served['decode_tokens_per_s']:.2f}",
            f"ratio {single['decode_ratio']:.3f}",
            ">= 0.97",
        ),
        (
            "time to first token",
            f"{repl['first_token_s'] * 1000:.0f} ms",
            f"{served['first_token_s'] * 1000:.0f} ms",
            "",
            "",
        ),
        (
            "time to first byte (role chunk)",
            "",
            f"{served['first_byte_s'] * 1000:.0f} ms",
            f"{served['first_token_s'] / served['first_byte_s']:.1f}x earlier than the first token",
            "",
        ),
    ]
    alone = next((r["aggregate_decode_tokens_per_s"] for r in figures["concurrent"] if r["clients"] == 1), None)
    for row in figures["concurrent"]:
        rows.append(
            (
                f"aggregate tok/s, {row['clients']} client(s)",
                "",
                f"{row['aggregate_tokens_per_s']:.2f}",
                f"first token median {row['median_first_token_s']:.2f} s, worst {row['max_first_token_s']:.2f} s",
                "report",
            )
        )
        together = row["aggregate_decode_tokens_per_s"]
        ratio = f"{together / alone:.2f}x one client" if together and alone else ""
        rows.append(
            (
                f"  decode tok/s, all {row['clients']} decoding",
                "",
                f"{together:.2f}" if together else "-",
                ratio,
                ">= 3x one client at 8" if row["clients"] == 8 else "",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def main() -> int:
    args = parse_args()
    import machine

    if args.model is None:
        import checkpoint

        args.model = checkpoint.ensure_checkpoint(args.cache, args.smoke)
    print(f"serve benchmark on {args.model.name} ({args.device} {args.dtype}) ...", flush=True)
    from glmrepl.engine.cpu import machine as cpu

    cpu.request_threads(args.threads)  # the REPL side, in this process; the server gets --threads
    server = Server(args.model, args.device, args.dtype, args.threads)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.busy_core else None
    try:
        backend = repl_backend(args.model, args.device, args.dtype)
        results = {
            "machine": machine.describe_machine(),
            "model": args.model.name,
            "placement": f"{args.device} {args.dtype}",
            "threads": cpu.apply_threads(),
            "load_average_before": os.getloadavg(),
            "prompt": PROMPT,
            "new_tokens": args.new_tokens,
            "client_tokens": args.client_tokens,
            "busy_core": args.busy_core,
        }
        print("one streamed request vs the REPL path ...", flush=True)
        results["single"] = compare_single(backend, server, args.repeats, args.new_tokens)
        results["concurrent"] = []
        for clients in (1, 4, 8):
            print(f"{clients} concurrent client(s) ...", flush=True)
            results["concurrent"].append(concurrent_clients(server, clients, args.client_tokens))
        results["load_average_after"] = os.getloadavg()
    finally:
        server.stop()
        if busy is not None:
            busy.kill()
    print()
    if args.smoke:
        print(smoke.NOTE)
    print(table(results))
    kind = "gpu" if args.device in ("gpu", "sharded") else "cpu"
    args.results.mkdir(parents=True, exist_ok=True)
    busy_part = "-busy" if args.busy_core else ""
    path = args.results / f"{datetime.date.today().isoformat()}-serve-{kind}{busy_part}.json"
    path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"\nwritten: {path}")
    if args.smoke:
        print(smoke.NOTE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
