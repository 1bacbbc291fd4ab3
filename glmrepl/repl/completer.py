"""Tab completion, read from the same command table that dispatches."""

from __future__ import annotations

from prompt_toolkit.completion import Completer, Completion

from .commands import CommandTable


class CommandCompleter(Completer):
    def __init__(self, table: CommandTable, app):
        self.table = table
        self.app = app

    def get_completions(self, document, complete_event):
        text = document.text_before_cursor
        if not text.startswith("/") or text.startswith("//") or "\n" in text:
            return
        name, space, rest = text[1:].partition(" ")
        if not space:
            for candidate in sorted(self.table.names()):
                if candidate.startswith(name.lower()):
                    yield Completion(candidate, start_position=-len(name))
            return
        command = self.table.find(name.lower())
        if command is None or command.complete_args is None or " " in rest:
            return
        try:
            candidates = command.complete_args(self.app, rest)
        except Exception:  # completion must never break typing
            return
        for candidate in candidates:
            if candidate.startswith(rest):
                yield Completion(candidate, start_position=-len(rest))
