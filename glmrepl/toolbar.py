"""The bottom toolbar: model, placement, format, turns and context use, or load progress."""

from __future__ import annotations


class Toolbar:
    def __init__(self, app):
        self.app = app
        self._usage_key = None
        self._usage = None

    def __call__(self) -> str:
        job = self.app.manager.job
        loaded = self.app.manager.current
        if job is not None and not job.done.is_set():
            return f" {job.status} · messages wait for it "
        if loaded is None:
            return " no model · /model lists local checkpoints "
        info = loaded.info
        parts = [info.name]
        if info.family:
            parts.append(info.family)
        parts += [info.placement.describe(), loaded.prompt_format.name, _plural(self.app.session.turns, "turn")]
        usage = self._context_usage(loaded)
        if usage is not None:
            used, limit = usage
            parts.append(f"{used}/{limit} tokens" if limit else f"{used} tokens")
        return " " + " · ".join(parts) + " "

    def _context_usage(self, loaded):
        # The toolbar redraws on every key press: re-tokenize only when the
        # conversation or the model changed.
        session = self.app.session
        key = (id(loaded), id(loaded.prompt_format), len(session.messages), session.system,
               session.messages[-1].content if session.messages else None)
        if key != self._usage_key:
            self._usage_key, self._usage = key, self.app.context_usage()
        return self._usage


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"
