"""The parts of benchmarks/server_probe.py: memory over many requests, silent sockets, a burst,
cache probing for a secret, schemathesis. Each takes a server_probe.ProbedServer (a running
`glmrepl serve`) and returns its figures, ready for the JSON."""

from __future__ import annotations

import collections
import os
import random
import re
import selectors
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from serve import ROOT

if TYPE_CHECKING:
    from server_probe import ProbedServer

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
SCHEMATHESIS = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or shutil.which("schemathesis")
SCHEMATHESIS_CONFIG = ROOT / "tests" / "schemathesis.toml"
CASE_PATTERNS = {  # the figures on schemathesis's "Test cases:" line
    "generated": r"(\d+) generated",
    "failing": r"(\d+) found",
    "failures": r"(\d+) unique failures?",
    "skipped": r"(\d+) skipped",
}
WARM_UP_REQUESTS = 12

StatusAndCode = tuple[int, str]


# -- 1. memory ------------------------------------------------------------------------------


def mixed_request(server: ProbedServer, i: int) -> StatusAndCode:
    """Request ``i`` of the memory run: chat, streamed chat and completions in turn, every third
    in a ``cache_salt`` namespace of its own."""
    prompt = f"Request {i}: tell me about the sea, the ships and the lighthouse number {i % 17}."
    salt = f"probe-salt-{i}" if i % 3 == 2 else None
    kind = i % 3
    if kind == 0:
        return server.chat(prompt, salt=salt)
    if kind == 1:
        return server.chat(prompt, stream=True, salt=salt)
    return server.completion(prompt, salt=salt)


def memory(server: ProbedServer, requests: int, settle_s: float) -> dict:
    """Resident memory before and after ``requests`` requests of three kinds, and after a settle."""
    readings = {"ready": server.rss()}
    for i in range(WARM_UP_REQUESTS):  # kernels chosen, first allocations made
        mixed_request(server, -1 - i)
    readings["before"] = server.rss()
    statuses: collections.Counter = collections.Counter()
    every_50 = []
    started = time.perf_counter()
    for i in range(requests):
        status, code = mixed_request(server, i)
        statuses[f"{status} {code}".strip()] += 1
        if (i + 1) % 50 == 0 or i + 1 == requests:
            every_50.append({"requests": i + 1, "rss_bytes": server.rss()})
    readings["after"] = server.rss()
    seconds = time.perf_counter() - started
    time.sleep(settle_s)
    readings["settled"] = server.rss()
    return {
        "requests": requests,
        "seconds": seconds,
        "statuses": dict(statuses),
        "rss_bytes": readings,
        "rss_every_50": every_50,
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

    def _drop_closed(self) -> None:
        """Forget the sockets the server closed (or reset) in the last 0.1 s."""
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

    def _refill(self) -> None:
        """Open sockets until ``count`` are open again, pausing at the first refused connection."""
        while self.open_now() < self.count and not self.stopping.is_set():
            before = self.connect_errors
            self._open()
            if self.connect_errors > before:
                time.sleep(0.05)
                break

    def _run(self) -> None:
        for _ in range(self.count):
            self._open()
        self.ready.set()
        while not self.stopping.is_set():
            self._drop_closed()
            self._refill()
        for key in list(self.selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self.selector.close()


def health_status(server: ProbedServer) -> StatusAndCode:
    status, _, code = server.call("GET", "/health", timeout=10)
    return status, code


def timed_call(call: Callable[[], StatusAndCode], results: list[dict], lock: threading.Lock) -> None:
    """Adds ``call``'s status, error code and seconds to ``results`` (status 0 when it could not connect)."""
    started = time.perf_counter()
    try:
        status, code = call()
    except OSError as error:
        status, code = 0, type(error).__name__
    with lock:
        results.append({"status": status, "code": code, "seconds": time.perf_counter() - started})


def ask_each_second(server: ProbedServer, silent: SilentFlood, started: float, seconds: float) -> dict:
    """Each second from ``started`` for ``seconds``: the count of open silent sockets noted, a chat request
    ("good") and a /health request ("health") sent on threads of their own. Their answers, once all in."""
    answers: dict[str, list[dict]] = {"good": [], "health": []}
    lock = threading.Lock()
    threads = []
    tick = 0
    while time.perf_counter() - started < seconds:
        silent.open_samples.append(silent.open_now())
        prompt = f"Flood check {tick}: one short line, please."
        calls = {"good": partial(server.chat, prompt, timeout=10), "health": partial(health_status, server)}
        for name, call in calls.items():
            thread = threading.Thread(target=timed_call, args=(call, answers[name], lock))
            thread.start()
            threads.append(thread)
        tick += 1
        time.sleep(max(0.0, started + tick - time.perf_counter()))
    for thread in threads:
        thread.join(30)
    return answers


def answered(results: list[dict]) -> dict:
    return {
        "sent": len(results),
        "ok": sum(r["status"] == 200 for r in results),
        "statuses": dict(collections.Counter(f"{r['status']} {r['code']}".strip() for r in results)),
        "max_seconds": max(r["seconds"] for r in results),
    }


def flood(server: ProbedServer, count: int, seconds: float) -> dict:
    """A chat request and a /health request each second while ``count`` silent sockets are held."""
    with SilentFlood(server.port, count) as silent:
        started = time.perf_counter()
        answers = ask_each_second(server, silent, started, seconds)
        figures = {
            "silent_sockets": count,
            "seconds": time.perf_counter() - started,
            "silent_opened": silent.opened,
            "silent_closed_by_server": silent.closed_by_server,
            "silent_connect_errors": silent.connect_errors,
            "silent_open_min": min(silent.open_samples),
        }
    for name, results in answers.items():
        figures[name] = answered(results)
    return figures


# -- 3. a burst --------------------------------------------------------------------------------


def first_answer(server: ProbedServer, prompt: str, gate: threading.Barrier) -> str:
    """One chat request sent once the whole burst is at ``gate``: its status and error code."""
    gate.wait()
    try:
        status, code = server.chat(prompt, timeout=120)
        return f"{status} {code}".strip()
    except OSError as error:
        return type(error).__name__


def answer_with_retries(server: ProbedServer, prompt: str, gate: threading.Barrier) -> str:
    """The same through the openai client, which retries a 503 after its Retry-After (twice, its default)."""
    from openai import APIStatusError

    client = server.openai_client(max_retries=2)
    gate.wait()
    try:
        client.chat.completions.create(
            model=server.model_id,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=server.new_tokens,
            temperature=0,
        )
        return "200"
    except APIStatusError as error:
        return f"{error.status_code} {getattr(error, 'code', '') or ''}".strip()
    except Exception as error:  # noqa: BLE001 - counted, not raised: a refused connection is a figure
        return type(error).__name__


def burst(server: ProbedServer, clients: int, with_retries: bool) -> dict:
    """``clients`` chat requests at once: their statuses, on the first answer or with openai's retries."""
    outcomes: list[str] = []
    lock = threading.Lock()
    gate = threading.Barrier(clients)
    send = answer_with_retries if with_retries else first_answer

    def client(i: int) -> None:
        outcome = send(server, f"Burst client {i}: say something short.", gate)
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    counts = collections.Counter(outcomes)
    return {
        "clients": clients,
        "retries": "openai client, max_retries=2" if with_retries else "none",
        "ok": counts.get("200", 0),
        "outcomes": dict(counts),
        "seconds": time.perf_counter() - started,
    }


# -- 4. cache probing ----------------------------------------------------------------------------


def cached_tokens(server: ProbedServer, who: tuple, system: str, user: str) -> int:
    """How many prompt tokens a one-token chat request by ``who`` (key index, cache_salt) reused."""
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


def guess_digits(server: ProbedServer, attacker: tuple, prefix: str, digits: int) -> tuple[str, list[dict], int]:
    """For each of ``digits`` digits after ``prefix``, guesses 0-9 in turn until one guess reuses a
    different number of tokens than another (the larger one is the digit), and stops at a digit
    where all ten reuse the same. The digits found, the cached tokens of each guess, the requests."""
    known = ""
    guesses = []
    requests = 0
    for _ in range(digits):
        seen: dict[str, int] = {}
        found = None
        for digit in "0123456789":
            seen[digit] = cached_tokens(server, attacker, prefix + known + digit, "hello")
            requests += 1
            if len(set(seen.values())) > 1:
                found = max(seen, key=seen.__getitem__)
                break
        guesses.append(seen)
        if found is None:
            break
        known += found
    return known, guesses, requests


def attack(server: ProbedServer, secret: str, victim: tuple, attacker: tuple) -> dict:
    """Recover ``secret`` from a victim's system prompt a digit at a time through cached_tokens.

    ``victim`` and ``attacker``: (key index or None, cache_salt or None). The attacker first sends
    a request whose system prompt stops before the secret, so that its own namespace holds that
    much and a wrong guess reuses exactly as much as any other; then guesses (guess_digits)."""
    cached_tokens(server, victim, SECRET_TEMPLATE.format(secret), "What can you do for me?")
    prefix = SECRET_TEMPLATE.split("{}")[0]
    cached_tokens(server, attacker, prefix, "hello")  # the attacker's own baseline
    known, guesses, guess_requests = guess_digits(server, attacker, prefix, len(secret))
    correct = len(os.path.commonprefix([known, secret]))  # the digits right up to the first wrong one
    # The control: the victim's own namespace still reuses its prompt through the secret, so an
    # attacker that learned nothing was refused the cache, not left without one.
    control = cached_tokens(server, victim, prefix + secret, "hello")
    most = max(max(seen.values()) for seen in guesses)
    return {
        "secret": secret,
        "recovered": known,
        "digits_recovered": correct,
        "requests": 1 + guess_requests,
        "cached_tokens_by_guess": guesses,
        "victim_namespace_cached_tokens": control,
        "victim_cache_held": control >= most + len(secret) - correct,
    }


def attacks(server: ProbedServer, kind: str, rng: random.Random) -> list[dict]:
    results = []
    for name, victim, attacker in ATTACKS[kind]:
        secret = f"{rng.randrange(10000):04d}"
        figures = attack(server, secret, victim, attacker)
        results.append({"attack": name, "victim": victim, "attacker": attacker, **figures})
    return results


# -- 5. schemathesis --------------------------------------------------------------------------------


def schemathesis_command(server: ProbedServer, checks: list[str], examples: int) -> list[str]:
    command = [SCHEMATHESIS, "--config-file", str(SCHEMATHESIS_CONFIG), "run"]
    command += [f"http://127.0.0.1:{server.port}/openapi.json", *checks]
    command += ["--max-examples", str(examples), "--seed", "1", "--no-shrink", "--workers", "1"]
    if server.keys:
        command += ["--header", f"Authorization: Bearer {server.keys[0]}"]
    return command


def schemathesis(server: ProbedServer, examples: int, folder: Path) -> dict:
    """schemathesis against the server's document, a bounded number of examples, seed 1: once with
    ``--checks all`` on the command line (which enables every check on every operation, over what
    tests/schemathesis.toml leaves out), and once as tests/test_server_concurrency.py runs it (every
    check but those the file leaves out, on the operations it names)."""
    if SCHEMATHESIS is None:
        return {"skipped": "schemathesis is not installed (dev extra)"}
    runs = {}
    for name, checks in (("checks_all", ["--checks", "all"]), ("as_the_tests_run_it", [])):
        command = schemathesis_command(server, checks, examples)
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


def case_counts(summary: str) -> dict[str, int]:
    """The test cases generated, failing, failing uniquely and skipped, from the summary's line."""
    cases = re.search(r"Test cases:\s*([^\n]+)", summary)
    if not cases:
        return {}
    found = {key: re.search(pattern, cases.group(1)) for key, pattern in CASE_PATTERNS.items()}
    return {key: int(match.group(1)) if match else 0 for key, match in found.items()}


def failed_checks(output: str) -> list[str]:
    """Each failure's operation and check, and the message of the answer that failed it."""
    failed: list[str] = []
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
    return failed


def schemathesis_counts(output: str) -> dict:
    """What schemathesis 4 prints: test cases generated, failing, skipped (and so passed), unique
    failures, errors, and each failure's operation and check."""
    summary = output[output.rfind("SUMMARY") :]
    counts: dict = {"generated": 0, "failing": 0, "skipped": 0, "failures": 0, "errors": 0}
    counts.update(case_counts(summary))
    errors = re.search(r"(\d+) errors?\b", summary.splitlines()[-1] if summary.strip() else "")
    counts["errors"] = int(errors.group(1)) if errors else 0
    counts["passed"] = counts["generated"] - counts["failing"] - counts["skipped"]
    counts["failed_checks"] = failed_checks(output)
    return counts
