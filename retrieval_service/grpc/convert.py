"""vitrine.v1 protobuf messages <-> the plain values of retrieval_service.usecases, and nothing else.

Handlers call these; they hold no validation (the use cases validate) beyond what the wire format forces
(proto3 "unset" -> None).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from google.protobuf import struct_pb2, timestamp_pb2
from google.rpc import code_pb2

from retrieval_service.adapters.gemini import Finished, GenerationEvent, ImageChunk, TextChunk
from retrieval_service.adapters.milvus import Hit, Row
from retrieval_service.grpc.status import ErrorMapper
from retrieval_service.usecases.embed import EmbedBatch
from retrieval_service.usecases.generate import GenerateRequest, Generation, ReferenceIds, ReferenceQuery
from retrieval_service.usecases.types import (
    CollectionStats,
    Embedding,
    ImageQuery,
    IngestItem,
    IngestOutcome,
    Query,
    RerankOptions,
    SearchPage,
    SearchRequest,
    StoredImage,
    StoredImageQuery,
    TextQuery,
)
from vitrine.v1 import retrieval_service_pb2 as pb

#: proto RerankOptions.Method -> the use case's method name; unspecified (or unknown) -> None (settings default).
RERANK_METHODS: dict[int, str | None] = {
    pb.RerankOptions.METHOD_UNSPECIFIED: None,
    pb.RerankOptions.NONE: "none",
    pb.RerankOptions.EXACT: "exact",
    pb.RerankOptions.MMR: "mmr",
    pb.RerankOptions.MODEL: "model",
}
_OUTCOMES = {"INSERTED": pb.IngestImagesResponse.INSERTED, "ALREADY_PRESENT": pb.IngestImagesResponse.ALREADY_PRESENT,
             "REJECTED": pb.IngestImagesResponse.REJECTED}


def _query(message: pb.SearchImagesRequest | pb.ReferenceQuery) -> Query | None:
    kind = message.WhichOneof("query")
    if kind == "text":
        return TextQuery(message.text)
    if kind == "image":
        return ImageQuery(message.image)
    if kind == "image_id":
        return StoredImageQuery(message.image_id)
    return None


def search_request(request: pb.SearchImagesRequest) -> SearchRequest:
    """SearchImagesRequest -> SearchRequest."""
    rr = request.rerank
    return SearchRequest(
        query=_query(request),
        top_k=request.top_k,
        min_score=request.min_score if request.HasField("min_score") else None,
        filter=request.filter,
        page_token=request.page_token,
        rerank=RerankOptions(method=RERANK_METHODS.get(rr.method), top_n=rr.top_n,
                             mmr_lambda=rr.mmr_lambda if rr.HasField("mmr_lambda") else None),
    )


def image_record(row: Row | Hit) -> pb.ImageRecord:
    """An ImageRecord from a stored Row or Hit (id, filename, ingest_time_ms, metadata)."""
    record = pb.ImageRecord(image_id=row.id, filename=row.filename or "")
    if row.metadata:
        record.metadata.update(row.metadata)
    record.ingest_time.CopyFrom(timestamp_pb2.Timestamp())
    record.ingest_time.FromMilliseconds(int(row.ingest_time_ms))
    return record


def search_response(page: SearchPage) -> pb.SearchImagesResponse:
    """SearchPage -> SearchImagesResponse (ranks from the page's offset)."""
    response = pb.SearchImagesResponse(model_id=page.model_id, encode_ms=page.encode_ms, search_ms=page.search_ms,
                                       next_page_token=page.next_page_token,
                                       text_truncated=page.text_truncated)
    for rank, hit in enumerate(page.hits, start=page.offset):
        response.results.append(pb.SearchResult(image=image_record(hit), score=hit.score, rank=rank))
    return response


def get_image_response(image: StoredImage) -> pb.GetImageResponse:
    """StoredImage -> GetImageResponse."""
    return pb.GetImageResponse(image=image_record(image.record), content=image.content, mime_type=image.mime_type)


def stats_response(stats: CollectionStats) -> pb.GetCollectionStatsResponse:
    """CollectionStats -> GetCollectionStatsResponse."""
    return pb.GetCollectionStatsResponse(
        collection=stats.collection, image_count=stats.image_count, model_id=stats.model_id,
        embedding_dim=stats.embedding_dim, index_type=stats.index_type, metric_type=stats.metric_type,
        index_params=stats.index_params, milvus_kind=stats.milvus_kind)


def plain_value(value: Any) -> Any:
    """A protobuf Struct / ListValue / number as plain Python, integral floats as ints (`metadata["label"] == 3`
    holds: google.protobuf.Struct stores every number as a double; JSON users expect 3, not 3.0). Never raises:
    NaN and Infinity stay floats, for the use case to refuse."""
    if isinstance(value, struct_pb2.Struct):
        return {k: plain_value(v) for k, v in value.items()}
    if isinstance(value, struct_pb2.ListValue):
        return [plain_value(v) for v in value]
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value


async def ingest_items(requests: AsyncIterator[pb.IngestImagesRequest]) -> AsyncIterator[IngestItem]:
    """The client stream as IngestItems."""
    async for req in requests:
        yield IngestItem(index=req.index, content=req.content, filename=req.filename,
                         metadata=plain_value(req.metadata) if req.HasField("metadata") else None)


def ingest_response(outcome: IngestOutcome, errors: ErrorMapper) -> pb.IngestImagesResponse:
    """IngestOutcome -> IngestImagesResponse; a REJECTED outcome's error becomes its `google.rpc.Status`."""
    response = pb.IngestImagesResponse(index=outcome.index, image_id=outcome.image_id,
                                       outcome=_OUTCOMES[outcome.outcome])
    if outcome.error is not None:
        response.error.CopyFrom(errors.status(outcome.error))
    return response


def ingest_metric_labels(outcome: IngestOutcome, response: pb.IngestImagesResponse) -> tuple[str, str]:
    """(outcome name, google.rpc code name of its error or 'OK'): the labels of vitrine_ingest_images_total."""
    return outcome.outcome, code_pb2.Code.Name(response.error.code) if outcome.error is not None else "OK"


def embed_texts_request(request: pb.EmbedTextsRequest) -> list[str]:
    """EmbedTextsRequest -> the texts, in request order."""
    return list(request.texts)


def embed_images_request(request: pb.EmbedImagesRequest) -> list[bytes]:
    """EmbedImagesRequest -> the encoded images, in request order."""
    return list(request.images)


def embedding_result(item: Embedding | Exception, errors: ErrorMapper) -> pb.EmbeddingResult:
    """One item of an EmbedBatch -> EmbeddingResult: the vector (float32 [D] -> `values`) with token_count,
    truncated and cached; or, for a refused item (its exception), `error` as a `google.rpc.Status` through
    `errors` (INVALID_ARGUMENT with the field / reason details for bad input)."""
    if isinstance(item, Exception):
        return pb.EmbeddingResult(error=errors.status(item))
    return pb.EmbeddingResult(values=item.vector.tolist(), token_count=item.token_count, truncated=item.truncated,
                              cached=item.cached)


def embed_response(batch: EmbedBatch, errors: ErrorMapper,
                   response_type: type[pb.EmbedTextsResponse] | type[pb.EmbedImagesResponse]
                   ) -> pb.EmbedTextsResponse | pb.EmbedImagesResponse:
    """EmbedBatch -> `response_type` (EmbedTextsResponse / EmbedImagesResponse): one EmbeddingResult per item, in
    request order, with the model id, dim and encode_ms."""
    return response_type(embeddings=[embedding_result(item, errors) for item in batch.items],
                         model_id=batch.model_id, embedding_dim=batch.embedding_dim, encode_ms=batch.encode_ms)


def generate_request(request: pb.GenerateImagesRequest) -> GenerateRequest:
    """GenerateImagesRequest -> GenerateRequest (options as GenerationOptions keyword arguments)."""
    kind = request.WhichOneof("references")
    references: ReferenceIds | ReferenceQuery | None = None
    if kind == "reference_ids":
        references = ReferenceIds(list(request.reference_ids.image_ids))
    elif kind == "reference_query":
        query = request.reference_query
        references = ReferenceQuery(
            query=_query(query), count=request.reference_count, filter=query.filter,
            min_score=query.min_score if query.HasField("min_score") else None)
    return GenerateRequest(prompt=request.prompt, references=references, model=request.model,
                           options=generation_options(request.options))


def generation_options(options: pb.GenerationOptions) -> dict[str, Any]:
    """Proto GenerationOptions -> GenerationOptions keyword arguments (unset fields left out / None)."""
    present = {f.name: v for f, v in options.ListFields()}
    kwargs: dict[str, Any] = {k: present.get(k) for k in ("temperature", "top_p", "top_k", "seed", "max_output_tokens")}
    kwargs["candidate_count"] = options.candidate_count or None
    kwargs["aspect_ratio"] = options.aspect_ratio or None
    if options.response_modalities:
        kwargs["response_modalities"] = tuple(options.response_modalities)
    return kwargs


def references_message(generation: Generation) -> pb.GenerateImagesResponse:
    """The first message of a GenerateImages stream: the references found and how long that took."""
    results = [pb.SearchResult(image=image_record(r.hit), score=r.hit.score, rank=r.rank)
               for r in generation.references]
    return pb.GenerateImagesResponse(references=pb.GenerationReferences(
        references=results, retrieval_ms=generation.retrieval_ms))


def generation_event(event: GenerationEvent) -> pb.GenerateImagesResponse:
    """A generation event (TextChunk / ImageChunk / Finished) -> its stream message."""
    if isinstance(event, TextChunk):
        return pb.GenerateImagesResponse(text=pb.GeneratedText(text=event.text,
                                                               candidate_index=event.candidate_index))
    if isinstance(event, ImageChunk):
        return pb.GenerateImagesResponse(image=pb.GeneratedImage(data=event.data, mime_type=event.mime_type,
                                                                 candidate_index=event.candidate_index))
    assert isinstance(event, Finished)
    return pb.GenerateImagesResponse(finished=pb.GenerationFinished(
        finish_reason=event.finish_reason, blocked=event.blocked, block_reason=event.block_reason,
        prompt_tokens=event.prompt_tokens, candidates_tokens=event.candidates_tokens,
        total_tokens=event.total_tokens, first_part_ms=event.first_part_ms or 0.0, total_ms=event.total_ms,
        text_parts=event.text_parts, image_parts=event.image_parts))
