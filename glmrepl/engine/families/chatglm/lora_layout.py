"""LoRA adapters trained on ChatGLM's remote-code layout, put onto glmrepl's native one.

ChatGLM2/3 and GLM-4 adapters (peft on the released modeling code) target
``query_key_value``, ``dense``, ``dense_h_to_4h`` and ``dense_4h_to_h`` under
``transformer.encoder.layers.N``. glmrepl runs those generations on
``GlmForCausalLM`` (glm2_mapping.py), where the fused query_key_value is three
projections. A LoRA pair on the fused linear adds ``B @ A @ x`` whose output
rows are q, then k, then v; so each projection gets the same ``A`` and its own
rows of ``B``, and the sum is exactly the fused one. The other three linears
are renamed as the base weights are.
"""

from __future__ import annotations

import copy
import re

from ...errors import AdapterError
from .. import architecture_name

_REMOTE_PREFIX = "base_model.model.transformer.encoder.layers."
_KEY = re.compile(
    r"base_model\.model\.transformer\.encoder\.layers\.(\d+)\."
    r"(self_attention\.query_key_value|self_attention\.dense|mlp\.dense_h_to_4h|mlp\.dense_4h_to_h)"
    r"\.(lora_A|lora_B)\.weight"
)
_NATIVE = {
    "self_attention.dense": "self_attn.o_proj",
    "mlp.dense_h_to_4h": "mlp.gate_up_proj",
    "mlp.dense_4h_to_h": "mlp.down_proj",
}
_SPLIT = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
# Settings whose module names or extra weights the translation does not carry over.
_UNTRANSLATED = ("modules_to_save", "rank_pattern", "alpha_pattern", "use_dora", "lora_bias", "layers_pattern")


def is_remote_layout(state: dict) -> bool:
    return any(key.startswith(_REMOTE_PREFIX) for key in state)


def to_native(config, state: dict, model, info):
    """(LoraConfig, state dict) for the native model; AdapterError names what does not fit."""
    folder = info.path.name
    if getattr(model.config, "model_type", None) != "glm":
        base = f", base {info.base}" if info.base else ""
        raise AdapterError(
            f"{folder} was trained on ChatGLM2/3 or GLM-4 (remote-code layout{base}); "
            f"the loaded model is {architecture_name(model)}"
        )
    used = [name for name in _UNTRANSLATED if getattr(config, name, None)]
    if used:
        raise AdapterError(f"{folder}: LoRA settings {', '.join(used)} are not supported on ChatGLM's layout")
    q_size = model.config.num_attention_heads * model.config.head_dim
    kv_size = model.config.num_key_value_heads * model.config.head_dim
    native, targets = {}, set()
    for key, tensor in state.items():
        match = _KEY.fullmatch(key)
        if match is None:
            raise AdapterError(f"{folder}: {key} is not a LoRA weight of ChatGLM's four linears")
        layer, module, which = match.groups()
        prefix = f"base_model.model.model.layers.{layer}"
        if module != "self_attention.query_key_value":
            native[f"{prefix}.{_NATIVE[module]}.{which}.weight"] = tensor
            targets.add(_NATIVE[module].split(".")[-1])
            continue
        parts = [tensor] * 3 if which == "lora_A" else _split_rows(tensor, q_size, kv_size, folder, key)
        for name, part in zip(_SPLIT, parts):
            native[f"{prefix}.{name}.{which}.weight"] = part
            targets.add(name.split(".")[-1])
    config = copy.deepcopy(config)
    config.target_modules = targets
    return config, native


def _split_rows(lora_b, q_size: int, kv_size: int, folder: str, key: str):
    if lora_b.shape[0] != q_size + 2 * kv_size:
        raise AdapterError(
            f"{folder}: {key} has {lora_b.shape[0]} rows, the loaded model's query_key_value "
            f"{q_size + 2 * kv_size}: the adapter is for another model size"
        )
    return lora_b.split([q_size, kv_size, kv_size], dim=0)
