"""What the processor offers: a working C++ compiler, its physical cores, native bfloat16.

Each answer is found once per process and kept: the compiler probe runs a
program, the others read /proc/cpuinfo.
"""

from __future__ import annotations

import functools
import os
import subprocess

from .errors import first_line

# x86 flags of instructions that compute in bfloat16 (as /proc/cpuinfo spells them).
_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def compiler_command() -> str:
    """The C++ compiler torch's code cache will call (CXX, else g++), as torch.compile finds it."""
    from torch._inductor import config

    setting = config.cpp.cxx
    named = [c for c in (setting if isinstance(setting, (list, tuple)) else (setting,)) if c]
    return named[-1] if named else os.environ.get("CXX") or "g++"


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
    flags = next((line.split(":", 1)[1].split() for line in _cpuinfo().splitlines()
                  if line.startswith("flags")), [])
    found = [flag for flag in _BF16_FLAGS if flag in flags]
    return {"amx_bf16": "AMX", "avx512_bf16": "AVX512-BF16"}[found[-1]] if found else None


def auto_dtype(stored_dtype: str | None) -> tuple[str, str]:
    """(dtype, why) for --dtype auto on the CPU."""
    native = native_bf16()
    if stored_dtype not in ("bfloat16", "float16"):
        return "float32", f"the checkpoint is stored in {stored_dtype or 'float32'}"
    if native:
        return "bfloat16", f"the CPU computes bfloat16 natively ({native}) and the checkpoint is {stored_dtype}"
    return "float32", "the CPU has no native bfloat16 (no AVX512-BF16/AMX): float32 is faster"


def set_threads(count: int | None) -> int:
    """Use ``count`` compute threads (default: the physical cores); returns the number used."""
    import torch

    threads = count or physical_cores()
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return threads
