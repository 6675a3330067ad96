"""The query embedding cache: an in-process LRU, optionally backed by a Redis shared by several replicas.

The embed use case asks it before calling the encoder (`get_many`) and gives it what the encoder returned
(`put_many`). Every transport goes through that use case, so they all share one cache per server.

Settings: `CacheSettings` below, the `cache` section of `retrieval_service.settings.Settings` (environment
`VITRINE_CACHE__MAX_ENTRIES`, `VITRINE_CACHE__REDIS_URL`, ...).

Keys (`text_key`, `image_key`): `<kind>:<model tag>:<sha256 hex>`, where kind is `t` (text) or `i` (image), the
model tag is the first 16 hex digits of sha256(model id) and the last part is sha256 of the normalized text's
UTF-8 bytes or of the image's encoded bytes (for an image, its content id, `vitrine.image_ids`). 83 ASCII
characters. The model id is in every key, so two models never share an entry (a new model version with a new id
starts cold), and all the entries of one model match `*:<tag>:*`. In Redis every key also gets
`CacheSettings.redis_prefix` (default "vitrine:emb:v1:"); the "v1" is the value format below, so a new format
takes a new prefix and never reads the old values.

Values in Redis (`encode_embedding` / `decode_embedding`): a 10-byte little-endian header, then the vector:

    offset 0  2 bytes  magic b"VE"
           2  uint8    format version, 1
           3  uint8    flags: bit 0 = truncated (other bits 0)
           4  uint16   token_count
           6  uint32   dim D (> 0)
          10  D * 4    the vector, float32 little-endian

    (a 512-d embedding is 2,058 bytes). A value is checked on read: its length must be exactly 10 + 4 * D, the
    magic, version and flags as above and every component finite. Anything else (another writer's data, a
    truncated value) is a miss, logged once per cache at WARNING (then at DEBUG), and overwritten by the next
    `put_many` of that key. Each write sets a lifetime, `redis_ttl_s` (`SET key value PX ttl`).

Bounds of the local LRU: at most `max_entries` entries and at most `max_bytes` bytes, counting for each entry
its vector's bytes (4 * D) plus its key's length (83); Python's per-object overhead (~300 bytes an entry) is not
counted. A put that goes over either bound evicts the least recently used entries (a `get_many` hit or a
`put_many` makes an entry the most recent) until both hold; an entry larger than `max_bytes` alone is not kept.
`max_entries == 0` or `max_bytes == 0` turns the local cache off; with no Redis either, `enabled` is False and
the cache does nothing. The LRU is an `OrderedDict` (O(1) `move_to_end` / `popitem(last=False)`) rather than
`cachetools.LRUCache`: that has a single bound (`maxsize` with one `getsizeof`) and no eviction hook by kind,
and we need two bounds and evictions counted per kind; the whole LRU is ~30 lines.

Concurrency: an `EmbeddingCache` belongs to one asyncio event loop and is not thread-safe. No lock is needed
there: the LRU is only touched between awaits, so each `get_many` / `put_many` sees and leaves it consistent.
Two concurrent misses of the same key may both encode it; the second `put_many` just replaces the entry.

Degrade rule: the shared cache is an optimisation, never a dependency. Every Redis call is bounded by
`redis_timeout_ms` (`RedisEmbeddingCache` enforces it; redis-py's retries are off), and any failure (refused,
reset, timeout, error reply) makes that call a miss for Redis and never reaches the caller. The first failure
of an outage logs ONE warning and every failed call counts in `vitrine_embedding_cache_redis_errors_total`;
then Redis is not asked for `redis_retry_s` seconds (the local cache alone serves), after which the next call
tries again. A call that succeeds after an outage ends it (logged at INFO), so a later outage warns again.

Metrics go through a `CacheObserver` (`retrieval_service.metrics.ServiceMetrics` is one; the grpc layer wires
it in, use cases do not import metrics): requests by tier (local, redis), kind and result (hit, miss), evictions
by kind, entries and bytes of the local LRU, and Redis errors. The redis tier counts the distinct keys asked of
Redis in calls that answered; a call that failed counts only as an error.
"""

from __future__ import annotations

import hashlib
import logging
import struct
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Literal, NamedTuple, Protocol, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from retrieval_service.adapters.redis_cache import DEFAULT_PREFIX, RedisEmbeddingCache, SharedCacheError
from retrieval_service.usecases.types import Embedding

log = logging.getLogger(__name__)

MiB = 1024 * 1024
T = TypeVar("T")

Kind = Literal["text", "image"]
KINDS: tuple[str, ...] = ("text", "image")
REDIS_SCHEMES: tuple[str, ...] = ("redis://", "rediss://", "unix://")


class CacheSettings(BaseModel):
    """Settings section `cache` (env `VITRINE_CACHE__MAX_ENTRIES=...`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_entries: int = Field(10_000, ge=0, description="most embeddings kept in process; 0 = no local cache")
    max_bytes: int = Field(64 * MiB, ge=0, description="most bytes of embeddings kept in process (vectors and keys)")
    redis_url: str = Field("", description="shared cache, e.g. redis://127.0.0.1:6379/0; empty = local cache only")
    redis_ttl_s: float = Field(7 * 24 * 3600.0, gt=0, description="lifetime of a shared-cache entry, seconds")
    redis_timeout_ms: float = Field(50.0, gt=0, description="deadline of one Redis call, ms; slower = a miss")
    redis_retry_s: float = Field(5.0, ge=0, description="after a failed Redis call, seconds before Redis is asked "
                                                        "again (meanwhile the local cache alone serves)")
    redis_prefix: str = Field(DEFAULT_PREFIX, min_length=1, description="prefix of every Redis key of the cache")

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str) -> str:
        value = value.strip()
        if value and not value.startswith(REDIS_SCHEMES):
            raise ValueError(f"must start with one of {', '.join(REDIS_SCHEMES)} (or be empty), got {value[:40]!r}")
        return value


class CacheObserver(Protocol):
    """Where the cache reports what it does (implemented by `retrieval_service.metrics.ServiceMetrics`)."""

    def count_cache_requests(self, tier: str, kind: str, hits: int, misses: int) -> None:
        """`hits` + `misses` keys of `kind` ("text" | "image") looked up in `tier` ("local" | "redis")."""

    def count_cache_evictions(self, kind: str, count: int) -> None:
        """`count` local entries of `kind` evicted to respect max_entries / max_bytes."""

    def set_cache_size(self, entries: int, nbytes: int) -> None:
        """The local LRU now holds `entries` entries of `nbytes` bytes (vectors + keys)."""

    def count_cache_redis_error(self) -> None:
        """One Redis call failed or timed out."""


class _NoObserver:
    def count_cache_requests(self, tier: str, kind: str, hits: int, misses: int) -> None:
        pass

    def count_cache_evictions(self, kind: str, count: int) -> None:
        pass

    def set_cache_size(self, entries: int, nbytes: int) -> None:
        pass

    def count_cache_redis_error(self) -> None:
        pass


class SharedEmbeddingCache(Protocol):
    """A key -> bytes store shared by replicas (`retrieval_service.adapters.redis_cache.RedisEmbeddingCache`).

    Each method raises `SharedCacheError` on any failure, within its own deadline.
    """

    address: str  # where it is, for log lines (no credentials)

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """The values of `keys` in order, None where absent."""

    async def set_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Store each (key, value) with the store's lifetime."""

    async def close(self) -> None:
        """Release connections."""


def build_shared_cache(settings: CacheSettings) -> RedisEmbeddingCache | None:
    """The Redis shared cache `settings` ask for, or None when `redis_url` is empty. Connects on first use.

    Raises:
        ValueError: redis_url is malformed (redis-py's message).
    """
    if not settings.redis_url:
        return None
    return RedisEmbeddingCache(settings.redis_url, ttl_s=settings.redis_ttl_s,
                               timeout_s=settings.redis_timeout_ms / 1000.0, prefix=settings.redis_prefix)


# --- value format ----------------------------------------------------------------------------------------------

_HEADER = struct.Struct("<2sBBHI")
_MAGIC = b"VE"
_VERSION = 1
_TRUNCATED = 0x01


def encode_embedding(embedding: Embedding) -> bytes:
    """The Redis value of `embedding` (format in the module docstring); `cached` is not stored.

    Raises:
        ValueError: the vector is not 1-D and non-empty, or token_count is outside 0..65535.
    """
    vector = _as_vector(embedding.vector)
    if not 0 <= embedding.token_count <= 0xFFFF:
        raise ValueError(f"token_count must be in 0..65535, got {embedding.token_count}")
    flags = _TRUNCATED if embedding.truncated else 0
    header = _HEADER.pack(_MAGIC, _VERSION, flags, embedding.token_count, vector.shape[0])
    return header + vector.astype("<f4", copy=False).tobytes()


def decode_embedding(data: bytes) -> Embedding:
    """The embedding a Redis value holds, with cached=True and a read-only float32 [D] vector.

    Raises:
        ValueError: `data` is not a value of this format (the message says what is wrong).
    """
    if len(data) < _HEADER.size:
        raise ValueError(f"{len(data)} bytes, shorter than the {_HEADER.size}-byte header")
    magic, version, flags, token_count, dim = _HEADER.unpack_from(data)
    if magic != _MAGIC or version != _VERSION:
        raise ValueError(f"magic {magic!r} version {version}, expected {_MAGIC!r} version {_VERSION}")
    if flags & ~_TRUNCATED:
        raise ValueError(f"unknown flags {flags:#04x}")
    if dim == 0 or len(data) != _HEADER.size + 4 * dim:
        raise ValueError(f"{len(data)} bytes for dim {dim}, expected {_HEADER.size + 4 * dim}")
    vector = np.frombuffer(data, dtype="<f4", offset=_HEADER.size, count=dim).astype(np.float32, copy=False)
    if not np.isfinite(vector).all():
        raise ValueError("the vector has non-finite components")
    vector.flags.writeable = False
    return Embedding(vector=vector, token_count=token_count, truncated=bool(flags & _TRUNCATED), cached=True)


def _as_vector(vector: object) -> np.ndarray:
    array = np.asarray(vector, dtype=np.float32)
    if array.ndim != 1 or array.shape[0] == 0:
        raise ValueError(f"an embedding vector must be float32 [D] with D > 0, got shape {array.shape}")
    return array


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _Entry(NamedTuple):
    embedding: Embedding  # cached=True, read-only vector: returned as is on a hit
    kind: str
    nbytes: int


class _Failed:
    """A shared-cache call that failed or was skipped during a back-off."""


_FAILED = _Failed()


class EmbeddingCache:
    """Query embeddings by key: a bounded local LRU, then (optionally) a shared Redis. See the module docstring.

    Args:
        settings: bounds and the Redis settings (`redis_url` itself is read by `build_shared_cache`).
        shared: the shared cache (a `RedisEmbeddingCache`), or None for a local cache only.
        observer: receives counts and sizes (a `ServiceMetrics`); None = not reported.
        clock: monotonic seconds, for the Redis back-off (tests pass their own).

    Attributes:
        enabled: False when there is neither a local cache (max_entries or max_bytes is 0) nor a shared one; then
            `get_many` returns all None and `put_many` does nothing.

    One asyncio event loop only (see "Concurrency" in the module docstring). No method raises because of Redis.
    """

    def __init__(self, settings: CacheSettings, *, shared: SharedEmbeddingCache | None = None,
                 observer: CacheObserver | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._local_on = settings.max_entries > 0 and settings.max_bytes > 0
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._nbytes = 0
        self._shared = shared
        self._observer: CacheObserver = observer if observer is not None else _NoObserver()
        self._clock = clock
        self._shared_down = False
        self._retry_at = 0.0
        self._warned_malformed = False
        self.enabled: bool = self._local_on or shared is not None

    # --- keys ------------------------------------------------------------------------------------------------

    @staticmethod
    def _model_tag(model_id: str) -> str:
        return _sha256_hex(model_id.encode("utf-8"))[:16]

    @staticmethod
    def text_key(model_id: str, normalized_text: str) -> str:
        """'t:<sha256(model_id)[:16]>:<sha256(normalized_text as UTF-8)>' (83 ASCII characters).

        `normalized_text` is the text as the tokenizer sees it after the embed use case's normalization, so texts
        that tokenize the same share an entry.
        """
        return f"t:{EmbeddingCache._model_tag(model_id)}:{_sha256_hex(normalized_text.encode('utf-8'))}"

    @staticmethod
    def image_key(model_id: str, content: bytes) -> str:
        """'i:<sha256(model_id)[:16]>:<sha256(content)>' (83 ASCII characters); content = the encoded image bytes
        as received (so the last part is the image's content id)."""
        return f"i:{EmbeddingCache._model_tag(model_id)}:{_sha256_hex(content)}"

    # --- lookups and writes ----------------------------------------------------------------------------------

    async def get_many(self, keys: Sequence[str], kind: str) -> list[Embedding | None]:
        """The cached embeddings of `keys`, in order: an `Embedding` with cached=True (read-only vector) or None.

        The local LRU first; the keys it misses go to Redis in one MGET (unless Redis is backing off), and Redis
        hits are added to the local LRU.

        Args:
            keys: from `text_key` / `image_key` (duplicates allowed).
            kind: "text" or "image" (metric label).

        Raises:
            ValueError: kind is not "text" or "image". Never because of Redis.
        """
        _check_kind(kind)
        results: list[Embedding | None] = [None] * len(keys)
        if not self.enabled or not keys:
            return results
        missing: list[int] = []
        if self._local_on:
            for i, key in enumerate(keys):
                entry = self._entries.get(key)
                if entry is None:
                    missing.append(i)
                else:
                    self._entries.move_to_end(key)
                    results[i] = entry.embedding
            self._observer.count_cache_requests("local", kind, len(keys) - len(missing), len(missing))
        else:
            missing = list(range(len(keys)))
        shared = self._shared
        if missing and shared is not None:
            unique = list(dict.fromkeys(keys[i] for i in missing))
            values = await self._call_shared(lambda: shared.get_many(unique))
            if not isinstance(values, _Failed):
                found: dict[str, Embedding] = {}
                for key, value in zip(unique, values):
                    embedding = self._decode(key, value) if value is not None else None
                    if embedding is not None:
                        found[key] = embedding
                        self._put_local(key, embedding, kind)
                self._observer.count_cache_requests("redis", kind, len(found), len(unique) - len(found))
                for i in missing:
                    results[i] = found.get(keys[i])
                self._report_size()
        return results

    async def put_many(self, items: Sequence[tuple[str, Embedding]], kind: str) -> None:
        """Keep each (key, embedding) in the local LRU and write it to Redis (one pipelined round trip, with the
        lifetime redis_ttl_s). The vector is copied; `cached` is ignored.

        Raises:
            ValueError: kind is not "text" or "image", a vector is not 1-D and non-empty, or a token_count is
                outside 0..65535. Never because of Redis.
        """
        _check_kind(kind)
        if not self.enabled or not items:
            return
        stored: list[tuple[str, Embedding]] = []
        for key, embedding in items:
            if not 0 <= embedding.token_count <= 0xFFFF:
                raise ValueError(f"token_count must be in 0..65535, got {embedding.token_count}")
            vector = np.array(_as_vector(embedding.vector), dtype=np.float32, copy=True)
            vector.flags.writeable = False
            stored.append((key, Embedding(vector=vector, token_count=embedding.token_count,
                                          truncated=embedding.truncated, cached=True)))
        shared = self._shared
        values = [(key, encode_embedding(embedding)) for key, embedding in stored] if shared is not None else []
        if self._local_on:
            for key, embedding in stored:
                self._put_local(key, embedding, kind)
            self._report_size()
        if shared is not None:
            await self._call_shared(lambda: shared.set_many(values))

    async def close(self) -> None:
        """Close the shared cache's connections (the local entries stay usable)."""
        if self._shared is not None:
            await self._shared.close()

    # --- state -----------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Entries in the local LRU."""
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes the local LRU counts against max_bytes (vectors + keys)."""
        return self._nbytes

    @property
    def shared_available(self) -> bool:
        """False during a Redis outage (from a failed call until one succeeds); False without Redis."""
        return self._shared is not None and not self._shared_down

    def clear(self) -> None:
        """Drop every local entry (Redis is left as is)."""
        self._entries.clear()
        self._nbytes = 0
        self._report_size()

    # --- internals -------------------------------------------------------------------------------------------

    def _put_local(self, key: str, embedding: Embedding, kind: str) -> None:
        if not self._local_on:
            return
        size = embedding.vector.nbytes + len(key)
        old = self._entries.pop(key, None)
        if old is not None:
            self._nbytes -= old.nbytes
        if size > self.settings.max_bytes:
            return
        self._entries[key] = _Entry(embedding, kind, size)
        self._nbytes += size
        evicted: dict[str, int] = {}
        while len(self._entries) > self.settings.max_entries or self._nbytes > self.settings.max_bytes:
            _, entry = self._entries.popitem(last=False)
            self._nbytes -= entry.nbytes
            evicted[entry.kind] = evicted.get(entry.kind, 0) + 1
        for evicted_kind, count in evicted.items():
            self._observer.count_cache_evictions(evicted_kind, count)

    def _report_size(self) -> None:
        self._observer.set_cache_size(len(self._entries), self._nbytes)

    def _decode(self, key: str, value: bytes) -> Embedding | None:
        try:
            return decode_embedding(value)
        except ValueError as e:
            level = logging.DEBUG if self._warned_malformed else logging.WARNING
            self._warned_malformed = True
            log.log(level, "embedding cache: ignoring a malformed Redis value under %r (%s); treated as a miss "
                           "(further ones are logged at DEBUG)", self.settings.redis_prefix + key, e)
            return None

    async def _call_shared(self, call: Callable[[], Awaitable[T]]) -> T | _Failed:
        """`call()` unless Redis is backing off; a failure starts (or extends) the back-off and returns _FAILED."""
        shared = self._shared
        if shared is None or (self._shared_down and self._clock() < self._retry_at):
            return _FAILED
        try:
            result = await call()
        except SharedCacheError as e:
            self._observer.count_cache_redis_error()
            self._retry_at = self._clock() + self.settings.redis_retry_s
            if not self._shared_down:
                self._shared_down = True
                log.warning("embedding cache: the shared cache (redis %s) is unavailable; serving from the local "
                            "cache only and retrying after %g s: %s", shared.address, self.settings.redis_retry_s, e)
            else:
                log.debug("embedding cache: redis still unavailable: %s", e)
            return _FAILED
        if self._shared_down:
            self._shared_down = False
            log.info("embedding cache: the shared cache (redis %s) is back", shared.address)
        return result


__all__ = [
    "CacheObserver",
    "CacheSettings",
    "EmbeddingCache",
    "SharedEmbeddingCache",
    "build_shared_cache",
    "decode_embedding",
    "encode_embedding",
]
