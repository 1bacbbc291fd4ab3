"""Weight-only int4 / int8 linears: THUDM's quantized ChatGLM layout, and group-wise scales.

Layout: ``weight`` is int8 [out, in] (8 bits) or [out, in / 2] (4 bits: two
signed values a byte, the even input index in the high nibble). ``weight_scale``
holds either one scale per output row (``group_size`` 0: THUDM's releases,
``row absmax / (2^(bits-1) - 1)`` in the model's dtype) or one per row and group
of ``group_size`` input columns, [out, ceil(in / group_size)] in float16 (the
last group may be shorter). The dequantized weight is ``value * scale``.

Why groups: one scale per row lets a single outlier weight set the step for the
whole row, so on real checkpoints (Llama, Qwen2) per-row int4 loses most of the
row's small weights to zero; groups of 32 columns, as GGUF's Q4_0 and AWQ use,
bound that damage to the group. The float16 scales add 0.5 bit a weight at 32
columns (4.5 bits for int4); float32 ones would add 1. Group-wise int4 takes the
group's largest-magnitude value to -8 (Q4_0's choice): all 16 levels are used,
where a symmetric ``absmax / 7`` leaves -8 empty.

CPU, one token (decoding): fused int8 / int4 matrix-vector kernels
(glmrepl.engine.cpu.kernels) that read only the packed bytes and the scales,
once they are built in the background. Many tokens (prompts, batched steps)
through a per-row layer: an integer matrix product where the CPU has
AVX512-VNNI (prompt_kernels.cpp), faster than a float matmul. Otherwise (no
kernels yet, no C++ compiler, no VNNI, group-wise scales): the weight stays
packed in memory and is dequantized a block of rows at a time inside
``forward``; for 4 bits the high and low nibbles are multiplied with the even
and odd inputs separately, which skips re-interleaving them (the costliest
step). Measured on a 4096x4096 layer for one token: about 1.25x the time of a
float32 matmul, where dequantizing the whole matrix per call took about 20x
(benchmarks/quant.py). A cached float copy would be faster but costs the
float32 memory that int4 is chosen to avoid.

GPU: per-row layers through a dequantization kernel compiled through
cpm_kernels (the ``quant`` extra) when it is installed and works, group-wise
ones (and per-row ones without it) through the same torch ops; the kernel
failing once disables it with one warning.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn import functional as F

from ..cpu import kernels as cpu_kernels
from ..cpu.float_linear import float_decode_path
from ..errors import GlmreplError, first_line

SUPPORTED_BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
# 0: one scale per row (THUDM's layout, kept for ChatGLM). See benchmarks/quant_models.py
# and the README for the errors and speeds these were chosen from.
DEFAULT_GROUP_SIZE = {4: 32, 8: 64}
GROUP_SCALE_DTYPE = torch.float16
# Rows dequantized at once on CPU for one matmul: blocks of about 4M float32 values
# (16 MB) beat 1M by 5 to 40% on ChatGLM2-6B's shapes at 64 and 1024 tokens (narrow
# blocks made torch's matmul slow) and 16M at 64 tokens (the block no longer stays cached).
_CPU_BLOCK_VALUES = 1 << 22


class QuantizeError(GlmreplError):
    """The model cannot be quantized as asked."""


def unsupported_architecture(architecture: str) -> QuantizeError:
    return QuantizeError(
        f"glmrepl cannot quantize {architecture}: it has no linear layers glmrepl knows how to quantize"
    )


def check_bits(bits) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"quantization to {bits!r} bits is not supported: choose 4 or 8")
    return int(bits)


def check_group_size(group_size) -> int:
    if group_size != 0 and group_size not in GROUP_SIZES:
        raise QuantizeError(f"group size {group_size!r} is not supported: choose 32, 64 or 128")
    return int(group_size)


def quantize_weight(weight: torch.Tensor, bits: int, group_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 packed weight, scale) of a float [out, in] weight.

    ``group_size`` 0 does it as THUDM's reference does: scale = row absmax / (2^(bits-1) - 1)
    in float32, values rounded (half to even) and clamped. Otherwise one float16 scale per
    ``group_size`` columns (see the module docstring), the values divided by the rounded scale."""
    check_bits(bits)
    if bits == 4 and weight.shape[-1] % 2:
        raise ValueError(f"4-bit packing needs an even input size, not {weight.shape[-1]}")
    limit = 2 ** (bits - 1) - 1
    if group_size:
        values, scale = _quantize_groups(weight, bits, group_size)
    else:
        scale = weight.abs().amax(dim=-1) / limit
        divisor = torch.where(scale == 0, torch.ones_like(scale), scale)  # an all-zero row stays zero
        values = torch.round(weight / divisor[:, None]).clamp_(-limit - 1, limit).to(torch.int8)
    return (pack_int4(values) if bits == 4 else values), scale


def _quantize_groups(weight: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows, columns = weight.shape
    groups = -(-columns // group_size)
    padded = F.pad(weight, (0, groups * group_size - columns)).view(rows, groups, group_size)
    if bits == 4:  # the largest magnitude, with its sign, becomes -8
        extreme = padded.gather(-1, padded.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)
        scale = (extreme / -8).to(GROUP_SCALE_DTYPE)
    else:
        scale = (padded.abs().amax(dim=-1) / 127).to(GROUP_SCALE_DTYPE)
    divisor = scale.float()
    divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    limit = 2 ** (bits - 1) - 1
    values = torch.round(padded / divisor[..., None]).clamp_(-limit - 1, limit).to(torch.int8)
    return values.view(rows, -1)[:, :columns].contiguous(), scale


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """Two signed 4-bit values a byte, the even column in the high nibble."""
    return (values[:, 0::2] << 4) | (values[:, 1::2] & 0x0F)


def unpack_int4(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(even columns, odd columns) as sign-extended int8; arithmetic shifts do the extension."""
    return packed >> 4, (packed << 4) >> 4


def unpacked_values(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The integer values, [out, in], as int8."""
    if check_bits(bits) == 8:
        return packed
    high, low = unpack_int4(packed)
    return torch.stack((high, low), dim=-1).reshape(packed.shape[0], -1)


def scaled(values: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    """float ``values`` [rows, columns] times their scales, in place: ``scale`` [rows] (per row)
    or [rows, groups] for groups of ``group`` columns, the last one possibly shorter."""
    if scale.dim() == 1:
        return values.mul_(scale[:, None])
    rows, columns = values.shape
    if columns % group == 0:
        values.view(rows, -1, group).mul_(scale[:, :, None])
        return values
    return values.mul_(scale.repeat_interleave(group, dim=1)[:, :columns])


def dequantize(
    packed: torch.Tensor,
    scale: torch.Tensor,
    bits: int,
    dtype: torch.dtype = torch.float32,
    group_size: int = 0,
) -> torch.Tensor:
    """The float [out, in] weight: each value times its row's (or group's) scale, in ``dtype``."""
    return scaled(unpacked_values(packed, bits).to(dtype), scale.to(dtype), group_size)


def model_bits(model: nn.Module) -> int:
    """The bits of a model's quantized layers, 0 when it has none (shown by /device)."""
    # The fewest: an int4 model's head is int8 (int8_head.py).
    return min((m.bits for m in model.modules() if isinstance(m, QuantizedLinear)), default=0)


class QuantizedLinear(nn.Module):
    """A bias-optional linear whose weight is stored quantized; see the module docstring.

    ``weight`` and ``weight_scale`` are frozen parameters so that loaders,
    accelerate's device maps and ``model.to(dtype)`` treat them like any other
    weight (``to`` leaves the int8 weight alone and converts the scale)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        bias: bool = False,
        device=None,
        dtype: torch.dtype | None = None,
        group_size: int = 0,
    ):
        super().__init__()
        self.bits, self.group_size = check_bits(bits), check_group_size(group_size)
        self.in_features, self.out_features = in_features, out_features
        stored = in_features * bits // 8
        self.weight = nn.Parameter(
            torch.empty(out_features, stored, dtype=torch.int8, device=device), requires_grad=False
        )
        scale_shape = (out_features, -(-in_features // group_size)) if group_size else (out_features,)
        scale_dtype = GROUP_SCALE_DTYPE if group_size else dtype
        self.weight_scale = nn.Parameter(
            torch.empty(scale_shape, dtype=scale_dtype, device=device), requires_grad=False
        )
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        )

    @classmethod
    def from_linear(cls, linear: nn.Module, bits: int, group_size: int = 0) -> QuantizedLinear:
        """Quantize a float linear, or a GPT-2 ``Conv1D`` (weight [in, out]), on its own device;
        a per-row scale keeps the weight's dtype, group scales are float16."""
        weight: torch.Tensor = getattr(linear, "weight").detach()  # noqa: B009  (nn.Module types it loosely)
        if not isinstance(linear, nn.Linear):  # Conv1D computes x @ weight: its weight is [in, out]
            weight = weight.t()
        out_features, in_features = weight.shape
        bias: torch.Tensor | None = getattr(linear, "bias", None)
        layer = cls(
            in_features, out_features, bits, bias is not None, weight.device, weight.dtype, group_size=group_size
        )
        packed, scale = quantize_weight(weight.float(), bits, group_size)
        layer.weight.data = packed
        layer.weight_scale.data = scale if group_size else scale.to(weight.dtype)
        if bias is not None:
            assert layer.bias is not None  # made with a bias because the linear has one
            layer.bias.data = bias.detach()
        return layer

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}{group}, "
            f"bias={self.bias is not None}"
        )

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        if dtype is None:  # the layer's float type: a per-row scale's, else the bias's
            scale_dtype = self.weight_scale.dtype if not self.group_size else torch.float32
            dtype = self.bias.dtype if self.bias is not None else scale_dtype
        return dequantize(self.weight, self.weight_scale, self.bits, dtype, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.is_cuda:
            weight = gpu_dequantize(self.weight, self.weight_scale, self.bits, x.dtype, self.group_size)
            output = F.linear(x, weight)
        else:
            output = cpu_linear(x, self.weight, self.weight_scale, self.bits, self.group_size)
        return output if self.bias is None else output + self.bias.to(output.dtype)


def cpu_linear(
    x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bits: int, group_size: int = 0
) -> torch.Tensor:
    """x @ dequantized.T: one token through the fused kernels when they are built, else (and
    for prompts, where a float matmul wins) dequantizing one block of rows at a time."""
    in_features = packed.shape[1] * 8 // bits
    if x.shape[-1] != in_features:
        raise RuntimeError(f"input has {x.shape[-1]} features, the layer takes {in_features}")
    if x.numel() == in_features and x.dtype in _KERNEL_TYPES and packed.is_contiguous():
        lib = cpu_kernels.library()
        if lib is not None:
            output = _fused_gemv(lib, x, packed, scale, bits, group_size or in_features)
            if output is not None:
                return output
    return blocked_linear(x, packed, scale, bits, group_size)


_KERNEL_TYPES = (torch.float32, torch.bfloat16, torch.float16)


def _fused_gemv(lib, x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bits: int, group: int):
    """One token through the fused kernel; None (and the kernels off) if it fails."""
    product = cpu_kernels.int8_gemv if bits == 8 else cpu_kernels.int4_gemv
    return _kernel_or_none("fused kernel", product, lib, packed, x, scale, group, torch.get_num_threads())


def _kernel_or_none(name: str, kernel, *args):
    """A kernel's result, or None with the kernels turned off when a library that loaded cannot
    run here: the reply goes on through torch."""
    try:
        return kernel(*args)
    except Exception as error:
        cpu_kernels.disable(f"{name} failed: {first_line(error)}")
        return None


def blocked_linear(
    x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bits: int, group_size: int = 0
) -> torch.Tensor:
    """x @ dequantized.T, dequantizing one block of rows at a time (see the module docstring)."""
    rows, in_features = packed.shape[0], packed.shape[1] * 8 // bits
    block = max(1, _CPU_BLOCK_VALUES // in_features)
    if x.device.type == "cpu" and x.dtype == torch.float32 and not x.requires_grad:
        lib = cpu_kernels.library()
        if lib is not None and packed.is_contiguous():
            scale = scale.contiguous()
            output = _integer_product(lib, x, packed, scale, bits, group_size)
            if output is None:
                output = _kernel_blocks(lib, x, packed, scale, bits, group_size or in_features, block)
            if output is not None:
                return output
    scale = scale.to(x.dtype)
    output = x.new_empty(*x.shape[:-1], rows)
    if bits == 4:
        even, odd = x[..., 0::2].contiguous(), x[..., 1::2].contiguous()
    for start in range(0, rows, block):
        part, part_scale, out = (
            packed[start : start + block],
            scale[start : start + block],
            output[..., start : start + block],
        )
        if bits == 8:
            out.copy_(F.linear(x, scaled(part.to(x.dtype), part_scale, group_size)))
            continue
        # The even and odd columns of a group are half of it: the group spans group_size / 2 of them.
        high, low = unpack_int4(part)
        out.copy_(F.linear(even, scaled(high.to(x.dtype), part_scale, group_size // 2)))
        out.add_(F.linear(odd, scaled(low.to(x.dtype), part_scale, group_size // 2)))
    return output


def _integer_product(lib, x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bits: int, group_size: int):
    """Many tokens through a per-row layer in integer products (prompt_kernels.cpp); None where
    that kernel cannot run (group-wise scales, no VNNI, odd widths): the caller dequantizes."""
    if group_size:
        return None
    return _kernel_or_none(
        "prompt kernel", cpu_kernels.prompt_gemm, lib, packed, scale, bits, x, torch.get_num_threads()
    )


def _kernel_blocks(lib, x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bits: int, group: int, block: int):
    """``blocked_linear`` with each block dequantized by the C++ kernel; None when it cannot read
    the scale's type."""
    rows, in_features = packed.shape[0], packed.shape[1] * 8 // bits
    buffer = torch.empty(min(block, rows), in_features)
    output = x.new_empty(*x.shape[:-1], rows)
    threads = torch.get_num_threads()
    for start in range(0, rows, block):
        part = buffer[: min(block, rows - start)]
        if not cpu_kernels.dequantize_rows(lib, packed, scale, bits, group, start, part, threads):
            return None
        output[..., start : start + len(part)] = F.linear(x, part)
    return output


# -- GPU -----------------------------------------------------------------------


def gpu_dequantize(
    packed: torch.Tensor, scale: torch.Tensor, bits: int, dtype: torch.dtype, group_size: int = 0
) -> torch.Tensor:
    """The whole float weight on the GPU (as the reference GPU path does): for per-row scales the
    cpm_kernels kernel for float16 when it works, torch otherwise; both compute value x scale in
    float and round once, so they agree bit for bit. Group-wise scales take the torch ops."""
    if group_size:
        return dequantize(packed, scale, bits, dtype, group_size)
    kernel = _kernels()
    if kernel is not None and dtype == torch.float16 and scale.dtype == torch.float16:
        try:
            return kernel.dequantize(packed, scale, bits)
        except Exception as error:  # the CUDA runtime/driver stack is the usual culprit
            _disable_kernels(error)
    return dequantize(packed, scale, bits, dtype)


_kernel_state: dict = {}


def _kernels():
    """The cpm_kernels dequantizer, built on first use; None when missing or disabled."""
    if "kernel" not in _kernel_state:
        try:
            _kernel_state["kernel"] = CpmDequantizer()
        except ImportError:
            _kernel_state["kernel"] = None  # not installed: the torch path is the plan, no warning
        except Exception as error:
            _kernel_state["kernel"] = None
            _warn(error)
    return _kernel_state["kernel"]


def _disable_kernels(error: BaseException) -> None:
    _kernel_state["kernel"] = None
    _warn(error)


def _warn(error: BaseException) -> None:
    warnings.warn(
        f"cpm_kernels failed ({first_line(error)}); quantized layers use torch on the GPU instead",
        RuntimeWarning,
        stacklevel=3,
    )


def reset_kernels() -> None:
    """Forget the kernel decision (tests; a fresh CUDA context)."""
    _kernel_state.clear()


# Compiled at run time by NVRTC (part of the CUDA toolkit cpm_kernels binds; no host
# compiler). Halves are handled as raw 16-bit values so that no CUDA header is needed.
_CUDA_SOURCE = r"""
static __device__ __forceinline__ unsigned short to_half(float v) {
    unsigned short h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v)); return h;
}
static __device__ __forceinline__ float from_half(unsigned short h) {
    float v; asm("cvt.f32.f16 %0, %1;" : "=f"(v) : "h"(h)); return v;
}
extern "C" __global__ void int8_dequantize_half(const signed char* w, const unsigned short* scale,
                                                unsigned short* out, int n, int m) {
    const float s = from_half(scale[blockIdx.x]);
    const long long row = (long long)blockIdx.x * m;
    for (int j = threadIdx.x; j < m; j += blockDim.x) out[row + j] = to_half((float)w[row + j] * s);
}
extern "C" __global__ void int4_dequantize_half(const signed char* w, const unsigned short* scale,
                                                unsigned short* out, int n, int m) {
    const float s = from_half(scale[blockIdx.x]);
    const long long row = (long long)blockIdx.x * m;
    for (int j = threadIdx.x; j < m; j += blockDim.x) {
        const signed char b = w[row + j];
        out[2 * (row + j)] = to_half((float)(b >> 4) * s);
        out[2 * (row + j) + 1] = to_half((float)((signed char)(b << 4) >> 4) * s);
    }
}
"""


class CpmDequantizer:
    """Dequantization to float16 with a kernel launched through cpm_kernels.

    Raises ImportError when cpm_kernels is not installed, anything else when
    it is but the CUDA stack under it does not work (both mean: use torch)."""

    def __init__(self):
        import cpm_kernels  # noqa: F401  (its import already probes the CUDA runtime)
        from cpm_kernels.kernels.base import KernelFunction, LazyKernelCModule

        capability = min(torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count()))
        module = LazyKernelCModule(_compile_ptx(f"compute_{capability[0]}{capability[1]}"))
        self._functions = {
            8: KernelFunction(module, "int8_dequantize_half"),
            4: KernelFunction(module, "int4_dequantize_half"),
        }

    def dequantize(self, packed: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
        import ctypes

        from cpm_kernels.library import cudart

        packed, scale = packed.contiguous(), scale.contiguous()
        rows, stored = packed.shape
        out = torch.empty(rows, stored * 8 // bits, dtype=torch.float16, device=packed.device)
        # cpm_kernels may bind its own copy of the CUDA runtime: select the device there too.
        cudart.cudaSetDevice(packed.device.index or 0)
        stream = torch.cuda.current_stream(packed.device).cuda_stream
        threads = min((stored + 31) // 32 * 32, 1024)
        self._functions[bits](
            (rows, 1, 1),
            (threads, 1, 1),
            0,
            stream,
            [
                ctypes.c_void_p(packed.data_ptr()),
                ctypes.c_void_p(scale.data_ptr()),
                ctypes.c_void_p(out.data_ptr()),
                ctypes.c_int32(rows),
                ctypes.c_int32(stored),
            ],
        )
        return out


def _compile_ptx(architecture: str) -> bytes:
    import ctypes

    from cpm_kernels.library import nvrtc

    program = nvrtc.nvrtcProgram()
    nvrtc.nvrtcCreateProgram(program, _CUDA_SOURCE, "glmrepl_quant.cu", 0, [], [])
    try:
        nvrtc.nvrtcCompileProgram(program, 1, [f"--gpu-architecture={architecture}"])
        buffer = ctypes.create_string_buffer(nvrtc.nvrtcGetPTXSize(program))
        nvrtc.nvrtcGetPTX(program, buffer)
    finally:
        nvrtc.nvrtcDestroyProgram(program)
    return buffer.raw


def decode_path(model) -> str:
    """How a model decodes, for /stats: 'eager', or its quantized or float layers' path, and
    whether its steps ran as whole fused layers (decode_step)."""
    layer = next((m for m in model.modules() if isinstance(m, QuantizedLinear)), None)
    if layer is None:
        path = float_decode_path(model)
    elif layer.weight.device.type != "cpu":
        return f"int{layer.bits} eager (dequantized on the {layer.weight.device.type})"
    else:
        path = f"int{layer.bits} {cpu_kernels.status()}"
    state = getattr(model, "__dict__", {})
    fused = state.get("_glmrepl_decode_plan") and "forward" in state  # planned, and not turned off
    return f"{path}, fused layers" if fused else path


def fallback_note(model) -> str | None:
    """One line for the load report when the CPU layers cannot use the kernels."""
    path = decode_path(model)
    if "torch ops (" not in path or "being compiled" in path or "not built" in path:
        return None
    return f"{path.split(' ', 1)[0]} layers decode with torch ops, slower: {cpu_kernels.failure_reason()}"
