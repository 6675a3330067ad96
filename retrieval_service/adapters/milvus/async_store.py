"""`AsyncVectorStore`: the `VectorStore` for asyncio callers, each call run in one bounded thread pool.

pymilvus' `MilvusClient` is synchronous; the use cases are coroutines on the server's event loop. This wrapper
gives them typed async methods (the same arguments, results and exceptions as `VectorStore`, see there) and
keeps blocking Milvus calls off the loop, in `executor` (4 threads by default: Milvus Lite serializes in its
own process, a Milvus server gains little from more concurrent calls from one client).

Deadlines (retrieval_service.deadlines): `loop.run_in_executor` does not carry contextvars into the thread, so
each call runs in a copy of the caller's context (`contextvars.copy_context().run`): the store's pymilvus
calls see the caller's deadline and take `remaining(...)` as their timeouts. The caller's wait is bounded too:
with a deadline, the coroutine gives up at the deadline (`DeadlineExceededError`) even if the thread is stuck
(it finishes, or times out, on its own; its result is dropped); a call still queued behind busy threads at its
deadline is cancelled and never reaches Milvus, and one whose deadline passes as it starts fails at once.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from retrieval_service.adapters.milvus.schema import Hit, Row
from retrieval_service.adapters.milvus.store import VectorStore
from retrieval_service.deadlines import DeadlineExceededError, check, time_left

T = TypeVar("T")


class AsyncVectorStore:
    """Async facade over one `VectorStore`; `sync` is the store itself (for wiring and read-only tools)."""

    def __init__(self, store: VectorStore, executor: Executor | None = None) -> None:
        self.sync = store
        self.executor = executor or ThreadPoolExecutor(4, thread_name_prefix="vitrine-milvus")

    async def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` in the executor, in a copy of the caller's context, waited for at most until
        the caller's deadline.

        Raises:
            DeadlineExceededError: the caller's deadline passed before the call, or before it finished.
            whatever `fn` raises.
        """
        loop = asyncio.get_running_loop()
        check()  # a deadline already passed fails before queueing
        context = contextvars.copy_context()
        future = loop.run_in_executor(self.executor, context.run, functools.partial(fn, *args, **kwargs))
        left = time_left()
        if left is None:
            return await future
        done, _ = await asyncio.wait({future}, timeout=max(left, 0.0))
        if not done:
            future.cancel()  # a queued call never starts; a running one finishes (or times out) unobserved
            raise DeadlineExceededError(
                f"Milvus call {getattr(fn, '__name__', 'call')} on {self.sync.collection!r} did not finish "
                "before the caller's deadline"
            )
        return future.result()

    @property
    def collection(self) -> str:
        """The Milvus collection name."""
        return self.sync.collection

    @property
    def is_lite(self) -> bool:
        """True for Milvus Lite (a local .db file)."""
        return self.sync.is_lite

    async def open(self) -> None:
        """`VectorStore.open` (connect, create or check, load)."""
        await self._run(self.sync.open)

    async def search(self, vectors: np.ndarray, top_k: int, *, offset: int = 0, filter: str = "",  # noqa: A002
                     min_score: float | None = None, with_vectors: bool = False) -> list[list[Hit]]:
        """`VectorStore.search`: float32 [Q, D] queries -> Q lists of at most top_k Hits, best first."""
        return await self._run(self.sync.search, vectors, top_k, offset=offset, filter=filter,
                               min_score=min_score, with_vectors=with_vectors)

    async def get(self, ids: Sequence[str], *, with_vectors: bool = False) -> list[Row]:
        """`VectorStore.get`: stored rows for `ids`, in the order asked; missing ids left out."""
        return await self._run(self.sync.get, ids, with_vectors=with_vectors)

    async def existing_ids(self, ids: Sequence[str]) -> set[str]:
        """`VectorStore.existing_ids`: the subset of `ids` stored (Session consistency)."""
        return await self._run(self.sync.existing_ids, ids)

    async def insert(self, rows: Sequence[Row]) -> int:
        """`VectorStore.insert` (upsert): number of distinct ids written."""
        return await self._run(self.sync.insert, rows)

    async def flush(self) -> None:
        """`VectorStore.flush` (Milvus Lite: make new rows fast to search)."""
        await self._run(self.sync.flush)

    async def delete(self, ids: Sequence[str] | None = None, filter: str | None = None) -> int:  # noqa: A002
        """`VectorStore.delete` by ids or filter (exactly one): stored rows deleted."""
        return await self._run(self.sync.delete, ids=ids, filter=filter)

    async def count(self, filter: str = "") -> int:  # noqa: A002
        """`VectorStore.count`: exact number of stored rows (Strong consistency)."""
        return await self._run(self.sync.count, filter)

    async def describe(self) -> dict[str, Any]:
        """`VectorStore.describe`: collection, backend, dim, index type and params, model id, count."""
        return await self._run(self.sync.describe)

    def shutdown(self) -> None:
        """Wait for running calls, cancel queued ones, close the store's connection."""
        self.executor.shutdown(wait=True, cancel_futures=True)
        self.sync.close()
