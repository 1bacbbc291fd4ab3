"""Key bindings, as a table of (keys, filter, handler) with names that say what they do."""

from __future__ import annotations

from prompt_toolkit.filters import Condition
from prompt_toolkit.key_binding import KeyBindings


def insert_newline(event) -> None:
    """Alt-Enter / Esc Enter: a new line in the message instead of sending it."""
    event.current_buffer.insert_text("\n")


def key_bindings(app) -> KeyBindings:
    """``app`` is the glmrepl App: Ctrl-C on an empty line cancels a load in progress."""

    def loading_with_empty_line() -> bool:
        from prompt_toolkit.application import get_app

        return app.loading_job() is not None and not get_app().current_buffer.text

    def cancel_load(event) -> None:
        """Ctrl-C on an empty line while a model loads: cancel the load (the previous model stays)."""
        job = app.loading_job()
        if job is not None:
            job.cancel()
        event.app.exit(exception=KeyboardInterrupt())

    table = (
        (("escape", "enter"), None, insert_newline),
        (("escape", "c-m"), None, insert_newline),
        (("c-c",), Condition(loading_with_empty_line), cancel_load),
    )
    bindings = KeyBindings()
    for keys, condition, handler in table:
        bindings.add(*keys, filter=condition if condition is not None else True)(handler)
    return bindings
