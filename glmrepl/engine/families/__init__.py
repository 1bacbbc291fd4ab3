"""Native support for checkpoint families transformers has no class for.

A family is recognised from a folder's files without executing any of its
Python code. The generic loader asks :func:`detect_family` first; a match is
loaded with :func:`load_family` instead of ``AutoModelForCausalLM``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class FamilyMatch:
    """Which family a folder is, and why we think so (shown to the user)."""

    family: str  # e.g. "chatglm1", "chatglm2", "chatglm3", "glm4"
    reason: str  # e.g. "tokenizer has role tokens <|user|>"


@dataclass
class LoadedParts:
    """What a family loader hands back to the model manager."""

    model: Any  # a transformers PreTrainedModel (generate() works on it)
    tokenizer: Any  # encode(text) -> ids, decode(ids, skip_special_tokens=True) -> str
    prompt_format: Any  # see glmrepl.engine.conversation.formats.PromptFormat


KNOWN_FAMILIES = ("chatglm1", "chatglm2", "chatglm3", "glm4")


def detect_family(path: Path, config: dict, override: str | None = None) -> FamilyMatch | None:
    """Return the native family of the folder at ``path``, or None for ordinary checkpoints.

    Raises CheckpointError for a config that claims a native family
    (``model_type: chatglm``) but matches none of its known generations.
    """
    if config.get("model_type") != "chatglm":
        return None
    from .chatglm.detect import detect_chatglm

    return detect_chatglm(path, config, override)


def ignored_family_override(config: dict, override: str | None) -> str | None:
    """Why ``--family`` does not apply to a checkpoint, or None when it does (or was not given)."""
    if not override or not isinstance(config, dict) or config.get("model_type") == "chatglm":
        return None
    model_type = config.get("model_type")
    return (
        f"--family {override} is ignored: it chooses the ChatGLM generation, and this checkpoint is not a "
        f"ChatGLM one (model_type {model_type!r})"
    )


def load_family(
    path: Path,
    match: FamilyMatch,
    *,
    weight_files: list[Path],
    dtype: Any,
    device_map: Any,
    quantize: int | None = None,
) -> LoadedParts:
    """Load a recognised family's model, tokenizer and prompt format (``quantize``: 4 or 8 bits).

    ``weight_files`` are the ones the validator checked (``CheckpointInfo.weight_files``):
    the loader reads those, never the folder's index again."""
    from .chatglm.load import load_chatglm

    return load_chatglm(path, match, weight_files=weight_files, dtype=dtype, device_map=device_map, quantize=quantize)


def architecture_name(model: Any) -> str:
    """The model's class as its config names it (what an adapter says it was trained on)."""
    return (getattr(model.config, "architectures", None) or [type(model).__name__])[0]
