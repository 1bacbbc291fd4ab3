"""The interactive loop: read a line, dispatch a command or send a message, render.

Input and output are injectable (as in ptpython), so tests drive the real
PromptSession through a pipe and read a recording output.

Ctrl-C policy: at the prompt it clears the line; while a reply streams it
stops the reply (kept, marked as cut); while waiting for a load it cancels the
load (the previous model stays). Ctrl-D on an empty line exits.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, TextIO

from ..engine import GlmreplError, Hint, LoadCancelled, first_line, record_reply
from .app import App
from .commands import TABLE, describe_call
from .hints import explain, flag_words, slash_words
from .render import Renderer, progress_bar
from .reply_commands import format_stats
from .results import Exit, Generate, TerminalEscape, WaitForLoad, WaitForTask
from .typeahead import keys_wait_for_the_prompt

if TYPE_CHECKING:
    from ..engine import LoadProgress


class LineHandler:
    """Everything that happens to one submitted line; shared by the REPL and piped input."""

    def __init__(self, app: App, renderer: Renderer, interactive: bool):
        self.app = app
        self.renderer = renderer
        self.interactive = interactive
        self.words = slash_words if interactive else flag_words  # how hints are worded for this user
        self.interrupted = False  # a reply was cut by Ctrl-C (non-interactive use then stops)
        self.reported_job: LoadProgress | None = None  # the load job last reported
        app.notify = lambda message: renderer.text(message, "dim")

    def handle(self, line: str) -> bool:
        """Handle one line; False means the user asked to leave."""
        self.report_finished_load()
        text = line.strip()
        if not text:
            return True
        if text.startswith("/") and not text.startswith("//"):
            return self.act(TABLE.dispatch(self.app, text, self.words))
        self.send(text[1:] if text.startswith("//") else line.strip("\n"))
        return True

    def act(self, result: object) -> bool:
        if isinstance(result, list):
            return all([self.act(item) for item in result])
        if isinstance(result, Exit):
            return False
        if isinstance(result, Generate):
            self.reply()
        elif isinstance(result, WaitForLoad):
            if self.wait_for_load(result.job):
                return self.act(result.then)
        elif isinstance(result, WaitForTask):
            self.wait_for_task(result)
        elif isinstance(result, TerminalEscape):
            self.copy_to_clipboard(result)
        else:
            self.renderer.result(result)
        return True

    # -- messages ------------------------------------------------------------
    def send(self, text: str) -> None:
        job = self.app.loading_job()
        if job is not None and not self.wait_for_load(job):
            return
        try:
            self.app.require_model()
        except GlmreplError as error:
            self.renderer.error(explain(error, self.words))
            return
        self.app.session.add_user(text)
        if not self.reply():
            self.app.session.messages.pop()  # it was never answered: keep the conversation as it was

    def reply(self) -> bool:
        """Stream a reply to the conversation; False if none could be started."""
        try:
            plan = self.app.plan_reply()
        except GlmreplError as error:
            self.renderer.error(explain(error, self.words))
            return False
        if plan.dropped_turns:
            self.renderer.text(
                f"(the oldest {plan.dropped_turns} turn(s) no longer fit the context and were left out)", "warning"
            )
        stream = self.renderer.reply_stream()
        failed = None
        with plan:
            try:
                for delta in plan:
                    stream.write(delta)
            except KeyboardInterrupt:
                plan.close()  # stops the worker within one token
            except GlmreplError as error:
                failed = error
        stream.finish()
        if failed is not None:
            kept = " (the conversation is kept: /retry tries again)" if self.interactive else ""
            self.renderer.error(explain(failed, self.words) + kept)
            return True
        self.app.last_stats = plan.stats
        record_reply(self.app.session, plan)
        self.after_reply(plan)
        return True

    def after_reply(self, reply) -> None:
        stats = reply.stats
        for call in reply.tool_calls:
            self.renderer.text(f"[tool call] {describe_call(call.as_dict())}")
        if reply.tool_calls and self.interactive:
            self.renderer.text("[/observe TEXT gives the model the result]", "dim")
        if reply.finish_reason == "cancelled":
            self.interrupted = True
            self.renderer.text("[reply cut: /retry generates it again]" if self.interactive else "[reply cut]", "dim")
        elif reply.hit_context_end:
            room = ": /clear or /undo makes room" if self.interactive else ""
            self.renderer.text(f"[reply stopped at the end of the model's context{room}]", "dim")
        elif reply.finish_reason == "length":
            more = Hint("setting", "max_new_tokens", "{} allows more").worded(self.words)
            self.renderer.text(f"[reply reached max_new_tokens={stats.new_tokens}: {more}]", "dim")
        if self.app.settings.get("stats"):
            self.renderer.text(format_stats(stats), "dim")

    # -- loads -----------------------------------------------------------------
    def wait_for_load(self, job) -> bool:
        """Wait for a load with progress; Ctrl-C cancels it. True if it succeeded."""
        shown = ""
        try:
            while not job.wait(0.1):
                shown = self._show_progress(job, shown)
        except KeyboardInterrupt:
            job.cancel()
            self._wait_ignoring_interrupts(job)
        if self.interactive and shown:
            self.renderer.out.write("\r\x1b[K" if self.renderer.color else "\n")
        return self.report_job(job)

    def _show_progress(self, job, shown: str) -> str:
        status = job.status + " (Ctrl-C cancels)"
        if status != shown and self.interactive and self.renderer.color:
            self.renderer.out.write("\r\x1b[K" + status)
            self.renderer.out.flush()
        return status

    def wait_for_task(self, task: WaitForTask) -> None:
        """Wait for a background task with a progress bar; Ctrl-C cancels it, the session stays."""
        job, shown = task.job, ""
        try:
            while not job.wait(0.1):
                shown = self._show_bar(job, shown)
        except KeyboardInterrupt:
            job.cancel()
            self.interrupted = True  # as for a cut reply: piped input stops here
            self._wait_ignoring_interrupts(job)
        if shown:
            self.renderer.out.write("\r\x1b[K")
        if job.error is None:
            self.act(task.report(job.result))
        elif job.cancel_event.is_set():
            self.renderer.text(explain(job.error, self.words), "warning")
        else:
            self.renderer.error(explain(job.error, self.words))

    def _show_bar(self, job, shown: str) -> str:
        line = f"{progress_bar(job.fraction)} {job.status} (Ctrl-C stops)"
        if line != shown and self.interactive and self.renderer.color:
            self.renderer.out.write("\r\x1b[K" + line)
            self.renderer.out.flush()
            return line
        return shown

    @staticmethod
    def _wait_ignoring_interrupts(job) -> None:
        while True:
            try:
                job.wait()
                return
            except KeyboardInterrupt:
                continue

    def report_finished_load(self) -> None:
        job = self.app.backend.job
        if job is not None and job.done.is_set():
            self.report_job(job)

    def report_job(self, job: LoadProgress) -> bool:
        """Say once how a load ended; True when it succeeded."""
        if job is self.reported_job:
            return job.error is None
        self.reported_job = job
        if isinstance(job.error, LoadCancelled):
            current = self.app.status()
            keep = f"; still using {current.name}" if current else ""
            self.renderer.text(f"{explain(job.error, self.words)}{keep}", "warning")
            return False
        if job.error is not None:
            current = self.app.status()
            keep = f" (still using {current.name})" if current else ""
            self.renderer.error(f"{explain(job.error, self.words)}{keep}")
            return False
        if not self.interactive:
            return True  # scripts asked for this model; no need to say it loaded
        info = self.app.status()
        if info is None:  # unloaded again since (a later failed swap)
            return False
        family = f", {info.family}" if info.family else ""
        self.renderer.text(
            f"loaded {info.name} ({info.architecture}{family}, {info.placement.describe()}, {info.format_name})", "dim"
        )
        if info.family_reason:
            self.renderer.text(f"  {info.family}: {info.family_reason}", "dim")
        if info.placement.reason:
            self.renderer.text(f"  {info.placement.mode}: {info.placement.reason}", "dim")
        for note in self.app.backend.load_notes():
            self.renderer.text(f"  {note}", "dim")
        return True

    def copy_to_clipboard(self, escape: TerminalEscape) -> None:
        if not self.renderer.color:
            self.renderer.error("/copy needs a terminal (it sends the text to the terminal's clipboard)")
            return
        self.renderer.out.write(escape.sequence)
        self.renderer.text(escape.done_message, "dim")


PROMPT = ">>> "


class Repl:
    """The prompt_toolkit loop around a LineHandler."""

    def __init__(
        self, app: App, out: TextIO | None = None, input=None, output=None, history_path=None, color: bool | None = None
    ):
        out = out or sys.stdout
        self.renderer = Renderer(out, color if color is not None else out.isatty())
        self.handler = LineHandler(app, self.renderer, interactive=True)
        self.app = app
        self.session = self._build_session(input, output, history_path)
        self._history_problem_reported = False
        self._keyboard = sys.stdin if input is None else None  # the terminal whose type-ahead is kept

    def _build_session(self, input, output, history_path):
        from prompt_toolkit import PromptSession
        from prompt_toolkit.auto_suggest import AutoSuggestFromHistory
        from prompt_toolkit.history import InMemoryHistory

        from .completer import CommandCompleter
        from .history import SafeFileHistory
        from .keys import key_bindings
        from .toolbar import Toolbar

        history = SafeFileHistory(str(history_path)) if history_path else InMemoryHistory()
        return PromptSession(
            input=input,
            output=output,
            history=history,
            completer=CommandCompleter(TABLE, self.app),
            auto_suggest=AutoSuggestFromHistory(),
            key_bindings=key_bindings(self.app),
            bottom_toolbar=Toolbar(self.app),
            complete_while_typing=False,
            enable_open_in_editor=True,
        )

    def run(self) -> None:
        hinted_exit = False
        while True:
            self.handler.report_finished_load()
            loading = self.app.loading_job() is not None
            try:
                line = self.session.prompt(PROMPT, pre_run=self._watch_load)
                self._report_history_problem()
            except KeyboardInterrupt:  # Ctrl-C at the prompt clears the line
                if not hinted_exit and not loading and not self.session.default_buffer.text:
                    hinted_exit = True  # once: someone pressing it on an empty line may be trying to leave
                    self.renderer.text("(Ctrl-D or /exit leaves glmrepl)", "dim")
                continue
            except EOFError:
                break
            try:
                with keys_wait_for_the_prompt(self._keyboard):
                    if not handle_line(self.handler, self.renderer, line):
                        break
            except KeyboardInterrupt:
                self.renderer.text("(interrupted)", "dim")

    def _watch_load(self) -> None:
        """At the prompt, a load in the background keeps the toolbar current and says
        how it ended as soon as it does, above the prompt. (The prompt is otherwise
        redrawn only on keys: an idle prompt writes nothing.)"""
        job = self.app.loading_job()
        if job is not None:
            self.session.app.create_background_task(self._follow(job))

    async def _follow(self, job) -> None:
        import asyncio

        from prompt_toolkit.application import run_in_terminal

        shown = job.status
        while not job.done.is_set():
            await asyncio.sleep(0.1)
            if job.status != shown:
                shown = job.status
                self.session.app.invalidate()
        # Ended with the prompt (a line was entered, /exit): the task is cancelled
        # before this point, and the next prompt or line reports the load instead.
        await run_in_terminal(lambda: self.handler.report_job(job))

    def _report_history_problem(self) -> None:
        history = self.session.history
        if getattr(history, "problem", None) and not self._history_problem_reported:
            self._history_problem_reported = True
            self.renderer.text(f"warning: {history.problem}", "warning")


def handle_line(handler: LineHandler, renderer: Renderer, line: str) -> bool:
    """One line, as ``handler.handle``; an error no command expected is said in one line, and the
    session goes on (a bug must not cost the user the conversation)."""
    try:
        return handler.handle(line)
    except Exception as error:  # noqa: BLE001 - said, not raised: see above
        renderer.error(f"unexpected {type(error).__name__}: {first_line(error)} (the conversation is kept)")
        return True


def run_piped(app: App, lines, out: TextIO, err: TextIO) -> int:
    """Non-interactive: each input line is a message (or a /command); plain text out.

    Every line runs even when one fails; the status is 1 if any failed, 130 if Ctrl-C cut a reply."""
    renderer = Renderer(out, color=False, err=err)
    handler = LineHandler(app, renderer, interactive=False)
    for line in lines:
        if not handle_line(handler, renderer, line) or handler.interrupted:
            break
    if handler.interrupted:
        return 130
    return 1 if renderer.errors else 0
