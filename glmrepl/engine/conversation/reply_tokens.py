"""A reply's own token ids, put back into the next prompt in place of its re-tokenized text.

The next turn's prompt holds the last reply as text, and tokenizing that text
seldom gives the ids the model generated (a model may write "hel" + "lo" where
the tokenizer merges "hello"). The cached keys and values are those of the
generated ids, so a re-tokenized reply would end the reusable prefix where the
reply starts and every turn would read every reply again. As llama.cpp's REPL
does, the prompt keeps a reply as the ids the model wrote: the same text, one
valid tokenization of it, and the one the model has already read.

Safety: a spliced prompt is used only when it decodes to exactly the text of
the freshly built one; anything else (a template that rewrites a reply, a
marker that does not survive tokenization) falls back to the fresh prompt.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

# Stands for a reply while the prompt is built: a plane-15 private-use character, never in real
# text, which byte-level tokenizers keep apart from the template's text around it.
MARKER = "\U000f0000"
DEFAULT_MAX_IDS = 1 << 20  # 4096 replies of 256 ids, with their texts: about 46 MB
# Each reply also costs its text, its key and its entry, a few hundred bytes however few its ids:
# bounded by ids alone, a million one-token replies (one a cache namespace) would hold 350-600 MB.
DEFAULT_MAX_REPLIES = 4096
# How far back from a reply's end to look for ids that end where its text does.
MAX_TRAILING_IDS = 48


class ReplyTokens:
    """Recent replies' text and the ids that made it, least recently used dropped first, by cache
    namespace: a client never learns from a prompt's length that another received some text."""

    def __init__(self, max_ids: int = DEFAULT_MAX_IDS, max_replies: int = DEFAULT_MAX_REPLIES):
        self.max_ids = max_ids
        self.max_replies = max_replies
        self._replies: OrderedDict[tuple[str, str], tuple[int, ...]] = OrderedDict()
        self._held = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._replies)

    def remember(self, text: str, ids: list[int], namespace: str = "") -> None:
        if not text or not ids or len(ids) > self.max_ids:
            return
        with self._lock:
            old = self._replies.pop((namespace, text), None)
            self._held -= len(old) if old else 0
            self._replies[namespace, text] = tuple(ids)
            self._held += len(ids)
            while self._held > self.max_ids or len(self._replies) > self.max_replies:
                _, dropped = self._replies.popitem(last=False)
                self._held -= len(dropped)

    def lookup(self, text: str, namespace: str = "") -> tuple[int, ...] | None:
        with self._lock:
            ids = self._replies.get((namespace, text))
            if ids is not None:
                self._replies.move_to_end((namespace, text))
            return ids

    def clear(self) -> None:
        with self._lock:
            self._replies.clear()
            self._held = 0


def reply_ids(tokenizer: Any, new_ids: list[int], stop_ids: list[int], text: str) -> list[int] | None:
    """Ids that stand for ``text`` exactly, as many of them generated ones as can be; or None.

    The end-of-turn id is left to the template. The text shown may leave out the last few ids
    (trailing spaces, a character the length limit cut in two) or end inside one (an id holding a
    character's last byte and the cut one's first): then the ids before it stand for the text's
    beginning and its last characters are tokenized again. A text that is not what the ids begin
    with (a stripped start) has none.
    """
    ids = list(new_ids)
    while ids and ids[-1] in stop_ids:
        ids.pop()
    hidden = _special_ids(tokenizer)
    for kept in range(len(ids), max(len(ids) - MAX_TRAILING_IDS, 0), -1):
        head = _shown(tokenizer, ids[:kept], hidden)
        if head == text:
            return ids[:kept]
        if text.startswith(head):
            candidate = ids[:kept] + tokenizer.encode(text[len(head) :], add_special_tokens=False)
            if _shown(tokenizer, candidate, hidden) == text:
                return candidate
    return None


def splice_replies(
    prompt_format: Any, messages: list[dict], fresh: list[int], memory: ReplyTokens, namespace: str = ""
) -> list[int]:
    """``fresh`` (the prompt built from ``messages``) with each remembered reply of ``namespace`` as
    the ids the model generated; ``fresh`` itself unless the result decodes to the same text."""
    known = [memory.lookup(m["content"], namespace) if m.get("role") == "assistant" else None for m in messages]
    replies = [ids for ids in known if ids]
    if not replies:
        return fresh
    tokenizer = prompt_format.tokenizer
    marked = [dict(m, content=MARKER) if ids else m for m, ids in zip(messages, known)]
    try:
        pieces = _split(prompt_format.build(marked), tokenizer.encode(MARKER, add_special_tokens=False))
    except Exception:  # a template that refuses the marked conversation: keep the fresh prompt
        return fresh
    if pieces is None or len(pieces) != len(replies) + 1:
        return fresh
    hidden = _special_ids(tokenizer)
    spliced, visible = list(pieces[0]), list(pieces[0])
    for ids, piece in zip(replies, pieces[1:]):
        spliced += [*ids, *piece]
        visible += [*(i for i in ids if i not in hidden), *piece]
    # The replies' own special ids (the text shows none) are the only difference allowed.
    if spliced == fresh or _decoded(tokenizer, visible) != _decoded(tokenizer, fresh):
        return fresh
    return spliced


def _split(ids: list[int], marker: list[int]) -> list[list[int]] | None:
    """``ids`` cut at each occurrence of ``marker`` (None for an empty marker)."""
    if not marker:
        return None
    pieces, start, index, width = [], 0, 0, len(marker)
    while index <= len(ids) - width:
        if ids[index] == marker[0] and ids[index : index + width] == marker:
            pieces.append(ids[start:index])
            index += width
            start = index
        else:
            index += 1
    pieces.append(ids[start:])
    return pieces


def _special_ids(tokenizer: Any) -> frozenset[int]:
    """Ids a reply's text leaves out (it is decoded skipping special tokens): the named special
    tokens and the added tokens marked special (Qwen's <|im_start|> is only the latter)."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    flagged = (index for index, token in added.items() if getattr(token, "special", False))
    return frozenset((*(getattr(tokenizer, "all_special_ids", None) or ()), *flagged))


def _shown(tokenizer: Any, ids: list[int], hidden: frozenset[int]) -> str:
    """The text of ``ids`` as a reply shows it."""
    return _decoded(tokenizer, [i for i in ids if i not in hidden])


def _decoded(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
