"""ChatGLM tokenizers on sentencepiece, reproducing the released tokenizers' ids.

Two layouts exist:

* ChatGLM-6B (``ice_text.model``): the special tokens are control pieces of
  the sentencepiece model itself. Text is pre-processed before encoding:
  newline becomes the piece ``<n>``, tab ``<|tab|>`` and each run of 2 to 80
  spaces ``<|blank_N|>``. Decoding undoes that and, as the released tokenizer
  did, removes the space before punctuation (" ?" becomes "?").
* ChatGLM2/3 (``tokenizer.model``): plain sentencepiece, with the special
  tokens numbered after the sentencepiece vocabulary ([MASK] [gMASK] [sMASK]
  sop eop, then ChatGLM3's role tokens).

Text given to ``encode`` is always plain text: a user typing "<|user|>" or
"<sop>" gets those characters, never the control token.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import sentencepiece

GLM1_CONTROL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>")
GLM2_SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
GLM3_ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")

_GLM1_MAX_BLANK = 80
# The space clean-up the first generation's tokenizer applied on decode.
_SPACE_BEFORE_PUNCTUATION = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)


def _as_int_list(ids) -> list[int]:
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    return [int(i) for i in ids]


class _SentencePieceBase:
    """What both layouts share: id <-> token conversion and the glmrepl interface."""

    def __init__(self, model_file: Path):
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        self.name_or_path = str(Path(model_file).parent)

    # -- to be provided by each layout --
    all_special_ids: set[int]

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        raise NotImplementedError

    def decode(self, ids, skip_special_tokens: bool = True, **_ignored) -> str:
        raise NotImplementedError

    def _id_to_token(self, index: int) -> str:
        raise NotImplementedError

    def _token_to_id(self, token: str) -> int:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    # -- shared interface --
    def __len__(self) -> int:
        return self.vocab_size

    def __call__(self, text: str, add_special_tokens: bool = True, **_ignored) -> dict:
        return {"input_ids": self.encode(text, add_special_tokens=add_special_tokens)}

    def convert_ids_to_tokens(self, ids, skip_special_tokens: bool = False):
        if isinstance(ids, int):
            return self._id_to_token(ids)
        tokens = [i for i in _as_int_list(ids) if not (skip_special_tokens and i in self.all_special_ids)]
        return [self._id_to_token(i) for i in tokens]

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            return self._token_to_id(tokens)
        return [self._token_to_id(token) for token in tokens]

    def get_vocab(self) -> dict[str, int]:
        return {self._id_to_token(i): i for i in range(self.vocab_size)}

    def batch_decode(self, sequences: Iterable, **kwargs) -> list[str]:
        return [self.decode(ids, **kwargs) for ids in sequences]

    def id_to_bytes(self, index: int) -> bytes | None:
        """The bytes a token adds to the text; None for a special or control token (none)."""
        piece_id = self._piece_id(int(index))
        if piece_id is None or index in self.all_special_ids:
            return None
        if self.sp.is_control(piece_id) or self.sp.is_unknown(piece_id):
            return None
        piece = self.sp.id_to_piece(piece_id)
        if self.sp.is_byte(piece_id):
            return bytes([int(piece[3:5], 16)])
        return self._piece_text(piece).encode("utf-8")

    def _piece_id(self, index: int) -> int | None:
        """The sentencepiece id of a token (None: a token outside sentencepiece's vocabulary)."""
        return index if 0 <= index < self.sp.get_piece_size() else None

    def _piece_text(self, piece: str) -> str:
        return piece.replace("\u2581", " ")


class ChatGLM1Tokenizer(_SentencePieceBase):
    """ChatGLM-6B's ``ice_text.model`` tokenizer."""

    def __init__(self, model_file: Path, num_image_tokens: int = 0):
        super().__init__(model_file)
        # Early releases reserved 20000 ids for image tokens before the text pieces.
        self.num_image_tokens = num_image_tokens
        self.bos_token_id = self._token_to_id("<sop>")
        self.eos_token_id = self._token_to_id("<eop>")
        self.pad_token_id = self._token_to_id("<pad>")
        self.unk_token_id = self._token_to_id("<unk>")
        self.mask_token_id = self._token_to_id("[MASK]")
        self.gmask_token_id = self._token_to_id("[gMASK]")
        # The ids the released tokenizer skipped with skip_special_tokens=True.
        self.all_special_ids = {
            self.bos_token_id,
            self.eos_token_id,
            self.pad_token_id,
            self.unk_token_id,
            self.mask_token_id,
        }

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size() + self.num_image_tokens

    def _id_to_token(self, index: int) -> str:
        if index < self.num_image_tokens:
            return f"<image_{index}>"
        return self.sp.id_to_piece(index - self.num_image_tokens)

    def _token_to_id(self, token: str) -> int:
        return self.sp.piece_to_id(token) + self.num_image_tokens

    def _piece_id(self, index: int) -> int | None:
        return super()._piece_id(index - self.num_image_tokens)

    def _piece_text(self, piece: str) -> str:
        return _glm1_postprocess(super()._piece_text(piece))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = [i + self.num_image_tokens for i in self.sp.encode(_glm1_preprocess(text))]
        if add_special_tokens:
            ids += [self.gmask_token_id, self.bos_token_id]
        return ids

    def decode(self, ids, skip_special_tokens: bool = True, **_ignored) -> str:
        kept = [i for i in _as_int_list(ids) if i != self.pad_token_id]
        if skip_special_tokens:
            kept = [i for i in kept if i not in self.all_special_ids]
        # Image ids have no text; control pieces decode to nothing in sentencepiece.
        pieces = [self._id_to_token(i) for i in kept if i >= self.num_image_tokens]
        text = _glm1_postprocess(self.sp.decode_pieces(pieces))
        for spaced, tight in _SPACE_BEFORE_PUNCTUATION:
            text = text.replace(spaced, tight)
        return text


def _glm1_preprocess(text: str) -> str:
    text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
    for length in range(_GLM1_MAX_BLANK, 1, -1):
        text = text.replace(" " * length, f"<|blank_{length}|>")
    return text


def _glm1_postprocess(text: str) -> str:
    text = text.replace("<n>", "\n").replace("<|tab|>", "\t")
    for length in range(2, _GLM1_MAX_BLANK + 1):
        text = text.replace(f"<|blank_{length}|>", " " * length)
    return text


class ChatGLM2Tokenizer(_SentencePieceBase):
    """ChatGLM2/3's ``tokenizer.model``: special tokens numbered after the sentencepiece pieces.

    ``role_tokens=True`` adds ChatGLM3's ``<|system|>`` ``<|user|>``
    ``<|assistant|>`` ``<|observation|>``.
    """

    def __init__(self, model_file: Path, role_tokens: bool = False):
        super().__init__(model_file)
        specials = GLM2_SPECIAL_TOKENS + (GLM3_ROLE_TOKENS if role_tokens else ())
        first = self.sp.get_piece_size()
        self.special_tokens = {token: first + offset for offset, token in enumerate(specials)}
        self.special_token_names = {index: token for token, index in self.special_tokens.items()}
        # ChatGLM3 decodes its special tokens to their names, ChatGLM2 to nothing.
        self.names_special_tokens = role_tokens
        self.bos_token_id = self.sp.bos_id()
        self.eos_token_id = self.sp.eos_id()
        self.pad_token_id = self.sp.unk_id()
        self.all_special_ids = {self.bos_token_id, self.eos_token_id, self.pad_token_id, *self.special_tokens.values()}

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size() + len(self.special_tokens)

    def get_command(self, token: str) -> int:
        """The id of a special token such as "[gMASK]" or "<|user|>"."""
        return self.special_tokens[token]

    def _id_to_token(self, index: int) -> str:
        if index in self.special_token_names:
            return self.special_token_names[index]
        if (
            index in (self.bos_token_id, self.eos_token_id, self.pad_token_id)
            or not 0 <= index < self.sp.get_piece_size()
        ):
            return ""
        return self.sp.id_to_piece(index)

    def _token_to_id(self, token: str) -> int:
        if token in self.special_tokens:
            return self.special_tokens[token]
        return self.sp.piece_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        if add_special_tokens:
            ids = [self.get_command("[gMASK]"), self.get_command("sop")] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = True, **_ignored) -> str:
        kept = _as_int_list(ids)
        if skip_special_tokens:
            kept = [i for i in kept if i not in self.all_special_ids]
        pieces = []
        for index in kept:
            token = self._id_to_token(index)
            if index in self.special_token_names and not self.names_special_tokens:
                token = ""
            pieces.append(token)
        # Pieces, not ids: a special token's name (not in the vocabulary) is kept verbatim.
        return self.sp.decode_pieces(pieces)
