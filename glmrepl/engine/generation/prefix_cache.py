"""The KV caches of recent replies, so that the next turn reads only its new tokens.

A reply leaves behind the model's cache for its prompt and what it generated.
The next request on the same conversation (the REPL's next turn, an API
client resending the whole history) starts with the same token ids: the cache
is cropped to the longest common prefix and only the rest is prefilled.

A cache belongs to one state of one model: any change to the model (a load,
a move, quantizing, an adapter, another prompt mode) takes the model lease
exclusively, and that empties this store (``ModelManager``), so a cache is
never reused across a model, dtype, device or adapter change. Families whose
prompt tokens attend both ways (ChatGLM-6B) never reuse: a prefix's cache
there depends on what follows it, so only a fresh prefill is exact.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from ..cpu.machine import release_thread_pool

DEFAULT_MAX_BYTES = 1024 * 2**20


@dataclass
class Reuse:
    """A cache to continue (None: prefill everything) and how many prompt tokens it already holds."""

    cache: Any
    tokens: int


@dataclass
class _Entry:
    ids: list[int]
    cache: Any
    nbytes: int
    prompt_length: int  # of the request that left it: a request sharing all of it continues that conversation
    namespace: str = ""  # whose it is: a request in another namespace never reuses it


class PrefixCache:
    """A few caches of recent replies, least recently used dropped first, within a byte budget."""

    def __init__(self, max_entries: int = 2, max_bytes: int | None = DEFAULT_MAX_BYTES):
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._next_key = 0
        self.tokens_reused = 0  # over this store's life, for /health and the tests
        self._lock = threading.Lock()

    def configure(self, max_entries: int, max_bytes: int | None) -> None:
        with self._lock:
            self.max_entries, self.max_bytes = max_entries, max_bytes
            self._shrink()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    @property
    def nbytes(self) -> int:
        return sum(entry.nbytes for entry in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def take(self, ids: list[int], namespace: str = "") -> Reuse:
        """The cache sharing the longest prefix with ``ids``, cropped to it (at least one token left to read).

        A request that shares the entry's whole prompt (the next turn, a retry) takes it
        over; one that only shares its beginning (the same system prompt) gets a copy,
        and the entry stays for the conversation it belongs to.
        """
        with self._lock:
            best_key, best = None, 0
            for key, entry in self._entries.items():
                if entry.namespace != namespace:
                    continue
                shared = _common_prefix(entry.ids, ids)
                if shared > best:
                    best_key, best = key, shared
            reuse = min(best, len(ids) - 1)
            if best_key is None or reuse <= 0:
                return Reuse(None, 0)
            entry = self._entries[best_key]
            if best >= entry.prompt_length:
                del self._entries[best_key]
                cache = entry.cache
            else:
                self._entries.move_to_end(best_key)
                cache = copy.deepcopy(entry.cache)
                release_thread_pool()  # a large copy runs in parallel; the decoding thread should be alone
            self.tokens_reused += reuse
        crop_to(cache, reuse)
        return Reuse(cache, reuse)

    def put(self, ids: list[int], cache: Any, prompt_length: int | None = None, namespace: str = "") -> None:
        """Keep the cache of ``ids`` (what the model has read: the prompt and the reply but its last
        token); ``prompt_length``: how many of them were the request's prompt."""
        if cache is None or not ids or not hasattr(cache, "crop") or self.max_entries < 1:
            return
        length = len(ids) if prompt_length is None else prompt_length
        entry = _Entry(list(ids), cache, cache_bytes(cache), length, namespace)
        with self._lock:
            if self.max_bytes is not None and entry.nbytes > self.max_bytes:
                return
            self._entries[self._next_key] = entry
            self._next_key += 1
            self._shrink()

    def _shrink(self) -> None:
        while len(self._entries) > self.max_entries or (
            self.max_bytes is not None and self._entries and self.nbytes > self.max_bytes
        ):
            self._entries.popitem(last=False)


def crop_to(cache: Any, length: int) -> None:
    """Keep the first ``length`` positions (transformers 5 crops by a negative count to remove)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def reuse_refused(family: str | None) -> str | None:
    """Why this family's caches are never reused, or None."""
    from ..families.traits import traits_of

    return traits_of(family).no_prefix_reuse


def cache_bytes(cache: Any) -> int:
    """Bytes of the key and value tensors a transformers cache holds."""
    total = 0
    for layer in getattr(cache, "layers", ()):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if tensor is not None and hasattr(tensor, "numel"):
                total += tensor.numel() * tensor.element_size()
    return total


def _common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix, by bisection over slice comparisons (done in C)."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low
