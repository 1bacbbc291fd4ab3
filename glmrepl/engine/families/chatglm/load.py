"""Load a ChatGLM checkpoint natively: model, tokenizer and prompt format.

The folder's own ``.py`` files are never imported: ChatGLM-6B runs on
glmrepl's implementation (glm1_model), ChatGLM2/3 and GLM-4 on transformers'
``GlmForCausalLM``. The model is built on the meta device and every tensor is
placed straight onto its device from the checkpoint (see weights.py).

``device_map``: "cpu", a device string such as "cuda:0", an accelerate
strategy ("auto", "balanced", "balanced_low_0", "sequential") or a
{module name: device} dict. Module names are the native model's
(``transformer.layers.3`` for ChatGLM-6B, ``model.layers.3`` for the others).

Quantized checkpoints (``quantization_bit`` 4 or 8) and ``quantize`` (quantize a
float checkpoint while loading it) get glmrepl's quantized linears; see quantized.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...errors import CheckpointError
from .. import FamilyMatch, LoadedParts
from . import quantized, weights


def load_chatglm(
    path: Path,
    match: FamilyMatch,
    *,
    weight_files: list[Path],
    dtype: Any,
    device_map: Any,
    quantize: int | None = None,
) -> LoadedParts:
    """Model (in eval mode, generation_config stopping like the family's chat()), tokenizer and
    prompt format for ``match.family``; CheckpointError names what the folder lacks or has unsupported.
    ``weight_files``: the ones the validator checked (CheckpointInfo.weight_files).
    ``quantize`` (4 or 8) quantizes a float checkpoint's layers as they are loaded."""
    path = Path(path)
    config = _read_config(path)
    bits = quantized.load_bits(config, path.name, quantize)
    if match.family == "chatglm1":
        model, tokenizer, prompt_format = _load_glm1(path, weight_files, config, dtype, device_map, bits)
    elif match.family in ("chatglm2", "chatglm3", "glm4"):
        model, tokenizer, prompt_format = _load_glm2(path, weight_files, config, match.family, dtype, device_map, bits)
    else:
        raise CheckpointError(f"{path.name}: unknown ChatGLM family {match.family!r}")
    model.eval()
    _set_generation_defaults(model, prompt_format, tokenizer)
    return LoadedParts(model=model, tokenizer=tokenizer, prompt_format=prompt_format)


def _read_config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path.name}: cannot read config.json ({error})") from None


def _read_tokenizer_config(path: Path) -> dict:
    try:
        return json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _vocabulary_file(path: Path, name: str) -> Path:
    file = path / name
    if not file.is_file():
        raise CheckpointError(f"{path.name}: tokenizer file {name} is missing")
    return file


# -- ChatGLM-6B ----------------------------------------------------------------


def _load_glm1(path: Path, weight_files: list[Path], config: dict, dtype, device_map, bits: int = 0):
    from .glm1_model import ChatGLM1ForCausalLM
    from .prompts import ChatGLM1Format
    from .tokenizers import ChatGLM1Tokenizer

    num_image_tokens = _read_tokenizer_config(path).get("num_image_tokens", 20000)
    tokenizer = ChatGLM1Tokenizer(_vocabulary_file(path, "ice_text.model"), num_image_tokens=num_image_tokens)
    model = _build_and_fill(
        path,
        weight_files,
        ChatGLM1ForCausalLM,
        glm1_config(config, path.name, dtype),
        _glm1_converter,
        dtype,
        device_map,
        bits,
        quantized.config_bits(config, path.name),
    )
    return model, tokenizer, ChatGLM1Format(tokenizer)


def glm1_config(config: dict, folder: str, dtype):
    from .glm1_model import ChatGLM1Config

    unsupported = [
        f"{name}={config[name]!r}" for name in ("pre_seq_len", "quantization_embeddings") if config.get(name)
    ]
    if not config.get("position_encoding_2d", True):
        unsupported.append("position_encoding_2d=false")
    if unsupported:
        raise CheckpointError(f"{folder}: unsupported ChatGLM-6B settings: {', '.join(unsupported)}")
    defaults = ChatGLM1Config()
    return ChatGLM1Config(
        vocab_size=config.get("vocab_size", defaults.vocab_size),
        hidden_size=config.get("hidden_size", defaults.hidden_size),
        num_hidden_layers=config.get("num_layers", defaults.num_hidden_layers),
        num_attention_heads=config.get("num_attention_heads", defaults.num_attention_heads),
        inner_hidden_size=config.get("inner_hidden_size", 4 * config.get("hidden_size", defaults.hidden_size)),
        layernorm_epsilon=config.get("layernorm_epsilon", defaults.layernorm_epsilon),
        max_sequence_length=config.get("max_sequence_length", defaults.max_sequence_length),
        bos_token_id=config.get("bos_token_id", defaults.bos_token_id),
        eos_token_id=config.get("eos_token_id", defaults.eos_token_id),
        pad_token_id=config.get("pad_token_id", defaults.pad_token_id),
        mask_token_id=config.get("mask_token_id", defaults.mask_token_id),
        gmask_token_id=config.get("gmask_token_id", defaults.gmask_token_id),
        dtype=dtype,
    )


def _glm1_converter(name: str, tensor):
    # Module names equal the checkpoint's; the stored rotary frequencies are recomputed.
    return [] if name.endswith("rotary_emb.inv_freq") else [(name, tensor)]


# -- ChatGLM2 / ChatGLM3 / GLM-4 -----------------------------------------------


def _glm2_tokenizer_and_format(path: Path, family: str):
    from .prompts import ChatGLM2Format, ChatGLM3Format, GLM4Format

    vocabulary = _vocabulary_file(path, "tokenizer.model")
    if family == "glm4":
        from .glm4_tokenizer import GLM4Tokenizer

        try:
            tokenizer = GLM4Tokenizer(vocabulary)
        except ValueError:  # also binascii.Error: not "<base64> <rank>" lines
            raise CheckpointError(f"{path.name}: tokenizer.model is not GLM-4's tiktoken vocabulary") from None
        return tokenizer, GLM4Format(tokenizer)
    from .tokenizers import ChatGLM2Tokenizer

    if family == "chatglm3":
        tokenizer = ChatGLM2Tokenizer(vocabulary, role_tokens=True)
        return tokenizer, ChatGLM3Format(tokenizer)
    tokenizer = ChatGLM2Tokenizer(vocabulary)
    return tokenizer, ChatGLM2Format(tokenizer)


def _load_glm2(path: Path, weight_files: list[Path], config: dict, family: str, dtype, device_map, bits: int = 0):
    from transformers import GlmForCausalLM

    from . import glm2_mapping

    glm2_mapping.check_supported(config, path.name)
    tokenizer, prompt_format = _glm2_tokenizer_and_format(path, family)
    glm_cfg = glm2_mapping.glm_config(config, family, prompt_format.stop_token_ids, dtype)
    convert = glm2_mapping.tensor_converter(glm_cfg, path.name)
    model = _build_and_fill(
        path,
        weight_files,
        GlmForCausalLM,
        glm_cfg,
        convert,
        dtype,
        device_map,
        bits,
        quantized.config_bits(config, path.name),
    )
    return model, tokenizer, prompt_format


# -- shared --------------------------------------------------------------------


def _build_and_fill(
    path: Path,
    weight_files: list[Path],
    model_class,
    model_config,
    convert,
    dtype,
    device_map,
    bits: int = 0,
    stored_bits: int = 0,
):
    """Build on the meta device, stream the weights in, dispatch if split across devices.
    ``bits``: the layers' quantization (0: float); ``stored_bits``: the checkpoint's own."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = model_class(model_config)
    if bits:  # before the device map is planned, so that it sizes the layers as stored
        quantized.replace_with_empty(model, bits, dtype)
        convert = quantized.quantizing_converter(model, convert, path.name, stored_bits)
    placement = weights.resolve_device_map(model, device_map, dtype)
    loaded = weights.load_into(model, weight_files, convert, placement, dtype)
    _fill_missing_head(model, loaded, placement, path)
    weights.place_buffers(model, placement)
    weights.dispatch_if_split(model, placement)
    if bits:
        quantized.release_freed_memory()
    return model


def _fill_missing_head(model, loaded: set[str], placement: dict, path: Path) -> None:
    """A checkpoint without its output layer shares the word embeddings, as tied models do;
    any other missing weight is an incomplete checkpoint."""
    from accelerate.utils import set_module_tensor_to_device

    missing = [name for name, _ in model.named_parameters() if name not in loaded]
    if missing == ["lm_head.weight"]:
        embeddings = model.get_input_embeddings().weight
        set_module_tensor_to_device(
            model, "lm_head.weight", weights.device_for("lm_head.weight", placement), value=embeddings
        )
    elif missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise CheckpointError(f"{path.name}: weights missing from the checkpoint: {shown}")


def _set_generation_defaults(model, prompt_format, tokenizer) -> None:
    """generate() without arguments stops where chat() did and never warns about padding."""
    config = model.generation_config
    config.eos_token_id = list(prompt_format.stop_token_ids)
    config.pad_token_id = tokenizer.pad_token_id
    config.bos_token_id = getattr(tokenizer, "bos_token_id", None)
