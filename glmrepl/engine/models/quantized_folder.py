"""Quantized checkpoint folders: ``glmrepl quantize SRC DST`` writes them, the loader reads them.

A folder is the source's files (config, tokenizer, generation config, chat
template) with the weights replaced by one ``model.safetensors`` holding the
quantized linears as int8 ``weight`` + float16 ``weight_scale`` (+ ``bias``)
and every other tensor as stored. ``config.json`` gains a ``glmrepl_quantization``
block (format, bits, group size, which modules, whether the head is quantized):
a key of glmrepl's own, because transformers reads ``quantization_config`` and
would refuse a method it does not know.

Loading builds the model on the meta device, swaps the listed modules for
empty quantized ones and assigns the stored tensors to them: the float model
never exists, so memory is about the packed weights.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ...common.atomic import current_umask
from ..errors import CheckpointError, first_line
from ..quant.layers import SUPPORTED_BITS, QuantizeError, check_group_size
from .quantize import QuantizedLayout

CONFIG_KEY = "glmrepl_quantization"
WEIGHTS_NAME = "model.safetensors"
# Not copied from the source: its weights (rewritten), and the download manifest, whose
# sizes and hashes describe the source's files and would fail `glmrepl check` here.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
_NOT_COPIED = ("glmrepl-manifest.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")


def read_layout(folder: Path) -> QuantizedLayout | None:
    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    block = config.get(CONFIG_KEY) if isinstance(config, dict) else None
    if not isinstance(block, dict):
        return None
    bits, group, modules = block.get("bits"), block.get("group_size"), block.get("modules")
    if bits not in SUPPORTED_BITS or not isinstance(group, int) or not isinstance(modules, list):
        raise CheckpointError(f"{Path(folder).name}: config.json's {CONFIG_KEY} block is not one glmrepl wrote")
    return QuantizedLayout(int(bits), group, [str(m) for m in modules], bool(block.get("head")))


# -- loading ----------------------------------------------------------------------


def load_quantized(info: Any, placement: Any, request: Any, layout: QuantizedLayout):
    """The model of a quantized folder, on the placement's device (cpu or one GPU)."""
    from ..devices.modes import torch_dtype

    if request.quantize and request.quantize != layout.bits:
        raise QuantizeError(
            f"{info.path.name} is already quantized to int{layout.bits}: "
            f"--quantize {request.quantize} needs the float checkpoint"
        )
    if placement.mode == "sharded":
        raise QuantizeError(f"{info.path.name} is quantized: load it on one device (--device cpu or gpu)")
    dtype = torch_dtype(placement.dtype)
    model = empty_quantized_model(info.path, layout, dtype, request.trust_remote_code)
    # A head made int8 on the CPU is quantized from the file a block of rows at a time, first:
    # the whole table read (in float32, or even as stored) beside the rest was the load's peak.
    made = placement.device_map == "cpu" and not request.float_head and _int8_head_from_file(model, info, dtype)
    state = read_tensors(info.path, info.weight_files, dtype, skip=made or set())
    assign_tensors(model, state, info.path.name)
    model.eval()
    if placement.device_map != "cpu":
        model.to(placement.device_map)
    return model


def empty_quantized_model(folder: Path, layout: QuantizedLayout, dtype, trust_remote_code: bool):
    """The architecture on the meta device, the listed modules empty quantized ones."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from ..quant.layers import QuantizedLinear
    from .quantize import _is_conv1d, _set_submodule

    config = AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=trust_remote_code)
    with init_empty_weights():  # buffers (rotary tables) are still made for real
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=dtype)
    for name in layout.modules:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{folder.name}: {CONFIG_KEY} names {name}, which the model has not") from None
        rows, columns = module.weight.shape
        out_features, in_features = (columns, rows) if _is_conv1d(module) else (rows, columns)
        bias = getattr(module, "bias", None) is not None
        layer = QuantizedLinear(
            in_features, out_features, layout.bits, bias, "meta", dtype, group_size=check_group_size(layout.group_size)
        )
        _set_submodule(model, name, layer)
    if (folder / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(str(folder), local_files_only=True)
    return model


def _int8_head_from_file(model, info: Any, dtype) -> set[str]:
    """Quantize the still empty model's head to int8 from its stored rows (a tied one from the
    embeddings' table, which its embeddings then read); the names of the tensors it replaced, or
    an empty set when the head stays float (quantize.quantize_head says which)."""
    from .quantize import quantize_head

    model.tie_weights()  # a tied head is the embeddings' table on the meta device too
    names = {id(module): name for name, module in model.named_modules()}
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    tied = embeddings is not None and head is not None and head.weight is embeddings.weight
    if head is None:
        return set()
    source = f"{names[id(embeddings if tied else head)]}.weight"
    rows = _stored_rows(info.weight_files, source)
    if rows is None or not quantize_head(model, dtype, rows):
        return set()
    return {source, f"{names[id(head)]}.weight"}


def _stored_rows(files: list[Path], name: str):
    """The rows of tensor ``name`` in the first of ``files`` that holds it, or None."""
    from .tensor_file import StoredRows

    for file in files:
        try:
            return StoredRows(file, name)
        except (ValueError, OSError):
            continue
    return None


def read_tensors(folder: Path, files: list[Path], dtype, skip: set[str] = frozenset()) -> dict:  # type: ignore[assignment]
    """Every stored tensor but ``skip``; float ones other than the scales at the placement's dtype.
    Read with plain reads into each tensor's memory (tensor_file.py), so that nothing of the file
    stays resident beside the tensors."""
    from .tensor_file import read_tensors as tensors_of

    state = {}
    for file in files:
        try:
            for name, tensor in tensors_of(file, skip):
                keep = not tensor.is_floating_point() or name.endswith(".weight_scale")
                state[name] = tensor if keep or tensor.dtype == dtype else tensor.to(dtype)
                del tensor
        except (ValueError, OSError) as error:
            raise CheckpointError(f"{folder.name}: cannot read {file.name}: {first_line(error)}") from None
    return state


def assign_tensors(model, state: dict, name: str) -> None:
    """Put the tensors in (no copies: ``assign``), tie what the config ties, and refuse a
    folder whose tensors do not cover the model."""
    import torch

    expected = model.state_dict()
    for key, tensor in state.items():
        target = expected.get(key)
        if target is None:
            raise CheckpointError(f"{name}: {key} is not a tensor of this architecture")
        if tuple(target.shape) != tuple(tensor.shape):
            raise CheckpointError(f"{name}: {key} has shape {tuple(tensor.shape)}, the model {tuple(target.shape)}")
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    missing = [key for key, value in model.state_dict().items() if value.device == torch.device("meta")]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(f"{name}: the weights lack {missing[0]}{more}")


# -- writing ----------------------------------------------------------------------


def quantize_checkpoint(
    source: Path,
    dest: Path,
    bits: int,
    group_size: int | None = None,
    include_head: bool = False,
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> QuantizedLayout:
    """Write a quantized copy of ``source`` to ``dest``, atomically: built in a temporary
    folder beside it and renamed into place, so ``dest`` is whole or absent."""
    from .checkpoint import inspect_checkpoint

    source, dest = Path(source).expanduser(), Path(dest).expanduser()
    if dest.exists() and not overwrite:
        raise QuantizeError(f"{dest} already exists: choose another folder, or --force to replace it")
    info = inspect_checkpoint(source, trust_remote_code=trust_remote_code)
    if info.family is not None:
        raise QuantizeError(
            f"{source.name} is a ChatGLM checkpoint: load it with --quantize {bits}, or use THUDM's int{bits} release"
        )
    if read_layout(source) is not None:
        raise QuantizeError(f"{source.name} is already quantized: quantize the float checkpoint")
    model = load_source(info, trust_remote_code)
    from .quantize import quantize_model

    layout = quantize_model(model, bits, group_size, include_head)
    with _writing(dest, overwrite) as scratch:
        save_tensors(model, scratch / WEIGHTS_NAME)
        copy_side_files(source, scratch)
        write_config(model, source, scratch, layout)
    return layout


def load_source(info: Any, trust_remote_code: bool):
    """The float model on the CPU in its stored precision (float32 when unknown)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # transformers' advice is for library users
    hf_logging.disable_progress_bar()  # a command-line tool: its own line says what it did
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(info.dtype or "", torch.float32)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(info.path),
            dtype=dtype,
            device_map="cpu",
            local_files_only=True,
            trust_remote_code=trust_remote_code,
            use_safetensors=info.weights_format == "safetensors",
        )
    except (OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{info.path.name}: cannot load the weights: {first_line(error)}") from None
    return model.eval()


def save_tensors(model, path: Path) -> None:
    """Every tensor once: a tied head is the embeddings' tensor and is re-tied on load."""
    from safetensors.torch import save_file

    seen: set = set()
    tensors = {}
    for key, tensor in model.state_dict().items():
        marker = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if marker in seen:
            continue
        seen.add(marker)
        tensors[key] = tensor.contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})
    os.chmod(path, 0o666 & ~current_umask())  # safetensors writes 0600: others may read a shared models dir


def copy_side_files(source: Path, dest: Path) -> None:
    for item in source.iterdir():
        if item.name.startswith(".") or item.name in _NOT_COPIED or item.name == "config.json":
            continue
        if item.suffix in _WEIGHT_SUFFIXES:
            continue
        if item.is_dir():
            shutil.copytree(item, dest / item.name)
        else:
            shutil.copy2(item, dest / item.name)


def write_config(model, source: Path, dest: Path, layout: QuantizedLayout) -> None:
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    config[CONFIG_KEY] = layout.to_config()
    if layout.head:  # the head has its own (quantized) tensors now
        config["tie_word_embeddings"] = False
    config["dtype"] = str(model.get_input_embeddings().weight.dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


class _writing:
    """A scratch folder beside ``dest``, renamed to it when the block succeeds; removed otherwise.
    OSError (read-only folder, full disk) becomes one QuantizeError line."""

    def __init__(self, dest: Path, overwrite: bool):
        self.dest, self.overwrite = dest, overwrite

    def __enter__(self) -> Path:
        try:
            self.dest.parent.mkdir(parents=True, exist_ok=True)
            self.scratch = Path(tempfile.mkdtemp(prefix=f".{self.dest.name}.", suffix=".partial", dir=self.dest.parent))
            os.chmod(self.scratch, 0o777 & ~current_umask())  # mkdtemp's is 0700: others may read a shared models dir
        except OSError as error:
            raise QuantizeError(f"cannot write {self.dest}: {_reason(error)}") from None
        return self.scratch

    def __exit__(self, kind, error, trace) -> None:
        if kind is None:
            try:
                self._replace()
                return
            except OSError as failure:
                error = failure
        shutil.rmtree(self.scratch, ignore_errors=True)
        if isinstance(error, OSError):
            raise QuantizeError(f"cannot write {self.dest}: {_reason(error)}") from None

    def _replace(self) -> None:
        old = None
        if self.dest.exists() and self.overwrite:
            old = self.dest.with_name(f".{self.dest.name}.old-{os.getpid()}")
            os.rename(self.dest, old)
        os.rename(self.scratch, self.dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _reason(error: OSError) -> str:
    return error.strerror or first_line(error)
