"""The application state shared by the REPL, the command handlers and one-shot mode.

It holds the front end's side of things (the conversation, the settings, the
load options) and a backend that owns the model. Nothing here touches the
model object, and there is no terminal code, so non-interactive use and tests
drive the same paths as the REPL.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..engine import (
    Backend,
    ChatSession,
    GenerateRequest,
    GenerationStats,
    GlmreplError,
    Hint,
    LoadOptions,
    OutputFormat,
    ReplyHandle,
    SamplingParams,
    Settings,
)


@dataclass
class App:
    backend: Backend  # built lazily by main, so the prompt comes first
    settings: Settings = field(default_factory=Settings)
    session: ChatSession = field(default_factory=ChatSession)
    models_dir: Path | None = None
    options: LoadOptions = field(default_factory=LoadOptions)
    last_stats: GenerationStats | None = None  # of the last reply, for /stats
    output_format: OutputFormat | None = None  # /format: replies held to JSON
    notify: Callable[[str], None] = lambda message: None  # the front end's way to say "waiting..."
    _defaults_applied_for: Any = None
    _saved: dict | None = None  # the conversation as last saved or loaded

    # -- the conversation ------------------------------------------------------
    def mark_saved(self) -> None:
        self._saved = self.session.to_dict()

    def unsaved_turns(self) -> int:
        """Turns that a /load would lose: none when the conversation is as saved (or empty)."""
        if not self.session.messages or self.session.to_dict() == self._saved:
            return 0
        return max(self.session.turns, 1)

    @property
    def manager(self) -> Any:
        """The local backend's ModelManager, for engine-level tests and tools (front ends use ``backend``)."""
        return getattr(self.backend, "manager", None)

    # -- models --------------------------------------------------------------
    def status(self):
        """The loaded model's ModelStatus, with the settings layer it brings applied."""
        status = self.backend.status()
        if status is not None and status.serial != self._defaults_applied_for:
            self.settings.set_model_defaults(status.checkpoint_defaults, status.sampling_defaults)
            self._defaults_applied_for = status.serial
        return status

    def load_request(self, target: str) -> LoadOptions:
        from ..engine import resolve_model

        path = resolve_model(target, self.models_dir)
        request = self.options.for_model(path, display_name(target, path))
        self.options.adapter = None  # --adapter belongs to the first model only, not to /model switches
        return request

    def start_load(self, target: str | None):
        if self.backend.can("server_models"):  # a server: choose among its models (None: the first)
            return self.backend.select_model(target)
        assert target is not None  # only a server chooses a model for us (a local load always names one)
        return self.backend.load(self.load_request(target))

    def loading_job(self):
        """The load in progress, or None."""
        job = self.backend.job
        return job if job is not None and not job.done.is_set() else None

    def require_model(self):
        status = self.status()
        if status is None:
            job = self.loading_job()
            if job is not None:
                raise GlmreplError(f"still {job.status}")
            raise GlmreplError("no model is loaded", Hint("model", sentence="choose one with {}"))
        return status

    def waiting_message(self, doing: str) -> Callable[[int], None]:
        """What a move, quantize or adapter change says while replies still run."""
        return lambda running: self.notify(
            f"waiting for {running} running repl{'y' if running == 1 else 'ies'} to finish before {doing} the model"
        )

    # -- replies -------------------------------------------------------------
    def plan_reply(self) -> ReplyHandle:
        """The REPL's policy: drop the oldest turns that no longer fit (and say so)."""
        self.require_model()
        sampling = SamplingParams.from_settings(self.settings)
        return self.backend.generate(GenerateRequest(self.session, sampling, output_format=self.output_format))

    def context_usage(self) -> tuple[int, int | None] | None:
        """Tokens of the conversation as the next reply will send it (old turns that no longer fit left out)."""
        return self.backend.context_usage(self.session, self.settings.get("max_new_tokens"))


def display_name(target: str, path: Path) -> str:
    candidate = Path(target)
    return path.name if candidate.is_absolute() or target.startswith((".", "~")) or candidate.exists() else target
