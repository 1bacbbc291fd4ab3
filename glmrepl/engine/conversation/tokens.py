"""How one token looks on its own, for listings such as /next.

A token is often part of a character: byte-level BPE (GPT-2, Qwen) splits a
CJK character over two or three tokens, and sentencepiece falls back to
``<0xE4>`` byte pieces. Decoded alone such a token is U+FFFD; showing its bytes
as ``<0xE4>`` says what it really is.
"""

from __future__ import annotations

import functools
import re

REPLACEMENT = "\ufffd"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_label(tokenizer, token_id: int, text: str) -> str:
    """``text`` (the token decoded alone), with bytes that are not a whole character shown as ``<0xE4>``."""
    if REPLACEMENT not in text:
        return text
    raw = token_bytes(tokenizer, token_id)
    return text if raw is None else escape_partial_characters(raw)


def token_bytes(tokenizer, token_id: int) -> bytes | None:
    """The raw bytes of a byte-level or byte-fallback token; None when the vocabulary says nothing of bytes."""
    own = getattr(tokenizer, "id_to_bytes", None)  # a tokenizer that keeps its tokens as bytes (GLM-4's)
    if own is not None:
        return own(int(token_id))
    piece = _piece(tokenizer, int(token_id))
    return None if piece is None else _raw_bytes(piece, byte_level=True)


def piece_bytes(tokenizer, token_id: int) -> bytes:
    """The bytes a token adds to the text, for each token of a reply (logprobs' ``bytes``): its
    own bytes where the vocabulary keeps them (GLM-4's, ChatGLM's sentencepiece pieces), its
    byte-level piece's bytes, a sentencepiece piece with its "▁" as a space; else its text alone."""
    own = getattr(tokenizer, "id_to_bytes", None)
    raw = own(int(token_id)) if own is not None else _vocabulary_piece_bytes(tokenizer, int(token_id))
    if raw is not None:
        return raw
    return tokenizer.decode([int(token_id)], skip_special_tokens=False).encode("utf-8")


def _vocabulary_piece_bytes(tokenizer, token_id: int) -> bytes | None:
    piece = _piece(tokenizer, token_id)
    if piece is None or token_id in (getattr(tokenizer, "all_special_ids", None) or ()):
        return None
    raw = _raw_bytes(piece, byte_level=_byte_level(tokenizer))
    if raw is None and "\u2581" in piece:
        return piece.replace("\u2581", " ").encode("utf-8")
    return raw


def _piece(tokenizer, token_id: int) -> str | None:
    """The token's piece in the vocabulary, or None (a tokenizer without pieces, an empty one)."""
    try:
        piece = tokenizer.convert_ids_to_tokens(token_id)
    except Exception:  # noqa: BLE001 - a tokenizer without pieces keeps the decoded text
        return None
    return piece if isinstance(piece, str) and piece else None


def _raw_bytes(piece: str, byte_level: bool) -> bytes | None:
    """A byte-fallback piece's byte ("<0xE4>"), or (``byte_level``) a byte-level piece's bytes."""
    match = _BYTE_PIECE.fullmatch(piece)
    if match:
        return bytes([int(match[1], 16)])
    table = _byte_level_alphabet()
    if byte_level and all(char in table for char in piece):
        return bytes(table[char] for char in piece)
    return None


def _byte_level(tokenizer) -> bool:
    """Whether the tokenizer's pieces stand for bytes (GPT-2's alphabet: "Ġ" is a space)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and "ByteLevel" in str(getattr(backend, "decoder", ""))


def escape_partial_characters(raw: bytes) -> str:
    """Decode UTF-8, writing each byte that is not part of a whole character as ``<0xE4>``."""
    parts = []
    while raw:
        try:
            parts.append(raw.decode("utf-8"))
            break
        except UnicodeDecodeError as error:
            parts.append(raw[: error.start].decode("utf-8"))
            parts.extend(f"<0x{byte:02X}>" for byte in raw[error.start : error.end])
            raw = raw[error.end :]
    return "".join(parts)


@functools.lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
    """The printable stand-in character of each byte in byte-level BPE vocabularies (GPT-2's table), reversed."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    stand_ins = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in stand_ins:
            stand_ins[byte] = chr(256 + extra)
            extra += 1
    return {char: byte for byte, char in stand_ins.items()}
