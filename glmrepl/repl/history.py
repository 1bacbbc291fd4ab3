"""Input history on disk that never costs the session.

A read-only, full or broken history file turns history off with one warning
(``problem``); prompt_toolkit's FileHistory would raise inside the event loop
on every Enter instead.
"""

from __future__ import annotations

import os

from prompt_toolkit.history import FileHistory


class SafeFileHistory(FileHistory):
    def __init__(self, filename: str):
        super().__init__(filename)
        self.problem: str | None = None  # set once history is off; the REPL says it once

    def load_history_strings(self):
        if not os.path.isfile(self.filename):  # absent, or a device or pipe that would never end
            return []
        try:
            return list(super().load_history_strings())
        except OSError as error:
            self._turn_off("read", error)
            return []

    def store_string(self, string: str) -> None:
        if self.problem is not None:
            return
        try:
            super().store_string(string)
        except OSError as error:
            self._turn_off("write", error)

    def _turn_off(self, doing: str, error: OSError) -> None:
        self.problem = (
            f"cannot {doing} the input history {os.fsdecode(self.filename)} ({error.strerror or error}); history is off"
        )
