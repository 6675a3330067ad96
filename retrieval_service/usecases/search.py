"""The SearchImages use case: a text, image or stored-image query -> one page of ranked stored images.

    validate the request (top_k, min_score, query, filter, page token, rerank fields; each once, here)
    -> embed the query (retrieval_service.usecases.embed: query embedding cache, else tokenizer + length bucket +
       text tower or decoder + image tower; or the stored vector)
    -> Milvus search (top_k at `offset`, or the rerank window with stored vectors)
    -> rerank (retrieval_service.usecases.rerank) -> min_score -> the page and its next_page_token

Every transport calls `SearchImages.search` with a plain `SearchRequest`; errors are the exceptions of
retrieval_service.errors (FieldError names the request field).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from retrieval_service.adapters.milvus import MILVUS_MAX_WINDOW, AsyncVectorStore, Hit, validate_filter
from retrieval_service.errors import FieldError, InvalidInputError, NotFoundError
from retrieval_service.usecases.pagination import decode_page_token, encode_page_token, query_fingerprint
from retrieval_service.usecases.embed import EmbedQueries
from retrieval_service.usecases.rerank import (
    Reranker,
    RerankMethod,
    RerankSettings,
    rerank_page,
    validate_request,
)
from retrieval_service.usecases.types import (
    ImageQuery,
    Query,
    SearchPage,
    SearchRequest,
    StoredImageQuery,
    TextQuery,
    require_image_id,
)

#: top_k of a request that leaves it unset (proto3 0).
DEFAULT_TOP_K = 10
_QUERY_FIELD = {TextQuery: "text", ImageQuery: "image", StoredImageQuery: "image_id"}


@dataclass(frozen=True)
class SearchLimits:
    """Request limits of search (settings `max_top_k`; text limits are the embed use case's)."""

    max_top_k: int = 1000


class SearchImages:
    """Search over one collection; one instance per server, safe for concurrent calls.

    Args:
        model_id: the manifest's model id, reported with every page.
        embed: text and image queries -> embeddings (length buckets, encoder, query embedding cache).
        store: the collection (async).
        rerankers: one Reranker per available method (built once, `rerank.build_rerankers`).
        rerank_settings: defaults and bounds of the rerank fields.
        limits: the top_k bound.
    """

    def __init__(self, *, model_id: str, embed: EmbedQueries, store: AsyncVectorStore,
                 rerankers: Mapping[RerankMethod, Reranker], rerank_settings: RerankSettings,
                 limits: SearchLimits) -> None:
        self.model_id = model_id
        self._embed = embed
        self._store = store
        self._rerankers = rerankers
        self._rerank_settings = rerank_settings
        self._limits = limits

    async def search(self, request: SearchRequest) -> SearchPage:
        """Rank stored images by cosine similarity to the query; return the page at the request's token.

        Returns up to top_k (1..max_top_k, default 10) hits from offset `page_token`, optionally reranked
        (exact cosine, MMR or a Triton reranker model) from the first `rerank.top_n` candidates; hits below
        `min_score` (cosine) are dropped from the page, after any rerank.

        Raises:
            FieldError / InvalidInputError / InvalidFilterError: bad request field (INVALID_ARGUMENT).
            NotFoundError: an image_id query that is not stored.
            DependencyUnavailableError: the encoder or Milvus is down.
        """
        top_k = request.top_k or DEFAULT_TOP_K
        if not 1 <= top_k <= self._limits.max_top_k:
            raise FieldError("top_k", f"top_k must be in [1, {self._limits.max_top_k}], got {request.top_k}")
        min_score = request.min_score
        if min_score is not None and not -1.0 <= min_score <= 1.0:
            raise FieldError("min_score", f"min_score must be in [-1, 1] (cosine similarity), got {min_score}")
        query = request.query
        if query is None:
            raise FieldError("query", "query is required: set one of text, image or image_id")
        kind = _QUERY_FIELD[type(query)]
        rr = request.rerank
        expr = validate_filter(request.filter)  # INVALID_ARGUMENT before any encoder or Milvus call
        fingerprint = query_fingerprint(kind, _query_key(query), request.filter, min_score, rr.method or None,
                                        rr.top_n, rr.mmr_lambda)
        offset = decode_page_token(request.page_token, fingerprint)
        if offset + top_k > MILVUS_MAX_WINDOW:
            raise FieldError("top_k", f"page offset {offset} + top_k {top_k} exceeds Milvus' window of "
                                      f"{MILVUS_MAX_WINDOW} results")
        try:
            plan = validate_request(rr.method or None, top_k, rr.top_n, rr.mmr_lambda, self._rerank_settings,
                                    offset=offset)
        except InvalidInputError as exc:
            raise FieldError("rerank", str(exc)) from exc

        vector, encode_ms, text_truncated = await self.embed(query)
        t1 = time.perf_counter()
        if plan.method == RerankMethod.NONE:
            hits = (await self._store.search(vector[None, :], top_k, offset=offset, filter=expr))[0]
            window_end = MILVUS_MAX_WINDOW
        else:
            candidates = (await self._store.search(vector[None, :], plan.top_n, filter=expr,
                                                   with_vectors=True))[0]
            hits = await rerank_page(self._rerankers, plan, vector, candidates, top_k=top_k, offset=offset)
            window_end = min(plan.top_n, len(candidates))
        if min_score is not None:  # hits are in rank order: a page cut short here has no successor above it
            hits = [h for h in hits if h.score >= min_score]
        t2 = time.perf_counter()
        next_token = ""
        if len(hits) == top_k and offset + top_k < window_end:
            next_token = encode_page_token(offset + top_k, fingerprint)
        return SearchPage(hits=hits, offset=offset, next_page_token=next_token, model_id=self.model_id,
                          encode_ms=encode_ms, search_ms=(t2 - t1) * 1e3, text_truncated=text_truncated)

    async def embed(self, query: Query) -> tuple[np.ndarray, float, bool]:
        """The query's embedding float32 [D] (L2-normalized by the encoder; a stored image's stored vector), the
        encode time in ms (0 on a query embedding cache hit or a stored vector) and whether the text was
        truncated to the context length.

        Raises:
            FieldError: empty or too long text, text with nothing left after cleaning, empty image, bad image_id.
            ImageRejectedError (field 'image'): the image cannot be decoded or breaks a limit.
            NotFoundError: a stored-image query whose id is not in the collection.
            DependencyUnavailableError: the encoder or Milvus is down.
        """
        if isinstance(query, TextQuery):
            embedding, encode_ms = await self._embed.embed_text(query.text, field="text")
            return embedding.vector, encode_ms, embedding.truncated
        if isinstance(query, ImageQuery):
            embedding, encode_ms = await self._embed.embed_image(query.content, field="image")
            return embedding.vector, encode_ms, False
        image_id = require_image_id(query.image_id)
        started = time.perf_counter()
        rows = await self._store.get([image_id], with_vectors=True)
        if not rows:
            raise NotFoundError(f"image {image_id} is not in the collection")
        return np.asarray(rows[0].embedding, dtype=np.float32), (time.perf_counter() - started) * 1e3, False


def _query_key(query: Query) -> str | bytes:
    if isinstance(query, TextQuery):
        return query.text
    if isinstance(query, ImageQuery):
        return query.content
    return query.image_id


__all__ = ["DEFAULT_TOP_K", "Hit", "SearchImages", "SearchLimits"]
