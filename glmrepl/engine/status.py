"""What a front end may know of the loaded model and of a finished reply: plain data, no model object."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelStatus:
    """What a front end may know about the loaded model (never the model object itself)."""

    serial: int  # changes on every load, swap or unload
    name: str
    path: Any
    architecture: str
    family: str | None
    family_reason: str | None
    placement: Any  # devices.Placement
    format_name: str
    is_chat: bool
    context_length: int | None
    checkpoint_defaults: dict = field(default_factory=dict)
    sampling_defaults: dict = field(default_factory=dict)
    adapter: str | None = None  # the adapter in use, described
    adapter_path: Any = None
    tool_syntax: str | None = None  # how the format's model writes tool calls; None: it takes no tools


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    first_token_s: float | None = None  # time to first token (prefill)
    total_s: float = 0.0
    stop_reason: str = "end"  # "end" (a stop token), "length", "cancelled"
    new_ids: list[int] = field(default_factory=list)
    reused_tokens: int = 0  # prompt tokens whose KV came from an earlier reply's cache
    path: str = ""  # how decoding ran (eager, fused quantized kernels...), for /stats

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Speed after the first token, the figure that compares across prompt lengths."""
        if self.first_token_s is None or self.new_tokens < 2:
            return None
        decode_time = self.total_s - self.first_token_s
        return (self.new_tokens - 1) / decode_time if decode_time > 0 else None
