"""Start-up as a person sees it: the console script in a pseudo-terminal.

pyte plays the terminal, because prompt_toolkit asks for the cursor position
and waits for the answer before it draws the prompt.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROWS, COLS = 40, 120
PROMPT = ">>>"


def console_script() -> str:
    return str(Path(sys.executable).with_name("glmrepl"))


def isolated_env(home: Path) -> dict:
    """No user config or history may change what is measured."""
    return dict(
        os.environ, XDG_DATA_HOME=str(home / "data"), XDG_CONFIG_HOME=str(home / "config"), TERM="xterm-256color"
    )


def time_to_prompt(model: Path, dtype: str, timeout: float = 60) -> float:
    import pexpect
    import pyte

    with tempfile.TemporaryDirectory() as home:
        started = time.perf_counter()
        child = pexpect.spawn(
            console_script(),
            [str(model), "--device", "cpu", "--dtype", dtype, "--no-history"],
            env=isolated_env(Path(home)),
            dimensions=(ROWS, COLS),
            encoding="utf-8",
        )
        screen = pyte.Screen(COLS, ROWS)
        screen.write_process_input = child.send  # answers cursor-position requests
        stream = pyte.Stream(screen)
        try:
            while not any(PROMPT in line for line in screen.display):
                if time.perf_counter() - started > timeout or not child.isalive():
                    raise RuntimeError("no prompt from glmrepl:\n" + "\n".join(screen.display))
                try:
                    stream.feed(child.read_nonblocking(100_000, timeout=0.005))
                except pexpect.TIMEOUT:
                    pass
            return time.perf_counter() - started
        finally:
            child.terminate(force=True)


def version_wall_time() -> float:
    started = time.perf_counter()
    subprocess.run([console_script(), "--version"], check=True, capture_output=True)
    return time.perf_counter() - started


def measure_startup(model: Path, dtype: str, repeats: int) -> dict:
    version_wall_time()  # warm-up: the interpreter and package files in the page cache
    prompts = [time_to_prompt(model, dtype) for _ in range(repeats)]
    versions = [version_wall_time() for _ in range(repeats)]
    return {
        "first_prompt_s": statistics.median(prompts),
        "version_s": statistics.median(versions),
        "first_prompt_runs": prompts,
        "version_runs": versions,
        "repeats": repeats,
    }
