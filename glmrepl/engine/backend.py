"""The engine in this process: ``LocalBackend`` serves the Backend protocol (contract.py)
from a ModelManager and the scheduler that owns its model. Front ends talk to a backend
only: they never hold the model, its tokenizer or its prompt format.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .contract import Abilities, NextToken
from .conversation.chat import ChatSession
from .conversation.reply_tokens import ReplyTokens
from .errors import GlmreplError
from .generation.prefix_cache import PrefixCache
from .generation.scheduler import Scheduler, scheduler_for
from .generation.service import ModelStatus, Reply, context_usage, fit_prompt, plan_reply, status_of
from .models.loading import LoadJob, LoadOptions
from .request import GenerateRequest, Variant
from .status import BatchingStatus, KVStatus, Placement, RepliesStatus

if TYPE_CHECKING:
    from .generation.comparing import CompareJob
    from .generation.perplexity import PerplexityJob
    from .models.manager import ModelManager


class LocalBackend(Abilities):
    """The engine in this process: one ModelManager, and the scheduler that owns its model."""

    abilities = frozenset(
        {"move", "quantize", "adapters", "prompt_mode", "next_tokens", "perplexity", "compare", "memory_report"}
    )

    def __init__(self, manager: ModelManager | None = None, max_queue: int | None = None):
        if manager is None:
            from .models.manager import ModelManager

            manager = ModelManager()
        self.manager = manager
        self.scheduler: Scheduler = scheduler_for(manager)
        self.scheduler.max_waiting = max_queue
        # Replies' KV caches and their own ids, for the next prompt (see prefix_cache, reply_tokens);
        # both belong to the model as it is, and go with every change to it.
        self.prefixes = PrefixCache()
        self.replies = ReplyTokens()
        self.kv_budget_bytes: int | None = None  # set_kv_budget (glmrepl serve)
        manager.change_hooks.append(self._model_changing)

    def _model_changing(self) -> None:
        self.prefixes.clear()
        self.replies.clear()

    # -- models ----------------------------------------------------------------
    def list_models(self, models_dir: Path | None = None, beside: Path | None = None) -> list:
        """Local checkpoints, with the folders beside ``beside`` (the loaded model's) too."""
        from .models.catalog import find_checkpoints

        return find_checkpoints(models_dir, beside=beside)

    def load(self, request: LoadOptions) -> LoadJob:
        """Start loading in the background; the current model serves meanwhile."""
        return self.manager.start_load(request)

    def load_and_wait(self, request: LoadOptions) -> ModelStatus:
        """Load synchronously; raises the load's GlmreplError."""
        self.manager.load(request)
        status = self.status()
        if status is None:  # unloaded again at once by another thread's swap
            raise GlmreplError(f"{request.name} was unloaded before it could be used")
        return status

    @property
    def job(self) -> LoadJob | None:
        return self.manager.job

    def status(self) -> ModelStatus | None:
        loaded = self.manager.current
        return status_of(loaded, self.manager.serial) if loaded is not None else None

    def load_notes(self) -> list[str]:
        """What the load report adds about the loaded model (e.g. why its quantized layers run slower)."""
        from .quant.layers import fallback_note

        loaded = self.manager.current
        note = fallback_note(loaded.model) if loaded is not None else None
        return [note] if note else []

    def enable_batching(self, max_batch: int, cache_bytes: int | None = None) -> None:
        """Let up to ``max_batch`` concurrent replies decode together (see batching.py)."""
        self.scheduler.enable_batching(max_batch, cache_bytes)

    def warm_batch(self) -> None:
        """Start the loaded model's batch ahead of the first concurrent replies (glmrepl serve)."""
        self.scheduler.warm_batch(self.manager.current)

    def set_kv_budget(self, budget_bytes: int, prefix_cap_bytes: int | None = None, entries: int = 64) -> None:
        """One memory budget for KV caches: the batch's paged pool (when batching is on) takes its
        share, the prefix caches of recent replies the rest (at most ``prefix_cap_bytes``)."""
        from .generation.batching import batch_pool_bytes

        pool = batch_pool_bytes(budget_bytes) if self.scheduler.batching else 0
        if pool:
            self.scheduler.cache_bytes = pool
        prefix_bytes = budget_bytes - pool
        if prefix_cap_bytes is not None:
            prefix_bytes = min(prefix_bytes, prefix_cap_bytes)
        self.prefixes.configure(entries if prefix_bytes > 0 else 0, prefix_bytes)
        # No reuse asked for (--prefix-cache-mb 0): the batch shares no prompt blocks either.
        self.scheduler.share_prompt_blocks = prefix_cap_bytes != 0
        self.kv_budget_bytes = budget_bytes

    def kv_status(self) -> KVStatus:
        """For /health: the KV budget and what uses it now."""
        prefixes = self.prefixes
        return {
            "budget_bytes": self.kv_budget_bytes,
            "batch_pool_bytes": self.scheduler.batch_pool_bytes,
            "prefix_cache": {
                "entries": len(prefixes),
                "bytes": prefixes.nbytes,
                "max_bytes": prefixes.max_bytes,
                "tokens_reused": prefixes.tokens_reused,
            },
        }

    def batching_status(self) -> BatchingStatus:
        """For /health and the start line: whether replies batch, how many run, and why not."""
        scheduler = self.scheduler
        why_not = scheduler.why_not_batching(self.manager.current)
        return {
            "enabled": why_not is None,
            "max_batch": scheduler.max_batch if why_not is None else 1,
            "running": scheduler.running,
            "why_not": why_not,
        }

    def replies_status(self) -> RepliesStatus:
        """For /health: replies decoding, waiting, the bound on waiting, tokens made so far."""
        scheduler = self.scheduler
        running = scheduler.running
        return {
            "running": running,
            "waiting": max(scheduler.admitted - running, 0),
            "max_waiting": scheduler.max_waiting,
            "tokens_generated": scheduler.tokens_generated,
        }

    def stop(self) -> None:
        """Stop the batch (its thread would keep the process alive)."""
        self.scheduler.stop_batch()

    def loading(self) -> bool:
        job = self.manager.job
        return job is not None and not job.done.is_set()

    # -- replies ---------------------------------------------------------------
    def generate(self, request: GenerateRequest) -> Reply:
        """Plan the reply ``request`` asks for (service.plan_reply); iterate it to run it."""
        return plan_reply(self, request)

    def context_usage(self, conversation: ChatSession, max_new_tokens: int = 0) -> tuple[int, int | None] | None:
        return context_usage(self.manager.current, conversation, max_new_tokens, self.replies)

    # -- optional abilities ----------------------------------------------------
    def move(self, mode: str, dtype: str = "auto", on_wait: Callable[[int], None] | None = None) -> Placement:
        """Move the model (waits for running replies first); returns the new Placement."""
        return self.manager.move(mode, dtype, on_wait=on_wait)

    def quantize(self, bits: int, on_wait: Callable[[int], None] | None = None) -> Placement:
        return self.manager.quantize(bits, on_wait=on_wait)

    def set_adapter(
        self, path: Path | None, merge: bool = False, on_wait: Callable[[int], None] | None = None
    ) -> str | None:
        """Put an adapter on the model (None: take it off); returns its description, or None."""
        adapter = self.manager.set_adapter(path, merge, on_wait=on_wait)
        return adapter.describe() if adapter else None

    def set_prompt_mode(self, mode: str | None) -> str:
        return self.manager.set_prompt_mode(mode)

    def next_tokens(self, conversation: ChatSession, k: int) -> list[NextToken]:
        """The k most likely next tokens after the conversation: (text, id, probability); a token
        that is part of a character shows its bytes (``<0xE4>``)."""
        from .conversation.tokens import token_label
        from .generation.run import next_token_distribution

        loaded = self._require_model()
        if not conversation.messages:
            raise GlmreplError("the conversation is empty: there is nothing to continue")
        ids = fit_prompt(conversation, loaded.prompt_format, loaded.info.context_length, 1).ids
        if not ids:
            raise GlmreplError("the conversation is empty: there is nothing to continue")
        with self.scheduler.reading():
            table = self.scheduler.call(lambda: next_token_distribution(loaded.model, loaded.tokenizer, ids, k))
        return [(token_label(loaded.tokenizer, token_id, text), token_id, p) for text, token_id, p in table]

    def start_perplexity(self, path: Path, window: int | None = None, stride: int | None = None) -> PerplexityJob:
        """Score the text file in the background (see perplexity.py); the PerplexityJob says how far it is.
        A file or window that cannot be used raises PerplexityError here, before anything runs."""
        from .generation.perplexity import PerplexityJob, choose_window, read_text

        text = read_text(path)
        window, stride = choose_window(self._require_model().info.context_length, window, stride)
        return PerplexityJob(Path(path).name).start(lambda job: self._perplexity(job, text, window, stride))

    def _perplexity(self, job, text: str, window: int, stride: int):
        from .generation.perplexity import perplexity_of_text

        with self.scheduler.reading():  # a move or swap waits for the run to end
            loaded = self._require_model()
            return self.scheduler.call(
                lambda: perplexity_of_text(
                    loaded.model, loaded.tokenizer, text, window, stride, job.cancel_event, job.progress
                )
            )

    def start_compare(self, variant: Variant, conversation: ChatSession, max_new_tokens: int) -> CompareJob:
        """Compare the replies of the loaded model and of ``variant`` to the conversation's last
        message, in the background (generation/comparing.py); the conversation is only read."""
        from .generation.comparing import compare_replies

        return compare_replies(self, variant, conversation, max_new_tokens)

    def start_compare_text(
        self, variant: Variant, path: Path, window: int | None = None, stride: int | None = None
    ) -> CompareJob:
        """Compare the two models' predictions on a text file, in perplexity's windows. A file or
        window that cannot be used raises PerplexityError here, before anything runs."""
        from .generation.comparing import compare_on_text
        from .generation.perplexity import choose_window, read_text

        text = read_text(path)
        window, stride = choose_window(self._require_model().info.context_length, window, stride)
        return compare_on_text(self, variant, text, window, stride)

    def memory_report(self) -> list[tuple[str, str]]:
        from .devices.modes import memory_report

        loaded = self.manager.current
        return memory_report(loaded.model if loaded is not None else None)

    def _require_model(self):
        loaded = self.manager.current
        if loaded is None:
            raise GlmreplError("no model is loaded")
        return loaded


def default_kv_budget_mb() -> int:
    """A quarter of the memory available now, between 256 MiB and 2 GiB."""
    from .models.manager import memory_available_bytes

    return max(256, min(2048, memory_available_bytes() // 4 // 2**20))
