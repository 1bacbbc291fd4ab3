"""Parameter counts of pickled PyTorch weights without torch and without running the pickle.

``torch.save`` writes a zip archive whose ``data.pkl`` describes each tensor
(storage key, offset, shape) and keeps the bytes in separate entries. Reading
that pickle with an unpickler that resolves no real class (every global is an
inert stand-in) gives the shapes safely and in milliseconds, so listings can
show a size for ``.bin`` checkpoints too.
"""

from __future__ import annotations

import math
import pickle
import zipfile
from pathlib import Path

_TENSOR_BUILDERS = {("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")}


class _Tensor:
    def __init__(self, storage, offset, size):
        self.key = (storage, offset, tuple(size))
        self.numel = math.prod(size)


def _rebuild_tensor(storage, storage_offset, size, *rest):
    return _Tensor(storage, storage_offset, size)


def _rebuild_parameter(data, *rest):
    return data


class _StateDict(dict):
    """OrderedDict stand-in: torch.save sets attributes (``_metadata``) on it."""


class _Opaque:
    """Whatever else the pickle names: accepts any state, does nothing."""

    def __setstate__(self, state):
        pass


def _inert(*args, **kwargs):
    return _Opaque()


class _ShapeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _TENSOR_BUILDERS:
            return _rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return _rebuild_parameter
        if (module, name) == ("collections", "OrderedDict"):
            return _StateDict
        return _inert  # storage types, dtypes, anything else: never the real object

    def persistent_load(self, pid):
        # ('storage', storage_type, key, location, numel): the key names the bytes.
        return pid[2] if isinstance(pid, tuple) and len(pid) > 2 else repr(pid)


def count_pickled_parameters(path: Path) -> int | None:
    """Elements of every distinct tensor in a zip-format ``torch.save`` file; None if unknown."""
    tensors = _stored_tensors(path)
    if tensors is None:
        return None
    distinct = {t.key: t.numel for t in tensors}
    return sum(distinct.values())


def count_pickled_tensors(path: Path) -> int | None:
    """How many tensors a zip-format ``torch.save`` state dict holds; None if unknown."""
    tensors = _stored_tensors(path)
    return None if tensors is None else len(tensors)


def _stored_tensors(path: Path) -> list[_Tensor] | None:
    """The tensor descriptions of a zip-format state dict, read without torch; None if unknown."""
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
            if name is None:
                return None
            state = _ShapeUnpickler(archive.open(name)).load()
    except Exception:  # legacy or damaged files: the structural check reports those
        return None
    if not isinstance(state, dict):
        return None
    return [t for t in state.values() if isinstance(t, _Tensor)]
