"""Quantized ChatGLM layers: THUDM's int4 / int8 checkpoints, and quantizing float ones.

The released quantized checkpoints store the four linears of every layer as
int8 ``weight`` + per-row ``weight_scale`` (see glmrepl.engine.quant.layers). Here
those linears become :class:`~glmrepl.engine.quant.layers.QuantizedLinear` modules,
on the meta device before loading (so accelerate's device maps size and place
them like any other block) or in place on a loaded model (``/quantize``).
A float tensor loaded into a quantized layer is quantized on the CPU first,
one tensor at a time, so a float checkpoint never exists in full float form
on the target device.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

import torch
from torch import nn

from ...cpu import kernels as cpu_kernels
from ...cpu.machine import release_freed_memory
from ...errors import CheckpointError
from ...quant.layers import (
    SUPPORTED_BITS,
    QuantizedLinear,
    QuantizeError,
    model_bits,
    quantize_weight,
    unsupported_architecture,
)

# The quantized linears of each model, as (layer list, linears within a layer).
_GLM_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_up_proj",
    "mlp.down_proj",
)
_GLM1_LINEARS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")


def config_bits(config: dict, folder: str) -> int:
    """The checkpoint's ``quantization_bit`` (0 for float checkpoints); CheckpointError for others."""
    bits = config.get("quantization_bit") or 0
    if bits and bits not in SUPPORTED_BITS:
        raise CheckpointError(f"{folder}: quantization_bit={bits!r} is not supported (4 or 8)")
    return int(bits)


def load_bits(config: dict, folder: str, requested: int | None) -> int:
    """Bits the loaded layers will have: the checkpoint's own, or ``requested`` (--quantize)
    for a float checkpoint; a quantized checkpoint cannot be requantized to other bits."""
    stored = config_bits(config, folder)
    if requested and requested not in SUPPORTED_BITS:
        raise QuantizeError(f"--quantize {requested!r}: choose 4 or 8")
    if stored and requested and requested != stored:
        raise QuantizeError(
            f"{folder} is already quantized to int{stored}: --quantize {requested} needs the float checkpoint"
        )
    return stored or int(requested or 0)


def linear_names(model: nn.Module) -> list[str]:
    """Module names of the linears glmrepl quantizes; QuantizeError for other architectures."""
    from .glm1_model import ChatGLM1ForCausalLM

    config: Any = model.config  # a transformers config; nn.Module types attributes as tensors or modules
    linears: tuple[str, ...]
    if isinstance(model, ChatGLM1ForCausalLM):
        prefix, linears = "transformer.layers", _GLM1_LINEARS
        count = config.num_hidden_layers
    elif getattr(config, "model_type", None) == "glm" and hasattr(model, "model"):
        prefix, linears = "model.layers", _GLM_LINEARS
        count = config.num_hidden_layers
    else:
        architecture = (getattr(config, "architectures", None) or [type(model).__name__])[0]
        raise unsupported_architecture(architecture)
    return [f"{prefix}.{layer}.{name}" for layer in range(count) for name in linears]


def replace_with_empty(model: nn.Module, bits: int, dtype: torch.dtype) -> None:
    """Swap the linears of a meta-device model for empty quantized ones of the same shape."""
    for name in linear_names(model):
        linear = cast(nn.Linear, model.get_submodule(name))  # linear_names names only nn.Linear layers
        layer = QuantizedLinear(
            linear.in_features, linear.out_features, bits, linear.bias is not None, device="meta", dtype=dtype
        )
        _set_submodule(model, name, layer)
    cpu_kernels.library()  # built in the background while the weights load


def quantize_in_place(model: nn.Module, bits: int) -> int:
    """Quantize a loaded model's float linears on the device they are on; return how many.

    One layer at a time, so the extra memory is one float matrix; QuantizeError
    when the model already has layers of other bits."""
    if bits not in SUPPORTED_BITS:
        raise QuantizeError(f"/quantize {bits!r}: choose 4 or 8")
    names = linear_names(model)
    current = model_bits(model)
    if current and current != bits:
        raise QuantizeError(
            f"the model is already quantized to int{current}: reload the float checkpoint to use int{bits}"
        )
    count = 0
    for name in names:
        linear = model.get_submodule(name)
        if isinstance(linear, nn.Linear):
            _set_submodule(model, name, QuantizedLinear.from_linear(linear, bits))
            count += 1
    release_freed_memory()
    cpu_kernels.library()
    return count


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def quantizing_converter(model: nn.Module, convert, folder: str, stored_bits: int):
    """Wrap a name conversion for a model with quantized layers.

    For a float checkpoint (``stored_bits`` 0) the weights bound for quantized
    layers are quantized on the CPU, before they are placed, giving the same
    tensors as a quantized checkpoint. A checkpoint that declares
    ``quantization_bit`` must store them as int8: a float one is refused."""
    quantized = {
        f"{name}.weight": module for name, module in model.named_modules() if isinstance(module, QuantizedLinear)
    }

    def wrapped(stored_name: str, tensor: torch.Tensor) -> Iterable[tuple[str, torch.Tensor]]:
        for name, value in convert(stored_name, tensor):
            layer = quantized.get(name)
            if layer is None or not value.is_floating_point():
                # A float tensor kept as read would pin the whole memory-mapped shard, and
                # with it every page the quantized layers were read from: copy it out.
                yield name, value.clone() if not stored_bits and value.is_floating_point() else value
                continue
            if stored_bits:
                raise CheckpointError(
                    f"{folder}: {stored_name} is stored as {str(value.dtype)[6:]}, but a "
                    f"quantization_bit={stored_bits} checkpoint stores int8 weights"
                )
            if tuple(value.shape) != (layer.out_features, layer.in_features):
                raise CheckpointError(
                    f"{folder}: {stored_name} has shape {tuple(value.shape)}, the config implies "
                    f"{(layer.out_features, layer.in_features)}"
                )
            packed, scale = quantize_weight(value.float(), layer.bits)
            yield name, packed
            yield f"{name}_scale", scale

    return wrapped
