"""GLM-4's tokenizer: byte-level BPE over a tiktoken-style ``tokenizer.model``.

The file holds one ``<base64 bytes> <rank>`` line per token. Text is split by
the GPT-4-style pattern below, each piece is looked up whole and otherwise
merged pairwise, lowest rank first (leftmost on ties), as tiktoken does. The
special tokens are numbered after the vocabulary. Pure Python: prompts of a
chat are short, and pieces repeat, so they are cached.
"""

from __future__ import annotations

import base64
from functools import lru_cache
from pathlib import Path

import regex

SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GLM4_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
)


def read_ranks(file: Path) -> dict[bytes, int]:
    ranks = {}
    with open(file, "rb") as handle:
        for line in handle:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    return ranks


class GLM4Tokenizer:
    def __init__(self, model_file: Path):
        self.ranks = read_ranks(model_file)
        self.tokens = {rank: token for token, rank in self.ranks.items()}
        first = max(self.tokens) + 1
        self.special_tokens = {token: first + offset for offset, token in enumerate(GLM4_SPECIAL_TOKENS)}
        self.special_token_names = {index: token for token, index in self.special_tokens.items()}
        self.all_special_ids = set(self.special_token_names)
        self.eos_token_id = self.pad_token_id = self.special_tokens["<|endoftext|>"]
        self.bos_token_id = None
        self.name_or_path = str(Path(model_file).parent)
        self._pattern = regex.compile(SPLIT_PATTERN)
        self._encode_piece = lru_cache(maxsize=65536)(self._merge)

    @property
    def vocab_size(self) -> int:
        return max(self.special_token_names) + 1

    def __len__(self) -> int:
        return self.vocab_size

    def get_command(self, token: str) -> int:
        return self.special_tokens[token]

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = [self.get_command("[gMASK]"), self.get_command("<sop>")] if add_special_tokens else []
        for piece in self._pattern.findall(text):
            ids.extend(self._encode_piece(piece.encode("utf-8")))
        return ids

    def _merge(self, piece: bytes) -> tuple[int, ...]:
        if piece in self.ranks:
            return (self.ranks[piece],)
        parts = [piece[i : i + 1] for i in range(len(piece))]
        while len(parts) > 1:
            pair_ranks = [self.ranks.get(parts[i] + parts[i + 1]) for i in range(len(parts) - 1)]
            candidates = [(rank, i) for i, rank in enumerate(pair_ranks) if rank is not None]
            if not candidates:
                break
            _, i = min(candidates)
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        return tuple(self.ranks[part] for part in parts)

    def decode(self, ids, skip_special_tokens: bool = True, **_ignored) -> str:
        """As the released tokenizer decodes: skipped special tokens leave the bytes around them
        joined; kept ones split the text into parts, each decoded alone, joined by single spaces."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        ids = [ids] if isinstance(ids, int) else ids
        parts, pending = [], b""
        for index in map(int, ids):
            if index not in self.special_token_names:
                pending += self.tokens.get(index, b"")
            elif not skip_special_tokens:
                parts += [pending.decode("utf-8", errors="replace")] if pending else []
                parts.append(self.special_token_names[index])
                pending = b""
        parts += [pending.decode("utf-8", errors="replace")] if pending else []
        return " ".join(parts)

    def convert_ids_to_tokens(self, ids, skip_special_tokens: bool = False):
        if isinstance(ids, int):
            return self._id_to_token(ids)
        return [self._id_to_token(i) for i in ids if not (skip_special_tokens and i in self.all_special_ids)]

    def id_to_bytes(self, index: int) -> bytes | None:
        """A token's own bytes (its piece writes those that are not a whole character as ``\\xe5``)."""
        return None if index in self.special_token_names else self.tokens.get(index)

    def _id_to_token(self, index: int) -> str:
        if index in self.special_token_names:
            return self.special_token_names[index]
        return self.tokens.get(index, b"").decode("utf-8", errors="backslashreplace")

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            return self.special_tokens.get(tokens, self.ranks.get(tokens.encode("utf-8")))
        return [self.convert_tokens_to_ids(token) for token in tokens]

    def __call__(self, text: str, add_special_tokens: bool = True, **_ignored) -> dict:
        return {"input_ids": self.encode(text, add_special_tokens=add_special_tokens)}

    def batch_decode(self, sequences, **kwargs) -> list[str]:
        return [self.decode(ids, **kwargs) for ids in sequences]
