"""The benchmark checkpoint: Qwen2-0.5B's shape, random weights, bfloat16 safetensors.

Built once into the cache directory and reused; a marker file written last
means a half-written folder (an interrupted build) is rebuilt, never loaded.
A smoke run (``--smoke``) builds the same kind of folder at a few MB.
"""

from __future__ import annotations

import json
import os
from itertools import product
from pathlib import Path

from glmrepl import tiny

QWEN2_0_5B_SHAPE = dict(
    hidden_size=896,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    intermediate_size=4864,
    vocab_size=151936,
    tie_word_embeddings=True,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
)
# The same layout, tokenizer and storage, small enough to build and decode in moments. A head of
# 64 values as in the real shape; widths that divide into the quantizers' groups (64, 32).
SMOKE_SHAPE = QWEN2_0_5B_SHAPE | dict(
    hidden_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    intermediate_size=256,
    vocab_size=1024,
)
READY_MARKER = ".complete"


def shape(smoke: bool = False) -> dict:
    return SMOKE_SHAPE if smoke else QWEN2_0_5B_SHAPE


def ensure_checkpoint(cache: Path, smoke: bool = False) -> Path:
    """The 0.5B checkpoint folder (or the smoke run's), built on first use."""
    dest = Path(cache) / ("qwen2-smoke-random" if smoke else "qwen2-0.5b-random")
    if not (dest / READY_MARKER).exists():
        build_checkpoint(dest, shape(smoke))
    return dest


def ensure_twin(original: Path) -> Path:
    """A second checkpoint for swap tests: hard links (no extra disk), a different folder."""
    twin = original.with_name(original.name + "-twin")
    if not (twin / READY_MARKER).exists():
        twin.mkdir(parents=True, exist_ok=True)
        items = [item for item in original.iterdir() if item.name != READY_MARKER]
        for item in items + [original / READY_MARKER]:  # the marker last, as in a build
            target = twin / item.name
            if not target.exists():
                os.link(item, target)
    return twin


def build_checkpoint(dest: Path, sizes: dict = QWEN2_0_5B_SHAPE) -> None:
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    dest.mkdir(parents=True, exist_ok=True)
    tokenizer = padded_tokenizer(sizes["vocab_size"])
    tokenizer.save(str(dest / "tokenizer.json"))
    eot, im_end = tokenizer.token_to_id(tiny.ENDOFTEXT), tokenizer.token_to_id(tiny.IM_END)
    (dest / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n")
    config = Qwen2Config(**sizes, bos_token_id=eot, eos_token_id=im_end, pad_token_id=eot, dtype="bfloat16")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tiny.SEED)
        # Built directly in bfloat16: half the memory and time of a float32 init.
        torch.set_default_dtype(torch.bfloat16)
        try:
            model = Qwen2ForCausalLM(config)
        finally:
            torch.set_default_dtype(torch.float32)
    model.save_pretrained(dest)
    GenerationConfig(bos_token_id=eot, eos_token_id=[im_end, eot], pad_token_id=eot).save_pretrained(dest)
    (dest / READY_MARKER).write_text("")


def padded_tokenizer(vocab_size: int):
    """glmrepl's tiny trained byte-level BPE, its vocabulary padded to the model's size.

    Real Qwen2 ids decode to a few bytes each; padding with byte-level strings
    (pairs, then triples, of the byte alphabet) keeps every id the random model
    emits decodable, so streaming does the work it does with a real model.
    """
    from tokenizers import Tokenizer

    trained = tiny._train_byte_level_bpe(vocab_size=500, special_tokens=[tiny.ENDOFTEXT, tiny.IM_START, tiny.IM_END])
    data = json.loads(trained.to_str())
    vocab = data["model"]["vocab"]
    missing = vocab_size - len(vocab)  # the special tokens are already in the vocabulary
    alphabet = sorted(set("".join(k for k in vocab if len(k) == 1)))
    for length in (2, 3):
        for chars in product(alphabet, repeat=length):
            if missing <= 0:
                break
            piece = "".join(chars)
            if piece not in vocab:
                vocab[piece] = len(vocab)
                missing -= 1
    return Tokenizer.from_str(json.dumps(data))


def tokenizer_config() -> dict:
    return {
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": None,
        "eos_token": tiny.IM_END,
        "pad_token": tiny.ENDOFTEXT,
        "unk_token": None,
        "add_prefix_space": False,
        "errors": "replace",
        "model_max_length": 32768,
        "chat_template": tiny.CHATML_TEMPLATE,
    }
