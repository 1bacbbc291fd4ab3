"""Device modes: where a model's weights live and in which precision.

``cpu`` keeps float32 (or bfloat16 when asked): half precision matmuls are not
implemented for CPU tensors. ``gpu`` is float16 on one CUDA device (bfloat16
when the checkpoint is stored so and the GPU supports it). ``sharded`` splits
layers across GPUs with accelerate. ``auto`` picks for the machine, and says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..units import human_bytes
from .errors import DeviceError

MODES = ("cpu", "gpu", "sharded", "auto")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Placement:
    mode: str  # "cpu", "gpu" or "sharded" (never "auto": it is resolved)
    dtype: str  # "float32", "bfloat16" or "float16"
    device_map: Any  # what from_pretrained takes: "cpu", "cuda:0", "auto" or a dict
    reason: str = ""  # why auto chose this mode, for the user

    def describe(self) -> str:
        return f"{self.mode} {self.dtype}"


def cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def plan_placement(mode: str, dtype: str = "auto", stored_dtype: str | None = None, gpu: int = 0) -> Placement:
    """Resolve a requested mode and dtype into a placement, or raise DeviceError."""
    if mode not in MODES:
        raise DeviceError(f"unknown device mode {mode!r}: choose one of {', '.join(MODES)}")
    if dtype not in DTYPES:
        raise DeviceError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    gpus = cuda_device_count()
    reason = ""
    if mode == "auto":
        mode, reason = ("gpu", f"{gpus} CUDA device(s) found") if gpus else ("cpu", "no CUDA device found")
    if mode == "cpu":
        return Placement("cpu", _cpu_dtype(dtype), "cpu", reason)
    if gpus == 0:
        raise DeviceError(f"/device {mode} needs a CUDA GPU and torch sees none on this machine; use cpu")
    if mode == "gpu":
        if gpu >= gpus:
            raise DeviceError(f"GPU {gpu} does not exist: this machine has {gpus} (0-{gpus - 1})")
        return Placement("gpu", _gpu_dtype(dtype, stored_dtype), f"cuda:{gpu}", reason)
    return Placement("sharded", _gpu_dtype(dtype, stored_dtype), "auto", reason)


def _cpu_dtype(dtype: str) -> str:
    if dtype == "float16":
        raise DeviceError("float16 is not supported on CPU (half-precision matmuls are GPU-only): use float32 or bfloat16")
    return "float32" if dtype == "auto" else dtype


def _gpu_dtype(dtype: str, stored_dtype: str | None) -> str:
    if dtype != "auto":
        return dtype
    import torch

    if stored_dtype == "bfloat16" and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float16"


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def resident_memory_bytes() -> int | None:
    """This process's resident set size now (not the peak), where the OS tells it."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            pages = int(statm.read().split()[1])
        import os

        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def memory_report() -> list[tuple[str, str]]:
    """(device, figures) lines for /device: process RSS and each GPU's allocated/free memory."""
    lines = []
    rss = resident_memory_bytes()
    if rss is not None:
        lines.append(("cpu", f"{human_bytes(rss)} resident"))
    import sys

    torch = sys.modules.get("torch")  # only report GPUs once torch is in use anyway
    if torch is not None and torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(index)
            used = torch.cuda.memory_allocated(index)
            lines.append((f"cuda:{index}", f"{human_bytes(used)} allocated, {human_bytes(free)} free of {human_bytes(total)}"))
    return lines
