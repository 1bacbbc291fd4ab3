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
"""

from __future__ import annotations

import argparse
import collections
import datetime
import http.client
import json
import os
import random
import re
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import smoke
from kv_memory import resident_bytes
from serve import HERE, ROOT, free_port

IDLE_TIMEOUT_S = 2.0
NEW_TOKENS = 8
KEYS = ("probe-key-one", "probe-key-two")
SECRET_TEMPLATE = "The code is {}. Never say it."
ATTACKS = {  # server kind -> (name, victim's (key, salt), attacker's (key, salt))
    "no key": [
        ("other cache_salt", (None, "victim-salt"), (None, "attacker-salt")),
        ("same namespace", (None, None), (None, None)),
    ],
    "two keys": [
        ("other cache_salt", (0, "victim-salt"), (0, "attacker-salt")),
        ("other API key", (0, None), (1, None)),
        ("same namespace", (0, None), (0, None)),
    ],
}
PARTS = ("memory", "flood", "burst", "secret", "schemathesis")
SCHEMATHESIS = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or shutil.which("schemathesis")
SCHEMATHESIS_CONFIG = ROOT / "tests" / "schemathesis.toml"


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
        self.port = free_port()
        self.log = log
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("GLMREPL_API_KEY", None)
        command = [sys.executable, "-m", "glmrepl", "serve", str(model), "--port", str(self.port)]
        command += ["--device", "cpu", "--dtype", "float32", "--max-new-tokens", str(NEW_TOKENS)]
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
            "max_tokens": NEW_TOKENS,
            "temperature": 0,
            "stream": stream,
        }
        if salt is not None:
            body["cache_salt"] = salt
        status, _, code = self.call("POST", "/v1/chat/completions", body, timeout)
        return status, code

    def completion(self, prompt: str, salt: str | None = None) -> tuple[int, str]:
        body = {"model": self.model_id, "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0}
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


# -- 1. memory ------------------------------------------------------------------------------


def memory(server: ProbedServer, requests: int, settle_s: float) -> dict:
    """Resident memory before and after ``requests`` requests of three kinds, and after a settle."""
    readings = {"ready": server.rss()}

    def one(i: int) -> tuple[int, str]:
        prompt = f"Request {i}: tell me about the sea, the ships and the lighthouse number {i % 17}."
        salt = f"probe-salt-{i}" if i % 3 == 2 else None  # a namespace of its own
        kind = i % 3
        if kind == 0:
            return server.chat(prompt, salt=salt)
        if kind == 1:
            return server.chat(prompt, stream=True, salt=salt)
        return server.completion(prompt, salt=salt)

    for i in range(12):  # warm-up: kernels chosen, first allocations made
        one(-1 - i)
    readings["before"] = server.rss()
    statuses: collections.Counter = collections.Counter()
    steps = []
    started = time.perf_counter()
    for i in range(requests):
        status, code = one(i)
        statuses[f"{status} {code}".strip()] += 1
        if (i + 1) % 50 == 0 or i + 1 == requests:
            steps.append({"requests": i + 1, "rss_bytes": server.rss()})
    readings["after"] = server.rss()
    seconds = time.perf_counter() - started
    time.sleep(settle_s)
    readings["settled"] = server.rss()
    return {
        "requests": requests,
        "seconds": seconds,
        "statuses": dict(statuses),
        "rss_bytes": readings,
        "rss_every_50": steps,
        "settle_s": settle_s,
    }


# -- 2. silent sockets ------------------------------------------------------------------------


class SilentFlood:
    """``count`` connections that never send a byte, each reopened as soon as the server closes it."""

    def __init__(self, port: int, count: int):
        self.port = port
        self.count = count
        self.selector = selectors.DefaultSelector()
        self.opened = 0
        self.closed_by_server = 0
        self.connect_errors = 0
        self.open_samples: list[int] = []
        self.stopping = threading.Event()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> SilentFlood:
        self.thread.start()
        self.ready.wait(60)
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.thread.join(30)

    def open_now(self) -> int:
        return len(self.selector.get_map())

    def _open(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(5)
        try:
            sock.connect(("127.0.0.1", self.port))
        except OSError:
            self.connect_errors += 1
            sock.close()
            return
        sock.setblocking(False)
        self.selector.register(sock, selectors.EVENT_READ)
        self.opened += 1

    def _run(self) -> None:
        for _ in range(self.count):
            self._open()
        self.ready.set()
        while not self.stopping.is_set():
            for key, _ in self.selector.select(0.1):
                sock = key.fileobj
                try:
                    if sock.recv(4096):  # type: ignore[union-attr]
                        continue  # the server said something: keep listening
                except BlockingIOError:
                    continue
                except OSError:
                    pass  # reset
                self.selector.unregister(sock)
                sock.close()  # type: ignore[union-attr]
                self.closed_by_server += 1
            while self.open_now() < self.count and not self.stopping.is_set():
                before = self.connect_errors
                self._open()
                if self.connect_errors > before:
                    time.sleep(0.05)
                    break
        for key in list(self.selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self.selector.close()


def flood(server: ProbedServer, count: int, seconds: float) -> dict:
    """A chat request and a /health request each second while ``count`` silent sockets are held."""
    good: list[dict] = []
    health: list[dict] = []
    lock = threading.Lock()

    def timed(results: list[dict], call) -> None:
        started = time.perf_counter()
        try:
            status, code = call()
        except OSError as error:
            status, code = 0, type(error).__name__
        with lock:
            results.append({"status": status, "code": code, "seconds": time.perf_counter() - started})

    def ask_health() -> tuple[int, str]:
        status, _, code = server.call("GET", "/health", timeout=10)
        return status, code

    with SilentFlood(server.port, count) as silent:
        threads = []
        started = time.perf_counter()
        tick = 0
        while time.perf_counter() - started < seconds:
            silent.open_samples.append(silent.open_now())
            prompt = f"Flood check {tick}: one short line, please."
            for results, call in (
                (good, lambda prompt=prompt: server.chat(prompt, timeout=10)),
                (health, ask_health),
            ):
                thread = threading.Thread(target=timed, args=(results, call))
                thread.start()
                threads.append(thread)
            tick += 1
            time.sleep(max(0.0, started + tick - time.perf_counter()))
        for thread in threads:
            thread.join(30)
        figures = {
            "silent_sockets": count,
            "seconds": time.perf_counter() - started,
            "silent_opened": silent.opened,
            "silent_closed_by_server": silent.closed_by_server,
            "silent_connect_errors": silent.connect_errors,
            "silent_open_min": min(silent.open_samples),
        }
    for name, results in (("good", good), ("health", health)):
        figures[name] = {
            "sent": len(results),
            "ok": sum(r["status"] == 200 for r in results),
            "statuses": dict(collections.Counter(f"{r['status']} {r['code']}".strip() for r in results)),
            "max_seconds": max(r["seconds"] for r in results),
        }
    return figures


# -- 3. a burst --------------------------------------------------------------------------------


def burst(server: ProbedServer, clients: int, with_retries: bool) -> dict:
    """``clients`` chat requests at once: their statuses, on the first answer or with openai's retries."""
    results: list[str] = []
    lock = threading.Lock()
    gate = threading.Barrier(clients)

    def one(i: int) -> None:
        prompt = f"Burst client {i}: say something short."
        if with_retries:
            from openai import APIStatusError

            client = server.openai_client(max_retries=2)  # openai's default: a 503 is retried after Retry-After
            gate.wait()
            try:
                client.chat.completions.create(
                    model=server.model_id,
                    messages=[{"role": "user", "content": prompt}],
                    max_tokens=NEW_TOKENS,
                    temperature=0,
                )
                outcome = "200"
            except APIStatusError as error:
                outcome = f"{error.status_code} {getattr(error, 'code', '') or ''}".strip()
            except Exception as error:  # noqa: BLE001 - counted, not raised: a refused connection is a figure
                outcome = type(error).__name__
        else:
            gate.wait()
            try:
                status, code = server.chat(prompt, timeout=120)
                outcome = f"{status} {code}".strip()
            except OSError as error:
                outcome = type(error).__name__
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    counts = collections.Counter(results)
    return {
        "clients": clients,
        "retries": "openai client, max_retries=2" if with_retries else "none",
        "ok": counts.get("200", 0),
        "outcomes": dict(counts),
        "seconds": time.perf_counter() - started,
    }


# -- 4. cache probing ----------------------------------------------------------------------------


def attack(server: ProbedServer, secret: str, victim: tuple, attacker: tuple) -> dict:
    """Recover ``secret`` from a victim's system prompt a digit at a time through cached_tokens.

    ``victim`` and ``attacker``: (key index or None, cache_salt or None). The attacker first sends
    a request whose system prompt stops before the secret, so that its own namespace holds that
    much and a wrong guess reuses exactly as much as any other; then, for each digit, guesses 0-9
    in turn until one guess reuses a different number of tokens than another (the larger one is
    the digit), and stops at a digit where all ten reuse the same."""

    def ask(who: tuple, system: str, user: str) -> int:
        key, salt = who
        client = server.openai_client(key)
        reply = client.chat.completions.create(
            model=server.model_id,
            messages=[{"role": "system", "content": system}, {"role": "user", "content": user}],
            max_tokens=1,
            temperature=0,
            extra_body={"cache_salt": salt} if salt else None,
        )
        details = reply.usage.prompt_tokens_details
        return (details.cached_tokens or 0) if details else 0

    ask(victim, SECRET_TEMPLATE.format(secret), "What can you do for me?")
    prefix = SECRET_TEMPLATE.split("{}")[0]
    requests = 1
    ask(attacker, prefix, "hello")  # the attacker's own baseline
    known = ""
    guesses = []
    for _ in secret:
        seen: dict[str, int] = {}
        found = None
        for digit in "0123456789":
            seen[digit] = ask(attacker, prefix + known + digit, "hello")
            requests += 1
            if len(set(seen.values())) > 1:
                found = max(seen, key=seen.__getitem__)
                break
        guesses.append(seen)
        if found is None:
            break
        known += found
    correct = 0
    for got, real in zip(known, secret):
        if got != real:
            break
        correct += 1
    # The control: the victim's own namespace still reuses its prompt through the secret, so an
    # attacker that learned nothing was refused the cache, not left without one.
    control = ask(victim, prefix + secret, "hello")
    most = max(max(seen.values()) for seen in guesses)
    return {
        "secret": secret,
        "recovered": known,
        "digits_recovered": correct,
        "requests": requests,
        "cached_tokens_by_guess": guesses,
        "victim_namespace_cached_tokens": control,
        "victim_cache_held": control >= most + len(secret) - correct,
    }


def attacks(server: ProbedServer, kind: str, rng: random.Random) -> list[dict]:
    results = []
    for name, victim, attacker in ATTACKS[kind]:
        secret = f"{rng.randrange(10000):04d}"
        results.append(
            {"attack": name, "victim": victim, "attacker": attacker, **attack(server, secret, victim, attacker)}
        )
    return results


# -- 5. schemathesis --------------------------------------------------------------------------------


def schemathesis(server: ProbedServer, examples: int, folder: Path) -> dict:
    """schemathesis against the server's document, a bounded number of examples, seed 1: once with
    ``--checks all`` on the command line (which enables every check on every operation, over what
    tests/schemathesis.toml leaves out), and once as tests/test_server_concurrency.py runs it (every
    check but those the file leaves out, on the operations it names)."""
    if SCHEMATHESIS is None:
        return {"skipped": "schemathesis is not installed (dev extra)"}
    runs = {}
    for name, checks in (("checks_all", ["--checks", "all"]), ("as_the_tests_run_it", [])):
        command = [SCHEMATHESIS, "--config-file", str(SCHEMATHESIS_CONFIG), "run"]
        command += [f"http://127.0.0.1:{server.port}/openapi.json", *checks]
        command += ["--max-examples", str(examples), "--seed", "1", "--no-shrink", "--workers", "1"]
        if server.keys:
            command += ["--header", f"Authorization: Bearer {server.keys[0]}"]
        started = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=folder)
        output = re.sub(r"\x1b\[[0-9;]*m", "", result.stdout + result.stderr)
        runs[name] = {
            "returncode": result.returncode,
            "seconds": time.perf_counter() - started,
            **schemathesis_counts(output),
            "summary": output[output.rfind("SUMMARY") :] if "SUMMARY" in output else output[-3000:],
        }
    return runs


def schemathesis_counts(output: str) -> dict:
    """What schemathesis 4 prints: test cases generated, failing, skipped (and so passed), unique
    failures, errors, and each failure's operation and check."""
    summary = output[output.rfind("SUMMARY") :]
    counts: dict = {"generated": 0, "failing": 0, "skipped": 0, "failures": 0, "errors": 0}
    cases = re.search(r"Test cases:\s*([^\n]+)", summary)
    if cases:
        line = cases.group(1)
        for key, pattern in (
            ("generated", r"(\d+) generated"),
            ("failing", r"(\d+) found"),
            ("failures", r"(\d+) unique failures?"),
            ("skipped", r"(\d+) skipped"),
        ):
            found = re.search(pattern, line)
            counts[key] = int(found.group(1)) if found else 0
    errors = re.search(r"(\d+) errors?\b", summary.splitlines()[-1] if summary.strip() else "")
    counts["errors"] = int(errors.group(1)) if errors else 0
    counts["passed"] = counts["generated"] - counts["failing"] - counts["skipped"]
    failed = []
    section = output[output.find("= FAILURES =") : output.rfind("SUMMARY")] if "= FAILURES =" in output else ""
    operation = None
    for line in section.splitlines():
        heading = re.match(r"_+ (.+?) _+$", line)
        if heading:
            operation = heading.group(1)
        check = re.match(r"- (ST\d+ .+)$", line.strip())
        if check and operation:
            failed.append(f"{operation}: {check.group(1)}")
        message = re.search(r'"message":"(.*?)"', line)
        if message and failed and " -> " not in failed[-1]:  # the answer's message, once a failure
            failed[-1] += f" -> {message.group(1)}"
    counts["failed_checks"] = failed
    return counts


# -- the run -----------------------------------------------------------------------------------


def probe(model: Path, kind: str, args: argparse.Namespace, folder: Path, rng: random.Random) -> dict:
    keys = KEYS if kind == "two keys" else ()
    log = folder / f"server-{kind.replace(' ', '-')}.log"
    print(f"[{kind}] starting glmrepl serve ...", flush=True)
    server = ProbedServer(model, keys, log)
    try:
        figures: dict = {"keys": len(keys)}
        if "memory" in args.parts:  # first, on a fresh server
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
        figures["health_after"] = json.loads(server.call("GET", "/health")[1])
        figures["server_tracebacks"] = server.tracebacks()
        if figures["server_tracebacks"]:
            figures["server_log_tail"] = log.read_text(errors="replace")[-4000:]
        figures["server_alive"] = server.process.poll() is None
    finally:
        server.stop()
    return figures


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
    s = fuzz[run]
    return f"{s['generated']} cases, {s['passed']} passed, {s['failures']} failures, {s['errors']} errors"


def table(results: dict) -> str:
    servers = results["servers"]
    rows: list[tuple[str, ...]] = [("figure", *servers)]

    def row(label: str, cell) -> None:
        rows.append((label, *(cell(server) for server in servers.values())))

    parts = results["parts"]
    for i, count in enumerate(results["flood"] if "flood" in parts else []):
        flood_of = [server["flood"][i] for server in servers.values()]
        rows.append(
            (
                f"{count} silent sockets: chat requests 200",
                *(f"{f['good']['ok']}/{f['good']['sent']}" for f in flood_of),
            )
        )
        rows.append(("  /health 200", *(f"{f['health']['ok']}/{f['health']['sent']}" for f in flood_of)))
        rows.append(("  slowest chat request", *(f"{f['good']['max_seconds']:.2f} s" for f in flood_of)))
        rows.append(
            (
                "  silent sockets closed by the server",
                *(f"{f['silent_closed_by_server']} (min held {f['silent_open_min']})" for f in flood_of),
            )
        )
    if "burst" in parts:
        row(f"burst of {results['burst']}, first answer: 200", lambda s: f"{s['burst']['ok']}/{s['burst']['clients']}")
        row(
            "  the others",
            lambda s: ", ".join(f"{n} {o}" for o, n in sorted(s["burst"]["outcomes"].items()) if o != "200") or "-",
        )
        row(
            f"burst of {results['burst']}, openai retries: 200",
            lambda s: f"{s['burst_with_retries']['ok']}/{s['burst_with_retries']['clients']}",
        )
    for name, _, _ in ATTACKS["two keys"] if "secret" in parts else []:
        label = "secret, same namespace" if name == "same namespace" else f"secret, attacker with {name}"
        rows.append((label, *(secret_cell(server, name) for server in servers.values())))
    if "schemathesis" in parts:
        row("schemathesis --checks all", lambda s: fuzz_cell(s, "checks_all"))
        row("  as the tests run it (schemathesis.toml)", lambda s: fuzz_cell(s, "as_the_tests_run_it"))
    if "memory" in parts:
        row(
            f"RSS MiB: before, after {results['requests']}, settled",
            lambda s: " -> ".join(mib(s["memory"]["rss_bytes"][k]) for k in ("before", "after", "settled")),
        )
        row("  along the run (requests: MiB)", lambda s: along(s["memory"]["rss_every_50"]))
    row("server tracebacks", lambda s: str(s["server_tracebacks"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    for kind, server in servers.items():
        fuzz = server.get("schemathesis", {})
        for run, label in (("checks_all", "--checks all"), ("as_the_tests_run_it", "as the tests run it")):
            for failed in fuzz.get(run, {}).get("failed_checks", []):
                lines.append(f"schemathesis failure ({kind}, {label}): {failed}")
    return "\n".join(lines)


def main() -> int:
    args = parse_args()
    import machine

    if args.model is None:
        import checkpoint

        args.model = checkpoint.ensure_checkpoint(args.cache, smoke=True)
    print(f"server probe on {args.model.name} (cpu float32, --idle-timeout {IDLE_TIMEOUT_S:g}) ...", flush=True)
    results: dict = {
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
    args.results.mkdir(parents=True, exist_ok=True)
    some = "" if args.parts == list(PARTS) else "-" + "-".join(args.parts)  # a partial run keeps its own file
    path = args.results / f"{datetime.date.today().isoformat()}-server-probe{some}.json"
    path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"\nwritten: {path} ({results['seconds']:.0f} s)")
    if args.smoke:
        print(smoke.NOTE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
