"""Tokens shown on their own (/next): partial characters as <0xE4> bytes, never U+FFFD."""

import re

from glmrepl.engine.conversation.tokens import escape_partial_characters, token_label


def test_partial_utf8_is_shown_as_byte_escapes():
    assert escape_partial_characters("日".encode()[:2]) == "<0xE6><0x97>"
    assert escape_partial_characters(b"a" + "本".encode() + b"\xe4") == "a本<0xE4>"
    assert escape_partial_characters(b"plain") == "plain"


def label_bytes(label: str) -> bytes:
    parts = re.split(r"(<0x[0-9A-F]{2}>)", label)
    return b"".join(bytes([int(p[3:5], 16)]) if p.startswith("<0x") else p.encode() for p in parts)


def test_byte_level_tokens_of_a_cjk_character(qwen_checkpoint):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen_checkpoint)
    ids = tokenizer.encode("東京")
    labels = [token_label(tokenizer, i, tokenizer.decode([i])) for i in ids]
    assert "\ufffd" not in "".join(labels) and any("<0x" in label for label in labels)
    assert b"".join(map(label_bytes, labels)) == "東京".encode()  # the escapes are the token's real bytes
    assert token_label(tokenizer, ids[0], "text") == "text"  # whole characters are left alone


def test_sentencepiece_byte_fallback_pieces():
    class Pieces:
        def convert_ids_to_tokens(self, token_id):
            return {7: "<0xE4>", 8: "▁hello"}[token_id]

    assert token_label(Pieces(), 7, "\ufffd") == "<0xE4>"
    assert token_label(Pieces(), 8, "\ufffd") == "\ufffd"  # no bytes known: the text as decoded


def test_next_shows_no_replacement_characters(qwen_checkpoint):
    from support import loaded_app

    from glmrepl.repl.commands import TABLE

    app = loaded_app(qwen_checkpoint)
    app.session.add_user("日本の東京")
    table = TABLE.dispatch(app, "/next 100")
    tokenizer = app.manager.current.tokenizer
    assert any("\ufffd" in tokenizer.decode([int(row[1])]) for row in table.rows)  # the case this is about
    assert not any("\ufffd" in row[0] for row in table.rows)
    assert any("<0x" in row[0] for row in table.rows)
