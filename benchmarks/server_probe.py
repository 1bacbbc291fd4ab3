"""`glmrepl serve` under hostile clients: silent sockets, bursts, cache probing, fuzzing, memory.

    python benchmarks/server_probe.py [--flood 65,200] [--flood-seconds 13] [--burst 70]
                                      [--requests 300] [--examples 15] [--parts memory,...] [--smoke]

Two real `glmrepl serve` processes on the small random Qwen2 checkpoint (benchmarks/checkpoint.py's
smoke build), each on a free loopback port with `--idle-timeout 2`: one without a key, one with
two `--api-key` values. Against each, in this order:

1. Memory: the server's resident memory (VmRSS) once ready, after a warm-up, after every 50 of
   --requests requests (chat, streamed chat and completions in turn, 8 new tokens, a third of them
   with a `cache_salt` of their own), and after a settle of a few seconds.
2. Silent sockets: for each count in --flood, that many TCP connections that never send a byte,
   each reopened as soon as the server closes it (the idle timeout), while a client sends one chat
   request a second on a new connection, and another asks `GET /health`, for --flood-seconds.
   Figure: how many of each got a 200.
3. A burst: --burst clients each send one chat request at once. Answered once (their first
   status, by code), and again with the `openai` client, which retries a 503 after its
   Retry-After (twice, its default).
4. Cache probing: a victim sends a system prompt holding a 4-digit secret; an attacker guesses it
   a digit at a time from `usage.prompt_tokens_details.cached_tokens` (one request to set its own
   baseline, then up to 10 guesses a digit, stopping at a digit no guess stands out for). With
   another `cache_salt` than the victim's, with another API key (the keyed server), and in the
   victim's own namespace (where reuse is meant to work, so the secret is recovered).
5. schemathesis (the venv's) against /openapi.json with tests/schemathesis.toml, --examples
   examples an operation, seed 1, once with `--checks all` and once as the tests run it: the counts
   it prints, and each failure's operation, check and answer.

Each server's stderr is kept and searched for tracebacks. Figures go to the terminal and to
benchmarks/results/<date>-server-probe.json (<date>-server-probe-<parts>.json when --parts names
only some). --smoke shortens every part (the figures then only show that the script runs; its JSON
goes to benchmarks/cache/smoke-results/). Not part of `make bench`.

The parts themselves are in benchmarks/server_probe_parts.py.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import smoke
from kv_memory import resident_bytes
from serve import HERE, ROOT, free_port
from server_probe_parts import ATTACKS, attacks, burst, flood, memory, schemathesis

IDLE_TIMEOUT_S = 2.0
NEW_TOKENS = 8
KEYS = ("probe-key-one", "probe-key-two")
PARTS = ("memory", "flood", "burst", "secret", "schemathesis")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flood", default="65,200", help="counts of silent sockets, one run each (default 65,200)")
    parser.add_argument("--flood-seconds", type=float, default=13.0, help="how long each flood lasts")
    parser.add_argument("--burst", type=int, default=70, help="clients sending one request at once")
    parser.add_argument("--requests", type=int, default=300, help="requests between the memory readings")
    parser.add_argument("--examples", type=int, default=15, help="schemathesis examples an operation")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"which parts to run (default all: {','.join(PARTS)})")
    parser.add_argument("--model", type=Path, help="a checkpoint folder (default: the small random checkpoint)")
    parser.add_argument("--cache", type=Path, default=HERE / "cache", help="where the checkpoint is built")
    parser.add_argument("--results", type=Path, help="where the JSON goes (default benchmarks/results)")
    smoke.add_flag(parser)
    args = parser.parse_args()
    args.results = smoke.results_folder(args, HERE / "results")
    args.flood = [int(count) for count in args.flood.split(",")]
    args.parts = [part for part in PARTS if part in args.parts.split(",")]
    if args.smoke:
        args.flood, args.flood_seconds, args.burst, args.requests, args.examples = [65], 4.0, 20, 30, 2
    return args


# -- the server -------------------------------------------------------------------------


class ProbedServer:
    """A `glmrepl serve` process, its port, its keys, and its stderr in a file."""

    def __init__(self, model: Path, keys: tuple[str, ...], log: Path):
        self.keys = keys
        self.new_tokens = NEW_TOKENS
        self.port = free_port()
        self.log = log
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("GLMREPL_API_KEY", None)
        command = [sys.executable, "-m", "glmrepl", "serve", str(model), "--port", str(self.port)]
        command += ["--device", "cpu", "--dtype", "float32", "--max-new-tokens", str(self.new_tokens)]
        command += ["--idle-timeout", str(IDLE_TIMEOUT_S)]
        for key in keys:
            command += ["--api-key", key]
        with log.open("wb") as stderr:
            self.process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        self._wait_ready()
        self.model_id = json.loads(self.call("GET", "/v1/models")[1])["data"][0]["id"]

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"the server exited with {self.process.returncode}:\n{self.log.read_text()[-2000:]}")
            try:
                if json.loads(self.call("GET", "/health", timeout=5)[1])["status"] == "ready":
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.3)
        self.stop()
        raise SystemExit("the server did not become ready")

    def headers(self, key: int | None = 0) -> dict[str, str]:
        """A JSON request's headers, with the key of index ``key`` where the server has keys."""
        headers = {"Content-Type": "application/json"}
        if self.keys and key is not None:
            headers["Authorization"] = f"Bearer {self.keys[key]}"
        return headers

    def call(self, method: str, path: str, body: dict | None = None, timeout: float = 60) -> tuple[int, bytes, str]:
        """One request on a new connection: status, body, and the error code of an error."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            payload = None if body is None else json.dumps(body)
            connection.request(method, path, body=payload, headers=self.headers())
            response = connection.getresponse()
            data = response.read()
        finally:
            connection.close()
        code = ""
        if response.status >= 400:
            try:
                code = json.loads(data)["error"]["code"] or ""
            except (ValueError, KeyError, TypeError):
                pass
        return response.status, data, code

    def chat(self, prompt: str, stream: bool = False, salt: str | None = None, timeout: float = 60) -> tuple[int, str]:
        body = {
            "model": self.model_id,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": self.new_tokens,
            "temperature": 0,
            "stream": stream,
        }
        if salt is not None:
            body["cache_salt"] = salt
        status, _, code = self.call("POST", "/v1/chat/completions", body, timeout)
        return status, code

    def completion(self, prompt: str, salt: str | None = None) -> tuple[int, str]:
        body = {"model": self.model_id, "prompt": prompt, "max_tokens": self.new_tokens, "temperature": 0}
        if salt is not None:
            body["cache_salt"] = salt
        status, _, code = self.call("POST", "/v1/completions", body)
        return status, code

    def openai_client(self, key: int | None = 0, max_retries: int = 0):
        from openai import OpenAI

        api_key = self.keys[key] if self.keys and key is not None else "unused"
        return OpenAI(
            base_url=f"http://127.0.0.1:{self.port}/v1", api_key=api_key, max_retries=max_retries, timeout=120
        )

    def rss(self) -> int:
        return resident_bytes(self.process.pid)

    def tracebacks(self) -> int:
        return self.log.read_text(errors="replace").count("Traceback")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# -- the run -----------------------------------------------------------------------------------


def run_parts(server: ProbedServer, kind: str, args: argparse.Namespace, folder: Path, rng: random.Random) -> dict:
    """The parts that --parts names, in their order, memory first (on a fresh server)."""
    figures: dict = {}
    if "memory" in args.parts:
        print(f"[{kind}] memory over {args.requests} requests ...", flush=True)
        figures["memory"] = memory(server, args.requests, settle_s=2.0 if args.smoke else 5.0)
    if "flood" in args.parts:
        figures["flood"] = []
        for count in args.flood:
            print(f"[{kind}] {count} silent sockets for {args.flood_seconds:g} s ...", flush=True)
            figures["flood"].append(flood(server, count, args.flood_seconds))
    if "burst" in args.parts:
        print(f"[{kind}] a burst of {args.burst} clients ...", flush=True)
        figures["burst"] = burst(server, args.burst, with_retries=False)
        figures["burst_with_retries"] = burst(server, args.burst, with_retries=True)
    if "secret" in args.parts:
        print(f"[{kind}] cache probing ...", flush=True)
        figures["secret"] = attacks(server, kind, rng)
    if "schemathesis" in args.parts:
        print(f"[{kind}] schemathesis ...", flush=True)
        figures["schemathesis"] = schemathesis(server, args.examples, folder)
    return figures


def server_state(server: ProbedServer) -> dict:
    """After the parts: its /health, the tracebacks in its stderr (and the log's tail if any), alive."""
    state: dict = {"health_after": json.loads(server.call("GET", "/health")[1])}
    state["server_tracebacks"] = server.tracebacks()
    if state["server_tracebacks"]:
        state["server_log_tail"] = server.log.read_text(errors="replace")[-4000:]
    state["server_alive"] = server.process.poll() is None
    return state


def probe(model: Path, kind: str, args: argparse.Namespace, folder: Path, rng: random.Random) -> dict:
    keys = KEYS if kind == "two keys" else ()
    log = folder / f"server-{kind.replace(' ', '-')}.log"
    print(f"[{kind}] starting glmrepl serve ...", flush=True)
    server = ProbedServer(model, keys, log)
    try:
        figures: dict = {"keys": len(keys)}
        figures.update(run_parts(server, kind, args, folder, rng))
        figures.update(server_state(server))
    finally:
        server.stop()
    return figures


# -- the table ---------------------------------------------------------------------------------

Row = tuple[str, ...]


def mib(value: int) -> str:
    return f"{value / 2**20:.0f}"


def along(steps: list[dict], shown: int = 6) -> str:
    """About ``shown`` readings evenly spread over the run, the last included."""
    every = max(1, round(len(steps) / shown))
    picked = steps[every - 1 :: every]
    if picked[-1] is not steps[-1]:
        picked.append(steps[-1])
    return ", ".join(f"{step['requests']}: {step['rss_bytes'] / 2**20:.0f}" for step in picked)


def secret_cell(server: dict, name: str) -> str:
    found = next((a for a in server["secret"] if a["attack"] == name), None)
    if found is None:
        return "-"
    cell = f"{found['digits_recovered']}/{len(found['secret'])} digits, {found['requests']} requests"
    if name != "same namespace":
        cell += ", victim's cache held" if found["victim_cache_held"] else ", victim's cache gone"
    return cell


def fuzz_cell(server: dict, run: str) -> str:
    fuzz = server["schemathesis"]
    if "skipped" in fuzz:
        return "skipped"
    counts = fuzz[run]
    return f"{counts['generated']} cases, {counts['passed']} passed, {counts['failures']} failures, {counts['errors']} errors"


def row(label: str, servers: dict, cell: Callable[[dict], str]) -> Row:
    """``label``, then ``cell`` of each server's figures."""
    return (label, *(cell(server) for server in servers.values()))


def ok_of(answers: dict, total: str) -> str:
    return f"{answers['ok']}/{answers[total]}"


def flood_rows(results: dict) -> list[Row]:
    rows = []
    for i, count in enumerate(results["flood"]):
        runs = {kind: server["flood"][i] for kind, server in results["servers"].items()}
        rows += [
            row(f"{count} silent sockets: chat requests 200", runs, lambda run: ok_of(run["good"], "sent")),
            row("  /health 200", runs, lambda run: ok_of(run["health"], "sent")),
            row("  slowest chat request", runs, lambda run: f"{run['good']['max_seconds']:.2f} s"),
            row(
                "  silent sockets closed by the server",
                runs,
                lambda run: f"{run['silent_closed_by_server']} (min held {run['silent_open_min']})",
            ),
        ]
    return rows


def burst_others(burst: dict) -> str:
    """The first answers other than 200: how many of each."""
    others = [f"{count} {outcome}" for outcome, count in sorted(burst["outcomes"].items()) if outcome != "200"]
    return ", ".join(others) or "-"


def burst_rows(results: dict) -> list[Row]:
    servers, clients = results["servers"], results["burst"]
    return [
        row(f"burst of {clients}, first answer: 200", servers, lambda server: ok_of(server["burst"], "clients")),
        row("  the others", servers, lambda server: burst_others(server["burst"])),
        row(
            f"burst of {clients}, openai retries: 200",
            servers,
            lambda server: ok_of(server["burst_with_retries"], "clients"),
        ),
    ]


def secret_rows(results: dict) -> list[Row]:
    rows = []
    for name, _, _ in ATTACKS["two keys"]:
        label = "secret, same namespace" if name == "same namespace" else f"secret, attacker with {name}"
        rows.append(row(label, results["servers"], partial(secret_cell, name=name)))
    return rows


def schemathesis_rows(results: dict) -> list[Row]:
    servers = results["servers"]
    return [
        row("schemathesis --checks all", servers, partial(fuzz_cell, run="checks_all")),
        row("  as the tests run it (schemathesis.toml)", servers, partial(fuzz_cell, run="as_the_tests_run_it")),
    ]


def rss_before_after(memory: dict) -> str:
    return " -> ".join(mib(memory["rss_bytes"][reading]) for reading in ("before", "after", "settled"))


def memory_rows(results: dict) -> list[Row]:
    servers = results["servers"]
    return [
        row(
            f"RSS MiB: before, after {results['requests']}, settled",
            servers,
            lambda server: rss_before_after(server["memory"]),
        ),
        row("  along the run (requests: MiB)", servers, lambda server: along(server["memory"]["rss_every_50"])),
    ]


TABLE_PARTS = {  # in the table's order
    "flood": flood_rows,
    "burst": burst_rows,
    "secret": secret_rows,
    "schemathesis": schemathesis_rows,
    "memory": memory_rows,
}


def aligned(rows: list[Row]) -> list[str]:
    """The rows in columns, a rule under the first."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return lines


def schemathesis_failures(servers: dict) -> list[str]:
    lines = []
    for kind, server in servers.items():
        fuzz = server.get("schemathesis", {})
        for run, label in (("checks_all", "--checks all"), ("as_the_tests_run_it", "as the tests run it")):
            for failed in fuzz.get(run, {}).get("failed_checks", []):
                lines.append(f"schemathesis failure ({kind}, {label}): {failed}")
    return lines


def table(results: dict) -> str:
    servers = results["servers"]
    rows: list[Row] = [("figure", *servers)]
    for part, part_rows in TABLE_PARTS.items():
        if part in results["parts"]:
            rows += part_rows(results)
    rows.append(row("server tracebacks", servers, lambda server: str(server["server_tracebacks"])))
    return "\n".join(aligned(rows) + schemathesis_failures(servers))


# -- the JSON ----------------------------------------------------------------------------------


def run_settings(args: argparse.Namespace) -> dict:
    import machine

    return {
        "machine": machine.describe_machine(),
        "model": args.model.name,
        "idle_timeout_s": IDLE_TIMEOUT_S,
        "new_tokens": NEW_TOKENS,
        "flood": args.flood,
        "flood_seconds": args.flood_seconds,
        "burst": args.burst,
        "requests": args.requests,
        "schemathesis_examples": args.examples,
        "parts": args.parts,
        "load_average_before": os.getloadavg(),
        "servers": {},
    }


def write_results(results: dict, args: argparse.Namespace) -> Path:
    args.results.mkdir(parents=True, exist_ok=True)
    some = "" if args.parts == list(PARTS) else "-" + "-".join(args.parts)  # a partial run keeps its own file
    path = args.results / f"{datetime.date.today().isoformat()}-server-probe{some}.json"
    path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return path


def main() -> int:
    args = parse_args()
    if args.model is None:
        import checkpoint

        args.model = checkpoint.ensure_checkpoint(args.cache, smoke=True)
    print(f"server probe on {args.model.name} (cpu float32, --idle-timeout {IDLE_TIMEOUT_S:g}) ...", flush=True)
    results = run_settings(args)
    rng = random.Random(4817)  # the secrets, the same each run
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="server-probe-") as folder:
        for kind in ("no key", "two keys"):
            results["servers"][kind] = probe(args.model, kind, args, Path(folder), rng)
    results["seconds"] = time.perf_counter() - started
    results["load_average_after"] = os.getloadavg()
    print()
    if args.smoke:
        print(smoke.NOTE)
    print(table(results))
    path = write_results(results, args)
    print(f"\nwritten: {path} ({results['seconds']:.0f} s)")
    if args.smoke:
        print(smoke.NOTE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
