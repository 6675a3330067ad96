"""The batched ingest pipeline behind `IngestImages`.

Items from the client stream are grouped into batches (`ingest_batch_size` items, or whatever arrived within
`ingest_batch_wait_ms` of the first). Up to `ingest_max_inflight_batches` batches run at once, so decoding one
batch, encoding another on Triton and inserting a third into Milvus overlap. Per batch:

    sha256 ids -> skip ids in flight elsewhere / already stored -> decode + preprocess (thread pool)
    -> one encoder call, overlapped with writing the original bytes to the blob store (parallel threads)
    -> insert (after both) -> flush (shared by the batches whose inserts finished meanwhile) -> answer each item

An id being ingested by any stream of this process is registered in `InflightIds`; a second copy of the same
bytes (same batch, another batch or another client) waits for the first and is answered ALREADY_PRESENT, so a
collection never holds two rows with one id.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from google.protobuf import json_format
from google.rpc import code_pb2, status_pb2

from retrieval_service.errors import DependencyUnavailableError, ImageRejectedError, InvalidInputError
from retrieval_service.metrics import ServiceMetrics
from retrieval_service.grpc.status import FieldError, to_status
from retrieval_service.adapters.milvus.store import MAX_FILENAME_BYTES, MILVUS_MAX_JSON_BYTES
from vitrine.v1 import retrieval_service_pb2 as pb

log = logging.getLogger(__name__)
Outcome = pb.IngestImagesResponse.Outcome


def plain_metadata(value: Any) -> Any:
    """Return `value` (from a protobuf Struct) with integral floats as ints, so `metadata["label"] == 3` holds.

    google.protobuf.Struct stores every number as a double; JSON users expect 3, not 3.0.
    """
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: plain_metadata(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_metadata(v) for v in value]
    return value


@dataclass
class _Item:
    index: int
    content: bytes
    filename: str
    metadata: dict[str, Any]
    image_id: str = ""
    rejected: status_pb2.Status | None = None


@dataclass
class InflightIds:
    """Ids being ingested right now in this process, each with a future of its final response."""

    futures: dict[str, asyncio.Future] = field(default_factory=dict)

    def claim(self, image_id: str) -> asyncio.Future | None:
        """Register `image_id` as ours and return None, or return the future of whoever holds it."""
        held = self.futures.get(image_id)
        if held is not None:
            return held
        self.futures[image_id] = asyncio.get_running_loop().create_future()
        return None

    def release(self, image_id: str, response: pb.IngestImagesResponse) -> None:
        """Publish our final `response` for `image_id` to waiters and forget the id."""
        fut = self.futures.pop(image_id, None)
        if fut is not None and not fut.done():
            fut.set_result(response)


@dataclass
class IngestPipeline:
    """Everything the pipeline calls; built once per server (see server.py)."""

    encoder: Any  # retrieval_service.adapters.triton.encoder.EncoderClient
    store: Any  # retrieval_service.adapters.milvus.store.VectorStore
    blobs: Any  # retrieval_service.adapters.blob_store.BlobStore
    preprocess: Callable[[list[bytes]], list[np.ndarray | ImageRejectedError]]
    decode_executor: Executor
    store_executor: Executor
    inflight: InflightIds
    on_unavailable: Callable[[DependencyUnavailableError], None]
    batch_size: int = 32
    batch_wait_ms: float = 20.0
    max_inflight_batches: int = 3
    max_image_bytes: int = 20 * 1024 * 1024
    max_filename_chars: int = 1024
    metrics: ServiceMetrics = field(default_factory=ServiceMetrics)  # outcomes and open streams (Prometheus)
    blob_executor: Executor = field(
        default_factory=lambda: ThreadPoolExecutor(8, thread_name_prefix="vitrine-blobs")
    )  # blob writes wait on fsync, not the CPU: more threads than cores
    _flush_lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)
    _flush_requested: int = field(default=0, repr=False)
    _flush_done: int = field(default=0, repr=False)

    async def run(self, requests: AsyncIterator[pb.IngestImagesRequest]) -> AsyncIterator[pb.IngestImagesResponse]:
        """Consume `requests`, yield one IngestImagesResponse per request (any order), end after the last."""
        queue: asyncio.Queue[_Item | None] = asyncio.Queue(maxsize=self.batch_size * (self.max_inflight_batches + 1))
        out: asyncio.Queue[pb.IngestImagesResponse | None] = asyncio.Queue()
        reader = asyncio.create_task(self._read(requests, queue))
        batcher = asyncio.create_task(self._batch(queue, out))
        self.metrics.ingest_streams.inc()
        try:
            while (resp := await out.get()) is not None:
                self.metrics.count_ingest(resp)
                yield resp
            await reader  # re-raise a broken client stream, if any
        finally:
            self.metrics.ingest_streams.dec()
            for task in (reader, batcher):
                task.cancel()
            await asyncio.gather(reader, batcher, return_exceptions=True)

    async def _read(self, requests: AsyncIterator[pb.IngestImagesRequest], queue: asyncio.Queue) -> None:
        try:
            async for req in requests:
                await queue.put(self._validate(req))
        finally:
            await queue.put(None)

    def _validate(self, req: pb.IngestImagesRequest) -> _Item:
        item = _Item(req.index, req.content, req.filename, {})
        try:
            if not req.content:
                raise _field("content", "content is empty: send the encoded image bytes")
            if len(req.content) > self.max_image_bytes:
                raise ImageRejectedError(
                    "too_many_bytes", f"image is {len(req.content)} bytes; the limit is {self.max_image_bytes} bytes"
                )
            if len(req.filename) > self.max_filename_chars:
                raise _field("filename", f"filename has {len(req.filename)} characters; limit {self.max_filename_chars}")
            if len(req.filename.encode("utf-8")) > MAX_FILENAME_BYTES:  # the Milvus VARCHAR limit is in bytes
                raise _field("filename", f"filename is {len(req.filename.encode('utf-8'))} UTF-8 bytes; the limit "
                                         f"is {MAX_FILENAME_BYTES}")
            item.metadata = _metadata(req) if req.HasField("metadata") else {}
        except InvalidInputError as exc:
            item.rejected = to_status(exc)
        return item

    async def _batch(self, queue: asyncio.Queue, out: asyncio.Queue) -> None:
        loop = asyncio.get_running_loop()
        slots = asyncio.Semaphore(self.max_inflight_batches)
        running: set[asyncio.Task] = set()
        ended = False
        try:
            while not ended:
                first = await queue.get()
                if first is None:
                    break
                batch, deadline = [first], loop.time() + self.batch_wait_ms / 1000
                while len(batch) < self.batch_size:
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
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        todo = [it for it in batch if it.rejected is None]
        for it in batch:
            if it.rejected is not None:
                await out.put(pb.IngestImagesResponse(index=it.index, outcome=Outcome.REJECTED, error=it.rejected))
        ids = await loop.run_in_executor(self.decode_executor, _sha256_all, [it.content for it in todo])
        mine: list[_Item] = []
        waits: list[tuple[_Item, asyncio.Future]] = []
        for it, image_id in zip(todo, ids):
            it.image_id = image_id
            held = self.inflight.claim(image_id)
            (mine.append(it) if held is None else waits.append((it, held)))
        try:
            for resp in await self._ingest_own(mine):
                self.inflight.release(resp.image_id, resp)
                await out.put(resp)
        finally:
            for it in mine:  # cancelled or crashed: never leave waiters hanging
                if it.image_id in self.inflight.futures:
                    aborted = status_pb2.Status(code=code_pb2.ABORTED, message="ingest of this image was aborted")
                    self.inflight.release(it.image_id, _rejected(it, aborted))
        for it, fut in waits:
            first = await fut
            resp = pb.IngestImagesResponse(index=it.index, image_id=it.image_id)
            if first.outcome in (Outcome.INSERTED, Outcome.ALREADY_PRESENT):
                resp.outcome = Outcome.ALREADY_PRESENT
            else:
                resp.outcome = Outcome.REJECTED
                resp.error.CopyFrom(first.error)
            await out.put(resp)
        log.debug("ingest batch of %d done in %.1f ms", len(batch), (time.perf_counter() - started) * 1e3)

    async def _ingest_own(self, items: list[_Item]) -> list[pb.IngestImagesResponse]:
        """Store the items this batch owns; return one response per item."""
        if not items:
            return []
        loop = asyncio.get_running_loop()
        responses: list[pb.IngestImagesResponse] = []
        try:
            present = await loop.run_in_executor(
                self.store_executor, self.store.existing_ids, [it.image_id for it in items]
            )
            new = []
            for it in items:
                if it.image_id in present:
                    responses.append(_response(it, Outcome.ALREADY_PRESENT))
                else:
                    new.append(it)
            if not new:
                return responses
            decoded = await loop.run_in_executor(self.decode_executor, self.preprocess, [it.content for it in new])
            ok: list[tuple[_Item, np.ndarray]] = []
            for it, pixels in zip(new, decoded):
                if isinstance(pixels, Exception):
                    responses.append(_rejected(it, to_status(pixels, field="content")))
                else:
                    ok.append((it, pixels))
            if not ok:
                return responses
            # Blob writes (fsync-bound, ~1-3 ms per file here) run during the encoder call instead of after it;
            # both finish before the Milvus insert, so a stored row always has its bytes.
            blob_writes = asyncio.ensure_future(self._put_blobs([it.content for it, _ in ok]))
            try:
                embeddings = await self.encoder.encode_images(np.stack([p for _, p in ok]))
            finally:
                await blob_writes
            rows = await loop.run_in_executor(self.store_executor, self._store, ok, embeddings)
            await self._flush()
            responses.extend(_response(it, Outcome.INSERTED) for it in rows)
            return responses
        except Exception as exc:  # noqa: BLE001 - every item is answered, the stream goes on
            if isinstance(exc, DependencyUnavailableError):
                self.on_unavailable(exc)  # health NOT_SERVING; the items get UNAVAILABLE
            status = to_status(exc)  # unexpected exceptions: INTERNAL, logged there
            answered = {r.image_id for r in responses}
            return responses + [_rejected(it, status) for it in items if it.image_id not in answered]

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
            await asyncio.get_running_loop().run_in_executor(self.store_executor, self.store.flush)
            self._flush_done = covers

    async def _put_blobs(self, contents: list[bytes]) -> None:
        """Write `contents` to the blob store, one thread of `blob_executor` per file (fsyncs overlap)."""
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(self.blob_executor, self.blobs.put, c) for c in contents))

    def _store(self, ok: list[tuple["_Item", np.ndarray]], embeddings: np.ndarray) -> list[_Item]:
        """Milvus insert of the batch (its bytes are already in the blob store; `_flush` follows). In a thread."""
        from retrieval_service.adapters.milvus.store import Row  # noqa: PLC0415 - keep module import light

        now_ms = int(time.time() * 1000)
        rows = []
        for (it, _), vec in zip(ok, embeddings):
            rows.append(Row(id=it.image_id, embedding=vec, filename=it.filename, ingest_time_ms=now_ms,
                            metadata=it.metadata))
        self.store.insert(rows)
        return [it for it, _ in ok]


def _metadata(req: pb.IngestImagesRequest) -> dict[str, Any]:
    """The request's metadata as a JSON object the vector store accepts.

    Raises:
        FieldError('metadata'): NaN/Infinity numbers (not JSON), or more than Milvus' JSON field limit
            (MILVUS_MAX_JSON_BYTES, 64 KiB serialized).
    """
    try:
        metadata = plain_metadata(json_format.MessageToDict(req.metadata))
        size = len(json.dumps(metadata, ensure_ascii=False, allow_nan=False).encode("utf-8"))
    except ValueError as exc:  # json_format and json.dumps refuse NaN / Infinity
        raise _field("metadata", f"metadata is not valid JSON: {exc}") from exc
    if size > MILVUS_MAX_JSON_BYTES:
        raise _field("metadata", f"metadata is {size} bytes of JSON; the limit is {MILVUS_MAX_JSON_BYTES}")
    return metadata


def _sha256_all(contents: list[bytes]) -> list[str]:
    return [hashlib.sha256(c).hexdigest() for c in contents]


def _field(name: str, message: str) -> InvalidInputError:
    return FieldError(name, message)


def _response(it: _Item, outcome: int) -> pb.IngestImagesResponse:
    return pb.IngestImagesResponse(index=it.index, image_id=it.image_id, outcome=outcome)


def _rejected(it: _Item, status: status_pb2.Status) -> pb.IngestImagesResponse:
    return pb.IngestImagesResponse(index=it.index, image_id=it.image_id, outcome=Outcome.REJECTED, error=status)
