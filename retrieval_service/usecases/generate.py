"""The GenerateImages use case: find reference images, then stream Gemini's generation from them.

    validate prompt and options -> references (by ids, or by a text/image query through SearchImages)
    -> original bytes from the blob store -> GeminiGenerator.stream(prompt, references)

`prepare` does everything that can fail on the request before anything is streamed, so a transport answers a
bad request with a status, never a half stream; the returned `Generation` carries the references and the
event iterator (TextChunk / ImageChunk ..., then one Finished).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

from retrieval_service.adapters.blob_store import AsyncBlobStore
from retrieval_service.adapters.gemini import (
    GeminiGenerator,
    GenerationEvent,
    GenerationNotConfiguredError,
    GenerationOptions,
)
from retrieval_service.adapters.milvus import AsyncVectorStore, Hit
from retrieval_service.errors import FieldError, NotFoundError
from retrieval_service.usecases.preprocess import image_format
from retrieval_service.usecases.search import SearchImages
from retrieval_service.usecases.types import ImageQuery, SearchRequest, TextQuery, require_image_id

#: A prompt may be this many times longer than a text query (settings `max_text_chars`).
PROMPT_CHARS_FACTOR = 10


@dataclass(frozen=True)
class ReferenceIds:
    """Use these stored images as references, in this order."""

    image_ids: Sequence[str]


@dataclass(frozen=True)
class ReferenceQuery:
    """Retrieve `count` references (0 = 1) with a text or image query (`query` None is an error)."""

    query: TextQuery | ImageQuery | None
    count: int = 0
    filter: str = ""
    min_score: float | None = None


@dataclass(frozen=True)
class GenerateRequest:
    """One GenerateImages call. `options`: GenerationOptions keyword arguments (None values = Gemini's default)."""

    prompt: str
    references: Union[ReferenceIds, ReferenceQuery, None] = None
    model: str = ""
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Reference:
    """A reference image as sent to Gemini: its hit (score 0 for ids), rank, bytes and MIME type."""

    hit: Hit
    rank: int
    content: bytes
    mime_type: str


@dataclass
class Generation:
    """A prepared generation: the references (in the order sent), how long finding them took (ms), the events."""

    references: list[Reference]
    retrieval_ms: float
    events: AsyncIterator[GenerationEvent]


class GenerateImages:
    """Retrieval-augmented generation over one collection.

    Args:
        search: the search use case (reference queries go through it, cache and limits included).
        store: the collection, for references by id.
        blobs: the original bytes sent to Gemini.
        generator: the Gemini client; None or not configured -> GenerationNotConfiguredError.
        max_text_chars: the text limit; prompts may be PROMPT_CHARS_FACTOR times longer.
        max_reference_images: most references per generation (settings `generation.max_reference_images`).
    """

    def __init__(self, *, search: SearchImages, store: AsyncVectorStore, blobs: AsyncBlobStore,
                 generator: GeminiGenerator | None, max_text_chars: int, max_reference_images: int) -> None:
        self._search = search
        self._store = store
        self._blobs = blobs
        self._generator = generator
        self._max_prompt_chars = max_text_chars * PROMPT_CHARS_FACTOR
        self._max_references = max_reference_images

    async def prepare(self, request: GenerateRequest) -> Generation:
        """Validate, find the references and open (lazily) Gemini's stream.

        Raises:
            FieldError / InvalidInputError: empty or too long prompt, bad options (the field named), bad reference
                ids or count, a reference query without text or image.
            GenerationNotConfiguredError: no Gemini API key is configured (FAILED_PRECONDITION).
            NotFoundError: a reference id that is not stored.
            DependencyUnavailableError: the encoder or Milvus is down.
        """
        prompt = request.prompt.strip()
        if not prompt:
            raise FieldError("prompt", "prompt is empty")
        if len(request.prompt) > self._max_prompt_chars:
            raise FieldError("prompt", f"prompt has {len(request.prompt)} characters; the limit is "
                                       f"{self._max_prompt_chars}")
        options = GenerationOptions(**dict(request.options))
        if self._generator is None or not self._generator.configured:
            raise GenerationNotConfiguredError(
                "no Gemini API key is configured (set VITRINE_GENERATION__API_KEY or generation.api_key)")
        t0 = time.perf_counter()
        references = await self._references(request.references)
        retrieval_ms = (time.perf_counter() - t0) * 1e3
        events = self._generator.stream(prompt, [(r.content, r.mime_type) for r in references],
                                        model=request.model or None, options=options)
        return Generation(references=references, retrieval_ms=retrieval_ms, events=events)

    async def _references(self, spec: ReferenceIds | ReferenceQuery | None) -> list[Reference]:
        """The reference images, in the order they go to Gemini."""
        limit = self._max_references
        if isinstance(spec, ReferenceIds):
            ids = [require_image_id(i, "reference_ids.image_ids") for i in spec.image_ids]
            if len(ids) > limit:
                raise FieldError("reference_ids.image_ids", f"at most {limit} reference images, got {len(ids)}")
            rows = {row.id: row for row in await self._store.get(ids)}
            missing = [i for i in ids if i not in rows]
            if missing:
                raise NotFoundError(f"reference image {missing[0]} is not in the collection")
            hits = [Hit(id=i, score=0.0, filename=rows[i].filename, ingest_time_ms=rows[i].ingest_time_ms,
                        metadata=rows[i].metadata) for i in ids]
            ranked = list(enumerate(hits))
        elif isinstance(spec, ReferenceQuery):
            count = spec.count or 1
            if not 1 <= count <= limit:
                raise FieldError("reference_count", f"reference_count must be in [1, {limit}], got {count}")
            if spec.query is None:
                raise FieldError("reference_query", "reference_query needs text or image")
            page = await self._search.search(SearchRequest(query=spec.query, top_k=count, filter=spec.filter,
                                                           min_score=spec.min_score))
            ranked = list(enumerate(page.hits, start=page.offset))
        else:
            return []
        out = []
        for rank, hit in ranked:
            content = await self._blobs.get(hit.id)
            out.append(Reference(hit=hit, rank=rank, content=content, mime_type=image_format(content)))
        return out
