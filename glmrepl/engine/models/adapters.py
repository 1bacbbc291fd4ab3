"""Fine-tuned adapters on a loaded model: PEFT LoRA and ChatGLM P-tuning v2 prefixes.

An adapter folder is recognised from its files alone (no torch, nothing run):

* a PEFT adapter: ``adapter_config.json`` plus ``adapter_model.safetensors`` or
  ``adapter_model.bin``; LoRA is the kind glmrepl runs;
* a P-tuning v2 checkpoint of ChatGLM's ``ptuning`` scripts: a ``config.json``
  with ``pre_seq_len`` and weights holding only ``transformer.prefix_encoder.*``.

LoRA goes through ``peft``, which wraps the base model's linears in place: the
model object stays the same, so generation, ``/device`` and the rest see no
difference. Unmerged (the default) the adapter can be taken off again and the
base is exactly restored; merged (``--merge-adapter``) it is folded into the
float weights, which runs at the base model's speed. An adapter trained on
ChatGLM's remote-code layout is first translated onto glmrepl's native layout
(families/chatglm/lora_layout.py); P-tuning prefixes: families/chatglm/ptuning.py.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import AdapterError, first_line
from ..families import architecture_name

LORA_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
PTUNING_WEIGHT_FILES = ("pytorch_model.bin", "model.safetensors")
_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class AdapterInfo:
    path: Path
    kind: str  # "lora" or "ptuning"
    base: str | None  # the base model it was trained on, as the folder records it
    detail: str  # e.g. "LoRA r=4 on query_key_value, dense" or "P-tuning v2, 4 prefix tokens"
    weights: Path
    config: dict = field(repr=False, default_factory=dict)


def looks_like_adapter(path: Path) -> bool:
    """Cheap test for listings: an adapter_config.json, or a config.json with pre_seq_len."""
    path = Path(path)
    if (path / "adapter_config.json").is_file():
        return True
    return bool(_checkpoint_config(path).get("pre_seq_len"))


def inspect_adapter(path) -> AdapterInfo:
    """What kind of adapter ``path`` is; AdapterError naming the missing or broken file."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"adapter {path}: no such folder")
    if (path / "adapter_config.json").is_file():
        return _inspect_peft(path)
    config = _checkpoint_config(path)
    if config.get("pre_seq_len"):
        return _inspect_ptuning(path, config)
    raise AdapterError(
        f"{path.name} is not an adapter folder: it has neither adapter_config.json (PEFT) nor a "
        "config.json with pre_seq_len (ChatGLM P-tuning v2)"
    )


def _inspect_peft(path: Path) -> AdapterInfo:
    config = _read_json(path / "adapter_config.json")
    kind = config.get("peft_type")
    if kind != "LORA":
        raise AdapterError(f"{path.name}: a PEFT adapter of type {kind!r}; glmrepl runs LoRA adapters only")
    weights = _first_file(path, LORA_WEIGHT_FILES)
    targets = config.get("target_modules") or []
    shown = targets if isinstance(targets, str) else ", ".join(sorted(targets))
    return AdapterInfo(
        path,
        "lora",
        config.get("base_model_name_or_path"),
        f"LoRA r={config.get('r')} on {shown or 'all linears'}",
        weights,
        config,
    )


def _inspect_ptuning(path: Path, config: dict) -> AdapterInfo:
    weights = _first_file(path, PTUNING_WEIGHT_FILES)
    projection = ", with projection" if config.get("prefix_projection") else ""
    return AdapterInfo(
        path,
        "ptuning",
        config.get("_name_or_path"),
        f"P-tuning v2, {config['pre_seq_len']} prefix tokens{projection}",
        weights,
        config,
    )


def _first_file(path: Path, names: tuple[str, ...]) -> Path:
    for name in names:
        if (path / name).is_file():
            return path / name
    raise AdapterError(f"{path.name}: adapter weights missing (expected {' or '.join(names)})")


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterError(f"{file.parent.name}: {file.name} is missing") from None
    except (OSError, ValueError) as error:
        raise AdapterError(f"{file.parent.name}: {file.name} is not valid JSON ({first_line(error)})") from None
    if not isinstance(data, dict):
        raise AdapterError(f"{file.parent.name}: {file.name} does not hold a JSON object")
    return data


def _checkpoint_config(path: Path) -> dict:
    """config.json, or {} when it is missing or unreadable (then the folder is no P-tuning checkpoint)."""
    try:
        return _read_json(path / "config.json")
    except AdapterError:
        return {}


def read_adapter_tensors(file: Path) -> dict:
    """The tensors of an adapter weights file (pickles with weights_only: no code runs)."""
    import pickle

    import torch
    from safetensors import SafetensorError

    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(file))
        state = torch.load(file, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError, SafetensorError) as error:
        raise AdapterError(f"{file.parent.name}: {file.name} cannot be read ({first_line(error, 'corrupt')})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AdapterError(f"{file.parent.name}: {file.name} does not hold a dict of tensors")
    return state


# -- on a model --------------------------------------------------------------------


@dataclass
class AttachedAdapter:
    """An adapter in use: ``detach()`` restores the base model (not possible once merged)."""

    info: AdapterInfo
    merged: bool
    _remove: Callable[[], None] | None = field(default=None, repr=False)

    def describe(self) -> str:
        return f"{self.info.path.name} ({self.info.detail}{', merged' if self.merged else ''})"

    def detach(self) -> None:
        if self._remove is None:
            raise AdapterError(f"{self.info.path.name} is merged into the weights; reload the model to remove it")
        self._remove()
        self._remove = None


def attach_adapter(model: Any, path, merge: bool = False) -> AttachedAdapter:
    """Put the adapter at ``path`` on ``model`` in place; AdapterError leaves the model unchanged."""
    info = inspect_adapter(path)
    if info.kind == "ptuning":
        from ..families.chatglm.ptuning import attach_prefix

        if merge:
            raise AdapterError(f"{info.path.name}: a P-tuning prefix has no weights to merge; drop --merge-adapter")
        return AttachedAdapter(info, False, attach_prefix(model, info, read_adapter_tensors(info.weights)))
    return _attach_lora(model, info, merge)


def _attach_lora(model: Any, info: AdapterInfo, merge: bool) -> AttachedAdapter:
    from peft import LoraConfig, PeftModel
    from peft.utils import set_peft_model_state_dict

    from ..families.chatglm import lora_layout
    from ..quant.layers import QuantizedLinear, model_bits

    try:
        config = LoraConfig.from_pretrained(str(info.path))
    except (TypeError, ValueError) as error:
        raise AdapterError(
            f"{info.path.name}: adapter_config.json is not a LoRA config peft reads ({first_line(error)})"
        ) from None
    state = read_adapter_tensors(info.weights)
    if lora_layout.is_remote_layout(state):
        config, state = lora_layout.to_native(config, state, model, info)
    check_lora_fits(model, state, info)
    if merge and model_bits(model):
        raise AdapterError(
            f"--merge-adapter needs float layers; the model is int{model_bits(model)}: "
            "the adapter runs unmerged on quantized layers"
        )
    config.inference_mode = True
    from peft.tuners.lora.layer import Linear as LoraLinear

    config._register_custom_module({QuantizedLinear: LoraLinear})  # LoRA beside int4/int8 layers
    with warnings.catch_warnings():  # peft doubts QuantizedLinear (it only needs its forward and sizes)
        warnings.filterwarnings("ignore", message="Unsupported layer type")
        warnings.filterwarnings("ignore", category=FutureWarning)
        peft_model = PeftModel(model, config)
    try:
        result = set_peft_model_state_dict(peft_model, state)
        # peft annotates its result as the bare namedtuple factory; it is torch's _IncompatibleKeys.
        unexpected = [key for key in result.unexpected_keys if "lora_" in key]  # type: ignore[attr-defined]
        if unexpected:
            raise AdapterError(f"{info.path.name}: weights the model has no place for: {', '.join(unexpected[:3])}")
    except BaseException:
        peft_model.unload()
        raise
    peft_model.eval()
    if merge:
        peft_model.merge_and_unload()
        return AttachedAdapter(info, True)
    return AttachedAdapter(info, False, peft_model.unload)


def check_lora_fits(model: Any, state: dict, info: AdapterInfo) -> None:
    """Every LoRA pair names a linear the model has, with the model's input and output sizes."""
    architecture = architecture_name(model)
    base = f" (trained on {info.base})" if info.base else ""
    for key, lora_a in state.items():
        if not key.endswith(".lora_A.weight"):
            continue
        name = key[len(_PEFT_PREFIX) : -len(".lora_A.weight")] if key.startswith(_PEFT_PREFIX) else key
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise AdapterError(
                f"{info.path.name}{base} adapts {name}, which the loaded {architecture} "
                "does not have: the adapter is for another architecture"
            ) from None
        lora_b = state.get(key.replace(".lora_A.", ".lora_B."))
        expected = (getattr(module, "in_features", None), getattr(module, "out_features", None))
        found = (lora_a.shape[-1], None if lora_b is None else lora_b.shape[0])
        if expected != found:
            raise AdapterError(
                f"{info.path.name}{base}: {name} is {found[0]} -> {found[1]} in the adapter, "
                f"{expected[0]} -> {expected[1]} in the loaded {architecture}: another model size"
            )


def swap_adapter(model: Any, current: AttachedAdapter | None, path, merge: bool = False) -> AttachedAdapter | None:
    """Take ``current`` off and put the adapter at ``path`` on (``path`` None: only take it off).

    If the new adapter does not fit, the previous one is put back: the model is
    left as it was, and the error says why."""
    if current is not None and current.merged:
        raise AdapterError(f"{current.info.path.name} is merged into the weights; reload the model to change adapters")
    if path is None:
        if current is None:
            raise AdapterError("no adapter is in use")
        current.detach()
        return None
    info = inspect_adapter(path)  # a broken folder is reported before anything changes
    if current is not None:
        current.detach()
    try:
        return attach_adapter(model, info.path, merge)
    except BaseException:
        if current is not None:  # the same adapter object stays the one in use
            current._remove = attach_adapter(model, current.info.path)._remove
        raise
