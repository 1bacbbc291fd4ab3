"""Helpers shared by the engine, REPL and CLI tests."""

from __future__ import annotations

import io
from pathlib import Path

from glmrepl.engine.backend import LocalBackend
from glmrepl.engine.conversation.chat import ChatSession
from glmrepl.engine.models.loading import LoadOptions
from glmrepl.engine.request import FitPolicy, GenerateRequest, SamplingParams
from glmrepl.engine.settings import Settings
from glmrepl.repl.app import App


def request(
    conversation: ChatSession,
    settings: Settings | None = None,
    *,
    stop=(),
    drop_oldest: bool = True,
    shorten_reply: bool = True,
    max_length: int | None = None,
    completion: bool = False,
    force_call: str | None = None,
) -> GenerateRequest:
    """The engine request a test means: the settings resolved as the REPL resolves them."""
    sampling = SamplingParams.from_settings(settings or Settings())
    fit = FitPolicy(drop_oldest, shorten_reply, max_length)
    return GenerateRequest(conversation, sampling, tuple(stop), fit, completion, force_call)


def make_app(models_dir: Path | None = None, **settings) -> App:
    """An App on CPU with greedy, short replies unless told otherwise."""
    values = {"temperature": 0, "max_new_tokens": 8, "stats": True}
    values.update(settings)
    return App(LocalBackend(), Settings(values), ChatSession(), models_dir, LoadOptions(mode="cpu"))


def loaded_app(path: Path, **settings) -> App:
    app = make_app(**settings)
    app.manager.load(app.load_request(str(path)))
    return app


def drive_repl(app: App, keys: str, color: bool = False, history_path: Path | None = None) -> str:
    """Type ``keys`` into a real PromptSession (pipe input) and return what glmrepl wrote."""
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput

    from glmrepl.repl.loop import Repl

    out = io.StringIO()
    with create_pipe_input() as pipe:
        pipe.send_text(keys)
        pipe.close()
        Repl(app, out=out, input=pipe, output=DummyOutput(), color=color, history_path=history_path).run()
    return out.getvalue()


def ctrl_c_once_a_bar_shows(monkeypatch, progressed) -> None:
    """A real SIGINT to this process once the REPL has drawn a progress bar whose job
    ``progressed(job)`` says has made progress (so the Ctrl-C lands while the job runs)."""
    import os
    import signal
    import threading

    from glmrepl.repl.loop import LineHandler

    drawn = threading.Event()
    show_bar = LineHandler._show_bar

    def showing(self, job, shown):
        line = show_bar(self, job, shown)
        if line != shown and progressed(job):
            drawn.set()
        return line

    monkeypatch.setattr(LineHandler, "_show_bar", showing)

    def press_ctrl_c():
        assert drawn.wait(60)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=press_ctrl_c, daemon=True).start()
