"""The batch shares KV blocks of equal prompts only between requests of one cache namespace.

Runs go straight to a ``Batcher`` one after another; what they share is read from transformers'
own block ledger: the blocks it holds hashed (kept for reuse) after each request ends.
"""

from __future__ import annotations

import dataclasses

import pytest
from support import request

from glmrepl.engine.backend import LocalBackend
from glmrepl.engine.conversation.chat import ChatSession
from glmrepl.engine.generation.batching import PAGE_SIZE, Batcher
from glmrepl.engine.generation.run import GenerationRun
from glmrepl.engine.models.loading import LoadOptions
from glmrepl.engine.settings import Settings

SYSTEM_PROMPT = "You are the assistant of a small shop. " * 12  # several pages of tokens


@pytest.fixture(scope="module")
def backend(qwen_checkpoint):
    backend = LocalBackend()
    backend.load_and_wait(LoadOptions(mode="cpu", dtype="float32").for_model(qwen_checkpoint, "qwen"))
    yield backend
    backend.stop()


@pytest.fixture
def batcher(backend):
    batcher = Batcher(backend.manager.current.model, 8 * 2**20, 4, lambda: None)
    yield batcher
    batcher.stop()


def prompt_ids(backend: LocalBackend) -> list[int]:
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "hello"}]
    ids = backend.manager.current.prompt_format.build(messages)
    assert len(ids) > 3 * PAGE_SIZE
    return ids


def decode_in_batch(backend: LocalBackend, batcher: Batcher, ids: list[int], namespace: str) -> set[int]:
    """Decode one greedy reply to ``ids`` in the batch; the hashes of the blocks the batch keeps after it."""
    loaded = backend.manager.current
    kwargs = {"max_new_tokens": 4, "do_sample": False}
    run = GenerationRun(loaded.model, loaded.tokenizer, ids, kwargs, [], cache_namespace=namespace)
    batcher.submit(run)
    assert run.done.wait(120) and run.error is None and len(run.made) == 4
    return kept_block_hashes(batcher)


def kept_block_hashes(batcher: Batcher) -> set[int]:
    cache = batcher._manager.batch_processor.cache
    return {
        block_hash for allocator in cache.cache_allocators.values() for block_hash in allocator.ledger.hash_to_block
    }


def test_equal_prompts_share_blocks_within_a_namespace_and_never_across(backend, batcher):
    ids = prompt_ids(backend)
    alice = decode_in_batch(backend, batcher, ids, "0\0alice")
    assert len(alice) >= 3  # the prompt's whole pages, kept for a later request to share
    assert decode_in_batch(backend, batcher, ids, "0\0alice") == alice  # shared: not one block more
    after_bob = decode_in_batch(backend, batcher, ids, "1\0")  # another key, the same prompt
    bob = after_bob - alice
    assert len(bob) == len(alice) and after_bob == alice | bob  # all its own: nothing shared
    after_default = decode_in_batch(backend, batcher, ids, "")
    assert len(after_default) == 3 * len(alice)  # and the unnamed namespace is a third one
    assert decode_in_batch(backend, batcher, ids, "") == after_default
    assert decode_in_batch(backend, batcher, ids, "1\0") == after_default


def test_the_unnamed_namespace_hashes_blocks_as_transformers_does(backend, batcher):
    from transformers.generation.continuous_batching.cache_allocators import cache_allocator

    ids = prompt_ids(backend)
    kept = decode_in_batch(backend, batcher, ids, "")
    first = cache_allocator.compute_block_hash(None, ids[:PAGE_SIZE])  # outside the batch: transformers' hash
    assert first in kept


def test_a_request_s_namespace_reaches_its_run(backend):
    session = ChatSession()
    session.add_user("hello")
    asked = dataclasses.replace(request(session, Settings({"max_new_tokens": 2})), cache_namespace="2\0salt")
    with backend.generate(asked) as reply:
        assert reply.run.cache_namespace == "2\0salt"


def test_with_the_prefix_caches_off_the_batch_shares_no_blocks(backend):
    """`--prefix-cache-mb 0` (a prefix cap of 0 bytes) turns every reuse off, the batch's too."""
    backend.set_kv_budget(64 * 2**20, 0)
    try:
        assert backend.scheduler.share_prompt_blocks is False
        batcher = Batcher(
            backend.manager.current.model, 8 * 2**20, 4, lambda: None, backend.scheduler.share_prompt_blocks
        )
        try:
            assert decode_in_batch(backend, batcher, prompt_ids(backend), "") == set()
        finally:
            batcher.stop()
    finally:
        backend.set_kv_budget(64 * 2**20, None)
    assert backend.scheduler.share_prompt_blocks is True
