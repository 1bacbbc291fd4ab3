"""/save and /load: the conversation, its settings and its model in a JSON file (written atomically)."""

from __future__ import annotations

from pathlib import Path

from ..common.units import counted
from ..engine import SETTINGS, GlmreplError
from .app import App
from .results import Error, Text, WaitForLoad


def cmd_save(app: App, args: str, overwrite: bool = False):
    from ..engine import save_conversation

    if not args:
        return Error("usage: /save FILE")
    target = Path(args).expanduser()
    if not target.parent.is_dir():
        return Error(f"{target.parent} is not a folder: create it first, or save somewhere else")
    if target.is_dir():
        return Error(f"{target} is a folder: give a file name")
    if target.exists() and not overwrite:
        return Error(f"{target} exists: /save! {args} replaces it")
    loaded = app.status()
    model = str(loaded.path) if loaded else None
    adapter = str(loaded.adapter_path) if loaded and loaded.adapter_path else None
    try:
        path = save_conversation(args, app.session, app.settings.chosen(), model, adapter)
    except OSError as error:
        return Error(f"{args}: cannot write it ({error.strerror or error})")
    app.mark_saved()
    return Text(f"saved {counted(app.session.turns, 'turn')} to {path}", "dim")


def cmd_save_over(app: App, args: str):
    return cmd_save(app, args, overwrite=True)


def cmd_load(app: App, args: str, replace: bool = False):
    from ..engine import read_conversation

    if not args:
        return Error("usage: /load FILE")
    data = read_conversation(args)
    unsaved = app.unsaved_turns()
    if unsaved and not replace:
        return Error(
            f"the conversation has {counted(unsaved, 'unsaved turn')}: /save FILE keeps it, /load! {args} replaces it"
        )
    app.session.restore(data)
    app.mark_saved()
    said: list = [Text(f"loaded {counted(app.session.turns, 'turn')} from {args}", "dim")]
    said += [Text(f"setting {key} skipped: {why}", "warning") for key, why in _restore_settings(app, data)]
    saved_model, saved_adapter = data.get("model"), data.get("adapter")
    loaded = app.status()
    if saved_model and not _same_model(app, loaded, saved_model) and app.backend.can("server_models"):
        serving = loaded.name if loaded is not None else "no model yet"
        return [
            *said,
            Text(f"it was saved with {saved_model}; the server's model is {serving} (/model NAME picks one)", "dim"),
        ]
    if saved_model and not _same_model(app, loaded, saved_model):
        app.options.adapter = Path(saved_adapter) if saved_adapter else None  # goes on with the model
        try:
            return WaitForLoad(app.start_load(saved_model), then=said)
        except GlmreplError as error:
            app.options.adapter = None
            return [*said, Error(f"the conversation's model is not available ({error}); keeping the current one")]
    current_adapter = str(loaded.adapter_path) if loaded is not None and loaded.adapter_path else None
    if saved_adapter and loaded is not None and current_adapter != saved_adapter and app.backend.can("adapters"):
        try:
            adapter = app.backend.set_adapter(
                Path(saved_adapter), on_wait=app.waiting_message("putting the adapter on")
            )
        except GlmreplError as error:
            return [*said, Error(f"the conversation's adapter is not available ({error})")]
        return [*said, Text(f"adapter {adapter} on, as when it was saved", "dim")]
    return said


def cmd_load_over(app: App, args: str):
    return cmd_load(app, args, replace=True)


def _restore_settings(app: App, data: dict) -> list[tuple[str, str]]:
    """Apply the file's settings; (key, why) for each one skipped (the current value stays)."""
    skipped = []
    settings = data.get("settings")
    for key, value in (settings if isinstance(settings, dict) else {}).items():
        try:
            app.settings.set(key, value)
        except KeyError:
            skipped.append((key, "not a setting of this glmrepl"))
        except (TypeError, ValueError) as error:
            skipped.append((key, f"{error}; keeping {app.settings.get(key)}" if key in SETTINGS else str(error)))
    return skipped


def _same_model(app: App, loaded, saved_model: str) -> bool:
    """Whether the conversation's model is the one in use: the same folder, or on a server, the
    served model named as the folder is (as --connect URL MODEL matches it)."""
    if loaded is None:
        return False
    if str(loaded.path) == saved_model:
        return True
    return app.backend.can("server_models") and Path(saved_model).name.casefold() == loaded.name.casefold()
