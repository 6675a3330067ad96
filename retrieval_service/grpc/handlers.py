"""RPC handlers of `vitrine.v1.RetrievalService` (see proto/vitrine/v1/retrieval_service.proto).

Handlers validate the request, then call the encoder (Triton) and the vector store (Milvus, in a thread pool).
Exceptions from the layers below become gRPC statuses in `retrieval_service.grpc.status`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from typing import Any

import grpc
import numpy as np
from google.protobuf import timestamp_pb2
from grpc_status import rpc_status

from retrieval_service.errors import DependencyUnavailableError, InvalidInputError, NotFoundError
from retrieval_service.usecases.filters import validate_filter
from retrieval_service.adapters.gemini.client import GeminiGenerator, GenerationNotConfiguredError, GenerationOptions
from retrieval_service.adapters.gemini.client import Finished as GenerationFinished
from retrieval_service.adapters.gemini.client import ImageChunk, TextChunk
from retrieval_service.grpc.health import HealthMonitor
from retrieval_service.usecases.ingest import IngestPipeline
from retrieval_service.usecases.pagination import MILVUS_MAX_WINDOW, decode_page_token, encode_page_token, query_fingerprint
from retrieval_service.usecases.rerank import ModelReranker, RerankMethod, rerank, validate_request
from retrieval_service.settings import Settings
from retrieval_service.grpc.status import FieldError, rpc_errors, to_status
from vitrine.manifest import Manifest
from vitrine.v1 import retrieval_service_pb2 as pb
from vitrine.v1 import retrieval_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

DEFAULT_TOP_K = 10
_RERANK_METHODS = {
    pb.RerankOptions.METHOD_UNSPECIFIED: None,  # settings default
    pb.RerankOptions.NONE: RerankMethod.NONE,
    pb.RerankOptions.EXACT: RerankMethod.EXACT,
    pb.RerankOptions.MMR: RerankMethod.MMR,
    pb.RerankOptions.MODEL: RerankMethod.MODEL,
}
_IMAGE_ID = re.compile(r"^[0-9a-f]{64}$")


def check_image_id(image_id: str, field: str = "image_id") -> str:
    """Return `image_id` if it is 64 lowercase hex characters (a sha256), else raise FieldError."""
    if not _IMAGE_ID.match(image_id):
        raise FieldError(field, f"{field} must be 64 lowercase hex characters (sha256 of the image bytes), "
                                f"got {image_id[:80]!r}")
    return image_id


def image_record(hit: Any) -> pb.ImageRecord:
    """Build an ImageRecord from a vector-store Hit or Row (id, filename, ingest_time_ms, metadata)."""
    record = pb.ImageRecord(image_id=hit.id, filename=hit.filename or "")
    if hit.metadata:
        record.metadata.update(hit.metadata)
    record.ingest_time.CopyFrom(timestamp_pb2.Timestamp())
    record.ingest_time.FromMilliseconds(int(hit.ingest_time_ms))
    return record


class RetrievalService(pb_grpc.RetrievalServiceServicer):
    """The handlers. One instance per server; safe for concurrent calls."""

    def __init__(
        self,
        *,
        settings: Settings,
        manifest: Manifest,
        tokenizer: Any,  # vitrine.tokenizer.TextTokenizer
        encoder: Any,  # retrieval_service.adapters.triton.encoder.EncoderClient
        store: Any,  # retrieval_service.adapters.milvus.store.VectorStore
        blobs: Any,  # retrieval_service.adapters.blob_store.BlobStore
        preprocess: Any,  # list[bytes] -> list[uint8 [H, W, 3] | ImageRejectedError]
        ingest: IngestPipeline,
        health: HealthMonitor,
        decode_executor: Executor,
        store_executor: Executor,
        model_reranker: ModelReranker | None = None,
        generator: GeminiGenerator | None = None,
    ) -> None:
        self._s = settings
        self._manifest = manifest
        self._tokenizer = tokenizer
        self._encoder = encoder
        self._store = store
        self._blobs = blobs
        self._preprocess = preprocess
        self._ingest = ingest
        self._health = health
        self._decode_executor = decode_executor
        self._store_executor = store_executor
        self._model_reranker = model_reranker
        self._generator = generator

    def dependency_failed(self, exc: DependencyUnavailableError) -> None:
        """Called on UNAVAILABLE: health goes NOT_SERVING until the next successful probe.

        Gemini is not a health dependency: search and ingest work without it.
        """
        dependency = getattr(exc, "dependency", "unknown")
        if dependency != "gemini":
            self._health.mark_down(dependency)

    async def _in_store(self, fn, *args, **kwargs):  # noqa: ANN001, ANN202
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._store_executor, lambda: fn(*args, **kwargs))

    # --- SearchImages -------------------------------------------------------------------------------------------

    @rpc_errors
    async def SearchImages(self, request: pb.SearchImagesRequest, context: grpc.aio.ServicerContext):  # noqa: N802
        """See `_search`."""
        return await self._search(request)

    async def _search(self, request: pb.SearchImagesRequest) -> pb.SearchImagesResponse:
        """Rank stored images by cosine similarity to a text, image or stored-image query.

        Returns up to top_k (1..max_top_k, default 10) results from offset `page_token`, optionally reranked
        (exact cosine, MMR or a Triton reranker model) from the first `rerank.top_n` candidates;
        INVALID_ARGUMENT for bad input, UNAVAILABLE when the encoder or Milvus is down.
        """
        top_k = request.top_k or DEFAULT_TOP_K
        if not 1 <= top_k <= self._s.max_top_k:
            raise FieldError("top_k", f"top_k must be in [1, {self._s.max_top_k}], got {request.top_k}")
        min_score = request.min_score if request.HasField("min_score") else None
        if min_score is not None and not -1.0 <= min_score <= 1.0:
            raise FieldError("min_score", f"min_score must be in [-1, 1] (cosine similarity), got {min_score}")
        kind = request.WhichOneof("query")
        if kind is None:
            raise FieldError("query", "query is required: set one of text, image or image_id")
        key = request.image if kind == "image" else getattr(request, kind)
        rr = request.rerank
        method = _RERANK_METHODS.get(rr.method)
        mmr_lambda = rr.mmr_lambda if rr.HasField("mmr_lambda") else None
        validate_filter(request.filter)  # INVALID_ARGUMENT before any encoder or Milvus call (the store checks too)
        fingerprint = query_fingerprint(kind, key, request.filter, min_score, method, rr.top_n, mmr_lambda)
        offset = decode_page_token(request.page_token, fingerprint)
        if offset + top_k > MILVUS_MAX_WINDOW:
            raise FieldError("top_k", f"page offset {offset} + top_k {top_k} exceeds Milvus' window of "
                                      f"{MILVUS_MAX_WINDOW} results")
        try:
            plan = validate_request(method, top_k, rr.top_n, mmr_lambda, self._s.rerank, offset=offset)
        except InvalidInputError as exc:
            raise FieldError("rerank", str(exc)) from exc

        t0 = time.perf_counter()
        vector = await self._query_vector(kind, request)
        t1 = time.perf_counter()
        if plan.method == RerankMethod.NONE:
            hits = (await self._in_store(self._store.search, vector[None, :], top_k, offset=offset,
                                         filter=request.filter, min_score=min_score))[0]
            window_end = MILVUS_MAX_WINDOW
        else:
            candidates = (await self._in_store(self._store.search, vector[None, :], plan.top_n,
                                               filter=request.filter, with_vectors=True))[0]
            hits = await rerank(plan.method, vector, candidates, top_k, lambda_=plan.mmr_lambda,
                                model_reranker=self._model_reranker, offset=offset)
            if min_score is not None:
                hits = [h for h in hits if h.score >= min_score]
            window_end = min(plan.top_n, len(candidates))
        t2 = time.perf_counter()

        response = pb.SearchImagesResponse(model_id=self._manifest.model_id, encode_ms=(t1 - t0) * 1e3,
                                           search_ms=(t2 - t1) * 1e3)
        for rank, hit in enumerate(hits, start=offset):
            response.results.append(pb.SearchResult(image=image_record(hit), score=hit.score, rank=rank))
        if len(hits) == top_k and offset + top_k < window_end:
            response.next_page_token = encode_page_token(offset + top_k, fingerprint)
        return response

    async def _query_vector(self, kind: str, request: pb.SearchImagesRequest) -> np.ndarray:
        """Return the query embedding, float32 [D]."""
        if kind == "text":
            text = request.text.strip()
            if not text:
                raise FieldError("text", "text is empty")
            if len(request.text) > self._s.max_text_chars:
                raise FieldError("text", f"text has {len(request.text)} characters; the limit is "
                                         f"{self._s.max_text_chars}")
            try:
                ids = self._tokenizer.encode_batch([text])
            except ValueError as exc:  # e.g. only control characters: nothing left after open_clip's cleaning
                raise FieldError("text", f"text has nothing to search for after cleaning ({exc})") from exc
            return (await self._encoder.encode_texts(ids))[0]
        if kind == "image":
            if not request.image:
                raise FieldError("image", "image is empty: send the encoded image bytes")
            loop = asyncio.get_running_loop()
            (pixels,) = await loop.run_in_executor(self._decode_executor, self._preprocess, [request.image])
            if isinstance(pixels, Exception):
                pixels.field = "image"
                raise pixels
            return (await self._encoder.encode_images(pixels[None]))[0]
        image_id = check_image_id(request.image_id)
        rows = await self._in_store(self._store.get, [image_id], with_vectors=True)
        if not rows:
            raise NotFoundError(f"image {image_id} is not in the collection")
        return np.asarray(rows[0].embedding, dtype=np.float32)

    # --- IngestImages -------------------------------------------------------------------------------------------

    async def IngestImages(  # noqa: N802
        self, request_iterator: AsyncIterator[pb.IngestImagesRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.IngestImagesResponse]:
        """Stream one IngestImagesResponse per request: INSERTED, ALREADY_PRESENT or REJECTED with a status."""
        async for response in self._ingest.run(request_iterator):
            yield response

    # --- DeleteImages / GetImage / GetCollectionStats ---------------------------------------------------------

    @rpc_errors
    async def DeleteImages(self, request: pb.DeleteImagesRequest, context: grpc.aio.ServicerContext):  # noqa: N802
        """Delete by ids or by filter (exactly one); returns how many stored images were deleted.

        The original bytes stay in the blob store (it is shared by collections of other models).
        """
        if bool(request.image_ids) == bool(request.filter):
            raise FieldError("image_ids", "set exactly one of image_ids and filter")
        if request.image_ids:
            if len(request.image_ids) > MILVUS_MAX_WINDOW:
                raise FieldError("image_ids", f"at most {MILVUS_MAX_WINDOW} ids per call")
            ids = [check_image_id(i, "image_ids") for i in request.image_ids]
            deleted = await self._in_store(self._store.delete, ids=ids)
        else:
            deleted = await self._in_store(self._store.delete, filter=request.filter)
        return pb.DeleteImagesResponse(deleted_count=deleted)

    @rpc_errors
    async def GetImage(self, request: pb.GetImageRequest, context: grpc.aio.ServicerContext):  # noqa: N802
        """Return an image's record, original bytes and MIME type; NOT_FOUND if it is not in the collection."""
        from retrieval_service.usecases.preprocess import image_format  # noqa: PLC0415

        image_id = check_image_id(request.image_id)
        rows = await self._in_store(self._store.get, [image_id])
        if not rows:
            raise NotFoundError(f"image {image_id} is not in the collection")
        content = await self._in_store(self._blobs.get, image_id)
        return pb.GetImageResponse(image=image_record(rows[0]), content=content, mime_type=image_format(content))

    @rpc_errors
    async def GetCollectionStats(self, request, context: grpc.aio.ServicerContext):  # noqa: N802, ANN001
        """Return count, model id, embedding dim and index of the served collection."""
        info = await self._in_store(self._store.describe)
        return pb.GetCollectionStatsResponse(
            collection=str(info["collection"]),
            image_count=int(info["count"]),
            model_id=self._manifest.model_id,
            embedding_dim=int(info["dim"]),
            index_type=str(info["index_type"]),
            metric_type=str(info["metric_type"]),
            index_params={k: str(v) for k, v in dict(info.get("params", {})).items()},
            milvus_kind="lite" if self._s.milvus_is_lite else "server",
        )


    # --- GenerateImages -----------------------------------------------------------------------------------------

    async def GenerateImages(  # noqa: N802
        self, request: pb.GenerateImagesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateImagesResponse]:
        """Retrieve references, then stream Gemini's generation (see the proto for the stream's shape and codes).

        Nothing is streamed before the request is validated and the references are found, so every request error
        is a status, never a half stream. Closing the stream (caller cancelled, deadline) closes Gemini's stream.
        """
        try:
            prompt = request.prompt.strip()
            if not prompt:
                raise FieldError("prompt", "prompt is empty")
            if len(request.prompt) > self._s.max_text_chars * 10:
                raise FieldError("prompt", f"prompt has {len(request.prompt)} characters; the limit is "
                                           f"{self._s.max_text_chars * 10}")
            options = _generation_options(request.options)
            if self._generator is None or not self._generator.configured:
                raise GenerationNotConfiguredError(
                    "no Gemini API key is configured (set VITRINE_GENERATION__API_KEY or generation.api_key)")
            t0 = time.perf_counter()
            references = await self._references(request)
            retrieval_ms = (time.perf_counter() - t0) * 1e3
            events = self._generator.stream(prompt, [(content, mime) for _, content, mime in references],
                                            model=request.model or None, options=options)
        except Exception as exc:  # noqa: BLE001 - mapped to a status; the server keeps serving
            if isinstance(exc, DependencyUnavailableError):
                self.dependency_failed(exc)
            await context.abort_with_status(rpc_status.to_status(to_status(exc)))
            return
        yield pb.GenerateImagesResponse(references=pb.GenerationReferences(
            references=[result for result, _, _ in references], retrieval_ms=retrieval_ms))
        try:
            async with contextlib.aclosing(events) as stream:
                async for event in stream:
                    yield _generation_event(event)
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as exc:  # noqa: BLE001
            await context.abort_with_status(rpc_status.to_status(to_status(exc)))

    async def _references(self, request: pb.GenerateImagesRequest) -> list[tuple[pb.SearchResult, bytes, str]]:
        """Find the reference images: (result, original bytes, MIME type) in the order they go to Gemini."""
        from retrieval_service.usecases.preprocess import image_format  # noqa: PLC0415

        limit = self._s.generation.max_reference_images
        kind = request.WhichOneof("references")
        if kind == "reference_ids":
            ids = [check_image_id(i, "reference_ids.image_ids") for i in request.reference_ids.image_ids]
            if len(ids) > limit:
                raise FieldError("reference_ids.image_ids", f"at most {limit} reference images, got {len(ids)}")
            rows = {row.id: row for row in await self._in_store(self._store.get, ids)}
            missing = [i for i in ids if i not in rows]
            if missing:
                raise NotFoundError(f"reference image {missing[0]} is not in the collection")
            results = [pb.SearchResult(image=image_record(rows[i]), score=0.0, rank=n) for n, i in enumerate(ids)]
        elif kind == "reference_query":
            count = request.reference_count or 1
            if not 1 <= count <= limit:
                raise FieldError("reference_count", f"reference_count must be in [1, {limit}], got {count}")
            query = request.reference_query
            search = pb.SearchImagesRequest(top_k=count, filter=query.filter)
            which = query.WhichOneof("query")
            if which is None:
                raise FieldError("reference_query", "reference_query needs text or image")
            setattr(search, which, getattr(query, which))
            if query.HasField("min_score"):
                search.min_score = query.min_score
            results = list((await self._search(search)).results)
        else:
            return []
        out = []
        for result in results:
            content = await self._in_store(self._blobs.get, result.image.image_id)
            out.append((result, content, image_format(content)))
        return out


def _generation_options(options: pb.GenerationOptions) -> GenerationOptions:
    """Proto options -> generation.GenerationOptions (validated there; InvalidInputError names the field)."""
    present = {f.name: v for f, v in options.ListFields()}
    kwargs = {k: present.get(k) for k in ("temperature", "top_p", "top_k", "seed", "max_output_tokens")}
    kwargs["candidate_count"] = options.candidate_count or None
    kwargs["aspect_ratio"] = options.aspect_ratio or None
    if options.response_modalities:
        kwargs["response_modalities"] = tuple(options.response_modalities)
    return GenerationOptions(**kwargs)


def _generation_event(event: TextChunk | ImageChunk | GenerationFinished) -> pb.GenerateImagesResponse:
    """A generation event -> its stream message."""
    if isinstance(event, TextChunk):
        return pb.GenerateImagesResponse(text=pb.GeneratedText(text=event.text,
                                                               candidate_index=event.candidate_index))
    if isinstance(event, ImageChunk):
        return pb.GenerateImagesResponse(image=pb.GeneratedImage(data=event.data, mime_type=event.mime_type,
                                                                 candidate_index=event.candidate_index))
    return pb.GenerateImagesResponse(finished=pb.GenerationFinished(
        finish_reason=event.finish_reason, blocked=event.blocked, block_reason=event.block_reason,
        prompt_tokens=event.prompt_tokens, candidates_tokens=event.candidates_tokens,
        total_tokens=event.total_tokens, first_part_ms=event.first_part_ms or 0.0, total_ms=event.total_ms,
        text_parts=event.text_parts, image_parts=event.image_parts))
