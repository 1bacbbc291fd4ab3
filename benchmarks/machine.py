"""What the figures were measured on, and how fast its memory can be read."""

from __future__ import annotations

import datetime
import os
import platform
import time

BANDWIDTH_BYTES = 1 << 30  # far larger than any cache, so the sum streams from memory
BANDWIDTH_REPEATS = 5


def describe_machine() -> dict:
    import torch
    import transformers

    import glmrepl

    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_bytes": _ram_bytes(),
        "gpu": _gpu_name(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "glmrepl": glmrepl.__version__,
    }


def read_bandwidth(device: str = "cpu") -> float:
    """Bytes per second of a large tensor sum: the best of a few, as a roof is a maximum."""
    import torch

    data = torch.ones(BANDWIDTH_BYTES // 4, dtype=torch.float32, device=device)
    best = 0.0
    for _ in range(BANDWIDTH_REPEATS):
        _synchronize(device)
        started = time.perf_counter()
        data.sum().item()  # .item() waits for the result on a GPU too
        best = max(best, BANDWIDTH_BYTES / (time.perf_counter() - started))
    del data
    return best


def weight_bytes_per_token(model) -> int:
    """Every weight is read once per decoded token; parameters() lists tied ones once.

    The tied embedding counts once: the lookup reads one row, the output
    projection the whole matrix. The KV cache (a few MB here) is left out.
    """
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError):
        return None


def _gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
