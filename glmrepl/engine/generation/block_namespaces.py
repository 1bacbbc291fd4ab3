"""Requests in different cache namespaces never share KV blocks in the batch.

transformers' paged cache shares a block between requests whose prompts agree up to its end:
each full block is keyed by a hash chained from the block before it, the first block's chain
starting from nothing. A request whose prompt's first blocks are found skips reading them, which
shows in how soon its first token comes: shared across clients, it would tell one client what
another's prompt begins with. Here each namespace's chains start from a seed of its own (the
namespace "" keeps transformers' start), so equal prompts in two namespaces have different keys
and share nothing, while requests of one namespace share as before.

The allocators hash with their module's ``compute_block_hash``, only while the cache matches a
new request's prompt (``search_prefix_match``) or registers the blocks a step completed
(``mark_complete_blocks``), both on the batch's own thread. Those two are wrapped on the cache the
manager makes, so that meanwhile that function starts a chain from the request's seed.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import threading
from collections.abc import Callable, Iterator
from typing import Any

# The seed the chains being hashed on this thread start from (None: transformers' own start).
_chain_start = threading.local()
_transformers_block_hash: Callable[[int | None, list[int]], int] | None = None


def namespace_seed(namespace: str) -> int | None:
    """The 64-bit start of a namespace's chains; None for "" (the chains transformers makes)."""
    if not namespace:
        return None
    digest = hashlib.blake2b(namespace.encode("utf-8", "surrogatepass"), digest_size=8, person=b"glmrepl-blocks")
    return int.from_bytes(digest.digest(), "little")


class BlockNamespaces:
    """The namespace of each request in one batch, by request id, kept as its seed."""

    def __init__(self) -> None:
        self._seeds: dict[str, int | None] = {}

    def add(self, request_id: str, namespace: str) -> None:
        self._seeds[request_id] = namespace_seed(namespace)

    def forget(self, request_id: str) -> None:
        self._seeds.pop(request_id, None)

    def clear(self) -> None:
        self._seeds.clear()

    def seed_of(self, request_id: Any) -> int | None:
        """A request no longer known (taken out while the batch still steps it) gets a seed no
        other has: its blocks then match nothing, and nothing matches them."""
        try:
            return self._seeds[request_id]
        except KeyError:
            return secrets.randbits(64)


def namespaces_supported() -> bool:
    """Whether this transformers hashes blocks where ``separate_namespaces`` expects; if not, the
    batch must share no blocks at all (``allow_block_sharing=False``)."""
    try:
        from transformers.generation.continuous_batching.cache import PagedAttentionCache
        from transformers.generation.continuous_batching.cache_allocators import cache_allocator
        from transformers.generation.continuous_batching.continuous_api import ContinuousBatchingManager
    except ImportError:
        return False
    needed = (
        (cache_allocator, "compute_block_hash"),
        (PagedAttentionCache, "search_prefix_match"),
        (PagedAttentionCache, "mark_complete_blocks"),
        (ContinuousBatchingManager, "_create_batch_processor"),
    )
    return all(callable(getattr(owner, name, None)) for owner, name in needed)


def separate_namespaces(manager: Any, namespaces: BlockNamespaces) -> None:
    """Make the cache ``manager`` creates (in its own thread, when it starts) keep the blocks of
    ``namespaces`` apart. Call only where ``namespaces_supported()``."""
    _install_seeded_block_hash()
    create = manager._create_batch_processor

    def create_with_namespaces() -> Any:
        processor = create()
        _wrap_cache(processor.cache, namespaces)
        return processor

    manager._create_batch_processor = create_with_namespaces


def _wrap_cache(cache: Any, namespaces: BlockNamespaces) -> None:
    if getattr(cache, "_glmrepl_namespaces", False):
        return  # a manager restarted reuses its processor and cache, wrapped the first time
    search, mark = cache.search_prefix_match, cache.mark_complete_blocks

    def search_prefix_match(request_id: str, *args: Any, **kwargs: Any) -> Any:
        with _chains_from(namespaces.seed_of(request_id)):
            return search(request_id, *args, **kwargs)

    def mark_complete_blocks(state: Any, *args: Any, **kwargs: Any) -> Any:
        with _chains_from(namespaces.seed_of(getattr(state, "request_id", None))):
            return mark(state, *args, **kwargs)

    cache.search_prefix_match = search_prefix_match
    cache.mark_complete_blocks = mark_complete_blocks
    cache._glmrepl_namespaces = True


@contextlib.contextmanager
def _chains_from(seed: int | None) -> Iterator[None]:
    before = getattr(_chain_start, "seed", None)
    _chain_start.seed = seed
    try:
        yield
    finally:
        _chain_start.seed = before


def _seeded_block_hash(parent_hash: int | None, tokens: list[int]) -> int:
    """transformers' block hash, a chain's first block chained from the seed set on this thread."""
    assert _transformers_block_hash is not None
    if parent_hash is None:
        parent_hash = getattr(_chain_start, "seed", None)
    return _transformers_block_hash(parent_hash, tokens)


def _install_seeded_block_hash() -> None:
    """Once per process: with no seed set (every caller but the wrapped cache) it hashes as before."""
    global _transformers_block_hash
    from transformers.generation.continuous_batching.cache_allocators import cache_allocator

    if cache_allocator.compute_block_hash is not _seeded_block_hash:
        _transformers_block_hash = cache_allocator.compute_block_hash
        cache_allocator.compute_block_hash = _seeded_block_hash
