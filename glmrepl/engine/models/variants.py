"""How the model the loaded one is compared with (``/compare``, a ``Variant``) is loaded: another
checkpoint, or the loaded model loaded again with a change (quantized, another dtype, another
adapter or none)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ..request import Variant
from .loading import LoadedModel, LoadOptions


def variant_request(loaded: LoadedModel, variant: Variant) -> LoadOptions:
    """How the other model is loaded: the variant's checkpoint, or the loaded model's own options
    (its /device, /quantize, /adapter and /mode included), with the changes the variant asks for."""
    base = variant.options or loaded.request or LoadOptions(path=loaded.info.path, name=loaded.info.name)
    changes: dict[str, Any] = {}
    if variant.quantize is not None:
        changes["quantize"] = variant.quantize
    if variant.dtype is not None:
        changes["dtype"] = variant.dtype
    if variant.adapter is not None or variant.no_adapter:
        changes.update(adapter=variant.adapter, merge_adapter=False)
    return replace(base, **changes)


def variant_label(request: LoadOptions, variant: Variant) -> str:
    """The other model's name where figures are shown: its checkpoint, then what differs."""
    assert request.path is not None  # variant_request always names a folder
    words = [request.name or request.path.name]
    if variant.quantize is not None:
        words.append(f"int{variant.quantize}")
    if variant.dtype is not None:
        words.append(variant.dtype)
    if variant.adapter is not None:
        words.append(f"+ adapter {variant.adapter.name}")
    if variant.no_adapter:
        words.append("without its adapter")
    return " ".join(words)
