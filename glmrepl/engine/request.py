"""What crosses the engine's boundary: a ``GenerateRequest`` goes in, a reply handle comes out.

The REPL resolves its layered settings into ``SamplingParams``; the server builds
them from the HTTP request; the remote backend sends the same request to
another server. Front-end policy travels as typed fields (``FitPolicy``, a forced
tool call, a cache namespace), never as keyword bags. A model is asked for with
``LoadOptions`` (the command line's, then one copy per checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .conversation.chat import ChatSession
from .settings import GREEDY_BELOW_TEMPERATURE, SETTINGS, Settings


@dataclass(frozen=True)
class SamplingParams:
    """How the reply's tokens are chosen, and how many at most (defaults: the settings table's)."""

    max_new_tokens: int = SETTINGS["max_new_tokens"].default
    do_sample: bool = SETTINGS["do_sample"].default
    temperature: float = SETTINGS["temperature"].default
    top_p: float = SETTINGS["top_p"].default
    top_k: int = SETTINGS["top_k"].default  # 0: no limit
    repetition_penalty: float = SETTINGS["repetition_penalty"].default
    seed: int | None = SETTINGS["seed"].default

    @classmethod
    def from_settings(cls, settings: Settings) -> SamplingParams:
        """The values in effect in layered settings (the REPL's /set, the server's defaults)."""
        return cls(**{f.name: settings.get(f.name) for f in fields(cls)})

    @property
    def greedy(self) -> bool:
        """Temperature 0 (or next to it), or sampling off: always the most likely token."""
        return not self.do_sample or self.temperature < GREEDY_BELOW_TEMPERATURE

    def with_max_new_tokens(self, max_new_tokens: int) -> SamplingParams:
        return replace(self, max_new_tokens=max_new_tokens)

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``model.generate``."""
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": not self.greedy}
        if self.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = self.repetition_penalty
        if not self.greedy:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        else:
            # Clear sampling values a checkpoint's generation_config may carry,
            # so transformers does not warn about unused flags on every reply.
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs


@dataclass(frozen=True)
class FitPolicy:
    """What to do when the conversation and the reply do not fit in the context.

    The REPL leaves out the oldest turns and shortens the reply (``REPL``); the
    OpenAI API refuses (``API``); ChatGLM's api.py counts prompt and reply
    together against ``max_length``.
    """

    drop_oldest: bool = True
    shorten_reply: bool = True
    max_length: int | None = None  # prompt and reply together stay within it


REPL_FIT = FitPolicy()
API_FIT = FitPolicy(drop_oldest=False, shorten_reply=False)


@dataclass(frozen=True)
class OutputFormat:
    """What the reply's text must be: any JSON object, or JSON valid under a schema.

    ``schema`` is the schema's JSON text (compiled once per text: generation/grammar.py);
    ``strict`` as OpenAI's: properties and items the schema does not name are not allowed.
    ``where`` names what carried the schema (or the format), for errors: an API field, a REPL file.
    """

    schema: str | None = None  # None: any JSON object
    strict: bool = False
    where: str = "response_format"

    def describe(self) -> str:
        return "JSON under a schema" if self.schema is not None else "a JSON object"


@dataclass
class GenerateRequest:
    """One reply to ask for: the conversation, how to sample, and the front end's policy."""

    conversation: ChatSession
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    fit: FitPolicy = REPL_FIT
    completion: bool = False  # continue the text as written, whatever the model's chat format
    # The reply is a call of this function ("": of any of the conversation's tools), begun in the prompt.
    force_call: str | None = None
    # Whose caches a reply may reuse: requests in different namespaces never share a cached prefix.
    cache_namespace: str = ""
    output_format: OutputFormat | None = None  # the reply's text held to JSON (None: free text)
    # Each token's log-probability and this many alternatives (0 to 20); None: none recorded.
    logprobs: int | None = None


@dataclass
class LoadOptions:
    """How a model is loaded: one type from the command line (and /device, /mode) to the loader.

    Front ends keep one without ``path``/``name`` as their defaults and give
    the loader a copy for one checkpoint (``for_model``).
    """

    path: Path | None = None
    name: str = ""
    mode: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False
    family: str | None = None  # the user's --family override
    prompt_mode: str | None = None  # "chat" / "complete" override
    gpu: int = 0  # gpu mode: which GPU
    gpus: list[int] | None = None  # sharded mode: which GPUs (None: all)
    max_gpu_memory: str | None = None  # sharded: "20GiB" each, or "0:20GiB,1:10GiB"
    offload: bool = False  # sharded: layers that fit no GPU may stay on the CPU
    quantize: int | None = None  # --quantize: 4 or 8 bits for a float checkpoint's linears
    group_size: int | None = None  # with quantize: columns a scale (None: the default for the bits)
    float_head: bool = False  # --float-head: a quantized model's head stays float (else int8 on the CPU)
    adapter: Path | None = None  # --adapter: a LoRA or P-tuning v2 folder put on the model (see adapters.py)
    merge_adapter: bool = False  # --merge-adapter: fold a LoRA into the weights

    def for_model(self, path: Path, name: str) -> LoadOptions:
        return replace(self, path=Path(path), name=name)


@dataclass(frozen=True)
class Variant:
    """What the loaded model is compared with (``/compare``): another checkpoint (``options``, made
    by the front end as for a load) or, without one, the loaded model's own options; then the
    changes asked for (models/variants.py)."""

    options: LoadOptions | None = None
    quantize: int | None = None  # 4 or 8
    dtype: str | None = None
    adapter: Path | None = None
    no_adapter: bool = False  # the same model without its adapter
