"""Fused matrix-vector kernels for decoding one token on the CPU (the .cpp files beside this one).

Decoding one token multiplies every weight by one activation vector, so its
speed is set by how many bytes are read and how much work is done per byte.
These kernels read each weight once, convert it to float in registers and
accumulate in float32 (four accumulators, so the additions do not wait on each
other); nothing the size of a float weight is ever written.
- int8 / int4 in glmrepl.engine.quant.layers's layout, with one scale per row or per
  group of input columns (int_kernels.cpp): the activations rounded to 16 bits in blocks
  of 32 to 128 values, each block's products summed in integers and scaled once; for
  int4 the high nibbles meet the even inputs and the low nibbles the odd ones, so only
  the activation vector is split (in C++), never the weight;
- many tokens (a prompt) through an int8 / int4 weight with one scale a row
  (prompt_kernels.cpp): the activations rounded to 16 bits in blocks of up to 1024
  values and multiplied as two bytes by VNNI's 8-bit products, where the CPU has them;
- float32 / bfloat16 / float16 weights (glmrepl.engine.cpu.float_linear), where
  torch's one-row matmul reads float32 weights at about half the bandwidth;
  and the same for a few tokens at once (a step of batched decoding, one token
  per request), each weight row read once for all of them: torch's matmul took
  2 to 3 times as long for a 0.5B model's linears at 2 to 16 rows as at one,
  the kernel 1.1 times at 2 rows and 3 times at 16, where the multiply-adds
  rather than the reading set the pace (benchmarks/kernel_speed.py).

Why C++ and not a ``torch.compile``d expression: on AVX2 processors
inductor loads 8 int8 lanes at a time through a bounce buffer, and the
compiled ``(w.float() * x).sum(-1)`` measured slower than a float32 matmul
(benchmarks/quant.py prints both); importing inductor alone also takes seconds
of the first reply's CPU time. The source is built by the C++ compiler
torch.compile would use (CXX, else g++), in the background, once per
machine: the library is cached under ~/.cache/glmrepl/kernels. Until it is
ready, or when there is no working compiler, the layers use the plain torch
path and say why (``status()``).
"""

from __future__ import annotations

import atexit
import contextvars
import ctypes
import functools
import hashlib
import os
import subprocess
import tempfile
import threading
from pathlib import Path

from ..errors import first_line

# The C++ sources ship beside this module; their text is part of the cache key. The fused
# decoder layer (decode_layer.cpp, for decode_step.py) calls the kernels, so it follows them.
_SOURCE = "\n".join(
    (Path(__file__).parent / name).read_text(encoding="utf-8")
    for name in ("cpu_kernels.cpp", "int_kernels.cpp", "float_kernels.cpp", "prompt_kernels.cpp", "decode_layer.cpp")
)

_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
_BUILD_WAIT_AT_EXIT_S = 60.0
_lock = threading.Lock()
_state: dict = {}  # "library" (ctypes.CDLL), "reason" (why not), "building" (a Thread)


def library():
    """The built kernels, or None while they build, or when they cannot (see ``status``).

    The first call starts the build in a background thread, so no reply waits on the compiler."""
    lib = _state.get("library")
    if lib is not None or "reason" in _state:
        return lib
    with _lock:
        if "building" not in _state and "reason" not in _state:
            from .machine import compiler_problem

            problem = compiler_problem()  # a few milliseconds: the load can say it at once
            if problem:
                _state["reason"] = problem
                return None
            # torch's compiler settings are per context: the build sees the caller's.
            context = contextvars.copy_context()
            thread = threading.Thread(target=context.run, args=(_build,), name="glmrepl-kernels", daemon=True)
            _state["building"] = thread
            thread.start()
            # A short run (one -p reply) would otherwise exit mid-build, every time, and never
            # cache the library; the build takes a few seconds once per machine.
            atexit.register(_finish_build, thread)
    return None


def _finish_build(thread: threading.Thread) -> None:
    try:
        thread.join(_BUILD_WAIT_AT_EXIT_S)
    except KeyboardInterrupt:  # Ctrl-C while exiting: leave the build, say nothing
        pass


def wait_until_built(timeout: float | None = None):
    """Start the build if needed and wait for it (benchmarks, tests); the library or None."""
    library()
    thread = _state.get("building")
    if thread is not None:
        thread.join(timeout)
    return _state.get("library")


def status() -> str:
    """Which path int8/int4 layers take on the CPU, and why: for /stats and /device."""
    if _state.get("library") is not None:
        return "fused kernels (compiled)"
    if "reason" in _state:
        return f"torch ops ({_state['reason']})"
    if "building" in _state:
        return "torch ops (fused kernels are being compiled)"
    return "torch ops (fused kernels not built yet)"


def failure_reason() -> str | None:
    """Why the kernels are not in use, once a build or a call failed."""
    return _state.get("reason")


def disable(reason: str) -> None:
    """Stop using the kernels (a call failed); the torch path carries on."""
    _state.pop("library", None)
    _state["reason"] = reason


def reset() -> None:
    """Forget the build (tests): the next ``library()`` builds again."""
    thread = _state.get("building")
    if thread is not None:
        thread.join()
    _state.clear()


def _build() -> None:
    try:
        lib = ctypes.CDLL(str(_built_library()))
        declare(lib)
        _state["library"] = lib
    except Exception as error:  # a broken compiler, OpenMP missing, an unwritable cache...
        _state["reason"] = f"kernel build failed: {first_line(error)}"


def declare(lib) -> None:
    """The C functions' argument types, so that a call passes plain ints without building
    ctypes objects (they run per layer)."""
    for name in ("int8_gemv", "int4_gemv"):
        getattr(lib, name).restype = ctypes.c_int
        getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
        getattr(lib, name).argtypes += [ctypes.c_int, ctypes.c_void_p] + [ctypes.c_int64] * 4
    lib.float_gemv.restype = ctypes.c_int
    lib.float_gemv.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    lib.float_gemv.argtypes += [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]
    lib.glm_decode_layer.restype = ctypes.c_int
    lib.glm_decode_layer.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 3
    lib.glm_decode_rows.restype = ctypes.c_int
    lib.glm_decode_rows.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] + [ctypes.c_void_p] * 8
    lib.glm_decode_rows.argtypes += [ctypes.c_int64]
    lib.dequantize_rows.restype = ctypes.c_int
    lib.dequantize_rows.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    lib.dequantize_rows.argtypes += [ctypes.c_int64] * 5
    lib.prompt_gemm.restype = ctypes.c_int
    lib.prompt_gemm.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    lib.prompt_gemm.argtypes += [ctypes.c_void_p] + [ctypes.c_int64] * 4
    lib.float_gemm.restype = ctypes.c_int
    lib.float_gemm.argtypes = lib.float_gemv.argtypes[:6] + [ctypes.c_int64] + lib.float_gemv.argtypes[6:]


def cache_folder() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "glmrepl" / "kernels"


def _built_library() -> Path:
    """The shared library for this source, compiler and processor: from the cache, else built.

    Built for this processor (-march=native), so the key holds the CPU's flags: a
    cache shared between machines never hands one the other's instructions."""
    from .machine import compiler_command, cpu_flags

    compiler = compiler_command()
    version = subprocess.run([compiler, "--version"], check=True, capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256("\0".join((_SOURCE, " ".join(_FLAGS), version, cpu_flags())).encode()).hexdigest()[:24]
    target = cache_folder() / f"quant-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as scratch:
        source, built = Path(scratch) / "quant.cpp", Path(scratch) / "quant.so"
        source.write_text(_SOURCE, encoding="utf-8")
        result = subprocess.run(
            [compiler, *_FLAGS, str(source), "-o", str(built)], capture_output=True, text=True, timeout=300
        )
        if result.returncode != 0:
            raise RuntimeError((result.stderr or result.stdout or f"{compiler} failed").strip().splitlines()[0])
        os.replace(built, target)  # atomic: another process sees the whole library or none
    return target


def int8_gemv(lib, packed, x, scale, group: int, threads: int):
    """``x @ dequantized.T`` for one token: packed int8 [rows, cols], scale [rows] (one group as
    wide as the row) or [rows, groups] of ``group`` columns each, any float type; x holds cols
    values of float32/bfloat16/float16. The result has x's type, the last dimension rows; None
    when this build cannot read a type."""
    return _int_product(lib.int8_gemv, packed, x, scale, group, threads)


def int4_gemv(lib, packed, x, scale, group: int, threads: int):
    """``int8_gemv`` for the int4 layout: packed [rows, cols / 2], ``group`` counted in values."""
    return _int_product(lib.int4_gemv, packed, x, scale, group, threads)


def _int_product(kernel, packed, x, scale, group: int, threads: int):
    import torch

    codes = _type_codes()
    rows, stored = packed.shape
    out = torch.empty(*x.shape[:-1], rows, dtype=x.dtype)
    x, scale = x.contiguous(), scale.contiguous()
    failed = kernel(
        packed.data_ptr(),
        x.data_ptr(),
        codes[x.dtype],
        scale.data_ptr(),
        codes[scale.dtype],
        out.data_ptr(),
        rows,
        stored,
        group,
        threads,
    )
    return None if failed else out


def dequantize_rows(lib, packed, scale, bits: int, group: int, first: int, out, threads: int) -> bool:
    """Rows [first, first + len(out)) of an int8/int4 weight as float32 into ``out`` [rows, values]
    (contiguous); False when this build cannot read the scale's type."""
    codes = _type_codes()
    count, values = out.shape
    failed = lib.dequantize_rows(
        packed.data_ptr(),
        bits,
        scale.data_ptr(),
        codes[scale.dtype],
        out.data_ptr(),
        first,
        count,
        values,
        group,
        threads,
    )
    return not failed


def prompt_gemm(lib, packed, scale, bits: int, x, threads: int):
    """``x @ dequantized.T`` for many tokens (a prompt) through an int8/int4 weight with one scale a
    row, x rounded to 16 bits a block and multiplied in integers (prompt_kernels.cpp): x float32
    [..., values], the result float32 [..., rows]; None when this build or shape cannot (the
    caller dequantizes instead)."""
    import torch

    rows, stored = packed.shape
    values = stored * 8 // bits
    x = x.contiguous()
    out = torch.empty(*x.shape[:-1], rows, dtype=torch.float32)
    failed = lib.prompt_gemm(
        packed.data_ptr(),
        bits,
        scale.data_ptr(),
        _type_codes()[scale.dtype],
        x.data_ptr(),
        out.data_ptr(),
        x.numel() // values,
        rows,
        values,
        threads,
    )
    return None if failed else out


# The codes the C++ side reads the float types by (cpu_kernels.cpp's ``Type``), by torch dtype name.
_FLOAT_TYPE_CODES = {"float32": 0, "bfloat16": 1, "float16": 2}


def float_gemv(lib, weight, x, bias, threads: int):
    """``F.linear`` for one token: weight [rows, cols] float32/bfloat16/float16 and contiguous,
    x holding cols values (any float type), bias None or of the weight's type. The result
    has x's type and shape, the last dimension rows; None when this build cannot read a type."""
    return _float_product(lib.float_gemv, weight, x, bias, threads, batched=False)


def float_gemm(lib, weight, x, bias, threads: int):
    """``F.linear`` for a few tokens at once (a step of batched decoding): ``float_gemv``'s
    arguments, x holding any number of vectors of cols values (its last dimension). Each
    weight row is read once for all of them; a large x is a prompt, for torch's matmul."""
    return _float_product(lib.float_gemm, weight, x, bias, threads, batched=True)


def _float_product(kernel, weight, x, bias, threads: int, batched: bool):
    """Call a float kernel; the batched one also takes how many vectors x holds."""
    import torch

    codes = _type_codes()
    rows, cols = weight.shape
    out = torch.empty(*x.shape[:-1], rows, dtype=x.dtype)
    x = x.contiguous()
    vectors = (x.numel() // cols,) if batched else ()
    failed = kernel(
        weight.data_ptr(),
        codes[weight.dtype],
        x.data_ptr(),
        codes[x.dtype],
        None if bias is None else bias.data_ptr(),
        out.data_ptr(),
        *vectors,
        rows,
        cols,
        threads,
    )
    return None if failed else out


@functools.cache
def _type_codes() -> dict:
    """The codes by torch dtype (found once: this runs for every layer of every token)."""
    import torch

    return {getattr(torch, name): code for name, code in _FLOAT_TYPE_CODES.items()}
