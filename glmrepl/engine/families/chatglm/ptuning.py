"""ChatGLM P-tuning v2 prefixes, applied as the released modeling code applies them.

The ``ptuning`` scripts of ChatGLM-6B and ChatGLM2-6B train a prefix encoder
(``transformer.prefix_encoder``: an embedding of ``pre_seq_len`` rows,
optionally followed by Linear-Tanh-Linear when ``prefix_projection``) whose
output, reshaped to [pre_seq_len, layers x 2, key/value heads, head size]
(ChatGLM2/3: the multi-query groups; ChatGLM-6B: all heads), is every layer's
key (even rows) and value (odd rows) for ``pre_seq_len`` extra positions in
front of the text. Those keys are not rotated, every token sees all of them,
and the text's own positions still start at 0.

The prefix does not depend on the input, so it is computed once here and kept
on each attention module; ``prepend_prefix`` puts it in front of the keys and
values that module computes and widens the mask to match. ChatGLM2/3 run on
transformers' attention, so a registered attention function does that, then
runs SDPA; ChatGLM-6B's attention (glm1_model.py) calls it itself. The cache never holds the prefix, so
generation, positions and masks stay as they are without one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ...errors import AdapterError
from .. import architecture_name
from .prefix import prepend_prefix

ATTENTION_NAME = "glmrepl_prefix_sdpa"
_PREFIX = "transformer.prefix_encoder."


def attach_prefix(model, info, state: dict) -> Callable[[], None]:
    """Put the prefix on ``model``; returns the function that takes it off."""
    attentions = _attention_modules(model, info)
    prefix = compute_prefix(state, info, len(attentions), *_key_value_shape(model))
    dtype = model.get_input_embeddings().weight.dtype
    for index, attention in enumerate(attentions):
        device = attention.dense.weight.device if hasattr(attention, "dense") else attention.o_proj.weight.device
        device = torch.device("cpu") if device.type == "meta" else device  # offloaded: moved when used
        keys, values = prefix[:, 2 * index], prefix[:, 2 * index + 1]  # [prefix, heads, head size]
        attention.register_buffer("prefix_key", keys.permute(1, 0, 2).to(device, dtype), persistent=False)
        attention.register_buffer("prefix_value", values.permute(1, 0, 2).to(device, dtype), persistent=False)
    previous = model.config._attn_implementation
    if _is_glm(model):  # ChatGLM-6B's own attention reads the buffers itself
        _register_attention()
        model.set_attn_implementation(ATTENTION_NAME)

    def remove() -> None:
        for attention in attentions:
            del attention.prefix_key, attention.prefix_value
        if _is_glm(model):
            model.set_attn_implementation(previous)

    return remove


def _is_glm(model) -> bool:
    return getattr(model.config, "model_type", None) == "glm" and hasattr(model, "model")


def _attention_modules(model, info) -> list:
    """Each layer's attention, once the checkpoint's generation and sizes are known to fit the model."""
    from .glm1_model import ChatGLM1ForCausalLM

    config, folder = info.config, info.path.name
    first_generation = bool(config.get("position_encoding_2d"))
    if first_generation and isinstance(model, ChatGLM1ForCausalLM):
        attentions = [layer.attention for layer in model.transformer.layers]
        kv_heads, head_size = (
            config.get("num_attention_heads"),
            _ratio(config.get("hidden_size"), config.get("num_attention_heads")),
        )
    elif not first_generation and _is_glm(model):
        attentions = [layer.self_attn for layer in model.model.layers]
        kv_heads = (
            config.get("multi_query_group_num", config.get("num_attention_heads"))
            if config.get("multi_query_attention")
            else config.get("num_attention_heads")
        )
        head_size = config.get("kv_channels")
    else:
        kind = "ChatGLM-6B" if first_generation else "ChatGLM2/3"
        raise AdapterError(f"{folder} is a {kind} P-tuning prefix; the loaded model is {architecture_name(model)}")
    wanted = {"layers": config.get("num_layers"), "head size": head_size, "key/value heads": kv_heads}
    loaded_heads, loaded_size = _key_value_shape(model)
    loaded = {"layers": len(attentions), "head size": loaded_size, "key/value heads": loaded_heads}
    differ = [
        f"{name} {wanted[name]} (loaded model: {loaded[name]})" for name in wanted if wanted[name] != loaded[name]
    ]
    if differ:
        raise AdapterError(f"{folder} was trained for another model size: {', '.join(differ)}")
    return attentions


def _key_value_shape(model) -> tuple[int, int]:
    """(key/value heads, head size) of the loaded model."""
    if _is_glm(model):
        return model.config.num_key_value_heads, model.config.head_dim
    return model.config.num_attention_heads, model.config.hidden_size // model.config.num_attention_heads


def _ratio(numerator, denominator):
    return numerator // denominator if numerator and denominator else None


def compute_prefix(state: dict, info, layers: int, heads: int, size: int) -> torch.Tensor:
    """The prefix key/values, [pre_seq_len, layers x 2, key/value heads, head size], in float32."""
    folder = info.path.name
    weights = {name[len(_PREFIX) :]: tensor.float() for name, tensor in state.items() if name.startswith(_PREFIX)}
    if "embedding.weight" not in weights:
        raise AdapterError(f"{folder}: {info.weights.name} holds no {_PREFIX}embedding.weight")
    length = info.config["pre_seq_len"]
    with torch.no_grad():
        prefix = weights["embedding.weight"][:length]
        if info.config.get("prefix_projection"):
            try:
                linear = torch.nn.functional.linear
                hidden = torch.tanh(linear(prefix, weights["trans.0.weight"], weights["trans.0.bias"]))
                prefix = linear(hidden, weights["trans.2.weight"], weights["trans.2.bias"])
            except (KeyError, RuntimeError) as error:
                raise AdapterError(
                    f"{folder}: the prefix projection weights are missing or do not fit ({str(error).splitlines()[0]})"
                ) from None
    if tuple(prefix.shape) != (length, layers * 2 * heads * size):
        raise AdapterError(
            f"{folder}: the prefix is {tuple(prefix.shape)}, the loaded model needs "
            f"({length}, {layers * 2 * heads * size})"
        )
    return prefix.reshape(length, layers * 2, heads, size)


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, prefix_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def prefix_attention(module, query, key, value, attention_mask, **kwargs):
    """SDPA attention with the module's prefix keys/values in front (all visible to every token)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if getattr(module, "prefix_key", None) is not None:
        mask = _causal_or_given(attention_mask, query.shape[2], key.shape[2], query.device)
        key, value, attention_mask = prepend_prefix(module, key, value, mask)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _causal_or_given(mask, query_length: int, key_length: int, device):
    """The mask transformers gave, cut to the keys, or the causal one it left to SDPA's
    is_causal, which no longer lines up once the prefix is in front."""
    if mask is not None:
        return mask[..., :key_length]
    causal = torch.ones(query_length, key_length, dtype=torch.bool, device=device)
    return causal.tril(diagonal=key_length - query_length)[None, None]
