"""What a front end may know of the loaded model and of a finished reply: plain data, no model object."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypedDict


@dataclass
class Placement:
    """Where the model's weights are and in what precision (devices/modes.py plans and moves them)."""

    mode: str  # "cpu", "gpu" or "sharded" (never "auto": it is resolved)
    dtype: str  # "float32", "bfloat16" or "float16"
    device_map: Any  # what loaders take: "cpu", "cuda:0", or a {module: device} dict once planned
    reason: str = ""  # why auto chose this mode, for the user
    budgets: dict[int, int] = field(default_factory=dict)  # sharded: bytes per GPU index
    offload: bool = False  # sharded: layers that fit on no GPU may go to the CPU
    summary: str = ""  # where the layers ended up, once loaded
    quant_bits: int = 0  # 4 or 8 when the layers are quantized (int4/int8), else 0

    def describe(self) -> str:
        quantized = f" int{self.quant_bits}" if self.quant_bits else ""
        return f"{self.mode} {self.dtype}{quantized}"


class PlacementView(Protocol):
    """What a front end reads of where the model runs: a local ``Placement``, or a server's."""

    @property
    def mode(self) -> str: ...

    @property
    def dtype(self) -> str: ...

    @property
    def reason(self) -> str | None: ...

    @property
    def summary(self) -> str | None: ...

    def describe(self) -> str: ...


@dataclass(frozen=True)
class ModelStatus:
    """What a front end may know about the loaded model (never the model object itself)."""

    serial: int  # changes on every load, swap or unload
    name: str
    path: Path | str  # the checkpoint folder, or the model's id on a server
    architecture: str
    family: str | None
    family_reason: str | None
    placement: PlacementView
    format_name: str
    is_chat: bool
    context_length: int | None
    checkpoint_defaults: dict = field(default_factory=dict)
    sampling_defaults: dict = field(default_factory=dict)
    adapter: str | None = None  # the adapter in use, described
    adapter_path: Path | None = None
    tool_syntax: str | None = None  # how the format's model writes tool calls; None: it takes no tools


@dataclass(frozen=True)
class TokenLogprob:
    """A token of a reply and its log-probability under the distribution it was drawn from;
    ``top``: the most likely tokens of that distribution, best first (OpenAI's top_logprobs)."""

    token: str  # its text; bytes that are no whole character as "<0xE4>" (conversation/tokens.py)
    token_id: int
    logprob: float
    bytes: tuple[int, ...]  # its UTF-8 bytes
    top: tuple[TokenLogprob, ...] = ()


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


# What /health and serve's start line show of the engine, as the backend reports it.
class PrefixCacheStatus(TypedDict):
    entries: int
    bytes: int
    max_bytes: int | None
    tokens_reused: int


class KVStatus(TypedDict):
    budget_bytes: int | None
    batch_pool_bytes: int
    prefix_cache: PrefixCacheStatus


class BatchingStatus(TypedDict):
    enabled: bool
    max_batch: int
    running: int
    why_not: str | None


class RepliesStatus(TypedDict):
    running: int
    waiting: int
    max_waiting: int | None
    tokens_generated: int
