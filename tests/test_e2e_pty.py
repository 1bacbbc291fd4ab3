"""End to end: the installed console script in a pseudo-terminal, read like a person reads it.

pexpect runs glmrepl in a pty; pyte plays the terminal (it keeps the screen
and answers prompt_toolkit's cursor-position requests). A needle counts as
seen when it is on the emulated screen (the toolbar is drawn there by cursor
moves) or in the output stripped of escape codes (streamed text that pyte's
width rules for random bytes can misplace).
"""

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import pexpect
import pyte
import pytest

GLMREPL = str(Path(sys.executable).with_name("glmrepl"))
ROWS, COLS = 40, 120
ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


class Terminal:
    def __init__(self, args, home: Path, **env_overrides):
        env = dict(
            os.environ, XDG_DATA_HOME=str(home / "data"), XDG_CONFIG_HOME=str(home / "config"), TERM="xterm-256color"
        )
        env.update(env_overrides)
        self.child = pexpect.spawn(GLMREPL, args, env=env, dimensions=(ROWS, COLS), encoding="utf-8")
        self.screen = pyte.Screen(COLS, ROWS)
        self.screen.write_process_input = self.child.send  # answers cursor-position requests
        self.stream = pyte.Stream(self.screen)
        self.transcript = ""
        self.received = 0  # characters read from glmrepl in all

    def seen(self, needle: str) -> bool:
        return needle in self.text() or needle in self.transcript

    def text(self) -> str:
        return "\n".join(line.rstrip() for line in self.screen.display)

    def pump(self, seconds: float = 0.1) -> None:
        try:
            data = self.child.read_nonblocking(100_000, timeout=seconds)
        except pexpect.TIMEOUT:
            return
        self.stream.feed(data)
        self.transcript += ESCAPES.sub("", data)
        self.received += len(data)

    def received_within(self, seconds: float) -> int:
        """Characters glmrepl writes in the next ``seconds`` (nothing typed meanwhile)."""
        before, end = self.received, time.monotonic() + seconds
        while time.monotonic() < end:
            self.pump(end - time.monotonic())
        return self.received - before

    def wait_for_more_output(self, characters: int, timeout: float = 120) -> None:
        """Wait until glmrepl has written ``characters`` more (a reply is streaming)."""
        target, end = len(self.transcript) + characters, time.monotonic() + timeout
        while len(self.transcript) < target:
            assert time.monotonic() < end, f"output stopped; screen:\n{self.text()}"
            self.pump()

    def wait_for(self, needle: str, timeout: float = 120) -> float:
        return self.wait_until(lambda: self.seen(needle), repr(needle), timeout)

    def wait_for_output_after(self, needle: str, chars: int, timeout: float = 120) -> float:
        """Wait until ``chars`` visible characters have arrived after ``needle`` (e.g. a reply streaming)."""

        def arrived() -> bool:
            _, found, after = self.transcript.rpartition(needle)
            return bool(found) and len("".join(after.split())) >= chars

        return self.wait_until(arrived, f"{chars} characters after {needle!r}", timeout)

    def wait_until(self, condition, what: str, timeout: float) -> float:
        start = time.monotonic()
        while not condition():
            if time.monotonic() - start > timeout:
                raise AssertionError(f"{what} never appeared; screen:\n{self.text()}")
            if not self.child.isalive():
                self.pump(0.2)
                if condition():
                    break
                raise AssertionError(f"glmrepl exited before {what}; screen:\n{self.text()}")
            self.pump()
        return time.monotonic() - start

    def type(self, keys: str) -> None:
        self.transcript = ""  # later needles must come from what follows
        self.child.send(keys)


@pytest.fixture
def long_context_qwen(qwen_checkpoint, tmp_path):
    """The tiny chat model with room for thousands of tokens, so a reply runs long enough to interrupt."""
    folder = tmp_path / "long-qwen"
    shutil.copytree(qwen_checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = 32768
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_prompt_first_then_chat_interrupt_retry_and_exit(long_context_qwen, tmp_path):
    term = Terminal([str(long_context_qwen), "--temperature", "0", "--max-new-tokens", "20000"], tmp_path)
    term.wait_for(">>>")
    term.wait_for("loading long-qwen")  # the prompt is up while the model still loads
    term.wait_for("chat template · 0 turns")  # the toolbar once it is ready
    term.type("tell me a long story\r")
    term.wait_for_output_after("tell me a long story", chars=20)  # the reply is streaming (20000 tokens: minutes)
    term.type("\x03")
    term.wait_for("[reply cut: /retry generates it again]", timeout=30)
    term.wait_for("1 turn ·")
    term.type("/history\r")
    term.wait_for("[cut]")
    term.type("/set max_new_tokens 5\r")
    term.wait_for("max_new_tokens = 5")
    term.type("/retry\r")
    term.wait_for("5 tokens · first token")
    term.type("\x04")
    term.child.expect(pexpect.EOF, timeout=30)
    term.child.close()
    assert term.child.exitstatus == 0
    assert "tell me a long story" in (tmp_path / "data" / "glmrepl" / "history").read_text()


def test_tab_completes_commands_and_ctrl_c_clears_the_line(qwen_checkpoint, tmp_path):
    term = Terminal([str(qwen_checkpoint), "--no-history"], tmp_path)
    term.wait_for("chat template · 0 turns")
    term.type("/hi\t")
    term.wait_for(">>> /history")
    term.type("\x03")  # clears the line, glmrepl stays
    term.type("/help\r")
    term.wait_for("/retry")
    term.type("/quit\r")
    term.child.expect(pexpect.EOF, timeout=30)
    assert not (tmp_path / "data" / "glmrepl" / "history").exists()


def test_a_chatglm_fixture_in_a_real_terminal(tmp_path):
    folder = Path(__file__).parent / "data" / "chatglm" / "chatglm3-tiny"
    term = Terminal([str(folder), "--temperature", "0", "--max-new-tokens", "6", "--no-history"], tmp_path)
    term.wait_for("chatglm3 · cpu float32 · ChatGLM3 roles · 0 turns")
    term.type("你好\r")
    term.wait_for("6 tokens · first token")
    term.wait_for("1 turn ·")
    term.type("/clear\r")
    term.wait_for("new conversation")
    term.type("\x04")
    term.child.expect(pexpect.EOF, timeout=30)


def test_a_read_only_data_dir_costs_the_history_not_the_session(qwen_checkpoint, tmp_path, unwritable_dir):
    # Greedy: a sampled reply may draw an end-of-turn id first and stop short of 3 tokens.
    args = [str(qwen_checkpoint), "--max-new-tokens", "3", "--temperature", "0"]
    term = Terminal(args, tmp_path, XDG_DATA_HOME=str(unwritable_dir))
    term.wait_for("chat template · 0 turns")
    assert term.text().count("warning: cannot keep the input history") == 1
    assert "history is off" in term.text()
    term.type("hello\r")
    term.wait_for("3 tokens · first token")
    term.type("\x04")
    term.child.expect(pexpect.EOF, timeout=30)
    term.child.close()
    assert term.child.exitstatus == 0 and "Traceback" not in term.transcript


def test_load_is_reported_at_once_the_idle_prompt_is_quiet_and_typed_keys_wait(long_context_qwen, tmp_path):
    term = Terminal(
        [str(long_context_qwen), "--temperature", "0", "--max-new-tokens", "20000", "--no-history"], tmp_path
    )
    term.wait_for("loaded long-qwen (")  # above the prompt, without a key pressed
    term.wait_for("chat template · 0 turns")
    term.received_within(0.5)  # the last repaint
    assert term.received_within(2.0) == 0  # an idle prompt writes nothing

    term.type("tell me a long story\r")
    term.wait_for_more_output(300)  # the reply streams
    term.type("TYPEDAHEAD")
    term.type("\x03")  # stops the reply; what was typed is kept
    term.wait_for("[reply cut: /retry generates it again]", timeout=30)
    term.wait_for(">>> TYPEDAHEAD")
    assert term.text().count("TYPEDAHEAD") == 1  # at the prompt only, not echoed into the reply

    term.type("\x15/retry\r")  # Ctrl-U clears the line
    term.wait_for_more_output(300)
    term.type("\x04")  # Ctrl-D during a reply: honoured at the next prompt
    term.type("\x03")
    term.child.expect(pexpect.EOF, timeout=30)
    term.child.close()
    assert term.child.exitstatus == 0


def test_a_gpu_load_on_a_machine_without_one_says_why_at_once_and_device_cpu_recovers(qwen_checkpoint, tmp_path):
    # A CPU-only machine for the glmrepl process, whatever this one has.
    term = Terminal([str(qwen_checkpoint), "--device", "gpu", "--no-history"], tmp_path, CUDA_VISIBLE_DEVICES="")
    term.wait_for("gpu mode needs a CUDA GPU and torch sees none on this machine: use /device cpu")  # no key pressed
    term.type("/device cpu\r")
    term.wait_for("loaded tiny-qwen2-chat (Qwen2ForCausalLM, cpu float32")
    term.wait_for("chat template · 0 turns")
    term.type("/exit\r")
    term.child.expect(pexpect.EOF, timeout=30)
