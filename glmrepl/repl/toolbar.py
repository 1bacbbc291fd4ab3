"""The bottom toolbar: model, placement, format, turns and context use, or load progress."""

from __future__ import annotations


class Toolbar:
    def __init__(self, app):
        self.app = app
        self._usage_key = None
        self._usage = None

    def __call__(self) -> str:
        job = self.app.loading_job()
        status = self.app.status()
        if job is not None:
            return f" {job.status} · messages wait for it "
        if status is None:
            return " no model · /model lists local checkpoints "
        parts = [status.name]
        if status.family:
            parts.append(status.family)
        parts += [status.placement.describe(), status.format_name, _plural(self.app.session.turns, "turn")]
        usage = self._context_usage(status)
        if usage is not None:
            used, limit = usage
            parts.append(f"{used}/{limit} tokens" if limit else f"{used} tokens")
        return " " + " · ".join(parts) + " "

    def _context_usage(self, status):
        # The toolbar redraws on every key press: re-tokenize only when the
        # conversation or the model changed.
        session = self.app.session
        key = (
            status.serial,
            status.format_name,
            len(session.messages),
            session.system,
            session.messages[-1].content if session.messages else None,
            self.app.settings.get("max_new_tokens"),
        )
        if key != self._usage_key:
            self._usage_key, self._usage = key, self.app.context_usage()
        return self._usage


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"
