"""A tiny Llama trained on sentences of a small grammar, so that its perplexity means something.

Random tiny checkpoints (glmrepl.tiny) score every text near their vocabulary
size. This one is trained for 100 steps on English-like sentences
generated from a fixed grammar, then saved with ``save_pretrained`` like any
checkpoint: on more sentences of the grammar its perplexity is far below the
vocabulary size, and on the same words shuffled it is much higher. That makes
it the yardstick for anything that should leave a model's predictions alone
(quantization, adapters, devices): compare its perplexity before and after.

It uses the tiny checkpoints' tokenizer (byte-level BPE, 500 tokens) with a
BOS token the tokenizer adds, so every window of a perplexity run starts with
one, as in training. Everything is seeded: the same weights every time.
"""

from __future__ import annotations

import random
from pathlib import Path

SEED = 20
BOS = "<s>"
TRAIN_SENTENCES = 1500
STEPS = 100
CONTEXT = 64  # short: a perplexity window then spans several sentences
BLOCK = CONTEXT - 1  # text tokens per training sequence (after the BOS)
BATCH = 16

_DETERMINERS = ("the", "a", "every", "one")
_ADJECTIVES = ("small", "green", "quiet", "old", "bright", "heavy")
_NOUNS = ("cat", "dog", "bird", "farmer", "child", "river", "stone", "tree", "teacher", "boat")
_VERBS = ("sees", "finds", "follows", "carries", "watches", "likes", "pushes", "helps")
_PLACES = ("near the river", "in the garden", "under the tree", "on the hill", "at the market")


def grammar_text(sentences: int, seed: int) -> str:
    """``sentences`` sentences of the grammar, one a line; another seed gives other sentences."""
    rng = random.Random(seed)
    return "\n".join(_sentence(rng) for _ in range(sentences)) + "\n"


def _sentence(rng: random.Random) -> str:
    words = [*_noun_phrase(rng), rng.choice(_VERBS), *_noun_phrase(rng)]
    if rng.random() < 0.4:
        words.append(rng.choice(_PLACES))
    sentence = " ".join(words)
    return sentence[0].upper() + sentence[1:] + "."


def _noun_phrase(rng: random.Random) -> list[str]:
    adjective = [rng.choice(_ADJECTIVES)] if rng.random() < 0.5 else []
    return [rng.choice(_DETERMINERS), *adjective, rng.choice(_NOUNS)]


def build_trained(dest: Path, steps: int = STEPS) -> Path:
    """Train the tiny Llama and save it (config, safetensors, tokenizer) in ``dest``."""
    import torch
    from tokenizers.processors import TemplateProcessing
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from glmrepl.tiny import ENDOFTEXT, _train_byte_level_bpe

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    raw = _train_byte_level_bpe(vocab_size=500, special_tokens=[ENDOFTEXT, BOS])
    bos = raw.token_to_id(BOS)
    raw.post_processor = TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, bos)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token=BOS, eos_token=ENDOFTEXT)
    config = LlamaConfig(
        vocab_size=raw.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=CONTEXT,
        bos_token_id=bos,
        eos_token_id=raw.token_to_id(ENDOFTEXT),
        tie_word_embeddings=False,
        dtype="float32",
    )
    threads = torch.get_num_threads()
    # Matrices this small gain nothing from more threads, and lose much when the cores are busy.
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):  # the caller's random state stays as it was
            torch.manual_seed(SEED)
            model = LlamaForCausalLM(config)
            _train(model, tokenizer.encode(grammar_text(TRAIN_SENTENCES, SEED), add_special_tokens=False), bos, steps)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def _train(model, ids: list[int], bos: int, steps: int) -> None:
    import torch

    data = torch.tensor(ids)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - BLOCK, (BATCH,))
        batch = torch.stack([torch.cat([torch.tensor([bos]), data[s : s + BLOCK]]) for s in starts.tolist()])
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
