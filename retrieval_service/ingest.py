"""The batched ingest pipeline behind `IngestImages`.

Items from the client stream are grouped into batches (`ingest_batch_size` items, or whatever arrived within
`ingest_batch_wait_ms` of the first). Up to `ingest_max_inflight_batches` batches run at once, so decoding one
batch, encoding another on Triton and inserting a third into Milvus overlap. Per batch:

    sha256 ids -> skip ids in flight elsewhere / already stored -> decode + preprocess (thread pool)
    -> one encoder call -> original bytes to the blob store -> insert + flush -> answer each item

An id being ingested by any stream of this process is registered in `InflightIds`; a second copy of the same
bytes (same batch, another batch or another client) waits for the first and is answered ALREADY_PRESENT, so a
collection never holds two rows with one id.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from google.protobuf import json_format
from google.rpc import code_pb2, status_pb2

from retrieval_service.errors import DependencyUnavailableError, ImageRejectedError, InvalidInputError
from retrieval_service.status import FieldError, to_status
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

    encoder: Any  # retrieval_service.encoder_client.EncoderClient
    store: Any  # retrieval_service.vector_store.VectorStore
    blobs: Any  # retrieval_service.blob_store.BlobStore
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

    async def run(self, requests: AsyncIterator[pb.IngestImagesRequest]) -> AsyncIterator[pb.IngestImagesResponse]:
        """Consume `requests`, yield one IngestImagesResponse per request (any order), end after the last."""
        queue: asyncio.Queue[_Item | None] = asyncio.Queue(maxsize=self.batch_size * (self.max_inflight_batches + 1))
        out: asyncio.Queue[pb.IngestImagesResponse | None] = asyncio.Queue()
        reader = asyncio.create_task(self._read(requests, queue))
        batcher = asyncio.create_task(self._batch(queue, out))
        try:
            while (resp := await out.get()) is not None:
                yield resp
            await reader  # re-raise a broken client stream, if any
        finally:
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
            item.metadata = plain_metadata(json_format.MessageToDict(req.metadata)) if req.HasField("metadata") else {}
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
            embeddings = await self.encoder.encode_images(np.stack([p for _, p in ok]))
            rows = await loop.run_in_executor(self.store_executor, self._store, ok, embeddings)
            responses.extend(_response(it, Outcome.INSERTED) for it in rows)
            return responses
        except DependencyUnavailableError as exc:
            self.on_unavailable(exc)
            answered = {r.image_id for r in responses}
            status = to_status(exc)
            return responses + [_rejected(it, status) for it in items if it.image_id not in answered]

    def _store(self, ok: list[tuple["_Item", np.ndarray]], embeddings: np.ndarray) -> list[_Item]:
        """Blob store first, then Milvus (insert + flush): a stored row always has its bytes. Runs in a thread."""
        from retrieval_service.vector_store import Row  # noqa: PLC0415 - keep module import light

        now_ms = int(time.time() * 1000)
        rows = []
        for (it, _), vec in zip(ok, embeddings):
            self.blobs.put(it.content)
            rows.append(Row(id=it.image_id, embedding=vec, filename=it.filename, ingest_time_ms=now_ms,
                            metadata=it.metadata))
        self.store.insert(rows)
        self.store.flush()
        return [it for it, _ in ok]


def _sha256_all(contents: list[bytes]) -> list[str]:
    return [hashlib.sha256(c).hexdigest() for c in contents]


def _field(name: str, message: str) -> InvalidInputError:
    return FieldError(name, message)


def _response(it: _Item, outcome: int) -> pb.IngestImagesResponse:
    return pb.IngestImagesResponse(index=it.index, image_id=it.image_id, outcome=outcome)


def _rejected(it: _Item, status: status_pb2.Status) -> pb.IngestImagesResponse:
    return pb.IngestImagesResponse(index=it.index, image_id=it.image_id, outcome=Outcome.REJECTED, error=status)
