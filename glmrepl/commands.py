"""The slash commands: one table drives dispatch, /help and Tab completion.

Handlers take the App and the argument text and return results (see
results.py); they never print. Nothing here imports torch at module level.
"""

from __future__ import annotations

import base64
import difflib
from dataclasses import dataclass, field
from typing import Callable

from .app import App
from .engine.errors import GlmreplError
from .results import Error, Exit, Generate, TerminalEscape, Table, Text, WaitForLoad

Handler = Callable[[App, str], object]
Completer = Callable[[App, str], list[str]]


@dataclass(frozen=True)
class Command:
    name: str
    usage: str
    help: str
    handler: Handler
    aliases: tuple[str, ...] = ()
    complete_args: Completer | None = None  # candidates for the first argument


@dataclass
class CommandTable:
    commands: list[Command] = field(default_factory=list)

    def add(self, command: Command) -> None:
        self.commands.append(command)

    def names(self) -> list[str]:
        return [n for c in self.commands for n in (c.name, *c.aliases)]

    def find(self, name: str) -> Command | None:
        return next((c for c in self.commands if name in (c.name, *c.aliases)), None)

    def dispatch(self, app: App, line: str) -> object:
        """Run one '/command args' line; unknown names get the closest match."""
        name, _, args = line[1:].strip().partition(" ")
        command = self.find(name.lower())
        if command is None:
            return Error(self.unknown_message(name))
        try:
            return command.handler(app, args.strip())
        except GlmreplError as error:
            return Error(str(error))

    def unknown_message(self, name: str) -> str:
        close = closest(name.lower(), self.names())
        hint = f" — did you mean /{close}?" if close else ""
        return f"unknown command /{name}{hint} (/help lists them)"


def closest(word: str, candidates: list[str]) -> str | None:
    """The likeliest intended word: swapped letters first (/modle is /model, not /mode)."""
    swapped = [c for c in candidates if sorted(c) == sorted(word)]
    if swapped:
        return swapped[0]
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.5)
    return close[0] if close else None


# -- handlers -----------------------------------------------------------------


def cmd_help(app: App, args: str):
    if args:
        command = TABLE.find(args.lstrip("/").lower())
        if command is None:
            return Error(TABLE.unknown_message(args.lstrip("/")))
        aliases = f"  (also /{', /'.join(command.aliases)})" if command.aliases else ""
        return Text(f"{command.usage}{aliases}\n  {command.help}")
    rows = [[c.usage, c.help] for c in TABLE.commands]
    rows.append(["//text", "send a message that starts with /"])
    return Table(["command", "what it does"], rows, title="Commands (Tab completes; Alt-Enter adds a line)")


def cmd_clear(app: App, args: str):
    app.session.clear()
    return Text("new conversation", "dim")


def cmd_exit(app: App, args: str):
    return Exit()


def cmd_model(app: App, args: str):
    if not args:
        return _model_table(app)
    job = app.start_load(args)
    return WaitForLoad(job)


def _model_table(app: App):
    from .engine.catalog import LISTING_COLUMNS, find_checkpoints, listing_cells

    entries = find_checkpoints(app.models_dir)
    current = app.manager.current
    if not entries:
        return Text(no_models_message(app))
    rows = []
    for entry in entries:
        cells = listing_cells(entry)
        if current is not None and current.info.path == entry.path:
            cells[0] = "*" + cells[0]  # the loaded one
        rows.append(cells)
    return Table(list(LISTING_COLUMNS), rows, title="Local checkpoints (/model NAME loads one)")


def no_models_message(app: App) -> str:
    from .engine.catalog import default_models_dir

    return (f"no checkpoints found in {default_models_dir(app.models_dir)} or the Hugging Face cache: "
            "put a checkpoint folder there, or start glmrepl with a folder path")


def cmd_device(app: App, args: str):
    from .engine.devices import DTYPES, MODES, memory_report

    words = args.split()
    if not words:
        loaded = app.require_model()
        placement = loaded.info.placement
        lines = [f"{placement.describe()}" + (f" ({placement.reason})" if placement.reason else "")]
        if placement.summary:
            lines.append(f"  layers: {placement.summary}")
        lines += [f"  {device}: {figures}" for device, figures in memory_report()]
        from .engine.cpu import threads_line

        lines.append(f"  cpu: {threads_line()}")
        return Text("\n".join(lines))
    mode = next((w for w in words if w in MODES), None)
    dtype = next((w for w in words if w in DTYPES), "auto")
    unknown = [w for w in words if w not in MODES and w not in DTYPES]
    if unknown:
        return Error(f"unknown device argument {unknown[0]!r}: modes are {', '.join(MODES)}; dtypes {', '.join(DTYPES)}")
    loaded = app.require_model()
    placement = app.manager.move(mode or loaded.info.placement.mode, dtype)
    app.options.mode, app.options.dtype = placement.mode, dtype
    return Text(f"model now on {placement.describe()}; conversation kept")


def cmd_quantize(app: App, args: str):
    if args.strip() not in ("4", "8"):
        return Error("/quantize needs 4 or 8 (bits per weight)")
    app.require_model()
    placement = app.manager.quantize(int(args))
    return Text(f"model now on {placement.describe()}; conversation kept")


def cmd_system(app: App, args: str):
    if not args:
        return Text(f"system prompt: {app.session.system}" if app.session.system else "no system prompt (/system TEXT sets one)")
    app.session.system = None if args.lower() in ("none", "off", "-") else args
    return Text("system prompt cleared" if app.session.system is None else "system prompt set", "dim")


def cmd_set(app: App, args: str):
    from .engine.settings import SETTINGS

    if not args:
        app.model  # apply the loaded model's defaults so the listing is what replies use
        rows = [[key, _show(app.settings.get(key)), app.settings.source(key), s.help] for key, s in SETTINGS.items()]
        return Table(["setting", "value", "from", "meaning"], rows)
    key, _, value = args.partition(" ")
    if key not in SETTINGS:
        close = closest(key, list(SETTINGS))
        hint = f" — did you mean {close}?" if close else ""
        return Error(f"unknown setting {key!r}{hint} (settings: {', '.join(SETTINGS)})")
    if not value.strip():
        return Error(f"/set {key} needs a value: {SETTINGS[key].describe_range()}")
    try:
        parsed = app.settings.set(key, value.strip())
    except ValueError as error:
        return Error(str(error))
    return Text(f"{key} = {_show(parsed)}", "dim")


def _show(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return "none" if value is None else str(value)


def cmd_history(app: App, args: str):
    if not app.session.messages and not app.session.system:
        return Text("the conversation is empty", "dim")
    lines = [f"system: {app.session.system}"] if app.session.system else []
    for m in app.session.messages:
        lines.append(f"{m.role}: {m.content}" + ("  [cut]" if m.cut else ""))
    return Text("\n".join(lines))


def cmd_undo(app: App, args: str):
    removed = app.session.undo()
    return Text("removed the last exchange" if removed else "nothing to undo", "dim")


def cmd_retry(app: App, args: str):
    app.require_model()
    app.session.prepare_retry()
    return Generate()


def cmd_save(app: App, args: str):
    from .engine.chat import save_conversation

    if not args:
        return Error("usage: /save FILE")
    loaded = app.manager.current
    model = str(loaded.info.path) if loaded else None
    try:
        path = save_conversation(args, app.session, app.settings.user, model)
    except OSError as error:
        return Error(f"{args}: cannot write it ({error.strerror or error})")
    return Text(f"saved {app.session.turns} turns to {path}", "dim")


def cmd_load(app: App, args: str):
    from .engine.chat import read_conversation

    if not args:
        return Error("usage: /load FILE")
    data = read_conversation(args)
    app.session.restore(data)
    for key, value in (data.get("settings") or {}).items():
        try:
            app.settings.set(key, value)
        except (KeyError, ValueError):
            pass  # a setting from another version: skip it, keep the conversation
    message = Text(f"loaded {app.session.turns} turns from {args}", "dim")
    saved_model = data.get("model")
    loaded = app.manager.current
    if saved_model and (loaded is None or str(loaded.info.path) != saved_model):
        try:
            return WaitForLoad(app.start_load(saved_model), then=[message])
        except GlmreplError as error:
            return [message, Error(f"the conversation's model is not available ({error}); keeping the current one")]
    return message


def cmd_stats(app: App, args: str):
    stats = app.last_stats
    if stats is None:
        return Text("no reply yet", "dim")
    path = f" · path: {stats.path}" if stats.path else ""
    return Text(format_stats(stats) + f" · prompt {stats.prompt_tokens} tokens · stopped: {stats.stop_reason}{path}")


def format_stats(stats) -> str:
    parts = [f"{stats.new_tokens} tokens"]
    if stats.first_token_s is not None:
        parts.append(f"first token {stats.first_token_s:.2f} s")
    speed = stats.decode_tokens_per_s
    if speed:
        parts.append(f"{speed:.1f} tok/s")
    return " · ".join(parts)


def cmd_next(app: App, args: str):
    from .engine.generate import next_token_distribution

    try:
        k = int(args) if args else 10
    except ValueError:
        return Error(f"/next takes a number of tokens from 1 to 100, not {args!r}")
    if not 1 <= k <= 100:
        return Error(f"/next takes a number of tokens from 1 to 100, not {k}")
    loaded = app.require_model()
    ids = app.session.fit(loaded.prompt_format, loaded.info.context_length, 1).ids
    if not ids:
        return Error("the conversation is empty: there is nothing to continue")
    rows = [[repr(text), str(token_id), f"{p:.2%}"] for text, token_id, p in
            next_token_distribution(loaded.model, loaded.tokenizer, ids, k)]
    return Table(["token", "id", "probability"], rows, title=f"{k} most likely next tokens")


def cmd_copy(app: App, args: str):
    reply = app.session.last_reply
    if reply is None:
        return Error("no reply to copy yet")
    payload = base64.b64encode(reply.content.encode("utf-8")).decode("ascii")
    return TerminalEscape(f"\x1b]52;c;{payload}\x07", f"copied the last reply ({len(reply.content)} characters)")


def cmd_mode(app: App, args: str):
    if args not in ("chat", "complete"):
        return Error("usage: /mode chat|complete")
    app.options.prompt_mode = args
    if app.manager.current is None:
        return Text(f"{args} mode will apply when a model is loaded", "dim")
    name = app.manager.set_prompt_mode(args)
    return Text(f"{args} mode ({name})", "dim")


# -- argument completion --------------------------------------------------------


def complete_model(app: App, prefix: str) -> list[str]:
    from .engine.catalog import find_checkpoints

    return [e.name for e in find_checkpoints(app.models_dir)]


def complete_device(app: App, prefix: str) -> list[str]:
    from .engine.devices import MODES

    return list(MODES)


def complete_setting(app: App, prefix: str) -> list[str]:
    from .engine.settings import SETTINGS

    return list(SETTINGS)


def complete_command(app: App, prefix: str) -> list[str]:
    return [c.name for c in TABLE.commands]


TABLE = CommandTable()
for _command in (
    Command("help", "/help [COMMAND]", "list commands, or explain one", cmd_help, ("?",), complete_command),
    Command("clear", "/clear", "start a new conversation (settings and model stay)", cmd_clear, ("new",)),
    Command("model", "/model [NAME|PATH]", "list local checkpoints, or switch to one (the conversation stays)",
            cmd_model, (), complete_model),
    Command("device", "/device [MODE] [DTYPE]", "show placement and memory, or move the model (cpu, gpu, sharded, auto)",
            cmd_device, (), complete_device),
    Command("quantize", "/quantize 4|8", "quantize the loaded ChatGLM model's layers to int4 or int8 in place",
            cmd_quantize, (), lambda app, prefix: ["4", "8"]),
    Command("system", "/system [TEXT|none]", "show or set the system prompt", cmd_system),
    Command("set", "/set [KEY VALUE]", "list generation settings, or change one", cmd_set, (), complete_setting),
    Command("mode", "/mode chat|complete", "chat with the template, or continue plain text", cmd_mode, (),
            lambda app, prefix: ["chat", "complete"]),
    Command("history", "/history", "show the conversation", cmd_history),
    Command("undo", "/undo", "remove the last message and its reply", cmd_undo),
    Command("retry", "/retry", "generate the last reply again", cmd_retry),
    Command("save", "/save FILE", "save conversation, settings and model name as JSON", cmd_save),
    Command("load", "/load FILE", "load a saved conversation (and its model)", cmd_load),
    Command("stats", "/stats", "figures of the last reply", cmd_stats),
    Command("next", "/next [K]", "the K most likely next tokens, without generating", cmd_next),
    Command("copy", "/copy", "copy the last reply to the clipboard (OSC 52, works over SSH)", cmd_copy),
    Command("exit", "/exit", "leave glmrepl (Ctrl-D does too)", cmd_exit, ("quit", "q")),
):
    TABLE.add(_command)
