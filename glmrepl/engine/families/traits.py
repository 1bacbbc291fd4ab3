"""What each family can do, declared once.

Generic code (batching, prefix reuse, perplexity, quantizing) asks ``traits_of``
or ``model_traits`` instead of naming a family; a new family adds its line here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FamilyTraits:
    # Why a reply's cache cannot serve a longer prompt (None: exact prefix reuse works).
    no_prefix_reuse: str | None = None
    # Why its replies cannot decode in a batch (None: transformers' continuous batching takes them).
    no_batching: str | None = None
    # The linears its releases quantize, one scale per row (None: glmrepl's group-wise layout).
    row_quantized_linears: Callable[[Any], list[str]] | None = None
    # The ids each perplexity window starts with, fed and never scored (None: the tokenizer's own).
    window_prefix: Callable[[Any], list[int]] | None = None


def _chatglm_linears(model: Any) -> list[str]:
    from .chatglm.quantized import linear_names

    return linear_names(model)


def _glm1_window_prefix(tokenizer: Any) -> list[int]:
    return [tokenizer.gmask_token_id, tokenizer.bos_token_id]  # [gMASK] <sop>


ORDINARY = FamilyTraits()
_GLM = FamilyTraits(row_quantized_linears=_chatglm_linears)
TRAITS = {
    "chatglm1": FamilyTraits(
        no_prefix_reuse="ChatGLM-6B's prompt attends both ways",
        no_batching="ChatGLM-6B's own implementation has no paged cache",
        row_quantized_linears=_chatglm_linears,
        window_prefix=_glm1_window_prefix,
    ),
    "chatglm2": _GLM,
    "chatglm3": _GLM,
    "glm4": _GLM,
}


def traits_of(family: str | None) -> FamilyTraits:
    return TRAITS.get(family or "", ORDINARY)


def model_traits(model: Any) -> FamilyTraits:
    """The traits of a loaded model, known from the model alone (a benchmark, quantizing a bare model)."""
    return traits_of(model_family(model))


def model_family(model: Any) -> str | None:
    """ "chatglm1" for ChatGLM-6B's own implementation, "chatglm2" for the later generations on
    transformers' GLM classes, None for everything else."""
    from .chatglm.glm1_model import ChatGLM1ForCausalLM  # torch is in: a model is loaded

    if isinstance(model, ChatGLM1ForCausalLM):
        return "chatglm1"
    if getattr(model.config, "model_type", None) == "glm" and hasattr(model, "model"):
        return "chatglm2"
    return None
