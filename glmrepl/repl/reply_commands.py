"""The REPL's commands that look at the model and its last reply: /stats, /next, /ppl, /copy."""

from __future__ import annotations

import base64
from pathlib import Path

from ..common.units import counted
from .app import App
from .results import Error, Table, TerminalEscape, Text, WaitForTask


def require_ability(app: App, ability: str, command: str) -> None:
    """Refuse ``command`` in one line where the backend (a remote server) cannot do it."""
    if not app.backend.can(ability):
        raise app.backend.refuse(ability, command)


def cmd_stats(app: App, args: str):
    stats = app.last_stats
    if stats is None:
        return Text("no reply yet", "dim")
    prompt = f" · prompt {stats.prompt_tokens} tokens" if stats.prompt_tokens is not None else ""
    reused = getattr(stats, "reused_tokens", None)
    if prompt and reused is not None:
        prompt += f" ({reused} reused from a cache, {stats.prompt_tokens - reused} read)"
    counted = getattr(stats, "usage_from_server", None)
    source = (
        "" if counted is None else " · counts from the server" if counted else " · tokens counted as streamed chunks"
    )
    path = f" · path: {stats.path}" if getattr(stats, "path", None) else ""
    return Text(format_stats(stats) + f"{prompt} · stopped: {stats.stop_reason}{source}{path}")


def format_stats(stats) -> str:
    parts = [counted(stats.new_tokens, "token")]
    if stats.first_token_s is not None:
        parts.append(f"first token {stats.first_token_s:.2f} s")
    speed = stats.decode_tokens_per_s
    if speed:
        parts.append(f"{speed:.1f} tok/s")
    return " · ".join(parts)


def cmd_next(app: App, args: str):
    try:
        k = int(args) if args else 10
    except ValueError:
        return Error(f"/next takes a number of tokens from 1 to 100, not {args!r}")
    if not 1 <= k <= 100:
        return Error(f"/next takes a number of tokens from 1 to 100, not {k}")
    app.require_model()
    require_ability(app, "next_tokens", "/next")
    rows = [[repr(text), str(token_id), f"{p:.2%}"] for text, token_id, p in app.backend.next_tokens(app.session, k)]
    return Table(["token", "id", "probability"], rows, title=f"{k} most likely next tokens")


def cmd_ppl(app: App, args: str):
    if not args:
        return Error("usage: /ppl FILE (the loaded model's perplexity on a text file)")
    require_ability(app, "perplexity", "/ppl")
    app.require_model()
    job = app.backend.start_perplexity(Path(args).expanduser())
    return WaitForTask(job, lambda result: Text(result.describe()))


def cmd_copy(app: App, args: str):
    reply = app.session.last_reply
    if reply is None:
        return Error("no reply to copy yet")
    payload = base64.b64encode(reply.content.encode("utf-8")).decode("ascii")
    # Whether the terminal took it cannot be known (OSC 52 has no answer): say what was done, not "copied".
    message = f"sent the last reply ({len(reply.content)} characters) to the terminal's clipboard (OSC 52)"
    return TerminalEscape(f"\x1b]52;c;{payload}\x07", message + tmux_clipboard_hint())


def tmux_clipboard_hint() -> str:
    """Inside tmux, OSC 52 reaches the outer terminal only with set-clipboard on: say so unless it is."""
    import os
    import subprocess

    if not os.environ.get("TMUX"):
        return ""
    try:
        setting = subprocess.run(
            ["tmux", "show-options", "-gv", "set-clipboard"], capture_output=True, text=True, timeout=2
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        setting = ""
    if setting == "on":
        return ""
    return "; inside tmux it reaches your terminal only with `set -g set-clipboard on` in ~/.tmux.conf" + (
        f" (it is {setting} now)" if setting else ""
    )
