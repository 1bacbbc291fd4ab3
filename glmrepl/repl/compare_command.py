"""/compare: the loaded model's reply to the last message beside another model's, with figures.

The other model is another checkpoint (a name or a folder, as for /model) or the loaded one with
a change: ``--quantize 4|8``, ``--dtype D``, ``--adapter DIR|off`` (the flags also apply to another
checkpoint). The engine does the work (``Backend.start_compare``); this module reads the
arguments and shows the result. The conversation is not changed.
"""

from __future__ import annotations

import shlex
from dataclasses import replace
from pathlib import Path

from ..engine import DTYPES, Variant
from .app import App, display_name
from .reply_commands import require_ability
from .results import Error, Table, Text, WaitForTask

USAGE = "usage: /compare MODEL|DIR, or /compare [MODEL|DIR] --quantize 4|8 | --dtype DTYPE | --adapter DIR|off"
FLAGS = ("--quantize", "--dtype", "--adapter")
NEWLINE_SHOWN = " ⏎ "  # a reply's line breaks, in a table row that must stay one line


def cmd_compare(app: App, args: str):
    require_ability(app, "compare", "/compare")
    variant = parse_variant(app, args)
    if isinstance(variant, Error):
        return variant
    app.require_model()
    job = app.backend.start_compare(variant, app.session, app.settings.get("max_new_tokens"))
    return WaitForTask(job, report_comparison)


def parse_variant(app: App, args: str) -> Variant | Error:
    """The Variant the arguments ask for, or the one-line Error that says what is wrong with them."""
    try:
        words = shlex.split(args)
    except ValueError as error:  # an unclosed quote
        return Error(f"/compare: {error}; {USAGE}")
    if not words:
        return Error(USAGE)
    target, changes = None, {}
    while words:
        word = words.pop(0)
        if word in FLAGS:
            if not words:
                return Error(f"{word} needs a value: {USAGE}")
            change = flag_value(word, words.pop(0))
            if isinstance(change, Error):
                return change
            changes.update(change)
        elif word.startswith("-"):
            return Error(f"unknown /compare argument {word!r}: the options are {', '.join(FLAGS)}")
        elif target is not None:
            return Error(f"/compare takes one model, not {target!r} and {word!r}")
        else:
            target = word
    return Variant(options=target_options(app, target) if target else None, **changes)


def flag_value(flag: str, value: str) -> dict | Error:
    if flag == "--quantize":
        if value not in ("4", "8"):
            return Error(f"--quantize takes 4 or 8 (bits per weight), not {value!r}")
        return {"quantize": int(value)}
    if flag == "--dtype":
        if value not in DTYPES:
            return Error(f"--dtype takes {', '.join(DTYPES)}, not {value!r}")
        return {"dtype": value}
    if value == "off":
        return {"no_adapter": True}
    return {"adapter": Path(value).expanduser()}


def target_options(app: App, target: str):
    """Load options for another checkpoint, as /model makes them (no adapter unless asked for)."""
    from ..engine import resolve_model

    path = resolve_model(target, app.models_dir)
    return replace(app.options.for_model(path, display_name(target, path)), adapter=None, merge_adapter=False)


def report_comparison(result) -> list:
    rows = [[result.name, one_line(result.reply)], [result.other, one_line(result.other_reply)]]
    return [Table(["model", "greedy reply to the last message"], rows), Text(result.describe())]


def one_line(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\n", NEWLINE_SHOWN) or "(nothing: the reply ended at once)"
