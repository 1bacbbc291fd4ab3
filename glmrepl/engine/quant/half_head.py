"""A quantized model's float output head kept in its checkpoint's 16-bit precision on the CPU.

Once the decoder's linears are int4, the float32 output head is most of what a token reads:
Qwen2-0.5B's tied 151936 x 896 head is 0.54 GB of the 0.74 GB of an int4 step. A checkpoint
stored in bfloat16 or float16 holds nothing the float32 copy adds, so the head (and the
embeddings it is tied to) stays in the stored type: the same values, half the bytes, read by
the fused kernels, which widen each weight to float32 in registers and accumulate in float32
as before. Activations stay float32: the head's input and the embeddings' output are float32,
so every other layer computes exactly as it did. A prompt's many rows (perplexity) widen a
block of head rows at a time (float_linear.widened_product).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..cpu import kernels as cpu_kernels
from ..cpu.float_linear import MAX_KERNEL_ROWS, KernelLinear, widened_product
from ..cpu.machine import release_freed_memory
from .layers import model_bits

_STORED_HALVES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


class StoredPrecisionHead(KernelLinear):
    """The output head with a 16-bit weight and float32 inputs and outputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.requires_grad or x.dtype != torch.float32:
            return F.linear(x, self.weight.to(x.dtype), None)
        lib = cpu_kernels.library()
        if lib is not None and 0 < x.numel() <= MAX_KERNEL_ROWS * self.in_features:
            product = cpu_kernels.float_gemv if x.numel() == self.in_features else cpu_kernels.float_gemm
            output = product(lib, self.weight, x, None, torch.get_num_threads())
            if output is not None:
                return output
        return widened_product(x, self.weight, None)


class WideningEmbedding(nn.Embedding):
    """Embeddings sharing the head's 16-bit tensor: the rows looked up come out float32."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return super().forward(input).float()


def keep_head_stored(model: Any, stored_dtype: str | None) -> bool:
    """Put a quantized model's float32 CPU head back in the checkpoint's 16-bit type; True when done.

    Only a plain, bias-free head of a model with quantized layers, and only when the 16-bit
    copy holds exactly the same values; its tied embeddings follow."""
    half = _STORED_HALVES.get(stored_dtype or "")
    head: Any = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if half is None or not model_bits(model) or type(head) not in (nn.Linear, KernelLinear):
        return False
    weight = head.weight
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or head.bias is not None:
        return False
    embeddings = model.get_input_embeddings()
    tied = embeddings is not None and embeddings.weight is weight
    if tied and type(embeddings) is not nn.Embedding:
        return False  # a scaled or otherwise special embedding: leave the pair as it is
    narrow = weight.data.to(half)
    if not torch.equal(narrow.float(), weight.data):
        return False  # the float32 values hold more than 16 bits (a config that says otherwise)
    weight.data = narrow
    head.__class__ = StoredPrecisionHead
    if tied:
        embeddings.__class__ = WideningEmbedding
    del narrow, weight
    release_freed_memory()  # the float32 copy's pages go back now, not at some later trim
    return True
