"""Key bindings, as a table of (keys, handler) pairs with names that say what they do."""

from __future__ import annotations

from prompt_toolkit.key_binding import KeyBindings


def insert_newline(event) -> None:
    """Alt-Enter / Esc Enter: a new line in the message instead of sending it."""
    event.current_buffer.insert_text("\n")


BINDINGS = (
    (("escape", "enter"), insert_newline),
    (("escape", "c-m"), insert_newline),
)


def key_bindings() -> KeyBindings:
    bindings = KeyBindings()
    for keys, handler in BINDINGS:
        bindings.add(*keys)(handler)
    return bindings
