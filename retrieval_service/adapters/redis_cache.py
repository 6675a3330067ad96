"""A shared key -> bytes cache in Redis (redis-py's asyncio client), for the query embedding cache.

`RedisEmbeddingCache` knows nothing of embeddings: the use case (`retrieval_service.usecases.embedding_cache`)
encodes values and decides what a failure means. This adapter only

- prefixes every key (`prefix`, e.g. "vitrine:emb:v1:"), so the cache can share a Redis with other data and a
  change of value format is a new prefix, not a migration;
- reads many keys with one `MGET` and writes many with one pipelined round trip of `SET key value PX ttl`
  (no MULTI: the writes are independent);
- bounds every call by `timeout_s` (an `asyncio.wait_for` around the whole call, and the same socket connect /
  read timeouts), with redis-py's own retries turned off, so a call never takes much longer than `timeout_s`;
- turns every failure (connection refused, reset, timeout, a Redis error reply, a bad URL at first use) into one
  exception type, `SharedCacheError`.

One instance belongs to one asyncio event loop (redis-py's asyncio connection pool is bound to the loop that
first uses it). Its connection pool opens connections on demand, one per concurrent call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from typing import TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

T = TypeVar("T")

DEFAULT_PREFIX = "vitrine:emb:v1:"


class SharedCacheError(ConnectionError):
    """A shared-cache (Redis) call failed or took longer than its timeout; the message says which and why."""


class RedisEmbeddingCache:
    """Bytes values under prefixed keys in one Redis, with a lifetime and a per-call deadline.

    Args:
        url: a redis-py URL: redis://[[user]:password@]host[:port][/db], rediss://... (TLS) or
            unix:///path/to/socket[?db=N].
        ttl_s: lifetime of a written entry, seconds (> 0; stored with millisecond precision, at least 1 ms).
        timeout_s: deadline of one call (connect included), seconds (> 0).
        prefix: prepended to every key.

    Raises:
        ValueError: `url` has an unknown scheme or is malformed (redis-py's message), or ttl_s / timeout_s <= 0.
    """

    def __init__(self, url: str, *, ttl_s: float, timeout_s: float, prefix: str = DEFAULT_PREFIX) -> None:
        if ttl_s <= 0 or timeout_s <= 0:
            raise ValueError(f"ttl_s and timeout_s must be > 0, got {ttl_s} and {timeout_s}")
        self.prefix = prefix
        self.ttl_ms = max(1, round(ttl_s * 1000))
        self.timeout_s = timeout_s
        self._client = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),  # redis-py >= 6 retries 3 times with back-off by default
            retry_on_timeout=False,
            health_check_interval=0,
            decode_responses=False,
        )
        kwargs = self._client.connection_pool.connection_kwargs
        #: where the server is, for log lines (never the password)
        self.address = kwargs.get("path") or f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"
        self.address += f"/{kwargs.get('db', 0)}"

    async def _bounded(self, call: Awaitable[T], what: str) -> T:
        try:
            return await asyncio.wait_for(call, self.timeout_s)
        except asyncio.TimeoutError as e:  # the builtin TimeoutError on Python >= 3.11
            raise SharedCacheError(f"redis {self.address}: {what} took longer than {self.timeout_s * 1000:g} ms") from e
        except (RedisError, OSError) as e:
            raise SharedCacheError(f"redis {self.address}: {what} failed: {type(e).__name__}: {e}") from e

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """The values of `keys` (without the prefix), None where absent or expired, in the order of `keys`.

        Raises:
            SharedCacheError: Redis is unreachable, failed, or did not answer within timeout_s.
        """
        if not keys:
            return []
        values = await self._bounded(self._client.mget([self.prefix + key for key in keys]), "MGET")
        return [value if isinstance(value, bytes) else None for value in values]

    async def set_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Write each (key without the prefix, value) with the lifetime ttl_s, in one round trip.

        Raises:
            SharedCacheError: Redis is unreachable, failed, or did not answer within timeout_s.
        """
        if not items:
            return
        pipe = self._client.pipeline(transaction=False)
        for key, value in items:
            pipe.set(self.prefix + key, value, px=self.ttl_ms)
        await self._bounded(pipe.execute(), "SET")

    async def ping(self) -> None:
        """Round trip to the server.

        Raises:
            SharedCacheError: Redis is unreachable, failed, or did not answer within timeout_s.
        """
        await self._bounded(self._client.ping(), "PING")

    async def close(self) -> None:
        """Close the connections (idempotent)."""
        await self._client.aclose()


__all__ = ["DEFAULT_PREFIX", "RedisEmbeddingCache", "SharedCacheError"]
