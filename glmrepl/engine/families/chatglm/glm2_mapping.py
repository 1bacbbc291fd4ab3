"""ChatGLM2, ChatGLM3 and GLM-4 on transformers' native ``GlmForCausalLM``.

The three share one architecture, which ``GlmConfig`` describes exactly:
multi-query groups are key/value heads, ``kv_channels`` the head size,
rotary embeddings cover half of each head (interleaved pairs), RMSNorm, SwiGLU
with the gate first in the fused ``dense_h_to_4h``. Only the weight names
differ, and the fused ``query_key_value`` is split into q, k and v.

``rope_ratio`` (the long-context releases) means two things, by generation, as
their reference code applies it (see ``rope_parameters``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch

from ...errors import CheckpointError

# Settings every supported checkpoint has; anything else is a variant we do not model.
_REQUIRED_SETTINGS = {
    "rmsnorm": True,
    "post_layer_norm": True,
    "add_bias_linear": False,
    "apply_residual_connection_post_layernorm": False,
    "fp32_residual_connection": False,
}
_SIZE_FIELDS = ("padded_vocab_size", "hidden_size", "ffn_hidden_size", "num_layers", "num_attention_heads")

_RENAMES = (
    (r"transformer\.embedding\.word_embeddings\.weight", "model.embed_tokens.weight"),
    (r"transformer\.encoder\.final_layernorm\.weight", "model.norm.weight"),
    (r"transformer\.output_layer\.weight", "lm_head.weight"),
    (
        r"transformer\.encoder\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight",
        r"model.layers.\1.\2.weight",
    ),
    # weight_scale: the per-row scales of quantized (int4/int8) checkpoints
    (
        r"transformer\.encoder\.layers\.(\d+)\.self_attention\.dense\.(weight|weight_scale)",
        r"model.layers.\1.self_attn.o_proj.\2",
    ),
    (
        r"transformer\.encoder\.layers\.(\d+)\.mlp\.dense_h_to_4h\.(weight|weight_scale)",
        r"model.layers.\1.mlp.gate_up_proj.\2",
    ),
    (
        r"transformer\.encoder\.layers\.(\d+)\.mlp\.dense_4h_to_h\.(weight|weight_scale)",
        r"model.layers.\1.mlp.down_proj.\2",
    ),
)
_FUSED_QKV = re.compile(
    r"transformer\.encoder\.layers\.(\d+)\.self_attention\.query_key_value\.(weight|bias|weight_scale)"
)
_IGNORED = re.compile(r"transformer\.rotary_pos_emb\.inv_freq")  # recomputed by the model


def check_supported(config: dict, folder: str) -> None:
    """Raise CheckpointError naming the config fields glmrepl cannot run."""
    missing = [name for name in _SIZE_FIELDS if name not in config]
    if missing:
        raise CheckpointError(f"{folder}: ChatGLM2-style config lacks {', '.join(missing)}")
    unsupported = [
        f"{name}={config[name]!r}"
        for name, wanted in _REQUIRED_SETTINGS.items()
        if name in config and config[name] != wanted
    ]
    if config.get("pre_seq_len"):
        unsupported.append(f"pre_seq_len={config['pre_seq_len']!r} (P-tuning prefix)")
    if config.get("quantization_bit") not in (None, 0, 4, 8):
        unsupported.append(f"quantization_bit={config['quantization_bit']!r}")
    if unsupported:
        raise CheckpointError(f"{folder}: unsupported ChatGLM2-style settings: {', '.join(unsupported)}")


def rope_parameters(config: dict, family: str) -> dict:
    """The rotary settings of ``family`` for a config with or without ``rope_ratio``.

    chatglm2-6b-32k divides the position index by ``rope_ratio`` and keeps base
    10000 (position interpolation: transformers' "linear" scaling, which divides
    the inverse frequencies by the same factor). chatglm3-6b-32k/-128k and GLM-4
    keep the positions and scale the base to 10000 x ``rope_ratio``. The family
    (from the tokenizer, see detect.py; ``--family`` overrides) decides which."""
    ratio = config.get("rope_ratio") or 1
    if family == "chatglm2" and ratio != 1:
        return {"rope_type": "linear", "factor": float(ratio), "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    return {"rope_type": "default", "rope_theta": 10000.0 * ratio, "partial_rotary_factor": 0.5}


def glm_config(config: dict, family: str, eos_token_ids: list[int], dtype: torch.dtype):
    """The ``GlmConfig`` equivalent to a ChatGLM2/3 / GLM-4 ``config.json``."""
    from transformers import GlmConfig

    heads = config["num_attention_heads"]
    kv_heads = config.get("multi_query_group_num", heads) if config.get("multi_query_attention") else heads
    return GlmConfig(
        vocab_size=config["padded_vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["ffn_hidden_size"],
        num_hidden_layers=config["num_layers"],
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=config.get("kv_channels") or config["hidden_size"] // heads,
        rms_norm_eps=config.get("layernorm_epsilon", 1e-5),
        attention_bias=bool(config.get("add_qkv_bias", False)),
        max_position_embeddings=config.get("seq_length", 8192),
        rope_parameters=rope_parameters(config, family),
        pad_token_id=config.get("pad_token_id", 0),
        eos_token_id=eos_token_ids,
        tie_word_embeddings=False,
        use_cache=True,
        dtype=dtype,
    )


def tensor_converter(glm_cfg, folder: str = "checkpoint"):
    """A conversion from ChatGLM2-style weight names to ``GlmForCausalLM`` ones.

    The fused query_key_value rows are q, then k, then v; a quantized one's
    weight and weight_scale are split at the same rows (scales are per row)."""
    q_size = glm_cfg.num_attention_heads * glm_cfg.head_dim
    kv_size = glm_cfg.num_key_value_heads * glm_cfg.head_dim

    def convert(name: str, tensor: torch.Tensor) -> Iterable[tuple[str, torch.Tensor]]:
        if _IGNORED.fullmatch(name):
            return []
        fused = _FUSED_QKV.fullmatch(name)
        if fused:
            layer, kind = fused.groups()
            if tensor.shape[0] != q_size + 2 * kv_size:
                raise CheckpointError(
                    f"{folder}: {name} has {tensor.shape[0]} rows, the config implies "
                    f"{q_size + 2 * kv_size} (query {q_size} + key and value {kv_size} each)"
                )
            q, k, v = tensor.split([q_size, kv_size, kv_size], dim=0)
            prefix = f"model.layers.{layer}.self_attn"
            return [(f"{prefix}.q_proj.{kind}", q), (f"{prefix}.k_proj.{kind}", k), (f"{prefix}.v_proj.{kind}", v)]
        for pattern, replacement in _RENAMES:
            if re.fullmatch(pattern, name):
                return [(re.sub(pattern, replacement, name), tensor)]
        return [(name, tensor)]  # unknown: the loader names it in its error

    return convert
