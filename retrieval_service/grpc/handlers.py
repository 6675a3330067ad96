"""RPC handlers of `vitrine.v1.RetrievalService` (see proto/vitrine/v1/retrieval_service.proto).

Each handler only converts: proto request -> plain values (retrieval_service.grpc.convert), one call of a use
case (retrieval_service.usecases), plain answer -> proto response. Exceptions become statuses in
retrieval_service.grpc.status (`unary_errors` / `stream_errors`, one table).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc

from retrieval_service.grpc import convert
from retrieval_service.grpc.status import ErrorMapper, stream_errors, unary_errors
from retrieval_service.metrics import ServiceMetrics
from retrieval_service.usecases.catalog import Catalog
from retrieval_service.usecases.generate import GenerateImages as GenerateUseCase
from retrieval_service.usecases.ingest import IngestImages as IngestUseCase
from retrieval_service.usecases.embed import EmbedQueries
from retrieval_service.usecases.search import SearchImages as SearchUseCase
from vitrine.v1 import retrieval_service_pb2 as pb
from vitrine.v1 import retrieval_service_pb2_grpc as pb_grpc


class RetrievalService(pb_grpc.RetrievalServiceServicer):
    """The handlers. One instance per server; safe for concurrent calls.

    Args:
        search, ingest, catalog, generate, embed: the use cases.
        errors: exceptions -> statuses (and dependency outages -> health).
        metrics: ingest outcome counters and the open-stream gauge.
    """

    def __init__(self, *, search: SearchUseCase, ingest: IngestUseCase, catalog: Catalog, generate: GenerateUseCase,
                 embed: EmbedQueries, errors: ErrorMapper, metrics: ServiceMetrics) -> None:
        self._search = search
        self._embed = embed
        self._ingest = ingest
        self._catalog = catalog
        self._generate = generate
        self.errors = errors
        self._metrics = metrics

    @unary_errors
    async def SearchImages(self, request: pb.SearchImagesRequest,  # noqa: N802
                           context: grpc.aio.ServicerContext) -> pb.SearchImagesResponse:
        """Rank stored images by cosine similarity to a text, image or stored-image query (one page).

        INVALID_ARGUMENT for bad input (the field named), NOT_FOUND for an unknown image_id, UNAVAILABLE when the
        encoder or Milvus is down. See `SearchImages.search`.
        """
        return convert.search_response(await self._search.search(convert.search_request(request)))

    async def IngestImages(  # noqa: N802
        self, request_iterator: AsyncIterator[pb.IngestImagesRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.IngestImagesResponse]:
        """Stream one IngestImagesResponse per request: INSERTED, ALREADY_PRESENT or REJECTED with a status.

        A bad item is REJECTED (INVALID_ARGUMENT naming the field) and the stream goes on; a dependency outage
        rejects the items it hit with UNAVAILABLE.
        """
        self._metrics.ingest_streams.inc()
        try:
            async for outcome in self._ingest.run(convert.ingest_items(request_iterator)):
                response = convert.ingest_response(outcome, self.errors)
                self._metrics.count_ingest(*convert.ingest_metric_labels(outcome, response))
                yield response
        finally:
            self._metrics.ingest_streams.dec()

    @unary_errors
    async def DeleteImages(self, request: pb.DeleteImagesRequest,  # noqa: N802
                           context: grpc.aio.ServicerContext) -> pb.DeleteImagesResponse:
        """Delete by ids or by filter (exactly one); returns how many stored images were deleted.

        The original bytes stay in the blob store (it is shared by collections of other models).
        """
        deleted = await self._catalog.delete(list(request.image_ids), request.filter)
        return pb.DeleteImagesResponse(deleted_count=deleted)

    @unary_errors
    async def GetImage(self, request: pb.GetImageRequest,  # noqa: N802
                       context: grpc.aio.ServicerContext) -> pb.GetImageResponse:
        """Return an image's record, original bytes and MIME type; NOT_FOUND if it is not in the collection."""
        return convert.get_image_response(await self._catalog.get(request.image_id))

    @unary_errors
    async def GetCollectionStats(self, request: pb.GetCollectionStatsRequest,  # noqa: N802
                                 context: grpc.aio.ServicerContext) -> pb.GetCollectionStatsResponse:
        """Return count, model id, embedding dim and index of the served collection."""
        return convert.stats_response(await self._catalog.stats())

    @stream_errors
    async def GenerateImages(  # noqa: N802
        self, request: pb.GenerateImagesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateImagesResponse]:
        """Retrieve references, then stream Gemini's generation (see the proto for the stream's shape and codes).

        Nothing is streamed before the request is validated and the references are found, so every request error
        is a status, never a half stream. Closing the stream (caller cancelled, deadline) closes Gemini's stream.
        """
        generation = await self._generate.prepare(convert.generate_request(request))
        yield convert.references_message(generation)
        async with contextlib.aclosing(generation.events) as events:
            async for event in events:
                yield convert.generation_event(event)

    @unary_errors
    async def EmbedTexts(self, request: pb.EmbedTextsRequest,  # noqa: N802
                         context: grpc.aio.ServicerContext) -> pb.EmbedTextsResponse:
        """Embed 1..max_embed_items texts with the text tower; one EmbeddingResult per text, in request order.

        INVALID_ARGUMENT ("texts") for 0 or too many texts; a bad text is that item's INVALID_ARGUMENT `error`
        ("texts[i]") and the others are embedded; UNAVAILABLE when the encoder is down. See
        `EmbedQueries.embed_texts`.
        """
        batch = await self._embed.embed_texts(convert.embed_texts_request(request))
        return convert.embed_response(batch, self.errors, pb.EmbedTextsResponse)

    @unary_errors
    async def EmbedImages(self, request: pb.EmbedImagesRequest,  # noqa: N802
                          context: grpc.aio.ServicerContext) -> pb.EmbedImagesResponse:
        """Embed 1..max_embed_items encoded images with the image tower; one EmbeddingResult per image, in order.

        INVALID_ARGUMENT ("images") for 0 or too many images; a bad image is that item's INVALID_ARGUMENT
        `error` (ErrorInfo reason IMAGE_*) and the others are embedded; UNAVAILABLE when the encoder is down.
        See `EmbedQueries.embed_images`.
        """
        batch = await self._embed.embed_images(convert.embed_images_request(request))
        return convert.embed_response(batch, self.errors, pb.EmbedImagesResponse)
