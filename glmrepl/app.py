"""The application state shared by the REPL, the command handlers and one-shot mode.

It glues the engine pieces together (model manager, conversation, settings)
without any terminal code, so non-interactive use and tests drive the same
paths as the REPL.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .engine.chat import ChatSession
from .engine.errors import GlmreplError
from .engine.settings import Settings


@dataclass
class LoadOptions:
    """How models are loaded: from the command line, changed by /device and /mode."""

    mode: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False
    family: str | None = None
    prompt_mode: str | None = None
    gpu: int = 0
    gpus: list[int] | None = None
    max_gpu_memory: str | None = None
    offload: bool = False
    quantize: int | None = None  # 4 or 8: quantize a float ChatGLM checkpoint while loading it
    adapter: Path | None = None  # --adapter: put on the model given on the command line
    merge_adapter: bool = False


@dataclass
class ReplyPlan:
    run: Any  # GenerationRun
    dropped_turns: int


@dataclass
class App:
    manager: Any  # ModelManager (imported lazily by main so the prompt comes first)
    settings: Settings = field(default_factory=Settings)
    session: ChatSession = field(default_factory=ChatSession)
    models_dir: Path | None = None
    options: LoadOptions = field(default_factory=LoadOptions)
    last_stats: Any = None  # GenerationStats of the last reply, for /stats
    _defaults_applied_for: Any = None

    # -- models --------------------------------------------------------------
    @property
    def model(self):
        """The loaded model, with the settings layer it brings applied."""
        loaded = self.manager.current
        if loaded is not None and loaded is not self._defaults_applied_for:
            family_defaults = getattr(loaded.prompt_format, "sampling_defaults", {}) or {}
            self.settings.set_model_defaults(loaded.info.checkpoint_defaults, family_defaults)
            self._defaults_applied_for = loaded
        return loaded

    def load_request(self, target: str):
        from .engine.catalog import resolve_model
        from .engine.manager import LoadRequest

        path = resolve_model(target, self.models_dir)
        o = self.options
        adapter, o.adapter = o.adapter, None  # --adapter belongs to the first model only, not to /model switches
        return LoadRequest(path=path, name=_display_name(target, path), mode=o.mode, dtype=o.dtype,
                           trust_remote_code=o.trust_remote_code, family=o.family, prompt_mode=o.prompt_mode,
                           gpu=o.gpu, gpus=o.gpus, max_gpu_memory=o.max_gpu_memory, offload=o.offload,
                           quantize=o.quantize, adapter=adapter, merge_adapter=o.merge_adapter)

    def start_load(self, target: str):
        return self.manager.start_load(self.load_request(target))

    def require_model(self):
        loaded = self.model
        if loaded is None:
            job = self.manager.job
            if job is not None and not job.done.is_set():
                raise GlmreplError(f"still {job.status}")
            raise GlmreplError("no model is loaded: choose one with /model NAME (or /model to list them)")
        return loaded

    # -- replies -------------------------------------------------------------
    def plan_reply(self) -> ReplyPlan:
        """Fit the conversation into the context and set up generation (not started)."""
        from .engine.generate import GenerationRun

        loaded = self.require_model()
        kwargs = self.settings.generation_kwargs()
        fitted = self.session.fit(loaded.prompt_format, loaded.info.context_length, kwargs["max_new_tokens"])
        kwargs["max_new_tokens"] = fitted.max_new_tokens
        run = GenerationRun(loaded.model, loaded.tokenizer, fitted.ids, kwargs,
                            loaded.prompt_format.stop_token_ids, seed=self.settings.get("seed"))
        return ReplyPlan(run, fitted.dropped_turns)

    def record_reply(self, run) -> str:
        """Keep what was generated; an interrupted reply stays, marked as cut."""
        loaded = self.require_model()
        text = loaded.prompt_format.clean_reply(run.text())
        cut = run.stats.stop_reason in ("cancelled", "length")
        self.session.add_assistant(text, cut=cut)
        return text

    def context_usage(self) -> tuple[int, int | None] | None:
        """(prompt tokens of the conversation so far, context length) for the toolbar."""
        loaded = self.manager.current
        if loaded is None:
            return None
        try:
            ids = loaded.prompt_format.build(self.session.as_dicts()) if self.session.messages else []
        except Exception:  # a template that rejects a partial conversation: show nothing rather than fail
            return None
        return len(ids), loaded.info.context_length


def _display_name(target: str, path: Path) -> str:
    candidate = Path(target)
    return path.name if candidate.is_absolute() or target.startswith((".", "~")) or candidate.exists() else target
