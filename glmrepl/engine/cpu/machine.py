"""What the processor offers: a working C++ compiler, its physical cores, native bfloat16.

Each answer is found once per process and kept: the compiler probe runs a
program, the others read /proc/cpuinfo.
"""

from __future__ import annotations

import functools
import os
import subprocess

from ..errors import first_line

# x86 flags of instructions that compute in bfloat16 (as /proc/cpuinfo spells them).
_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def compiler_command() -> str:
    """The C++ compiler torch.compile would call: CXX, else inductor's setting when it is
    already imported (importing it only to ask takes seconds), else g++."""
    import sys

    if os.environ.get("CXX"):
        return os.environ["CXX"]
    config = sys.modules.get("torch._inductor.config")
    setting = getattr(getattr(config, "cpp", None), "cxx", None) if config else None
    named = [c for c in (setting if isinstance(setting, (list, tuple)) else (setting,)) if c]
    return named[-1] if named else "g++"


@functools.cache
def compiler_problem() -> str | None:
    """None when a C++ compiler answers; else why not, in a few words (cached)."""
    command = compiler_command()
    try:
        subprocess.run([command, "--version"], check=True, capture_output=True, timeout=20)
    except FileNotFoundError:
        return f"no C++ compiler: {command} not found"
    except subprocess.TimeoutExpired:
        return f"the C++ compiler {command} did not answer"
    except (subprocess.CalledProcessError, OSError) as error:
        return f"the C++ compiler {command} does not work ({first_line(error)})"
    return None


def _cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            return info.read()
    except OSError:
        return ""


@functools.cache
def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads counted once)."""
    try:
        allowed = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        allowed = set(range(os.cpu_count() or 1))
    cores, processor, physical = set(), None, "0"
    for line in _cpuinfo().splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "processor":
            processor = int(value) if value.isdigit() else None
        elif key == "physical id":
            physical = value
        elif key == "core id" and processor in allowed:
            cores.add((physical, value))
    return max(1, len(cores) or len(allowed))


def cpu_flags() -> str:
    """The processor's feature flags as /proc/cpuinfo lists them ('' where it does not)."""
    return next(
        (line.split(":", 1)[1].strip() for line in _cpuinfo().splitlines() if line.startswith(("flags", "Features"))),
        "",
    )


@functools.cache
def native_bf16() -> str | None:
    """Which instructions compute bfloat16 natively here (e.g. 'AMX'), or None."""
    try:
        import torch

        if torch.cpu._is_amx_tile_supported():
            return "AMX"
        if torch.cpu._is_avx512_bf16_supported():
            return "AVX512-BF16"
    except (AttributeError, RuntimeError):
        pass
    flags = cpu_flags().split()
    found = [flag for flag in _BF16_FLAGS if flag in flags]
    return {"amx_bf16": "AMX", "avx512_bf16": "AVX512-BF16"}[found[-1]] if found else None


def auto_dtype(stored_dtype: str | None) -> tuple[str, str]:
    """(dtype, why) for --dtype auto on the CPU."""
    native = native_bf16()
    if stored_dtype not in ("bfloat16", "float16"):
        return "float32", f"the checkpoint is stored in {stored_dtype or 'float32'}"
    if native:
        return "bfloat16", f"the CPU computes bfloat16 natively ({native}) and the checkpoint is {stored_dtype}"
    return "float32", "the CPU has no native bfloat16 (AVX512-BF16 or AMX)"


_requested_threads: list[int] = []  # --threads, once given


def request_threads(count: int | None) -> str | None:
    """Remember --threads (applied when generation starts: torch is not imported here); returns a
    warning when there are more threads than cores."""
    if count is not None and count < 1:
        raise ValueError(f"--threads must be 1 or more, not {count}")
    _requested_threads[:] = [count] if count else []
    cores = physical_cores()
    if count and count > cores:
        return f"--threads {count} is more than the {cores} cores this process may run on: threads beyond the cores wait on each other"
    return None


def apply_threads() -> int:
    """Use the requested compute threads, else the physical cores; returns the number in use."""
    import torch

    threads = _requested_threads[0] if _requested_threads else physical_cores()
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return threads


def threads_line() -> str:
    """For /device: the compute threads and where the number comes from."""
    threads = apply_threads()
    origin = "--threads" if _requested_threads else "the physical cores available"
    return f"{threads} compute thread{'s' if threads != 1 else ''} ({origin})"


def release_thread_pool() -> None:
    """Let the calling thread's OpenMP helper threads go (a no-op where it has none).

    libgomp keeps a pool of helper threads per thread that ran a parallel region, and once
    the pools together hold more threads than there are cores, every pool stops spin-waiting
    between regions and sleeps instead: a decode step runs hundreds of short regions (each
    layer, each kernel), and waking from sleep for each made int4 decoding a third slower on
    two cores. A thread that is done with its compute (a reply, a plan) lets its pool go, so
    the thread that decodes next is the only one with a pool."""
    import sys

    pause = _openmp_pause() if "torch" in sys.modules else None  # no torch, no pool
    if pause is not None:
        pause(1)  # omp_pause_soft: threads end, the next parallel region starts new ones


@functools.cache
def _openmp_pause():
    """libgomp's omp_pause_resource_all when torch runs on it (already loaded), else None."""
    import ctypes

    try:
        runtime = ctypes.CDLL("libgomp.so.1", mode=os.RTLD_NOLOAD)
        pause = runtime.omp_pause_resource_all
    except (OSError, AttributeError):  # another OpenMP runtime, or none loaded
        return None
    pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
    return pause


_M_ARENA_MAX = -8  # glibc's mallopt parameter


def use_one_heap() -> None:
    """Make every thread allocate from glibc's one main heap (no per-thread arenas).

    A compute helper thread that allocates gets a heap of its own, whose freed memory
    malloc_trim does not hand back: after a quantized prompt, the second of two threads
    kept about 30 MB resident, 12% of an int4 model's weights. Called by the entry points
    before any thread starts; decoding speed is the same either way. Elsewhere than glibc
    there is nothing to do.
    """
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt(_M_ARENA_MAX, 1)
    except (OSError, AttributeError):
        pass


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's malloc_trim).

    glibc keeps large freed chunks in its heap: without this, resident memory
    grows by about one model's size per /model swap and stays near the float
    size after quantizing. Elsewhere than glibc there is nothing to do.
    """
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
