"""Keys typed while glmrepl is busy (a reply streams, a model loads) wait for the next prompt.

Between prompts the terminal is in its ordinary cooked mode: it would echo
typed keys into the reply, and Ctrl-C would flush them (Ctrl-D too). Here echo
and line editing are off, so the keys stay queued unseen and prompt_toolkit
reads them at the next prompt, as a shell does with type-ahead. Ctrl-C still
raises KeyboardInterrupt (signals stay on) without flushing the queue.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def keys_wait_for_the_prompt(stream) -> Iterator[None]:
    """Within the block, typed keys are neither shown nor lost (no-op when ``stream`` is no terminal)."""
    try:
        import termios

        fd = stream.fileno()
        before = termios.tcgetattr(fd)
    except (ImportError, AttributeError, ValueError, OSError):  # not a terminal, or no termios (Windows)
        yield
        return
    quiet = [*before[:6], list(before[6])]
    quiet[0] &= ~termios.ICRNL  # Enter stays \r, as prompt_toolkit reads it
    quiet[3] = (quiet[3] & ~(termios.ECHO | termios.ICANON)) | termios.NOFLSH
    quiet[6][termios.VMIN], quiet[6][termios.VTIME] = 1, 0
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, before)
