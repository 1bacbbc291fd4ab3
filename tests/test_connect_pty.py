"""`glmrepl --connect` in a real terminal against real servers on 127.0.0.1.

The servers are `transformers serve` (transformers' own OpenAI-compatible
server) and `glmrepl serve`, both started as processes on the tiny chat
checkpoint, offline. A person's session: chat, Ctrl-C mid-reply, /retry,
/model; and the server killed mid-reply, then started again on the same port.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pexpect
import pytest
from serving import free_port
from test_e2e_pty import Terminal, long_context_qwen  # noqa: F401  (a fixture used by these tests)

ROOT = Path(__file__).parent.parent
TRANSFORMERS_CLI = Path(sys.executable).with_name("transformers")


class ServerOnPort:
    """A server process on a fixed loopback port, which a test can kill and start again."""

    def __init__(self, kind: str, model: Path, log_path: Path, extra_args: tuple | list = ()):
        self.kind, self.model, self.log_path, self.extra_args = kind, model, log_path, list(extra_args)
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def command(self) -> list[str]:
        if self.kind == "transformers":
            return [
                str(TRANSFORMERS_CLI),
                "serve",
                str(self.model),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--device",
                "cpu",
            ]
        return [
            sys.executable,
            "-m",
            "glmrepl",
            "serve",
            str(self.model),
            "--port",
            str(self.port),
            "--device",
            "cpu",
            *self.extra_args,
        ]

    def start(self) -> ServerOnPort:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        env.pop("GLMREPL_API_KEY", None)
        with open(self.log_path, "a", encoding="utf-8") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"{self.kind} server exited:\n{self.log_path.read_text()}")
            try:
                with urllib.request.urlopen(f"{self.url}/models", timeout=5) as answer:
                    if json.loads(answer.read())["data"]:
                        return self
            except urllib.error.HTTPError as error:
                if error.code == 401:  # up, and wants a key
                    return self
                time.sleep(0.3)
            except OSError:
                time.sleep(0.3)
        raise AssertionError(f"{self.kind} server not ready:\n{self.log_path.read_text()}")

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)  # no goodbye: the client sees the stream break off
            self.process.wait(30)


@pytest.fixture(params=["transformers", "glmrepl"])
def server(request, long_context_qwen, tmp_path):  # noqa: F811
    if request.param == "transformers":
        if not TRANSFORMERS_CLI.exists():
            pytest.skip("the transformers command is not installed")
        pytest.importorskip("fastapi")
        pytest.importorskip("uvicorn")
    running = ServerOnPort(request.param, long_context_qwen, tmp_path / f"{request.param}-serve.log").start()
    yield running
    running.kill()


def connect(server: ServerOnPort, home: Path, *flags: str) -> Terminal:
    term = Terminal(["--connect", server.url, "--no-history", *flags], home)
    term.wait_for(f"long-qwen · at 127.0.0.1:{server.port} · server's chat template · 0 turns")  # toolbar
    return term


def test_chat_interrupt_retry_and_model_listing_on_a_server(server, tmp_path):
    term = connect(server, tmp_path, "--temperature", "0", "--max-new-tokens", "20000")
    term.type("tell me a long story\r")
    term.wait_for_output_after("tell me a long story", 40)  # streaming: 20000 tokens would take minutes
    term.type("\x03")
    term.wait_for("[reply cut: /retry generates it again]", timeout=30)
    term.wait_for("server's chat template · 1 turn")
    term.type("/history\r")
    term.wait_for("[cut]")
    term.type("/set max_new_tokens 5\r")
    term.wait_for("max_new_tokens = 5")
    term.type("/retry\r")
    term.wait_for("5 tokens · first token")  # the server's count of the new reply
    term.type("/stats\r")
    term.wait_for("counts from the server")
    term.type("/model\r")
    term.wait_for(f"Models on {server.url} (/model NAME picks one)")
    term.wait_for("long-qwen")
    term.type("/device\r")
    term.wait_for("/device is not available on a remote server")
    term.type("\x04")
    term.child.expect(pexpect.EOF, timeout=30)
    term.child.close()
    assert term.child.exitstatus == 0
    # -p and piped input go through the same server
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    base = [sys.executable, "-m", "glmrepl", "--connect", server.url, "--temperature", "0", "--max-new-tokens", "3"]
    one_shot = subprocess.run([*base, "-p", "hi"], capture_output=True, text=True, env=env, timeout=120)
    assert one_shot.returncode == 0 and one_shot.stderr.startswith("[reply reached max_new_tokens=3"), one_shot.stderr
    piped = subprocess.run(
        base, input="hi\n/set stats on\nagain\n", capture_output=True, text=True, env=env, timeout=120
    )
    assert piped.returncode == 0 and piped.stdout.strip()  # the replies
    assert "3 tokens · first token" in piped.stderr and "error" not in piped.stderr  # notes go to stderr


def test_a_server_killed_mid_reply_then_started_again(server, tmp_path):
    term = connect(server, tmp_path, "--temperature", "0", "--max-new-tokens", "20000")
    term.type("tell me a long story\r")
    term.wait_for_output_after("tell me a long story", 40)  # the reply is streaming
    server.kill()
    term.wait_for("was lost mid-reply", timeout=60)
    term.wait_for("(the conversation is kept: /retry tries again)")
    term.type("are you there?\r")
    term.wait_for(f"cannot reach the server at {server.url} (connection refused)")
    server.start()  # same port
    term.type("/set max_new_tokens 4\r")
    term.wait_for("max_new_tokens = 4")
    term.type("and now?\r")
    term.wait_for("4 tokens · first token", timeout=120)
    term.type("/history\r")
    term.wait_for("user: and now?")
    assert "user: are you there?" not in term.text()  # the failed message was not kept
    term.type("\x04")
    term.child.expect(pexpect.EOF, timeout=30)


def test_a_server_whose_context_is_smaller_than_the_reply_asked_for(qwen_checkpoint, tmp_path):
    """A reply as long as the model's whole context (the default max_new_tokens on the tiny model)
    cannot fit beside any prompt: the server refuses it, and the client asks for the room that is left."""
    context = json.loads((qwen_checkpoint / "config.json").read_text())["max_position_embeddings"]
    server = ServerOnPort("glmrepl", qwen_checkpoint, tmp_path / "serve.log").start()
    try:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        base = [sys.executable, "-m", "glmrepl", "--connect", server.url, "--temperature", "0"]
        base += ["--max-new-tokens", str(context)]
        one_shot = subprocess.run([*base, "-p", "hello"], capture_output=True, text=True, env=env, timeout=120)
        assert one_shot.returncode == 0 and one_shot.stdout.strip(), one_shot.stderr
        assert "error" not in one_shot.stderr, one_shot.stderr
        piped = subprocess.run(base, input="hello\n/stats\n", capture_output=True, text=True, env=env, timeout=120)
        assert piped.returncode == 0 and "error" not in piped.stderr, piped.stderr
        stats = re.search(
            r"(\d+) tokens · .* · prompt (\d+) tokens(?: \([^)]*\))? · stopped: (\w+) · counts from the server",
            piped.stdout,
        )
        assert stats, piped.stdout
        new, prompt, stopped = int(stats[1]), int(stats[2]), stats[3]
        # Greedy on the tiny model never ends "hello"'s reply: it fills the room the prompt left, and no more.
        assert (new + prompt, stopped) == (context, "length"), piped.stdout
        assert "[reply stopped at the end of the model's context]" in piped.stderr
    finally:
        server.kill()


def test_a_key_from_the_flag_or_the_environment_and_a_wrong_one(long_context_qwen, tmp_path):  # noqa: F811
    server = ServerOnPort("glmrepl", long_context_qwen, tmp_path / "serve.log", ["--api-key", "right-key"]).start()
    try:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "GLMREPL_API_KEY": "right-key"}
        base = [sys.executable, "-m", "glmrepl", "--connect", server.url, "--max-new-tokens", "2"]
        wrong = subprocess.run(
            [*base, "--api-key", "wrong-key", "-p", "hi"], capture_output=True, text=True, env=env, timeout=120
        )
        assert wrong.returncode == 1
        assert wrong.stderr == (
            f"error: the server at {server.url} refused the API key (401: Incorrect API key "
            "provided): check --api-key or $GLMREPL_API_KEY\n"
        )
        right = subprocess.run([*base, "-p", "hi"], capture_output=True, text=True, env=env, timeout=120)
        assert right.returncode == 0 and "error" not in right.stderr
    finally:
        server.kill()
