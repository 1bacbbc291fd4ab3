"""Float linears that decode on the CPU through glmrepl's C++ kernels.

Decoding one token multiplies each weight matrix by one vector, so its speed
is how fast the weights are read. torch's one-row matmul reads float32 weights
at about half the memory bandwidth that a plain fused loop reaches with the
same threads (benchmarks/kernel_speed.py prints both, layer by layer), and the
weights of a 0.5B model in float32 are 2 GB per token. ``KernelLinear`` is
``nn.Linear`` with one change: a single token on the CPU goes through
``cpu_kernels.float_gemv`` (float32, bfloat16 or float16 weights, accumulated
in float32 as torch does), and a few tokens at once (batched decoding: one per
request, up to ``MAX_KERNEL_ROWS``) through ``cpu_kernels.float_gemm``, which
reads each weight row once for all of them. A prompt (many tokens) with
bfloat16 or float16 weights on a CPU that cannot compute in them natively
widens a block of weight rows at a time to float32 and multiplies in float32:
torch's own half-precision matmul on such CPUs ran a 1024-token prompt
several times slower than float32 (benchmarks/run.py, first token). Everything else — GPUs,
autograd, a kernel not built yet or not buildable — is ``F.linear`` as before.

The class of each existing ``nn.Linear`` is swapped in place: the parameters,
names, hooks and tied weights stay the same objects, PEFT still recognises the
layers (they are ``nn.Linear``), and ``restore_linears`` undoes it.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import first_line
from . import kernels as cpu_kernels

_FLOAT_TYPES = (torch.float32, torch.bfloat16, torch.float16)
_HALF_TYPES = (torch.bfloat16, torch.float16)
# Weight rows widened to float32 at once for a prompt: about 4 MB, which stays in the
# cache between widening it and multiplying with it; the whole float32 copy never exists.
_PROMPT_BLOCK_VALUES = 1 << 20
# Inputs of up to this many rows (a step of batched decoding: one token per request) go
# through the kernel, which reads each weight row once for all of them; more rows are a
# prompt, for torch's matmul. At 16 rows the kernel still beat F.linear on every large layer
# of a 0.5B model (1.4x to 2.7x in float32, more in bfloat16); from about 24 the smaller
# layers went faster through F.linear (benchmarks/kernel_speed.py), sooner with wider vectors.
MAX_KERNEL_ROWS = 16


class KernelLinear(nn.Linear):
    """``nn.Linear`` whose CPU products of up to MAX_KERNEL_ROWS tokens run in the fused kernels (see the module)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and not x.requires_grad and x.dim() and x.shape[-1] == self.in_features:
            if x.numel() <= MAX_KERNEL_ROWS * self.in_features:
                output = kernel_product(x, self.weight, self.bias)
                if output is not None:
                    return output
            if x.numel() != self.in_features and x.dtype == self.weight.dtype and x.dtype in _HALF_TYPES:
                if _widen_half_prompts():
                    return widened_product(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def kernel_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """``F.linear(x, weight, bias)`` through the kernels for x of 1 to MAX_KERNEL_ROWS rows
    (the matrix-vector one for a single token); None when they cannot run."""
    if weight.dtype not in _FLOAT_TYPES or x.dtype != weight.dtype or not weight.is_contiguous():
        return None  # (a type mismatch is F.linear's to report, as before)
    if weight.device.type != "cpu" or (bias is not None and (bias.dtype != weight.dtype or bias.device != x.device)):
        return None
    lib = cpu_kernels.library()
    if lib is None or x.numel() == 0:
        return None
    product = cpu_kernels.float_gemv if x.numel() == weight.shape[1] else cpu_kernels.float_gemm
    try:
        return product(lib, weight, x, bias, torch.get_num_threads())
    except Exception as error:  # a library that loaded but cannot run here: keep the reply going
        cpu_kernels.disable(f"fused kernel failed: {first_line(error)}")
        return None


def widened_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` for a half-precision prompt, in float32 a block of weight rows at a time,
    rounded once to x's type (as torch's half-precision matmul accumulates in float32)."""
    rows, columns = weight.shape
    block = max(1, _PROMPT_BLOCK_VALUES // columns)
    wide_x = x.float()
    output = x.new_empty(*x.shape[:-1], rows)
    for start in range(0, rows, block):
        part_bias = None if bias is None else bias[start : start + block].float()
        output[..., start : start + block] = F.linear(wide_x, weight[start : start + block].float(), part_bias)
    return output


@functools.cache
def _widen_half_prompts() -> bool:
    """True on CPUs without native bfloat16 (AVX512-BF16/AMX), which have no float16 arithmetic either."""
    from .machine import native_bf16

    return native_bf16() is None


def use_kernels(model: nn.Module) -> int:
    """Make the model's plain ``nn.Linear`` layers ``KernelLinear``; return how many.

    Starts building the kernels in the background when any of them is on the CPU."""
    swapped = [module for module in model.modules() if type(module) is nn.Linear]
    for module in swapped:
        module.__class__ = KernelLinear
    if any(module.weight.device.type == "cpu" for module in swapped):
        cpu_kernels.library()
    return len(swapped)


def restore_linears(model: nn.Module) -> int:
    """Undo ``use_kernels`` (the benchmark's raw transformers side); return how many."""
    swapped: list[nn.Module] = [module for module in model.modules() if type(module) is KernelLinear]
    for module in swapped:
        module.__class__ = nn.Linear
    return len(swapped)


def float_decode_path(model: nn.Module) -> str:
    """How a float model decodes on this device, for /stats: 'eager' or the kernels' state."""
    layer = next((m for m in model.modules() if type(m) is KernelLinear), None)
    if layer is None or layer.weight.device.type != "cpu" or layer.weight.dtype not in _FLOAT_TYPES:
        return "eager"
    return f"{str(layer.weight.dtype).removeprefix('torch.')} {cpu_kernels.status()}"
