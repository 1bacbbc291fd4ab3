"""config.json against itself and against the weights, without loading either.

transformers reports a wrong config late and obscurely: a string where a number belongs is a
"Validation error for field 'hidden_size':" with nothing after it, and a config from another
size of the model is "look at the above report!" once the weights are read. These checks
name the field, or the tensor and both shapes, while the folder is checked.
"""

from __future__ import annotations

from pathlib import Path

# Sizes every decoder config states as a positive whole number (where it states them at all).
WHOLE_NUMBER_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "padded_vocab_size",
    "max_position_embeddings",
    "seq_length",
    "n_embd",
    "n_layer",
    "n_head",
)
# The input embedding's name in the checkpoints glmrepl knows, and the config fields of its two
# sizes: (rows, width).
EMBEDDING_NAMES = (
    "embed_tokens.weight",  # Llama, Qwen2, Mistral...
    "wte.weight",  # GPT-2
    "word_embeddings.weight",  # ChatGLM, BLOOM
)
ROW_FIELDS = ("padded_vocab_size", "vocab_size")
WIDTH_FIELDS = ("embedding_size", "hidden_size", "n_embd", "d_model")


def config_value_problems(config: dict, config_path: Path) -> list[str]:
    """One message per size field that is not a positive whole number."""
    problems = []
    for key in WHOLE_NUMBER_FIELDS:
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append(
                f"{config_path}: {key} must be a positive whole number, not {value!r}: "
                "fix it, or download config.json again"
            )
    return problems


def embedding_of(header: dict) -> tuple[str, list[int]] | None:
    """The input embedding's name and shape in a safetensors header, if it holds one."""
    for name, entry in header.items():
        if isinstance(entry, dict) and name.endswith(EMBEDDING_NAMES):
            shape = entry.get("shape")
            if isinstance(shape, list) and len(shape) == 2 and all(isinstance(d, int) for d in shape):
                return name, shape
    return None


def embedding_problem(config: dict, config_path: Path, file: Path, name: str, shape: list[int]) -> str | None:
    """Where config.json's sizes disagree with the embedding's shape in the weights."""
    expected = [_first_size(config, ROW_FIELDS), _first_size(config, WIDTH_FIELDS)]
    if None in expected or expected == shape:
        return None
    fields = [f"{key} {config[key]}" for key in (*ROW_FIELDS, *WIDTH_FIELDS) if isinstance(config.get(key), int)]
    return (
        f"{config_path} does not match the weights: {file.name} holds {name} as {shape}, the config "
        f"({', '.join(fields)}) makes it {expected}; config.json is for another model or size: download it again"
    )


def _first_size(config: dict, keys: tuple[str, ...]) -> int | None:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None
