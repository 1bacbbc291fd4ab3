"""int4 / int8 for any transformers decoder model: which linears, and quantizing them in place.

Every ``nn.Linear`` of the decoder (attention and MLP projections) becomes a
:class:`~glmrepl.engine.quant.layers.QuantizedLinear` with group-wise scales, as does
GPT-2's ``Conv1D`` (whose weight is [in, out]: transposed first). Embeddings and
norms stay float, and so does the output head unless asked: it is the layer
whose errors reach the logits without any later layer to average them out, and
a tied head shares its tensor with the embeddings, so quantizing it means a
second, quantized copy (``include_head``), never a quantized embedding.

ChatGLM models keep THUDM's per-row layout by default, so that quantizing a
float checkpoint gives the same tensors as the released int4/int8 ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..cpu import kernels as cpu_kernels
from ..cpu.machine import release_freed_memory
from ..families.traits import model_traits
from ..quant.layers import (
    DEFAULT_GROUP_SIZE,
    SUPPORTED_BITS,
    QuantizedLinear,
    QuantizeError,
    check_group_size,
    model_bits,
    unsupported_architecture,
)


@dataclass
class QuantizedLayout:
    """What a quantized model (or checkpoint) holds: bits, group size (0: per row) and modules."""

    bits: int
    group_size: int
    modules: list[str] = field(default_factory=list)
    head: bool = False  # the output head is quantized too

    def to_config(self) -> dict:
        return {
            "format": "glmrepl",
            "version": 1,
            "bits": self.bits,
            "group_size": self.group_size,
            "head": self.head,
            "modules": list(self.modules),
        }


def _is_conv1d(module: nn.Module) -> bool:
    # GPT-2's projections; imported lazily, and matched by name so a copy in remote code counts too.
    return type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None


def _is_float_linear(module: nn.Module) -> bool:
    """A plain float linear: nn.Linear or glmrepl's KernelLinear (its subclass), or a Conv1D;
    not PEFT's wrappers, which hold their base layer as a child."""
    from ..cpu.float_linear import KernelLinear

    return type(module) in (nn.Linear, KernelLinear) or _is_conv1d(module)


def _in_features(module: nn.Module) -> int:
    weight: torch.Tensor = getattr(module, "weight")  # noqa: B009  (nn.Module types it loosely)
    return int(weight.shape[0] if _is_conv1d(module) else weight.shape[1])


def quantizable_linears(model: nn.Module, bits: int, include_head: bool = False) -> list[str]:
    """Names of the linears to quantize: every float linear but the output head (unless
    ``include_head``) and any layer sharing its weight with the input embeddings."""
    head, embeddings = output_head(model), _call(model, "get_input_embeddings")
    shared = getattr(embeddings, "weight", None)
    names = []
    for name, module in model.named_modules():
        if not _is_float_linear(module):
            continue
        is_head = module is head
        if (is_head and not include_head) or (not is_head and getattr(module, "weight", None) is shared):
            continue
        if bits == 4 and _in_features(module) % 2:
            continue  # two values a byte: an odd width has no int4 form, and stays float
        names.append(name)
    return names


def quantize_refusal(model: nn.Module, bits: int) -> QuantizeError | None:
    """Why the model cannot be quantized to ``bits`` as it is, or None (checked before anything changes)."""
    if bits not in SUPPORTED_BITS:
        return QuantizeError(f"quantizing to {bits!r} bits is not supported: choose 4 or 8")
    current = model_bits(model)
    if current and current != bits:
        return QuantizeError(
            f"the model is already quantized to int{current}: reload the float checkpoint to use int{bits}"
        )
    return None


def quantize_model(
    model: nn.Module, bits: int, group_size: int | None = None, include_head: bool = False
) -> QuantizedLayout:
    """Quantize a loaded model's linears in place, one at a time (the extra memory is one
    float matrix), on the device each is on. ``group_size`` None: the default for the bits
    (per row for ChatGLM). QuantizeError for bits other than 4/8, a model already quantized
    to other bits, or one with nothing to quantize."""
    refused = quantize_refusal(model, bits)
    if refused is not None:
        raise refused
    rows = model_traits(model).row_quantized_linears  # the release's own layout: a scale per row
    group = check_group_size(group_size if group_size is not None else (0 if rows else DEFAULT_GROUP_SIZE[bits]))
    names = rows(model) if rows is not None else quantizable_linears(model, bits, include_head)
    done = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    if not names and not done:
        config: Any = model.config
        architecture = (getattr(config, "architectures", None) or [type(model).__name__])[0]
        raise unsupported_architecture(architecture)
    head = output_head(model)
    for name in names:
        layer = model.get_submodule(name)
        if _is_float_linear(layer):
            _set_submodule(model, name, QuantizedLinear.from_linear(layer, bits, group))
            if layer is head:
                untie_head(model)
    release_freed_memory()
    cpu_kernels.library()  # built in the background while the reply starts
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    first = next(iter(layers.values()))
    return QuantizedLayout(bits, first.group_size, list(layers), include_head and head is not None)


def output_head(model: nn.Module) -> nn.Module | None:
    return _call(model, "get_output_embeddings")


def _call(model: nn.Module, method: str):
    """A transformers model method, None when the model lacks it (a plain nn.Module)."""
    found = getattr(model, method, None)
    return found() if callable(found) else None


def untie_head(model: nn.Module) -> None:
    """Keep transformers from tying the (now quantized) head back to the embeddings later."""
    configs: list[Any] = [model.config, _text_config(model)]
    for config in {id(c): c for c in configs}.values():
        if getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False


def _text_config(model: nn.Module) -> Any:
    getter = getattr(model.config, "get_text_config", None)
    return getter() if getter else model.config


def quantize_head(model: nn.Module, compute: torch.dtype = torch.float32, stored: Any = None) -> bool:
    """Put a quantized model's float CPU head in int8 (quant/int8_head.py), its tied embeddings
    reading the same bytes and giving rows of ``compute``, the model's type; True when done.
    ``stored``: the head's rows still in the checkpoint (a model not yet loaded, on the meta
    device). Left alone: a model without quantized layers, a head already quantized, on another
    device, with a bias, or rows not a whole number of groups."""
    from ..cpu.float_linear import KernelLinear
    from ..quant.int8_head import HEAD_GROUP, Int8Embedding, quantized_head

    head, embeddings = output_head(model), _call(model, "get_input_embeddings")
    if not model_bits(model) or type(head) not in (nn.Linear, KernelLinear):
        return False
    weight: torch.Tensor = getattr(head, "weight")  # noqa: B009
    device = "cpu" if stored is None else "meta"
    if weight.device.type != device or getattr(head, "bias", None) is not None or weight.shape[1] % HEAD_GROUP:
        return False
    tied = embeddings is not None and embeddings.weight is weight
    if tied and type(embeddings) is not nn.Embedding:
        return False  # a scaled or otherwise special embedding: leave the pair as it is
    names = {id(module): name for name, module in model.named_modules()}
    int8 = quantized_head(weight.detach() if stored is None else stored)
    _set_submodule(model, names[id(head)], int8)
    if tied:
        untie_head(model)
        _set_submodule(model, names[id(embeddings)], Int8Embedding(int8, compute, embeddings.padding_idx))
    del weight, head, embeddings
    release_freed_memory()  # the float table's pages go back now, not at some later trim
    return True


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
