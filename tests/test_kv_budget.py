"""One memory budget for KV caches; a cache is copied when a reply starts, never when it is admitted;
a cached prefix serves only requests of its own namespace."""

from __future__ import annotations

import dataclasses

import pytest
from support import request

from glmrepl.engine.backend import LocalBackend
from glmrepl.engine.conversation.chat import ChatSession
from glmrepl.engine.generation.batching import DEFAULT_CACHE_BYTES
from glmrepl.engine.models.loading import LoadOptions
from glmrepl.engine.settings import Settings

GREEDY = Settings({"max_new_tokens": 4, "do_sample": False})
SYSTEM = "You are a careful assistant who answers in one short sentence. " * 4


@pytest.fixture
def backend(qwen_checkpoint):
    backend = LocalBackend()
    backend.load_and_wait(LoadOptions(mode="cpu", dtype="float32").for_model(qwen_checkpoint, "qwen"))
    backend.set_kv_budget(64 * 2**20)
    yield backend
    backend.stop()


def conversation(question: str) -> ChatSession:
    session = ChatSession()
    session.system = SYSTEM
    session.add_user(question)
    return session


def ask(backend: LocalBackend, question: str, namespace: str = "") -> int:
    """The reply's reused prompt tokens."""
    asked = dataclasses.replace(request(conversation(question), GREEDY), cache_namespace=namespace)
    with backend.generate(asked) as reply:
        "".join(reply)
    return reply.stats.reused_tokens


def test_the_batch_pool_and_the_prefix_caches_share_one_budget(backend):
    backend.enable_batching(8)
    backend.set_kv_budget(3 * 2**30)
    kv = backend.kv_status()
    assert kv["budget_bytes"] == 3 * 2**30
    assert backend.scheduler.cache_bytes == DEFAULT_CACHE_BYTES  # the pool's share: half, at most 512 MiB
    assert kv["prefix_cache"]["max_bytes"] == 3 * 2**30 - DEFAULT_CACHE_BYTES
    backend.set_kv_budget(3 * 2**30, prefix_cap_bytes=100 * 2**20)
    assert backend.kv_status()["prefix_cache"]["max_bytes"] == 100 * 2**20
    backend.set_kv_budget(64 * 2**20)
    assert backend.scheduler.cache_bytes + backend.kv_status()["prefix_cache"]["max_bytes"] == 64 * 2**20


def test_a_warmed_batch_holds_its_pool_before_any_reply_and_replies_still_come(backend):
    backend.enable_batching(8)
    backend.set_kv_budget(64 * 2**20)
    assert backend.scheduler.batch_pool_bytes == 0
    backend.warm_batch()
    backend.scheduler.call(lambda: None)  # the model thread's queue is first in, first out
    assert backend.scheduler.batch_running
    assert backend.scheduler.batch_pool_bytes > 0 and backend.batching_status()["why_not"] is None
    assert ask(backend, "What is a cache?") == 0  # a lone reply decodes beside the idle batch


def test_the_batch_pool_holds_no_more_than_its_replies_can_fill(backend):
    from glmrepl.engine.generation.batching import PAGE_SIZE, kv_bytes_per_token

    model = backend.manager.current.model
    per_token = kv_bytes_per_token(model.config, 4)
    context = model.config.max_position_embeddings
    backend.enable_batching(4)
    backend.set_kv_budget(3 * 2**30)  # a share far beyond four whole contexts of the tiny model
    backend.warm_batch()
    backend.scheduler.call(lambda: None)
    assert backend.scheduler.batch_pool_bytes == -(-4 * context // PAGE_SIZE) * PAGE_SIZE * per_token
    assert backend.scheduler.batch_pool_bytes < DEFAULT_CACHE_BYTES // 8


def test_no_batch_is_warmed_while_batching_is_off(backend):
    backend.warm_batch()
    backend.scheduler.call(lambda: None)
    assert not backend.scheduler.batch_running


def test_admitted_replies_copy_no_cache_until_they_start(backend):
    ask(backend, "hello there")  # leaves the shared system prompt's cache behind
    cached = backend.prefixes.nbytes
    assert cached > 0 and backend.prefixes.tokens_reused == 0
    planned = [backend.generate(request(conversation(f"question {i}"), GREEDY)) for i in range(6)]
    assert backend.prefixes.tokens_reused == 0  # admitted, not started: nothing copied, nothing counted
    for reply in planned[1:]:
        reply.close()  # never started: never counted
    assert backend.prefixes.tokens_reused == 0
    with planned[0]:
        "".join(planned[0])
    assert planned[0].stats.reused_tokens > 0
    assert backend.prefixes.tokens_reused == planned[0].stats.reused_tokens  # counts what was reused


def test_a_cached_prefix_serves_only_its_own_namespace(backend):
    assert ask(backend, "hello there", namespace="alice") == 0
    assert ask(backend, "hello there", namespace="bob") == 0  # alice's system prompt is not bob's cache
    assert ask(backend, "something else", namespace="alice") > 0
    assert ask(backend, "something else", namespace="bob") > 0


def test_a_refused_quantize_keeps_the_caches(backend):
    from glmrepl.engine.errors import GlmreplError

    backend.quantize(8)
    ask(backend, "hello there")
    cached = len(backend.prefixes)
    assert cached
    with pytest.raises(GlmreplError, match="already quantized to int8"):
        backend.quantize(4)
    assert len(backend.prefixes) == cached  # nothing changed, so nothing was thrown away
    assert ask(backend, "something else") > 0
