"""The slash commands: one table drives dispatch, /help and Tab completion.

Handlers take the App and the argument text and return results (see
results.py); they never print. Nothing here imports torch at module level.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..engine import SETTINGS, GlmreplError, LoadCancelled
from .app import App
from .compare_command import cmd_compare
from .conversation_commands import cmd_load, cmd_load_over, cmd_save, cmd_save_over
from .format_commands import cmd_format
from .hints import explain, slash_words
from .reply_commands import cmd_copy, cmd_next, cmd_ppl, cmd_stats, require_ability
from .results import Error, Exit, Generate, Table, Text, WaitForLoad
from .tool_commands import cmd_observe, cmd_tools, describe_call

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

    def dispatch(self, app: App, line: str, words=slash_words) -> object:
        """Run one '/command args' line; unknown names get the closest match (hints in ``words``)."""
        name, _, args = line[1:].strip().partition(" ")
        command = self.find(name.lower())
        if command is None:
            return Error(self.unknown_message(name, line.strip()))
        try:
            return command.handler(app, args.strip())
        except GlmreplError as error:
            return Error(explain(error, words))

    def unknown_message(self, name: str, line: str | None = None) -> str:
        if "/" in name:  # a path such as /usr/bin/ls, meant as text
            return (
                f"/{name} is not a command: type /{line or '/' + name} to send text that starts with / "
                "(/help lists the commands)"
            )
        close = closest(name.lower(), self.names())
        if close:
            return f"unknown command /{name} — did you mean /{close}? (/help lists them)"
        return f"unknown command /{name} (/help lists them; //text sends text that starts with /)"


def closest(word: str, candidates: list[str]) -> str | None:
    """The likeliest intended word: swapped letters first (/modle is /model, not /mode)."""
    swapped = [c for c in candidates if sorted(c) == sorted(word)]
    if swapped:
        return swapped[0]
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)  # 0.5 offered /tools for /foo
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
    from ..engine import LISTING_COLUMNS, listing_cells

    if app.backend.can("server_models"):
        return _server_model_table(app)
    current = app.status()
    entries = app.backend.list_models(app.models_dir, beside=current.path if current else None)
    if not entries:
        return Text(no_models_message(app))
    rows = []
    for entry in entries:
        cells = listing_cells(entry)
        if current is not None and current.path == entry.path:
            cells[0] = "*" + cells[0]  # the loaded one
        rows.append(cells)
    return Table(list(LISTING_COLUMNS), rows, title="Local checkpoints (/model NAME loads one)")


def _server_model_table(app: App):
    models = app.backend.list_models()
    current = app.status().path
    if not models:
        return Text(f"the server at {app.backend.where()} lists no models")
    rows = [
        [
            ("*" if m.name == current else "") + m.name,
            m.owned_by or "-",
            str(m.context_length) if m.context_length else "-",
        ]
        for m in models
    ]
    return Table(
        ["name", "owned by", "context"], rows, title=f"Models on {app.backend.where()} (/model NAME picks one)"
    )


def no_models_message(app: App) -> str:
    from ..engine import default_models_dir

    return (
        f"no checkpoints found in {default_models_dir(app.models_dir)} or the Hugging Face cache: "
        "put a checkpoint folder there, or start glmrepl with a folder path"
    )


def cmd_device(app: App, args: str):
    from ..engine import DTYPES, MODES

    require_ability(app, "move", "/device")
    words = args.split()
    if not words:
        status = app.require_model()
        placement = status.placement
        lines = [f"{placement.describe()}" + (f" ({placement.reason})" if placement.reason else "")]
        if placement.summary:
            lines.append(f"  layers: {placement.summary}")
        if app.backend.can("memory_report"):
            from ..engine import threads_line

            lines += [f"  {device}: {figures}" for device, figures in app.backend.memory_report()]
            lines.append(f"  cpu: {threads_line()}")
        if status.adapter:
            lines.append(f"  adapter: {status.adapter}")
        return Text("\n".join(lines))
    mode = next((w for w in words if w in MODES), None)
    dtype = next((w for w in words if w in DTYPES), "auto")
    unknown = [w for w in words if w not in MODES and w not in DTYPES]
    if unknown:
        return Error(
            f"unknown device argument {unknown[0]!r}: modes are {', '.join(MODES)}; dtypes {', '.join(DTYPES)}"
        )
    if app.status() is None and app.loading_job() is None:
        return _device_for_next_load(app, mode, dtype)
    status = app.require_model()
    if _already_on(status.placement, mode, dtype):
        return Text(f"already on {status.placement.describe()}", "dim")
    require_ability(app, "move", "/device")
    placement = app.backend.move(mode or status.placement.mode, dtype, on_wait=app.waiting_message("moving"))
    app.options.mode, app.options.dtype = placement.mode, dtype
    return Text(f"model now on {placement.describe()}; conversation kept")


def cmd_adapter(app: App, args: str):
    status = app.require_model()
    if not args:
        return Text(f"adapter: {status.adapter}" if status.adapter else "no adapter (/adapter DIR puts one on)")
    require_ability(app, "adapters", "/adapter")
    if args == "off":
        app.backend.set_adapter(None, on_wait=app.waiting_message("taking the adapter off"))
        return Text(f"adapter {status.adapter} off: the base model again; conversation kept")
    adapter = app.backend.set_adapter(Path(args).expanduser(), on_wait=app.waiting_message("putting the adapter on"))
    return Text(f"adapter {adapter} on {status.name}; conversation kept")


def _already_on(placement, mode: str | None, dtype: str) -> bool:
    if (mode or placement.mode) != placement.mode:
        return False
    return dtype == placement.dtype or (dtype == "auto" and placement.mode == "cpu" and placement.dtype == "float32")


def _device_for_next_load(app: App, mode: str | None, dtype: str):
    """No model: the choice is for the next load, and a load that failed (no GPU, no room) is tried with it."""
    app.options.mode, app.options.dtype = mode or app.options.mode, dtype
    job = app.backend.job
    failed = job is not None and job.error is not None and not isinstance(job.error, LoadCancelled)
    request = job.request if failed and job is not None else None
    if request is not None and request.path:
        return WaitForLoad(app.backend.load(app.options.for_model(request.path, request.name)))
    chosen = app.options.mode + ("" if dtype == "auto" else f" {dtype}")
    return Text(f"{chosen} will apply when a model is loaded", "dim")


def cmd_quantize(app: App, args: str):
    if args.strip() not in ("4", "8"):
        return Error("/quantize needs 4 or 8 (bits per weight)")
    app.require_model()
    require_ability(app, "quantize", "/quantize")
    placement = app.backend.quantize(int(args), on_wait=app.waiting_message("quantizing"))
    return Text(f"model now on {placement.describe()}; conversation kept")


def cmd_system(app: App, args: str):
    if not args:
        return Text(
            f"system prompt: {app.session.system}" if app.session.system else "no system prompt (/system TEXT sets one)"
        )
    app.session.system = None if args.lower() in ("none", "off", "-") else args
    return Text("system prompt cleared" if app.session.system is None else "system prompt set", "dim")


def cmd_set(app: App, args: str):
    if not args:
        app.status()  # apply the loaded model's defaults so the listing is what replies use
        rows = [[key, _show(app.settings.get(key)), app.settings.source(key), s.help] for key, s in SETTINGS.items()]
        return Table(["setting", "value", "from", "meaning"], rows)
    key, _, value = args.partition(" ")
    if key not in SETTINGS:
        close = closest(key, list(SETTINGS))
        hint = f" — did you mean {close}?" if close else ""
        return Error(f"unknown setting {key!r}{hint} (settings: {', '.join(SETTINGS)})")
    if not value.strip():
        app.status()
        return Text(
            f"{key} = {_show(app.settings.get(key))} (from {app.settings.source(key)}; "
            f"{SETTINGS[key].describe_range()})"
        )
    try:
        parsed = app.settings.set(key, value.strip())
    except ValueError as error:
        return Error(str(error))
    note = app.backend.setting_note(key)
    done = Text(f"{key} = {_show(parsed)}" + (f" ({note})" if note else ""), "dim")
    if key in UNUSUALLY_HIGH and parsed > UNUSUALLY_HIGH[key][0]:
        return [done, Text(f"{key} {_show(parsed)} is unusually high: {UNUSUALLY_HIGH[key][1]}", "warning")]
    return done


# Values that are allowed but rarely what anyone wants: (above this, what happens).
UNUSUALLY_HIGH = {"temperature": (2.0, "replies become close to random (0.1 to 1.5 is usual)")}


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
        lines += [f"  [tool call] {describe_call(call)}" for call in m.tool_calls or []]
    return Text("\n".join(lines))


def cmd_undo(app: App, args: str):
    removed = app.session.undo()
    return Text("removed the last exchange" if removed else "nothing to undo", "dim")


def cmd_retry(app: App, args: str):
    app.require_model()
    app.session.prepare_retry()
    return Generate()


def cmd_mode(app: App, args: str):
    if not args:
        status = app.status()
        if status is None:
            return Text(f"{app.options.prompt_mode or 'chat'} mode when a model is loaded (/mode chat|complete)")
        return Text(
            f"{'chat' if status.is_chat else 'complete'} mode ({status.format_name}); /mode chat|complete switches"
        )
    if args not in ("chat", "complete"):
        return Error("usage: /mode chat|complete")
    app.options.prompt_mode = args
    if app.status() is None:
        return Text(f"{args} mode will apply when a model is loaded", "dim")
    require_ability(app, "prompt_mode", "/mode")
    name = app.backend.set_prompt_mode(args)
    return Text(f"{args} mode ({name})", "dim")


# -- argument completion --------------------------------------------------------


def complete_model(app: App, prefix: str) -> list[str]:
    return [e.name for e in app.backend.list_models(app.models_dir)]


def complete_device(app: App, prefix: str) -> list[str]:
    from ..engine import MODES

    return list(MODES)


def complete_setting(app: App, prefix: str) -> list[str]:
    return list(SETTINGS)


def complete_path(app: App, prefix: str) -> list[str]:
    """Files and folders (with a trailing /) whose path starts with ``prefix``."""
    import os

    folder, _, start = prefix.rpartition("/")
    where = Path(folder or ("/" if prefix.startswith("/") else ".")).expanduser()
    try:
        names = sorted(os.listdir(where))
    except OSError:
        return []
    head = f"{folder}/" if folder or prefix.startswith("/") else ""
    return [
        head + name + ("/" if (where / name).is_dir() else "")
        for name in names
        if name.startswith(start) and (start.startswith(".") or not name.startswith("."))
    ]


def complete_command(app: App, prefix: str) -> list[str]:
    return [c.name for c in TABLE.commands]


TABLE = CommandTable()
for _command in (
    Command("help", "/help [COMMAND]", "list commands, or explain one", cmd_help, ("?",), complete_command),
    Command("clear", "/clear", "start a new conversation (settings and model stay)", cmd_clear, ("new",)),
    Command(
        "model",
        "/model [NAME|PATH]",
        "list local checkpoints, or switch to one (the conversation stays)",
        cmd_model,
        (),
        complete_model,
    ),
    Command(
        "device",
        "/device [MODE] [DTYPE]",
        "show placement and memory, or move the model (cpu, gpu, sharded, auto)",
        cmd_device,
        (),
        complete_device,
    ),
    Command(
        "adapter",
        "/adapter [DIR|off]",
        "show the adapter, put a LoRA or P-tuning v2 adapter on the model, or take it off (no reload)",
        cmd_adapter,
        (),
        lambda app, prefix: ["off"],
    ),
    Command(
        "quantize",
        "/quantize 4|8",
        "quantize the loaded model's linear layers to int4 or int8 in place",
        cmd_quantize,
        (),
        lambda app, prefix: ["4", "8"],
    ),
    Command("system", "/system [TEXT|none]", "show or set the system prompt", cmd_system),
    Command(
        "set", "/set [KEY [VALUE]]", "list generation settings, show one, or change one", cmd_set, (), complete_setting
    ),
    Command(
        "mode",
        "/mode [chat|complete]",
        "chat with the template, or continue plain text",
        cmd_mode,
        (),
        lambda app, prefix: ["chat", "complete"],
    ),
    Command(
        "tools",
        "/tools [FILE|off]",
        "show the tools the model may call, load a JSON list of functions, or drop them",
        cmd_tools,
        (),
        lambda app, prefix: ["off"],
    ),
    Command(
        "format",
        "/format [json|FILE|off]",
        "hold replies to JSON: any object, or the JSON Schema in FILE; off frees them",
        cmd_format,
        (),
        lambda app, prefix: ["json", "off"],
    ),
    Command("observe", "/observe TEXT", "answer the model's tool call with its result (then it replies)", cmd_observe),
    Command("history", "/history", "show the conversation", cmd_history),
    Command("undo", "/undo", "remove the last message and its reply", cmd_undo),
    Command("retry", "/retry", "generate the last reply again", cmd_retry),
    Command("save", "/save FILE", "save conversation, settings and model name as JSON (a new file)", cmd_save),
    Command("save!", "/save! FILE", "save, replacing FILE if it exists", cmd_save_over),
    Command("load", "/load FILE", "load a saved conversation (and its model)", cmd_load),
    Command("load!", "/load! FILE", "load one over a conversation that is not saved", cmd_load_over),
    Command("stats", "/stats", "figures of the last reply", cmd_stats),
    Command("next", "/next [K]", "the K most likely next tokens, without generating", cmd_next),
    Command(
        "ppl",
        "/ppl FILE",
        "the model's perplexity on a text file (sliding windows; lower is better; Ctrl-C stops)",
        cmd_ppl,
        (),
        complete_path,
    ),
    Command(
        "compare",
        "/compare MODEL|VARIANT",
        "the last message's greedy reply beside another model's or a variant's (--quantize 4|8, --dtype D, "
        "--adapter DIR): agreement and KL divergence",
        cmd_compare,
        (),
        complete_model,
    ),
    Command("copy", "/copy", "send the last reply to the terminal's clipboard (OSC 52, works over SSH)", cmd_copy),
    Command("exit", "/exit", "leave glmrepl (Ctrl-D does too)", cmd_exit, ("quit", "q")),
):
    TABLE.add(_command)
