"""Planning where each part of a model goes: device maps for the sharded mode.

Rule (as ChatGLM's own multi-GPU loader does it): everything outside the
repeated transformer blocks — embeddings, final norm, output head, rotary
tables — sits on the first GPU, because inputs enter the model there and a
tied head must share its device with the embeddings. The blocks follow in
order, filling each GPU's budget before the next; a block is never split
(the model's ``_no_split_modules``). Blocks that fit nowhere go to the CPU
only when the user allowed offload; otherwise the plan fails with the figures.

The planner works on a model on the meta device and on budgets given in
bytes, so it is tested with fake GPUs on a machine without any.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ...common.units import human_bytes
from ..errors import DeviceError, ModelLoadError

_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_memory(text: str) -> int:
    """'20GiB', '20GB', '512MiB' or a byte count -> bytes."""
    match = _MEMORY.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a memory size: write it like 20GiB, 500MiB or 16GB")
    number, unit = match.groups()
    return int(float(number) * _UNITS[(unit or "B").lower()])


def parse_gpu_memory(text: str | None, gpus: list[int]) -> dict[int, int] | None:
    """'--max-gpu-memory 20GiB' (each GPU) or '0:20GiB,1:10GiB' (per GPU) -> {gpu: bytes}."""
    if not text:
        return None
    if ":" not in text:
        return {gpu: parse_memory(text) for gpu in gpus}
    budgets = {}
    for part in text.split(","):
        gpu, _, size = part.partition(":")
        if not gpu.strip().isdigit():
            raise ValueError(f"{part!r}: per-GPU memory is written GPU:SIZE, e.g. 0:20GiB,1:10GiB")
        budgets[int(gpu)] = parse_memory(size)
    return budgets


@dataclass
class ShardPlan:
    device_map: dict[str, Any]  # module name -> GPU index or "cpu"
    offloaded_blocks: int


def block_names(model: Any) -> list[str]:
    """The repeated blocks (the model's no-split classes), outermost instances, in order."""
    classes = set(getattr(model, "_no_split_modules", None) or [])
    names: list[str] = []
    for name, module in model.named_modules():
        if type(module).__name__ in classes and not any(name.startswith(b + ".") for b in names):
            names.append(name)
    if not names:
        raise DeviceError(f"{type(model).__name__} declares no transformer block classes, so it cannot be sharded")
    return names


def outer_module_names(model: Any, blocks: list[str]) -> list[str]:
    """Modules holding tensors of their own outside every block (embeddings, norms, head)."""
    names = []
    for name, module in model.named_modules():
        inside = any(name == b or name.startswith(b + ".") for b in blocks)
        owns = any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))
        if not inside and owns:
            names.append(name)
    return names


def plan_shards(model: Any, budgets: dict[int, int], dtype: Any, offload: bool = False) -> ShardPlan:
    """Place blocks across GPUs in order within ``budgets`` (bytes per GPU index)."""
    from accelerate.utils import compute_module_sizes

    if not budgets:
        raise DeviceError("sharded mode needs at least one GPU")
    sizes = compute_module_sizes(model, dtype=dtype)
    blocks = block_names(model)
    outer = outer_module_names(model, blocks)
    gpus = list(budgets)
    room = dict(budgets)
    first = gpus[0]
    outer_bytes = _unique_bytes(model, outer, dtype)
    if outer_bytes > room[first]:
        raise DeviceError(
            f"the embeddings and output head alone need {human_bytes(outer_bytes)} but GPU {first} "
            f"has a budget of {human_bytes(room[first])}: raise --max-gpu-memory or use cpu"
        )
    room[first] -= outer_bytes
    device_map: dict[str, Any] = {name: first for name in outer}
    gpu_index, offloaded = 0, 0
    for block in blocks:
        while gpu_index < len(gpus) and sizes[block] > room[gpus[gpu_index]]:
            gpu_index += 1
        if gpu_index < len(gpus):
            room[gpus[gpu_index]] -= sizes[block]
            device_map[block] = gpus[gpu_index]
        elif offload:
            device_map[block] = "cpu"
            offloaded += 1
        else:
            raise DeviceError(_no_fit_message(sizes, blocks, outer_bytes, budgets))
    return ShardPlan(device_map, offloaded)


def _unique_bytes(model: Any, names: list[str], dtype: Any) -> int:
    """Bytes of the tensors these modules own, each counted once: a head tied to the
    embeddings is the same tensor and must not be budgeted twice."""
    import torch

    modules = dict(model.named_modules())
    seen: dict[int, int] = {}
    for name in names:
        module = modules[name]
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            size = torch.finfo(dtype).bits // 8 if tensor.is_floating_point() else tensor.element_size()
            seen[id(tensor)] = tensor.numel() * size
    return sum(seen.values())


def _no_fit_message(sizes: dict, blocks: list[str], outer_bytes: int, budgets: dict[int, int]) -> str:
    needed = outer_bytes + sum(sizes[b] for b in blocks)
    have = ", ".join(f"GPU {g} {human_bytes(b)}" for g, b in budgets.items())
    return (
        f"the model does not fit: it needs {human_bytes(needed)} and the GPU budgets are {have}; "
        f"add --offload to put the remaining layers on the CPU, give more GPUs or memory, or use cpu"
    )


def summarize(model: Any, device_map: dict[str, Any]) -> str:
    """'cuda:0 layers 0-13 + embeddings + head, cuda:1 layers 14-27' from a device map."""
    blocks = block_names(model)
    per_device: dict[str, list[int]] = {}
    outer_devices = {str(_device_label(d)) for name, d in device_map.items() if name not in blocks}
    for index, block in enumerate(blocks):
        device = _device_label(device_for(block, device_map))
        per_device.setdefault(device, []).append(index)
    parts = []
    for device, layers in per_device.items():
        text = f"{device} layers {_ranges(layers)}"
        if device in outer_devices:
            text += " + embeddings + head"
        parts.append(text)
    return ", ".join(parts)


def device_for(name: str, device_map: dict[str, Any]) -> Any:
    """The device of the most specific device_map entry that contains ``name``."""
    best = max((p for p in device_map if p == "" or name == p or name.startswith(p + ".")), key=len, default=None)
    if best is None:
        raise ModelLoadError(f"the device_map places no module containing {name}")
    return device_map[best]


def _device_label(device: Any) -> str:
    return f"cuda:{device}" if isinstance(device, int) else str(device)


def _ranges(indices: list[int]) -> str:
    spans: list[str] = []
    start: int | None = indices[0]
    for previous, current in zip(indices, indices[1:] + [None]):
        if current != previous + 1 if current is not None else True:
            spans.append(f"{start}" if start == previous else f"{start}-{previous}")
            start = current
    return ", ".join(spans)
