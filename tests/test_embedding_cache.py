"""The query embedding cache (retrieval_service.usecases.embedding_cache) over a real redis-server.

Unit level: no encoder, no Milvus. The shared Redis is the session's `redis_server` (tests/redis_server.py);
tests that stop or freeze Redis start one of their own. The Redis back-off runs on a test clock, so no test
sleeps or measures time.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import uuid

import numpy as np
import pytest
from prometheus_client import generate_latest
from pydantic import ValidationError

from redis_server import start_redis_server
from retrieval_service.adapters.redis_cache import RedisEmbeddingCache, SharedCacheError
from retrieval_service.metrics import ServiceMetrics
from retrieval_service.usecases.embedding_cache import (
    CacheSettings,
    EmbeddingCache,
    build_shared_cache,
    decode_embedding,
    encode_embedding,
)
from retrieval_service.usecases.types import Embedding

DIM = 8
LOGGER = "retrieval_service.usecases.embedding_cache"


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def emb(seed: int, *, token_count: int = 5, truncated: bool = False, dim: int = DIM) -> Embedding:
    vector = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return Embedding(vector=vector / np.linalg.norm(vector), token_count=token_count, truncated=truncated)


def model() -> str:
    """A model id of its own for each test, so tests sharing the session's Redis never see each other's keys."""
    return f"test-model-{uuid.uuid4().hex[:8]}"


def sample(metrics: ServiceMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def requests(metrics: ServiceMetrics, tier: str, kind: str, result: str) -> float:
    return sample(metrics, "vitrine_embedding_cache_requests_total", tier=tier, kind=kind, result=result)


def shared_for(url: str, settings: CacheSettings) -> RedisEmbeddingCache:
    shared = build_shared_cache(settings.model_copy(update={"redis_url": url}))
    assert shared is not None
    return shared


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


# --- the local LRU ---------------------------------------------------------------------------------------------


async def test_miss_then_hit_with_cached_flag_and_same_values():
    metrics = ServiceMetrics()
    cache = EmbeddingCache(CacheSettings(), observer=metrics)
    key = EmbeddingCache.text_key("m", "a red car")
    assert await cache.get_many([key], "text") == [None]

    original = emb(1, token_count=7, truncated=True)
    await cache.put_many([(key, original)], "text")
    [hit] = await cache.get_many([key], "text")

    assert hit is not None and hit.cached and not original.cached
    assert hit.token_count == 7 and hit.truncated
    assert hit.vector.dtype == np.float32 and np.array_equal(hit.vector, original.vector)
    assert requests(metrics, "local", "text", "miss") == 1
    assert requests(metrics, "local", "text", "hit") == 1
    assert sample(metrics, "vitrine_embedding_cache_entries") == 1
    assert sample(metrics, "vitrine_embedding_cache_bytes") == DIM * 4 + len(key)


async def test_cached_vector_is_a_read_only_copy():
    cache = EmbeddingCache(CacheSettings())
    key = EmbeddingCache.text_key("m", "dog")
    original = emb(2)
    before = original.vector.copy()
    await cache.put_many([(key, original)], "text")
    original.vector[:] = 0.0  # the caller reuses its buffer

    [hit] = await cache.get_many([key], "text")
    assert np.array_equal(hit.vector, before)
    with pytest.raises(ValueError):
        hit.vector[0] = 1.0


async def test_get_many_keeps_order_and_duplicates():
    cache = EmbeddingCache(CacheSettings())
    a, b, c = (EmbeddingCache.text_key("m", t) for t in ("a", "b", "c"))
    await cache.put_many([(a, emb(1)), (c, emb(3))], "text")
    got = await cache.get_many([c, b, a, c], "text")
    assert got[1] is None
    assert np.array_equal(got[0].vector, emb(3).vector) and np.array_equal(got[3].vector, emb(3).vector)
    assert np.array_equal(got[2].vector, emb(1).vector)


async def test_least_recently_used_entry_is_evicted_first():
    metrics = ServiceMetrics()
    cache = EmbeddingCache(CacheSettings(max_entries=2), observer=metrics)
    a, b, c = (EmbeddingCache.text_key("m", t) for t in ("a", "b", "c"))
    await cache.put_many([(a, emb(1)), (b, emb(2))], "text")
    await cache.get_many([a], "text")  # a is now more recent than b
    await cache.put_many([(c, emb(3))], "text")

    got = await cache.get_many([a, b, c], "text")
    assert got[0] is not None and got[1] is None and got[2] is not None
    assert len(cache) == 2
    assert sample(metrics, "vitrine_embedding_cache_evictions_total", kind="text") == 1
    assert sample(metrics, "vitrine_embedding_cache_evictions_total", kind="image") == 0


async def test_byte_bound_evicts_and_counts_vector_and_key_bytes():
    metrics = ServiceMetrics()
    key_len = len(EmbeddingCache.text_key("m", "x"))
    entry = 512 * 4 + key_len
    cache = EmbeddingCache(CacheSettings(max_entries=100, max_bytes=3 * entry - 1), observer=metrics)
    keys = [EmbeddingCache.text_key("m", str(i)) for i in range(3)]
    for i, key in enumerate(keys):
        await cache.put_many([(key, emb(i, dim=512))], "text")

    assert len(cache) == 2 and cache.nbytes == 2 * entry
    assert (await cache.get_many(keys[:1], "text")) == [None]  # the oldest went
    assert all(e is not None for e in await cache.get_many(keys[1:], "text"))
    assert sample(metrics, "vitrine_embedding_cache_bytes") == 2 * entry
    assert sample(metrics, "vitrine_embedding_cache_entries") == 2
    assert sample(metrics, "vitrine_embedding_cache_evictions_total", kind="text") == 1


async def test_evictions_are_counted_by_the_evicted_entrys_kind():
    metrics = ServiceMetrics()
    cache = EmbeddingCache(CacheSettings(max_entries=1), observer=metrics)
    await cache.put_many([(EmbeddingCache.image_key("m", b"png"), emb(1, token_count=0))], "image")
    await cache.put_many([(EmbeddingCache.text_key("m", "t"), emb(2))], "text")
    assert sample(metrics, "vitrine_embedding_cache_evictions_total", kind="image") == 1
    assert sample(metrics, "vitrine_embedding_cache_evictions_total", kind="text") == 0


async def test_an_entry_larger_than_max_bytes_is_not_kept():
    cache = EmbeddingCache(CacheSettings(max_bytes=100))
    small, big = EmbeddingCache.text_key("m", "small"), EmbeddingCache.text_key("m", "big")
    await cache.put_many([(small, emb(1, dim=2))], "text")
    await cache.put_many([(big, emb(2, dim=512))], "text")
    got = await cache.get_many([small, big], "text")
    assert got[0] is not None and got[1] is None  # and the small one was not evicted for it


async def test_replacing_a_key_does_not_double_count_its_bytes():
    cache = EmbeddingCache(CacheSettings())
    key = EmbeddingCache.text_key("m", "again")
    await cache.put_many([(key, emb(1))], "text")
    await cache.put_many([(key, emb(2))], "text")
    assert len(cache) == 1 and cache.nbytes == DIM * 4 + len(key)
    [hit] = await cache.get_many([key], "text")
    assert np.array_equal(hit.vector, emb(2).vector)


async def test_zero_bounds_disable_the_cache():
    for settings in (CacheSettings(max_entries=0), CacheSettings(max_bytes=0)):
        metrics = ServiceMetrics()
        cache = EmbeddingCache(settings, observer=metrics)
        assert not cache.enabled
        key = EmbeddingCache.text_key("m", "a")
        await cache.put_many([(key, emb(1))], "text")
        assert await cache.get_many([key], "text") == [None]
        assert len(cache) == 0 and requests(metrics, "local", "text", "miss") == 0


async def test_bad_kind_and_bad_vectors_are_refused():
    cache = EmbeddingCache(CacheSettings())
    key = EmbeddingCache.text_key("m", "a")
    with pytest.raises(ValueError, match="kind"):
        await cache.get_many([key], "audio")
    with pytest.raises(ValueError, match="float32"):
        await cache.put_many([(key, Embedding(vector=np.zeros((2, 4), np.float32)))], "text")
    with pytest.raises(ValueError, match="token_count"):
        await cache.put_many([(key, emb(1, token_count=70_000))], "text")
    assert len(cache) == 0


# --- keys ------------------------------------------------------------------------------------------------------


def test_keys_separate_models_and_kinds():
    assert EmbeddingCache.text_key("a", "cat") == EmbeddingCache.text_key("a", "cat")
    assert EmbeddingCache.text_key("a", "cat") != EmbeddingCache.text_key("b", "cat")
    assert EmbeddingCache.text_key("a", "cat") != EmbeddingCache.text_key("a", "cats")
    assert EmbeddingCache.image_key("a", b"cat") != EmbeddingCache.text_key("a", "cat")
    assert EmbeddingCache.image_key("a", b"x") != EmbeddingCache.image_key("b", b"x")


def test_image_key_is_the_sha256_of_the_bytes():
    content = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
    key = EmbeddingCache.image_key("m", content)
    assert key.startswith("i:") and key.endswith(":" + hashlib.sha256(content).hexdigest())
    assert EmbeddingCache.image_key("m", bytes(content)) == key
    assert EmbeddingCache.image_key("m", content + b"\0") != key
    assert key.isascii() and len(key) == 83


async def test_two_models_never_share_a_local_entry():
    cache = EmbeddingCache(CacheSettings())
    await cache.put_many([(EmbeddingCache.text_key("model-a", "cat"), emb(1))], "text")
    assert await cache.get_many([EmbeddingCache.text_key("model-b", "cat")], "text") == [None]


# --- value format ----------------------------------------------------------------------------------------------


def test_value_format_round_trips_and_is_compact():
    original = emb(4, token_count=77, truncated=True, dim=512)
    data = encode_embedding(original)
    assert len(data) == 10 + 512 * 4
    assert data[:2] == b"VE" and data[2] == 1 and data[3] == 1
    assert int.from_bytes(data[4:6], "little") == 77 and int.from_bytes(data[6:10], "little") == 512
    assert np.array_equal(np.frombuffer(data[10:], "<f4"), original.vector)
    back = decode_embedding(data)
    assert back.cached and back.token_count == 77 and back.truncated
    assert np.array_equal(back.vector, original.vector)


@pytest.mark.parametrize("value", [
    b"",
    b"hello world, not an embedding",
    encode_embedding(emb(1))[:-1],                       # truncated
    encode_embedding(emb(1)) + b"\0\0\0\0",              # trailing bytes
    b"XX" + encode_embedding(emb(1))[2:],                # magic
    encode_embedding(emb(1))[:2] + b"\x02" + encode_embedding(emb(1))[3:],  # version
    encode_embedding(emb(1))[:3] + b"\x04" + encode_embedding(emb(1))[4:],  # unknown flag
    encode_embedding(Embedding(vector=np.array([1.0, np.nan], np.float32))),
])
def test_malformed_values_are_rejected(value):
    with pytest.raises(ValueError):
        decode_embedding(value)


# --- the shared Redis ------------------------------------------------------------------------------------------


async def test_redis_is_shared_between_two_replicas(redis_server):
    settings = CacheSettings(redis_url=redis_server.url)
    metrics_a, metrics_b = ServiceMetrics(), ServiceMetrics()
    replica_a = EmbeddingCache(settings, shared=build_shared_cache(settings), observer=metrics_a)
    replica_b = EmbeddingCache(settings, shared=build_shared_cache(settings), observer=metrics_b)
    try:
        key = EmbeddingCache.text_key(model(), "a photo of a cat")
        original = emb(5, token_count=9)
        await replica_a.put_many([(key, original)], "text")

        [first] = await replica_b.get_many([key], "text")
        assert first is not None and first.cached and first.token_count == 9 and not first.truncated
        assert np.array_equal(first.vector, original.vector)
        assert requests(metrics_b, "local", "text", "miss") == 1
        assert requests(metrics_b, "redis", "text", "hit") == 1

        [second] = await replica_b.get_many([key], "text")  # now from B's own LRU
        assert second is not None and len(replica_b) == 1
        assert requests(metrics_b, "local", "text", "hit") == 1
        assert requests(metrics_b, "redis", "text", "hit") == 1

        other = EmbeddingCache.text_key(model(), "never written")
        assert await replica_b.get_many([other], "text") == [None]
        assert requests(metrics_b, "redis", "text", "miss") == 1
    finally:
        await replica_a.close()
        await replica_b.close()


async def test_redis_keys_have_the_prefix_the_model_and_a_ttl(redis_server):
    settings = CacheSettings(redis_url=redis_server.url, redis_ttl_s=3600, redis_prefix="vitrine:test:")
    cache = EmbeddingCache(settings, shared=build_shared_cache(settings))
    client = redis_server.client()
    try:
        model_a, model_b = model(), model()
        key_a = EmbeddingCache.image_key(model_a, b"image bytes")
        await cache.put_many([(key_a, emb(6, token_count=0))], "image")

        ttl = client.ttl("vitrine:test:" + key_a)
        assert 0 < ttl <= 3600
        assert client.get("vitrine:test:" + key_a) == encode_embedding(emb(6, token_count=0))
        # the other model's key for the same bytes is not there, in Redis either
        cache.clear()
        assert await cache.get_many([EmbeddingCache.image_key(model_b, b"image bytes")], "image") == [None]
        assert (await cache.get_many([key_a], "image"))[0] is not None
    finally:
        client.close()
        await cache.close()


async def test_redis_only_cache_without_a_local_lru(redis_server):
    settings = CacheSettings(max_entries=0, redis_url=redis_server.url)
    cache = EmbeddingCache(settings, shared=build_shared_cache(settings))
    try:
        assert cache.enabled
        key = EmbeddingCache.text_key(model(), "only in redis")
        await cache.put_many([(key, emb(7))], "text")
        assert len(cache) == 0
        [hit] = await cache.get_many([key], "text")
        assert hit is not None and np.array_equal(hit.vector, emb(7).vector) and len(cache) == 0
    finally:
        await cache.close()


async def test_malformed_redis_value_is_a_miss_logged_once(redis_server, caplog):
    settings = CacheSettings(redis_url=redis_server.url)
    cache = EmbeddingCache(settings, shared=build_shared_cache(settings))
    client = redis_server.client()
    try:
        m = model()
        keys = [EmbeddingCache.text_key(m, t) for t in ("one", "two")]
        client.set(settings.redis_prefix + keys[0], b"{\"not\": \"ours\"}")
        client.set(settings.redis_prefix + keys[1], encode_embedding(emb(1))[:-3])
        with caplog.at_level(logging.DEBUG, logger=LOGGER):
            assert await cache.get_many(keys, "text") == [None, None]
            assert await cache.get_many(keys[:1], "text") == [None]
        assert len(warnings_of(caplog)) == 1 and "malformed" in warnings_of(caplog)[0]

        await cache.put_many([(keys[0], emb(2))], "text")  # the next put overwrites it
        cache.clear()
        [hit] = await cache.get_many(keys[:1], "text")
        assert hit is not None and np.array_equal(hit.vector, emb(2).vector)
    finally:
        client.close()
        await cache.close()


async def test_stopped_redis_degrades_to_local_with_one_warning_and_recovers(tmp_path, caplog):
    server = start_redis_server(tmp_path / "redis")
    clock = Clock()
    metrics = ServiceMetrics()
    settings = CacheSettings(redis_url=server.url, redis_retry_s=5.0, redis_timeout_ms=1000)
    cache = EmbeddingCache(settings, shared=build_shared_cache(settings), observer=metrics, clock=clock)
    m = model()
    cached, absent = EmbeddingCache.text_key(m, "kept locally"), EmbeddingCache.text_key(m, "never seen")
    try:
        await cache.put_many([(cached, emb(1))], "text")
        assert cache.shared_available
        server.stop()

        with caplog.at_level(logging.DEBUG, logger=LOGGER):
            got = await cache.get_many([cached, absent], "text")  # the local hit still serves; the miss is a miss
            assert got[0] is not None and got[1] is None
            assert not cache.shared_available
            await cache.put_many([(absent, emb(2))], "text")  # backing off: Redis is not asked
            clock.now += 5.1
            assert (await cache.get_many([EmbeddingCache.text_key(m, "x")], "text")) == [None]  # asked, fails
            await cache.put_many([(cached, emb(1))], "text")  # backing off again: not asked
        assert len(warnings_of(caplog)) == 1 and "unavailable" in warnings_of(caplog)[0]
        assert sample(metrics, "vitrine_embedding_cache_redis_errors_total") == 2
        assert (await cache.get_many([absent], "text"))[0] is not None  # the put during the outage went local

        server = start_redis_server(tmp_path / "redis", port=server.port)  # Redis is back, empty
        await cache.put_many([(absent, emb(2))], "text")  # still backing off: not written
        assert server.client().get(settings.redis_prefix + absent) is None
        clock.now += 5.1
        caplog.clear()
        with caplog.at_level(logging.INFO, logger=LOGGER):
            await cache.put_many([(absent, emb(2))], "text")
        assert cache.shared_available
        assert any("is back" in r.getMessage() for r in caplog.records)
        assert server.client().get(settings.redis_prefix + absent) == encode_embedding(emb(2))
        assert sample(metrics, "vitrine_embedding_cache_redis_errors_total") == 2
    finally:
        await cache.close()
        server.stop()


async def test_frozen_redis_times_out_into_a_miss(tmp_path, caplog):
    server = start_redis_server(tmp_path / "redis")
    metrics = ServiceMetrics()
    settings = CacheSettings(redis_url=server.url, redis_timeout_ms=100)
    cache = EmbeddingCache(settings, shared=build_shared_cache(settings), observer=metrics)
    key = EmbeddingCache.text_key(model(), "frozen")
    try:
        await cache.put_many([(key, emb(1))], "text")
        cache.clear()
        os.kill(server.process.pid, signal.SIGSTOP)
        try:
            with caplog.at_level(logging.WARNING, logger=LOGGER):
                assert await cache.get_many([key], "text") == [None]
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        assert len(warnings_of(caplog)) == 1 and "unavailable" in warnings_of(caplog)[0]
        assert sample(metrics, "vitrine_embedding_cache_redis_errors_total") == 1
    finally:
        await cache.close()
        server.stop()


async def test_adapter_raises_its_own_error_when_redis_is_unreachable(tmp_path):
    server = start_redis_server(tmp_path / "redis")
    server.stop()
    shared = RedisEmbeddingCache(server.url, ttl_s=60, timeout_s=1.0)
    try:
        with pytest.raises(SharedCacheError, match=f"127.0.0.1:{server.port}"):
            await shared.get_many(["k"])
        with pytest.raises(SharedCacheError):
            await shared.set_many([("k", b"v")])
    finally:
        await shared.close()


# --- settings and metrics --------------------------------------------------------------------------------------


def test_settings_refuse_a_url_that_is_not_redis():
    with pytest.raises(ValidationError, match="redis_url"):
        CacheSettings(redis_url="http://127.0.0.1:6379")
    assert CacheSettings(redis_url=" redis://h:1/0 ").redis_url == "redis://h:1/0"
    assert build_shared_cache(CacheSettings()) is None


def test_settings_section_reads_the_environment(monkeypatch):
    from retrieval_service.settings import Settings

    monkeypatch.setenv("VITRINE_CACHE__REDIS_URL", "redis://10.0.0.5:6380/2")
    monkeypatch.setenv("VITRINE_CACHE__MAX_ENTRIES", "123")
    settings = Settings()
    assert settings.cache.redis_url == "redis://10.0.0.5:6380/2" and settings.cache.max_entries == 123
    shared = build_shared_cache(settings.cache)
    assert shared is not None and shared.address == "10.0.0.5:6380/2"


def test_cache_metrics_are_exposed_from_the_start():
    text = generate_latest(ServiceMetrics().registry).decode()
    for line in (
        'vitrine_embedding_cache_requests_total{kind="text",result="hit",tier="local"} 0.0',
        'vitrine_embedding_cache_requests_total{kind="image",result="miss",tier="redis"} 0.0',
        'vitrine_embedding_cache_evictions_total{kind="image"} 0.0',
        "vitrine_embedding_cache_entries 0.0",
        "vitrine_embedding_cache_bytes 0.0",
        "vitrine_embedding_cache_redis_errors_total 0.0",
    ):
        assert line in text
