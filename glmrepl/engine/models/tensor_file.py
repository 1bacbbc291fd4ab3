"""A safetensors file read tensor by tensor with plain reads, for a quantized folder's load.

safetensors' own reader maps the file: every page a tensor is copied from stays resident in
the process until the file is closed, so a load peaked at the whole file plus the copies of
its tensors (1.8x where the model settled, on the int4 folder of Qwen2-0.5B). Read into each
tensor's own memory, the bytes pass through the system's file cache only, and the load's
peak is what the model keeps. The format: an 8-byte little-endian header length, a JSON header
naming each tensor's dtype, shape and byte range, then the data.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_MAX_HEADER_BYTES = 100 << 20  # as safetensors itself allows


def tensor_types() -> dict[str, Any]:
    import torch

    names = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64"}
    names |= {"I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
    return {code: getattr(torch, name) for code, name in names.items()}


def read_tensors(path: Path, skip: frozenset[str] | set[str] = frozenset()) -> Iterator[tuple[str, Any]]:
    """(name, tensor) for each tensor of the file but ``skip`` (never read), in file order;
    ValueError for a malformed file (OSError when it cannot be read)."""
    import torch

    types = tensor_types()
    with open(path, "rb", buffering=0) as stream:
        size = path.stat().st_size
        start, entries = _header(stream, size)
        for name, entry in sorted(entries.items(), key=lambda item: item[1]["data_offsets"][0]):
            dtype, shape, (begin, end) = _checked(name, entry, types, size - start)
            if name in skip:
                continue
            data = torch.empty(end - begin, dtype=torch.uint8)
            stream.seek(start + begin)
            if stream.readinto(data.numpy().data) != end - begin:
                raise ValueError(f"{name} ends past the end of the file")
            yield name, data.view(dtype).reshape(shape)


def _header(stream, size: int) -> tuple[int, dict]:
    raw = stream.read(8)
    if len(raw) != 8:
        raise ValueError("the file is too short to be safetensors")
    (length,) = struct.unpack("<Q", raw)
    if length > min(size - 8, _MAX_HEADER_BYTES):
        raise ValueError("its header is larger than the file")
    try:
        header = json.loads(stream.read(length))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError("its header is not JSON") from None
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    header.pop("__metadata__", None)
    return 8 + length, header


def _checked(name: str, entry: Any, types: dict, data_bytes: int) -> tuple[Any, list[int], tuple[int, int]]:
    """The entry's dtype, shape and byte range, each checked against the others and the file."""
    if not isinstance(entry, dict) or entry.get("dtype") not in types:
        raise ValueError(f"{name} has no dtype this reader knows")
    dtype, shape, offsets = types[entry["dtype"]], entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ValueError(f"{name} has no valid shape")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise ValueError(f"{name} has no valid byte range")
    begin, end = offsets
    itemsize = dtype.itemsize
    if not 0 <= begin <= end <= data_bytes or end - begin != math.prod(shape) * itemsize:
        raise ValueError(f"{name}'s byte range does not match its shape or the file")
    return dtype, shape, (begin, end)


class StoredRows:
    """One tensor of a file read a block of rows (its first dimension) at a time: ``rows[a:b]``.
    A vocabulary-sized table is quantized from it block by block, never held whole."""

    def __init__(self, path: Path, name: str):
        with open(path, "rb") as stream:
            start, entries = _header(stream, path.stat().st_size)
            if name not in entries:
                raise ValueError(f"{name} is not in the file")
            dtype, shape, (begin, _) = _checked(name, entries[name], tensor_types(), path.stat().st_size - start)
        if not shape:
            raise ValueError(f"{name} has no rows")
        self.path, self.offset, self.dtype, self.shape = path, start + begin, dtype, tuple(shape)
        self.row_bytes = dtype.itemsize * math.prod(shape[1:])

    def __getitem__(self, rows: slice) -> Any:
        import torch

        first, stop, _ = rows.indices(self.shape[0])
        count = max(0, stop - first)
        data = torch.empty(count * self.row_bytes, dtype=torch.uint8)
        with open(self.path, "rb", buffering=0) as stream:
            stream.seek(self.offset + first * self.row_bytes)
            if stream.readinto(data.numpy().data) != len(data):
                raise ValueError("the file ends inside a tensor")
        return data.view(self.dtype).reshape(count, *self.shape[1:])
