"""The IngestImages use case: a stream of images in, one outcome per image out, batched end to end.

Items from the stream are grouped into batches (`batch_size` items, or whatever arrived within
`batch_wait_ms` of the first). Up to `max_inflight_batches` batches run at once, so decoding one batch, encoding
another on Triton and inserting a third into Milvus overlap. Per batch:

    sha256 ids (once) -> skip ids in flight elsewhere / already stored -> decode + preprocess (thread pool)
    -> one encoder call, overlapped with writing the original bytes to the blob store (parallel threads)
    -> insert (after both) -> flush (shared by the batches whose inserts finished meanwhile) -> answer each item

An id being ingested by any stream of this process is registered in `InflightIds`; a second copy of the same
bytes (same batch, another batch or another client) waits for the first and is answered ALREADY_PRESENT, so a
collection never holds two rows with one id.

Plain values in and out (`IngestItem` -> `IngestOutcome`, retrieval_service.usecases.types); a REJECTED
outcome carries the exception that refused the item, which the transport maps to a status.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from retrieval_service.adapters.blob_store import AsyncBlobStore
from retrieval_service.adapters.milvus import AsyncVectorStore, Row, check_filename, check_metadata
from retrieval_service.adapters.triton.encoder import EncoderClient
from retrieval_service.errors import AbortedError, FieldError, ImageRejectedError, InvalidInputError
from retrieval_service.usecases.preprocess import ImageDecoder
from retrieval_service.usecases.types import IngestItem, IngestOutcome, IngestOutcomeKind

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class IngestLimits:
    """Batching and per-item limits (settings ingest_batch_size, ingest_batch_wait_ms,
    ingest_max_inflight_batches, max_image_bytes, max_filename_chars)."""

    batch_size: int = 32
    batch_wait_ms: float = 20.0
    max_inflight_batches: int = 3
    max_image_bytes: int = 20 * 1024 * 1024
    max_filename_chars: int = 1024


@dataclass
class _Item:
    index: int
    content: bytes
    filename: str
    metadata: dict[str, Any]
    image_id: str = ""
    rejected: BaseException | None = None


@dataclass
class InflightIds:
    """Ids being ingested right now in this process, each with a future of its final outcome."""

    futures: dict[str, asyncio.Future] = field(default_factory=dict)

    def claim(self, image_id: str) -> asyncio.Future | None:
        """Register `image_id` as ours and return None, or return the future of whoever holds it."""
        held = self.futures.get(image_id)
        if held is not None:
            return held
        self.futures[image_id] = asyncio.get_running_loop().create_future()
        return None

    def release(self, image_id: str, outcome: IngestOutcome) -> None:
        """Publish our final `outcome` for `image_id` to waiters and forget the id."""
        fut = self.futures.pop(image_id, None)
        if fut is not None and not fut.done():
            fut.set_result(outcome)


class IngestImages:
    """The batched ingest pipeline; one instance per server (its InflightIds are shared by every stream).

    Args:
        encoder: the image tower (uint8 [B, H, W, 3] -> float32 [B, D]).
        store: the collection (async).
        blobs: the original bytes (async; written before the row that references them).
        decoder: encoded images -> pixels, and their sha256 ids.
        limits: batching and per-item limits.
    """

    def __init__(self, *, encoder: EncoderClient, store: AsyncVectorStore, blobs: AsyncBlobStore,
                 decoder: ImageDecoder, limits: IngestLimits) -> None:
        self._encoder = encoder
        self._store = store
        self._blobs = blobs
        self._decoder = decoder
        self.limits = limits
        self.inflight = InflightIds()
        self._flush_lock = asyncio.Lock()
        self._flush_requested = 0
        self._flush_done = 0

    async def run(self, items: AsyncIterator[IngestItem]) -> AsyncIterator[IngestOutcome]:
        """Consume `items`, yield one IngestOutcome per item (any order), end after the last.

        Raises whatever the `items` iterator raises (a broken client stream), after the outcomes so far.
        """
        lim = self.limits
        queue: asyncio.Queue[_Item | None] = asyncio.Queue(maxsize=lim.batch_size * (lim.max_inflight_batches + 1))
        out: asyncio.Queue[IngestOutcome | None] = asyncio.Queue()
        reader = asyncio.create_task(self._read(items, queue))
        batcher = asyncio.create_task(self._batch(queue, out))
        try:
            while (outcome := await out.get()) is not None:
                yield outcome
            await reader  # re-raise a broken client stream, if any
        finally:
            for task in (reader, batcher):
                task.cancel()
            await asyncio.gather(reader, batcher, return_exceptions=True)

    async def _read(self, items: AsyncIterator[IngestItem], queue: asyncio.Queue) -> None:
        try:
            async for item in items:
                await queue.put(self._validate(item))
        finally:
            await queue.put(None)

    def _validate(self, req: IngestItem) -> _Item:
        """The item with its checks done at this edge: content, size, filename, metadata (each once; the filename
    byte limit and the metadata JSON rules are the schema's own checks, so the store does not repeat them
    differently)."""
        item = _Item(req.index, req.content, req.filename, {})
        try:
            if not req.content:
                raise FieldError("content", "content is empty: send the encoded image bytes")
            limit = self.limits.max_image_bytes
            if len(req.content) > limit:
                raise ImageRejectedError("too_many_bytes", f"image is {len(req.content)} bytes; the limit is "
                                                           f"{limit} bytes")
            chars = self.limits.max_filename_chars
            if len(req.filename) > chars:
                raise FieldError("filename", f"filename has {len(req.filename)} characters; limit {chars}")
            item.filename = _as_field("filename", check_filename, req.filename)  # the schema's byte limit
            item.metadata = _as_field("metadata", check_metadata, req.metadata) if req.metadata is not None else {}
        except InvalidInputError as exc:
            item.rejected = exc
        return item

    async def _batch(self, queue: asyncio.Queue, out: asyncio.Queue) -> None:
        loop = asyncio.get_running_loop()
        slots = asyncio.Semaphore(self.limits.max_inflight_batches)
        running: set[asyncio.Task] = set()
        ended = False
        try:
            while not ended:
                first = await queue.get()
                if first is None:
                    break
                batch, deadline = [first], loop.time() + self.limits.batch_wait_ms / 1000
                while len(batch) < self.limits.batch_size:
                    try:
                        nxt = queue.get_nowait()
                    except asyncio.QueueEmpty:
                        if loop.time() >= deadline:
                            break
                        await asyncio.sleep(0.001)
                        continue
                    if nxt is None:
                        ended = True
                        break
                    batch.append(nxt)
                await slots.acquire()
                task = asyncio.create_task(self._process(batch, out))
                running.add(task)
                task.add_done_callback(lambda t: (running.discard(t), slots.release()))
            await asyncio.gather(*running)
        finally:
            for task in running:
                task.cancel()
            await out.put(None)

    async def _process(self, batch: list[_Item], out: asyncio.Queue) -> None:
        """Answer every item of `batch` on `out`, whatever fails."""
        started = time.perf_counter()
        todo = [it for it in batch if it.rejected is None]
        for it in batch:
            if it.rejected is not None:
                await out.put(_outcome(it, "REJECTED", it.rejected))
        ids = await self._decoder.sha256_all([it.content for it in todo])
        mine: list[_Item] = []
        waits: list[tuple[_Item, asyncio.Future]] = []
        for it, image_id in zip(todo, ids):
            it.image_id = image_id
            held = self.inflight.claim(image_id)
            (mine.append(it) if held is None else waits.append((it, held)))
        try:
            for outcome in await self._ingest_own(mine):
                self.inflight.release(outcome.image_id, outcome)
                await out.put(outcome)
        finally:
            for it in mine:  # cancelled or crashed: never leave waiters hanging
                if it.image_id in self.inflight.futures:
                    aborted = AbortedError("ingest of this image was aborted")
                    self.inflight.release(it.image_id, _outcome(it, "REJECTED", aborted))
        for it, fut in waits:
            first: IngestOutcome = await fut
            if first.outcome in ("INSERTED", "ALREADY_PRESENT"):
                await out.put(_outcome(it, "ALREADY_PRESENT"))
            else:
                await out.put(_outcome(it, "REJECTED", first.error))
        log.debug("ingest batch of %d done in %.1f ms", len(batch), (time.perf_counter() - started) * 1e3)

    async def _ingest_own(self, items: list[_Item]) -> list[IngestOutcome]:
        """Store the items this batch owns; return one outcome per item."""
        if not items:
            return []
        outcomes: list[IngestOutcome] = []
        try:
            present = await self._store.existing_ids([it.image_id for it in items])
            new = []
            for it in items:
                if it.image_id in present:
                    outcomes.append(_outcome(it, "ALREADY_PRESENT"))
                else:
                    new.append(it)
            if not new:
                return outcomes
            decoded = await self._decoder.decode([it.content for it in new])
            ok: list[tuple[_Item, np.ndarray]] = []
            for it, pixels in zip(new, decoded):
                if isinstance(pixels, Exception):
                    pixels.field = getattr(pixels, "field", "") or "content"
                    outcomes.append(_outcome(it, "REJECTED", pixels))
                else:
                    ok.append((it, pixels))
            if not ok:
                return outcomes
            # Blob writes (fsync-bound, ~1-3 ms per file here) run during the encoder call instead of after it;
            # both finish before the Milvus insert, so a stored row always has its bytes.
            blob_writes = asyncio.ensure_future(
                self._blobs.put_all([it.content for it, _ in ok], [it.image_id for it, _ in ok]))
            try:
                embeddings = await self._encoder.encode_images(np.stack([p for _, p in ok]))
            finally:
                await blob_writes
            now_ms = int(time.time() * 1000)
            await self._store.insert([
                Row(id=it.image_id, embedding=vec, filename=it.filename, ingest_time_ms=now_ms, metadata=it.metadata)
                for (it, _), vec in zip(ok, embeddings)
            ])
            await self._flush()
            outcomes.extend(_outcome(it, "INSERTED") for it, _ in ok)
            return outcomes
        except Exception as exc:  # noqa: BLE001 - every item is answered, the stream goes on
            answered = {o.image_id for o in outcomes}
            return outcomes + [_outcome(it, "REJECTED", exc) for it in items if it.image_id not in answered]

    async def _flush(self) -> None:
        """Flush the store so that every row inserted before this call is searchable fast (Milvus Lite).

        Batches that finish their insert while a flush runs share the next one: a Milvus Lite flush costs
        ~25-65 ms however few rows it carries (measured: 960 rows of 512-d in batches of 32 took 1.97 s of
        flushes one per batch, 0.62 s one per 96 rows), so under load this is one flush per several batches.
        """
        self._flush_requested += 1
        mine = self._flush_requested
        async with self._flush_lock:
            if self._flush_done >= mine:
                return  # a flush that started after our insert already covered it
            covers = self._flush_requested  # every caller so far inserted before calling us
            await self._store.flush()
            self._flush_done = covers


def _as_field(field: str, check: Callable[[Any], T], value: Any) -> T:
    """`check(value)` (a schema check of retrieval_service.adapters.milvus), its refusal as FieldError(field)."""
    try:
        return check(value)
    except FieldError:
        raise
    except InvalidInputError as exc:
        raise FieldError(field, str(exc)) from exc


def _outcome(it: _Item, outcome: IngestOutcomeKind, error: BaseException | None = None) -> IngestOutcome:
    return IngestOutcome(index=it.index, image_id=it.image_id, outcome=outcome, error=error)
