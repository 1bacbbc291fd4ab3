"""Weight-only int4 / int8 linears in the layout of THUDM's quantized ChatGLM releases.

Layout: ``weight`` is int8 [out, in] (8 bits) or [out, in / 2] (4 bits: two
signed values a byte, the even input index in the high nibble), and
``weight_scale`` holds one scale per output row, ``row absmax / (2^(bits-1) - 1)``.
The dequantized weight is ``value * weight_scale[row]``.

CPU, one token (decoding): fused int8 / int4 matrix-vector kernels
(glmrepl.engine.cpu_kernels) that read only the packed bytes, once they are
built in the background; until then, with no C++ compiler, and for prompts
(many tokens, where a float matmul is faster), plain torch ops: the weight
stays packed in memory and is dequantized a block of rows at a time inside
``forward``; for 4 bits the high
and low nibbles are multiplied with the even and odd inputs separately, which
skips re-interleaving them (the costliest step). Measured on a 4096x4096 layer
for one token: about 1.25x the time of a float32 matmul, where dequantizing the
whole matrix per call took about 20x (benchmarks/quant.py). A cached float copy
would be faster but costs the float32 memory that int4 is chosen to avoid.

GPU: a dequantization kernel compiled through cpm_kernels (the ``quant``
extra) when it is installed and works, else the same torch ops; the kernel
failing once disables it with one warning.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn import functional as F

from . import cpu_kernels
from .errors import GlmreplError, first_line
from .float_linear import float_decode_path

SUPPORTED_BITS = (4, 8)
# Rows dequantized at once on CPU: a block of about this many float32 values
# stays in the cache between dequantizing it and multiplying with it.
_CPU_BLOCK_VALUES = 1 << 20


class QuantizeError(GlmreplError):
    """The model cannot be quantized as asked."""


def unsupported_architecture(architecture: str) -> QuantizeError:
    return QuantizeError(
        f"glmrepl cannot quantize {architecture}: int4/int8 is supported for "
        "ChatGLM-6B, ChatGLM2/3 and GLM-4 checkpoints"
    )


def check_bits(bits) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"quantization to {bits!r} bits is not supported: choose 4 or 8")
    return int(bits)


def quantize_weight(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 packed weight, per-row scale) of a float [out, in] weight, as the reference does it:
    scale = row absmax / (2^(bits-1) - 1), values rounded (half to even) and clamped."""
    check_bits(bits)
    limit = 2 ** (bits - 1) - 1
    scale = weight.abs().amax(dim=-1) / limit
    divisor = torch.where(scale == 0, torch.ones_like(scale), scale)  # an all-zero row stays zero
    values = torch.round(weight / divisor[:, None]).clamp_(-limit - 1, limit).to(torch.int8)
    if bits == 4:
        if weight.shape[-1] % 2:
            raise ValueError(f"4-bit packing needs an even input size, not {weight.shape[-1]}")
        values = pack_int4(values)
    return values, scale


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


def dequantize(
    packed: torch.Tensor, scale: torch.Tensor, bits: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The float [out, in] weight: each value times its row's scale, computed in ``dtype``."""
    return unpacked_values(packed, bits).to(dtype) * scale.to(dtype)[:, None]


def model_bits(model: nn.Module) -> int:
    """The bits of a model's quantized layers, 0 when it has none (shown by /device)."""
    return next((m.bits for m in model.modules() if isinstance(m, QuantizedLinear)), 0)


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
    ):
        super().__init__()
        self.bits = check_bits(bits)
        self.in_features, self.out_features = in_features, out_features
        stored = in_features * bits // 8
        self.weight = nn.Parameter(
            torch.empty(out_features, stored, dtype=torch.int8, device=device), requires_grad=False
        )
        self.weight_scale = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int) -> QuantizedLinear:
        """Quantize a float linear (on its own device; the scale keeps its dtype)."""
        weight = linear.weight.detach()
        layer = cls(
            linear.in_features,
            linear.out_features,
            bits,
            linear.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        packed, scale = quantize_weight(weight.float(), bits)
        layer.weight.data = packed
        layer.weight_scale.data = scale.to(weight.dtype)
        if linear.bias is not None:
            assert layer.bias is not None  # made with a bias because the linear has one
            layer.bias.data = linear.bias.detach()
        return layer

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"bias={self.bias is not None}"
        )

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self.weight, self.weight_scale, self.bits, dtype or self.weight_scale.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.is_cuda:
            output = F.linear(x, gpu_dequantize(self.weight, self.weight_scale, self.bits, x.dtype))
        else:
            output = cpu_linear(x, self.weight, self.weight_scale, self.bits)
        return output if self.bias is None else output + self.bias.to(output.dtype)


def cpu_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """x @ dequantized.T: one token through the fused kernels when they are built, else (and
    for prompts, where a float matmul wins) dequantizing one block of rows at a time."""
    if x.numel() == x.shape[-1] and x.dtype in (torch.float32, torch.bfloat16) and packed.is_contiguous():
        lib = cpu_kernels.library()
        if lib is not None:
            output = _fused_gemv(lib, x, packed, scale, bits)
            if output is not None:
                return output
    return blocked_linear(x, packed, scale, bits)


def _fused_gemv(lib, x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor | None:
    """One token through the fused kernel; None (and the kernels off) if it fails."""
    rows, in_features = packed.shape[0], packed.shape[1] * 8 // bits
    if x.shape[-1] != in_features:
        raise RuntimeError(f"input has {x.shape[-1]} features, the layer takes {in_features}")
    vector = x.reshape(-1).to(torch.float32).contiguous()
    scale = scale.to(torch.float32).contiguous()
    threads = torch.get_num_threads()
    try:
        if bits == 8:
            output = cpu_kernels.int8_gemv(lib, packed, vector, scale, threads)
        else:
            output = cpu_kernels.int4_gemv(
                lib, packed, vector[0::2].contiguous(), vector[1::2].contiguous(), scale, threads
            )
    except Exception as error:  # a library that loaded but cannot run here: keep the reply going
        cpu_kernels.disable(f"fused kernel failed: {first_line(error)}")
        return None
    return output.to(x.dtype).reshape(*x.shape[:-1], rows)


def blocked_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """x @ dequantized.T, dequantizing one block of rows at a time (see the module docstring)."""
    rows, in_features = packed.shape[0], packed.shape[1] * 8 // bits
    block = max(1, _CPU_BLOCK_VALUES // in_features)
    scale = scale.to(x.dtype)[:, None]
    output = x.new_empty(*x.shape[:-1], rows)
    if bits == 4:
        even, odd = x[..., 0::2].contiguous(), x[..., 1::2].contiguous()
    for start in range(0, rows, block):
        part, row_scale, out = (
            packed[start : start + block],
            scale[start : start + block],
            output[..., start : start + block],
        )
        if bits == 8:
            out.copy_(F.linear(x, part.to(x.dtype).mul_(row_scale)))
            continue
        high, low = unpack_int4(part)
        out.copy_(F.linear(even, high.to(x.dtype).mul_(row_scale)))
        out.add_(F.linear(odd, low.to(x.dtype).mul_(row_scale)))
    return output


# -- GPU -----------------------------------------------------------------------


def gpu_dequantize(packed: torch.Tensor, scale: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """The whole float weight on the GPU (as the reference GPU path does): the cpm_kernels
    kernel for float16 when it works, torch otherwise; both compute value x scale in float
    and round once, so they agree bit for bit."""
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
    """How a model decodes, for /stats: 'eager', or its quantized or float layers' path."""
    layer = next((m for m in model.modules() if isinstance(m, QuantizedLinear)), None)
    if layer is None:
        return float_decode_path(model)
    if layer.weight.device.type != "cpu":
        return f"int{layer.bits} eager (dequantized on the {layer.weight.device.type})"
    return f"int{layer.bits} {cpu_kernels.status()}"


def fallback_note(model) -> str | None:
    """One line for the load report when the CPU layers cannot use the kernels."""
    path = decode_path(model)
    if "torch ops (" not in path or "being compiled" in path or "not built" in path:
        return None
    return f"{path.split(' ', 1)[0]} layers decode with torch ops, slower: {cpu_kernels.failure_reason()}"
