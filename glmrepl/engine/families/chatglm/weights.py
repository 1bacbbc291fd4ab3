"""Stream a checkpoint's tensors into a model built on the meta device.

Tensors are read one shard at a time (safetensors tensor by tensor, pickled
``.bin`` shards memory-mapped with ``weights_only=True``), converted by the
caller and placed straight onto their target device, so no second full copy
of the weights ever exists. Loading goes through transformers' tqdm hook,
which lets the caller show progress and cancel between tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, cast

import torch

from ...devices.placement import device_for
from ...errors import CheckpointError, ModelLoadError, first_line
from ...pickled import count_pickled_tensors

AUTO_DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")

# A conversion turns one checkpoint tensor into zero or more (model name, tensor) pairs.
Conversion = Callable[[str, torch.Tensor], Iterable[tuple[str, torch.Tensor]]]


def iter_checkpoint_tensors(files: list[Path]) -> tuple[Iterator[tuple[str, torch.Tensor]], int | None]:
    """(iterator over every (name, tensor) of the weight files, how many there are when known).

    ``files`` are the ones the validator checked (CheckpointInfo.weight_files): the
    folder's index is not read again, so what was checked is what is loaded."""
    if len(files) == 1 and files[0].suffix != ".safetensors":
        state = _load_pickled(files[0])  # read once: a legacy pickle cannot be memory-mapped
        return _drain(state), len(state)
    counts = [_tensor_count(file) for file in files]
    known = [count for count in counts if count is not None]
    total = sum(known) if len(known) == len(counts) else None
    return (item for file in files for item in _shard_tensors(file)), total


def _tensor_count(shard: Path) -> int | None:
    """From the safetensors header, or the pickle's tensor descriptions (no tensor is read)."""
    if shard.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(shard), framework="pt") as reader:
            return len(list(reader.keys()))
    return count_pickled_tensors(shard)


def _shard_tensors(shard: Path) -> Iterator[tuple[str, torch.Tensor]]:
    if shard.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(shard), framework="pt") as reader:
            for name in reader.keys():
                yield name, reader.get_tensor(name)
        return
    yield from _drain(_load_pickled(shard))


def _drain(state: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """Hand out tensors one by one, dropping each reference once it has been placed."""
    for name in list(state):
        yield name, state.pop(name)


def _load_pickled(shard: Path) -> dict:
    """A pickled shard, tensors only (no code runs), memory-mapped when its format allows."""
    import pickle

    try:
        try:
            return torch.load(shard, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            return torch.load(shard, map_location="cpu", weights_only=True)  # a legacy, non-zip pickle
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{shard.parent.name}: {shard.name} holds more than tensors, "
            f"so it is not unpickled ({first_line(error, 'not plain tensors')})"
        ) from None


# -- placement ----------------------------------------------------------------


def resolve_device_map(model: torch.nn.Module, device_map, dtype: torch.dtype) -> dict[str, str]:
    """A {module name: device} dict from "cpu", "cuda:0", a torch.device, an accelerate
    strategy ("auto", "balanced", ...) or a dict (GPU indices become "cuda:N")."""
    if callable(device_map):  # a planner: it decides on the empty model
        device_map = device_map(model)
    if isinstance(device_map, str) and device_map in AUTO_DEVICE_MAPS:
        device_map = _infer_device_map(model, device_map, dtype)
    elif isinstance(device_map, (str, torch.device)):
        device_map = {"": str(device_map)}
    if not isinstance(device_map, dict):
        raise ModelLoadError(f"unsupported device_map {device_map!r}")
    resolved = {name: _device_name(device) for name, device in device_map.items()}
    if "disk" in resolved.values():
        raise ModelLoadError("disk offload is not supported for ChatGLM checkpoints: use cpu or more GPUs")
    return resolved


def _device_name(device) -> str:
    """GPU indices become "cuda:N"; "cpu:0" is "cpu" (accelerate treats them as two devices)."""
    if isinstance(device, int):
        return f"cuda:{device}"
    if str(device) in ("disk", "meta"):
        return str(device)
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        raise ModelLoadError(f"unknown device {device!r} in device_map") from None
    return "cpu" if kind == "cpu" else str(device)


def _infer_device_map(model, strategy: str, dtype) -> dict:
    from accelerate.utils import get_balanced_memory, infer_auto_device_map

    no_split = list(getattr(model, "_no_split_modules", None) or [])
    max_memory = None
    if strategy != "sequential":
        max_memory = get_balanced_memory(
            model, dtype=dtype, no_split_module_classes=no_split, low_zero=strategy == "balanced_low_0"
        )
    return infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype)


def load_into(
    model: torch.nn.Module, files: list[Path], convert: Conversion, device_map: dict[str, str], dtype: torch.dtype
) -> set[str]:
    """Fill the meta model from the checkpoint's weight files; return the names that were set."""
    from accelerate.utils import set_module_tensor_to_device
    from transformers.utils import logging as hf_logging

    expected = dict(model.named_parameters())
    folder = files[0].parent.name
    tensors, count = iter_checkpoint_tensors(files)
    loaded: set[str] = set()
    for stored_name, tensor in hf_logging.tqdm(tensors, total=count, desc="Loading weights"):
        for name, value in convert(stored_name, tensor):
            if name not in expected:
                raise CheckpointError(f"{folder}: unexpected weight {stored_name}")
            if tuple(value.shape) != tuple(expected[name].shape):
                raise CheckpointError(
                    f"{folder}: {stored_name} has shape {tuple(value.shape)}, "
                    f"the config implies {tuple(expected[name].shape)}"
                )
            set_module_tensor_to_device(model, name, device_for(name, device_map), value=value, dtype=dtype)
            loaded.add(name)
    return loaded


def place_buffers(model: torch.nn.Module, device_map: dict[str, str]) -> None:
    """Buffers (rotary frequencies) were built on the CPU; move each next to its module.

    A hand-written map may leave out parameter-less modules such as the rotary
    embedding; their buffers go to the map's first device (inputs are moved
    to each block's device anyway)."""
    from accelerate.utils import set_module_tensor_to_device

    first_device = next(iter(device_map.values()))
    for name, buffer in list(model.named_buffers()):
        try:
            device = device_for(name, device_map)
        except ModelLoadError:
            device = first_device
        set_module_tensor_to_device(model, name, device, value=buffer)


def dispatch_if_split(model: torch.nn.Module, device_map: dict[str, str]) -> None:
    """Across several devices, accelerate's hooks move activations between them."""
    if len(set(device_map.values())) <= 1:
        return
    from accelerate import dispatch_model

    # The cache object must reach every block as is, never copied between devices.
    dispatch_model(
        model, device_map=device_map, skip_keys=list(getattr(model, "_skip_keys_device_placement", None) or [])
    )
    # An attribute transformers reads; nn.Module types its attributes as tensors or modules only.
    cast(Any, model).hf_device_map = device_map
