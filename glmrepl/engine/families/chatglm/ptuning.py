"""ChatGLM2/3 P-tuning v2 prefixes, applied as the released modeling code applies them.

The ``ptuning`` scripts train a prefix encoder (``transformer.prefix_encoder``:
an embedding of ``pre_seq_len`` rows, optionally followed by Linear-Tanh-Linear
when ``prefix_projection``) whose output, reshaped to
[pre_seq_len, layers x 2, multi-query groups, head size], is every layer's
key (even rows) and value (odd rows) for ``pre_seq_len`` extra positions in
front of the text. Those keys are not rotated, every token sees all of them,
and the text's own positions still start at 0.

The prefix does not depend on the input, so it is computed once here and kept
on each attention module; a registered attention function puts it in front of
the keys and values that module computes (and widens the mask to match), then
runs transformers' SDPA attention. The cache never holds the prefix, so
generation, positions and masks stay as they are without one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ...adapters import AdapterError, architecture_name

ATTENTION_NAME = "glmrepl_prefix_sdpa"
_PREFIX = "transformer.prefix_encoder."


def attach_prefix(model, info, state: dict) -> Callable[[], None]:
    """Put the prefix on ``model``; returns the function that takes it off."""
    _check_fits(model, info)
    prefix = compute_prefix(state, info, model.config)
    dtype = model.get_input_embeddings().weight.dtype
    layers = model.model.layers
    for index, layer in enumerate(layers):
        attention = layer.self_attn
        device = attention.o_proj.weight.device
        device = torch.device("cpu") if device.type == "meta" else device  # offloaded: moved when used
        keys, values = prefix[:, 2 * index], prefix[:, 2 * index + 1]  # [prefix, groups, head]
        attention.register_buffer("prefix_key", keys.permute(1, 0, 2).to(device, dtype), persistent=False)
        attention.register_buffer("prefix_value", values.permute(1, 0, 2).to(device, dtype), persistent=False)
    previous = model.config._attn_implementation
    _register_attention()
    model.set_attn_implementation(ATTENTION_NAME)

    def remove() -> None:
        for layer in layers:
            del layer.self_attn.prefix_key, layer.self_attn.prefix_value
        model.set_attn_implementation(previous)

    return remove


def _check_fits(model, info) -> None:
    config, folder = info.config, info.path.name
    if config.get("position_encoding_2d"):
        raise AdapterError(f"{folder}: P-tuning v2 of ChatGLM-6B (first generation) is not supported; "
                           "ChatGLM2/3 prefixes are")
    if getattr(model.config, "model_type", None) != "glm" or not hasattr(model, "model"):
        raise AdapterError(f"{folder} is a ChatGLM2/3 P-tuning prefix; the loaded model is {architecture_name(model)}")
    kv_heads = config.get("multi_query_group_num", config.get("num_attention_heads")) \
        if config.get("multi_query_attention") else config.get("num_attention_heads")
    wanted = {"layers": config.get("num_layers"), "head size": config.get("kv_channels"),
              "key/value heads": kv_heads}
    loaded = {"layers": model.config.num_hidden_layers, "head size": model.config.head_dim,
              "key/value heads": model.config.num_key_value_heads}
    differ = [f"{name} {wanted[name]} (loaded model: {loaded[name]})"
              for name in wanted if wanted[name] != loaded[name]]
    if differ:
        raise AdapterError(f"{folder} was trained for another model size: {', '.join(differ)}")


def compute_prefix(state: dict, info, glm_config) -> torch.Tensor:
    """The prefix key/values, [pre_seq_len, layers x 2, key/value heads, head size], in float32."""
    folder = info.path.name
    weights = {name[len(_PREFIX):]: tensor.float() for name, tensor in state.items() if name.startswith(_PREFIX)}
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
                raise AdapterError(f"{folder}: the prefix projection weights are missing or do not fit "
                                   f"({str(error).splitlines()[0]})") from None
    layers, heads, size = glm_config.num_hidden_layers, glm_config.num_key_value_heads, glm_config.head_dim
    if tuple(prefix.shape) != (length, layers * 2 * heads * size):
        raise AdapterError(f"{folder}: the prefix is {tuple(prefix.shape)}, the loaded model needs "
                           f"({length}, {layers * 2 * heads * size})")
    return prefix.reshape(length, layers * 2, heads, size)


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, prefix_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def prefix_attention(module, query, key, value, attention_mask, **kwargs):
    """SDPA attention with the module's prefix keys/values in front (all visible to every token)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    prefix_key = getattr(module, "prefix_key", None)
    if prefix_key is not None:
        batch, length = query.shape[0], prefix_key.shape[1]
        mask = _causal_or_given(attention_mask, query.shape[2], key.shape[2], query.device)
        key = torch.cat([prefix_key.to(key.device, key.dtype).expand(batch, -1, -1, -1), key], dim=2)
        value = torch.cat([module.prefix_value.to(value.device, value.dtype).expand(batch, -1, -1, -1), value], dim=2)
        visible = torch.ones(*mask.shape[:-1], length, dtype=mask.dtype, device=mask.device)
        attention_mask = torch.cat([visible if mask.dtype == torch.bool else visible.zero_(), mask], dim=-1)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _causal_or_given(mask, query_length: int, key_length: int, device):
    """The mask transformers gave (bool: True attends; float: 0 attends), cut to the keys, or the
    causal one it left to SDPA's is_causal, which no longer lines up once the prefix is in front."""
    if mask is not None:
        return mask[..., :key_length]
    causal = torch.ones(query_length, key_length, dtype=torch.bool, device=device)
    return causal.tril(diagonal=key_length - query_length)[None, None]
