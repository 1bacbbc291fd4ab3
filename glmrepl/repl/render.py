"""Writing replies and command results to the terminal.

Replies stream as deltas: each piece of text is written once and never
re-rendered. Fenced code blocks are highlighted line by line with pygments as
each line completes. When the output is not a terminal, everything is plain
text without escape codes, so piping glmrepl into a file gives clean text.
"""

from __future__ import annotations

import shutil
from typing import TextIO

from wcwidth import wcwidth

from .results import Error, Table, Text

DIM, RED, YELLOW, BOLD, RESET = "\x1b[2m", "\x1b[31m", "\x1b[33m", "\x1b[1m", "\x1b[0m"
FENCE = "```"


class Renderer:
    def __init__(self, out: TextIO, color: bool, err: TextIO | None = None):
        self.out = out
        self.err = err or out  # piped use sends errors to stderr, replies to stdout
        self.color = color
        self.errors = 0  # error lines written: non-interactive use exits 1 when there were any

    # -- one-line messages -------------------------------------------------
    def text(self, text: str, style: str = "info") -> None:
        codes = {"dim": DIM, "warning": YELLOW, "error": RED}.get(style, "")
        # Notices (dim, warning) are not part of the conversation: piped use
        # keeps them off stdout so that it carries the replies alone.
        self._line(text, codes, self.err if style in ("dim", "warning") else self.out)

    def error(self, message: str) -> None:
        self.errors += 1
        self._line(f"error: {message}", RED, self.err)

    def _line(self, text: str, codes: str = "", stream: TextIO | None = None) -> None:
        stream = stream or self.out
        if self._is_terminal(stream):
            text = text.translate(_CONTROL_TO_VISIBLE)
        if self.color and codes:
            text = f"{codes}{text}{RESET}"
        stream.write(text + "\n")
        stream.flush()

    def result(self, result: object) -> None:
        """Render a command's Text / Error / Table result (lists render in order)."""
        if isinstance(result, list):
            for item in result:
                self.result(item)
        elif isinstance(result, Text):
            self.text(result.text, result.style)
        elif isinstance(result, Error):
            self.error(result.message)
        elif isinstance(result, Table):
            self.table(result)

    def table(self, table: Table) -> None:
        """Columns aligned by display width (CJK takes two cells); the last column wraps to the terminal."""
        width = shutil.get_terminal_size((100, 24)).columns
        if table.title:
            self._line(table.title, BOLD)
        columns = list(zip(table.headers, *table.rows)) if table.rows else [(h,) for h in table.headers]
        widths = [min(max(display_width(str(cell)) for cell in column), MAX_COLUMN) for column in columns[:-1]]
        last = max(width - sum(widths) - 2 * len(widths), MIN_LAST_COLUMN)
        self._line(_row(table.headers, widths, last)[0], DIM)
        for row in table.rows:
            for line in _row([str(cell) for cell in row], widths, last):
                if self._is_terminal(self.out):
                    line = line.translate(_CONTROL_TO_VISIBLE)
                self.out.write(line + "\n")
        self.out.flush()

    # -- streamed replies --------------------------------------------------
    def reply_stream(self) -> ReplyStream:
        return ReplyStream(self.out, self.color, self._is_terminal(self.out))

    def _is_terminal(self, stream: TextIO) -> bool:
        """Control characters written here would move the cursor: show them instead."""
        if self.color:
            return True
        isatty = getattr(stream, "isatty", None)
        return bool(isatty and isatty())


MAX_COLUMN = 48  # a column other than the last is cut (with …) beyond this
MIN_LAST_COLUMN = 20


def progress_bar(fraction: float | None, width: int = 24) -> str:
    """``[#########...............]  37%``; before the total is known, an empty bar."""
    if fraction is None:
        return "[" + "." * width + "]     "
    filled = min(width, int(fraction * width))
    return "[" + "#" * filled + "." * (width - filled) + f"] {fraction:4.0%}"


def display_width(text: str) -> int:
    """Terminal cells the text takes: two for wide (CJK) characters, none for combining ones."""
    return sum(max(wcwidth(char), 0) for char in text)


def _row(cells: list[str], widths: list[int], last: int) -> list[str]:
    """One table row as lines: the leading cells padded, the last one wrapped under its column."""
    lead = "  ".join(_pad(_clip(cell, w), w) for cell, w in zip(cells, widths))
    indent = " " * (sum(widths) + 2 * len(widths))
    wrapped = _wrap(cells[-1], last) or [""]
    first = f"{lead}  {wrapped[0]}" if widths else wrapped[0]
    return [first.rstrip()] + [f"{indent}{line}".rstrip() for line in wrapped[1:]]


def _pad(text: str, width: int) -> str:
    return text + " " * max(width - display_width(text), 0)


def _clip(text: str, width: int) -> str:
    if display_width(text) <= width:
        return text
    kept, used = [], 0
    for char in text:
        used += max(wcwidth(char), 0)
        if used > width - 1:
            break
        kept.append(char)
    return "".join(kept) + "…"


def _wrap(text: str, width: int) -> list[str]:
    """Words in lines of at most ``width`` cells; a word longer than a line is cut into pieces."""
    lines, current = [], ""
    for word in text.split(" "):
        while display_width(word) > width:
            if current:
                lines.append(current)
                current = ""
            piece = _clip(word, width + 1)[:-1]  # the longest start that fits
            lines.append(piece)
            word = word[len(piece) :]
        candidate = f"{current} {word}" if current else word
        if display_width(candidate) <= width:
            current = candidate
        else:
            lines.append(current)
            current = word
    lines.append(current)
    return lines


# A model can emit any byte, ESC and carriage return included; written raw to
# a terminal they would move the cursor, recolour or retitle it. Show them as
# control pictures instead (tab and newline stay as they are).
_CONTROL_TO_VISIBLE = {c: 0x2400 + c for c in range(32) if chr(c) not in "\n\t"} | {0x7F: 0x2421}


class ReplyStream:
    """Writes a reply as it arrives; highlights fenced code once each line is complete."""

    def __init__(self, out: TextIO, color: bool, terminal: bool | None = None):
        self.out = out
        self.color = color
        self.terminal = color if terminal is None else terminal  # show control characters, never send them
        self.at_line_start = True
        self.held = ""  # text at a line start that might become a fence
        self.code_language: str | None = None  # set while inside a fenced block
        self.code_line = ""
        self.wrote_anything = False
        self.ends_with_newline = True

    def write(self, delta: str) -> None:
        if not self.color:
            self._emit(delta.translate(_CONTROL_TO_VISIBLE) if self.terminal else delta)
            self.out.flush()  # a pipe reads the reply as it comes, as a terminal does
            return
        for char in delta.translate(_CONTROL_TO_VISIBLE):
            self._feed(char)
        self.out.flush()

    def _feed(self, char: str) -> None:
        if self.code_language is not None:
            self._feed_code(char)
        elif self.at_line_start or self.held:
            self._feed_line_start(char)
        else:
            self._emit(char)
            self.at_line_start = char == "\n"

    def _feed_line_start(self, char: str) -> None:
        self.held += char
        stripped = self.held.lstrip(" ")
        if char == "\n":
            if stripped.startswith(FENCE):
                self._open_fence(stripped)
            else:
                self._emit(self.held)
            self.held, self.at_line_start = "", True
        elif not (FENCE.startswith(stripped) or stripped.startswith(FENCE)):
            self._emit(self.held)  # not a fence after all: show it now
            self.held, self.at_line_start = "", False

    def _open_fence(self, fence_line: str) -> None:
        self.code_language = fence_line[len(FENCE) :].strip() or "text"
        self._emit(_dim_line(fence_line))

    def _feed_code(self, char: str) -> None:
        self.code_line += char
        if char != "\n":
            return
        if self.code_line.strip().startswith(FENCE):
            self._emit(_dim_line(self.code_line))
            self.code_language = None
        else:
            self._emit(highlight_line(self.code_line, self.code_language))
        self.code_line = ""

    def _emit(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.wrote_anything = True
            self.ends_with_newline = text.endswith("\n")

    def finish(self) -> None:
        """Write what is held (an unfinished code line or fence) and end the line."""
        pending = self.held + self.code_line
        if pending:
            self._emit(highlight_line(pending, self.code_language) if self.code_language else pending)
        self.held = self.code_line = ""
        if self.wrote_anything and not self.ends_with_newline:
            self.out.write("\n")
        self.out.flush()


def _dim_line(line: str) -> str:
    return f"{DIM}{line.rstrip(chr(10))}{RESET}" + ("\n" if line.endswith("\n") else "")


_LEXERS: dict[str, object] = {}


def highlight_line(line: str, language: str | None) -> str:
    """One line of code in terminal colours (per-line lexing: good enough, and streamable)."""
    from pygments import highlight
    from pygments.formatters import Terminal256Formatter
    from pygments.lexers import TextLexer, get_lexer_by_name
    from pygments.util import ClassNotFound

    key = language or "text"
    if key not in _LEXERS:
        try:
            _LEXERS[key] = get_lexer_by_name(key, stripnl=False, ensurenl=False)
        except ClassNotFound:
            _LEXERS[key] = TextLexer(stripnl=False, ensurenl=False)
    return highlight(line, _LEXERS[key], Terminal256Formatter(style="monokai"))
