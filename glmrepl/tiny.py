"""Tiny random checkpoints: real on-disk layouts, random weights, built in a second.

They load through transformers' Auto classes exactly like a downloaded
checkpoint, so tests, ``make demo`` and benchmarks exercise the real loading
path without a network. Their answers are gibberish: the weights are random.

Everything is deterministic (fixed seeds, one tokenizer corpus) and stored
as float32. torch, transformers and tokenizers are imported inside the
builders so that importing this module costs nothing.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

SEED = 1234

# Mixed prose with accented and CJK text, so that byte-level BPE learns
# multi-byte pieces and streaming code meets characters split across tokens.
CORPUS = """\
The quick brown fox jumps over the lazy dog. A small model answers a small question.
Once upon a time there was a tiny language model that lived in a folder on a laptop.
It had no network, only a config, a tokenizer and some random weights.
Every morning it read its own config.json and counted its parameters again.
Hello! How are you today? I am fine, thank you. What would you like to talk about?
Let us write some code: def add(a, b): return a + b. print(add(2, 3)) prints 5.
The café on the corner serves crème brûlée, a naïve but delicious choice.
Grüße aus München. Ça va très bien, merci. El niño está aquí.
日本の東京は大きな都市です。 こんにちは、世界。 中文也可以：你好，世界！
Numbers matter too: 1, 2, 3, 10, 42, 100, 2024 and 3.14159.
Questions and answers, turns and replies, users and assistants talking in turns.
The assistant said: I am a tiny random model, so my answers make no sense at all.
"""

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

# ChatML; the system turn appears only when the conversation has one.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

DEMO_README = """\
# Tiny random demo checkpoint

This folder is a Qwen2-style chat model with RANDOM weights and a tokenizer
trained on a few paragraphs. It answers gibberish. It exists to show glmrepl
working end to end (loading, streaming, slash commands) without downloading
a real model. Point glmrepl at a real checkpoint folder for real answers.
"""


def build_gpt2(dest: Path) -> Path:
    """Build a GPT-2 base LM (no chat template, vocab.json + merges.txt, pytorch_model.bin)."""
    import torch
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

    dest = _fresh_folder(dest)
    tokenizer = _train_byte_level_bpe(vocab_size=500, special_tokens=[ENDOFTEXT])
    tokenizer.model.save(str(dest))  # writes vocab.json and merges.txt
    eot = tokenizer.token_to_id(ENDOFTEXT)
    _write_json(
        dest / "tokenizer_config.json",
        {
            "tokenizer_class": "GPT2Tokenizer",
            "bos_token": ENDOFTEXT,
            "eos_token": ENDOFTEXT,
            "unk_token": ENDOFTEXT,
            "add_prefix_space": False,
            "model_max_length": 256,
        },
    )
    config = GPT2Config(
        vocab_size=tokenizer.get_vocab_size(),
        n_positions=256,
        n_embd=64,
        n_layer=2,
        n_head=2,
        bos_token_id=eot,
        eos_token_id=eot,
        dtype="float32",
        architectures=["GPT2LMHeadModel"],
    )
    model = _random_model(GPT2LMHeadModel, config)
    config.save_pretrained(dest)
    # transformers 5 only writes safetensors; GPT-2 checkpoints in the wild
    # are often pickled, and the loader must cope with that format too.
    torch.save(model.state_dict(), dest / "pytorch_model.bin")
    GenerationConfig(bos_token_id=eot, eos_token_id=eot).save_pretrained(dest)
    return dest


def build_qwen2_chat(dest: Path) -> Path:
    """Build a Qwen2-style chat model (tokenizer.json, ChatML template, sharded safetensors)."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    dest = _fresh_folder(dest)
    tokenizer = _train_byte_level_bpe(vocab_size=500, special_tokens=[ENDOFTEXT, IM_START, IM_END])
    tokenizer.save(str(dest / "tokenizer.json"))
    eot, im_end = tokenizer.token_to_id(ENDOFTEXT), tokenizer.token_to_id(IM_END)
    _write_json(
        dest / "tokenizer_config.json",
        {
            "tokenizer_class": "Qwen2Tokenizer",
            "bos_token": None,
            "eos_token": IM_END,
            "pad_token": ENDOFTEXT,
            "unk_token": None,
            "add_prefix_space": False,
            "errors": "replace",
            "model_max_length": 512,
            "chat_template": CHATML_TEMPLATE,
        },
    )
    config = Qwen2Config(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=eot,
        eos_token_id=im_end,
        pad_token_id=eot,
        dtype="float32",
    )
    model = _random_model(Qwen2ForCausalLM, config)
    # A small shard size forces an index and several shards, as in real releases.
    with _no_progress_bars():  # transformers draws one for writing the shards: noise on `make demo`
        model.save_pretrained(dest, max_shard_size="200KB")
    GenerationConfig(bos_token_id=eot, eos_token_id=[im_end, eot], pad_token_id=eot).save_pretrained(dest)
    return dest


def build_demo(dest: Path) -> Path:
    """Build the checkpoint ``make demo`` chats with, with a README saying it is random."""
    dest = build_qwen2_chat(dest)
    (dest / "README.md").write_text(DEMO_README, encoding="utf-8")
    return dest


@contextlib.contextmanager
def _no_progress_bars():
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()


def _fresh_folder(dest: Path) -> Path:
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    return dest


def _train_byte_level_bpe(vocab_size: int, special_tokens: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        # Every byte gets a token, so any text (emoji included) can be encoded.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS.splitlines(), trainer)
    return tokenizer


def _random_model(model_class, config):
    import torch

    # fork_rng keeps the caller's random state untouched by our fixed seed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = model_class(config)
    return model.to(torch.float32).eval()


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
