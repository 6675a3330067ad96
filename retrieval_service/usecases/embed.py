"""Query embedding, shared by SearchImages and the EmbedTexts / EmbedImages RPCs (and every transport).

    texts:  validate each -> open_clip cleaning -> cache lookup (model id, cleaned text)
            -> misses: tokenize, pad to the smallest length bucket that fits, one encoder call per bucket
               (concurrently; Triton's dynamic batcher merges concurrent requests of one bucket)
            -> cache the new embeddings
    images: cache lookup (model id, sha256 of the bytes) -> misses: decode + preprocess (executor) -> one encoder
            call -> cache

A cache hit costs no encoder call and reports encode_ms 0. Bad items are reported per item (FieldError /
ImageRejectedError naming `texts[i]` / `images[i]`) so one bad item never fails the others; a down encoder fails
the whole call (DependencyUnavailableError -> UNAVAILABLE).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from retrieval_service.adapters.triton.encoder import EncoderClient
from retrieval_service.errors import FieldError, ImageRejectedError
from retrieval_service.usecases.embedding_cache import EmbeddingCache
from retrieval_service.usecases.preprocess import ImageDecoder
from retrieval_service.usecases.types import Embedding
from vitrine.tokenizer import TextTokenizer, bucket_for

#: Above this many bytes of images in one call, their cache keys (sha256) are computed off the event loop.
_HASH_IN_LOOP_BYTES = 1 << 20


@dataclass(frozen=True)
class EmbedLimits:
    """Request limits (settings `max_embed_items`, `max_text_chars`)."""

    max_items: int = 256
    max_text_chars: int = 1000


@dataclass(frozen=True)
class EmbedBatch:
    """The answer of one embed call, items in request order.

    items: per input, its `Embedding` (vector float32 [D]) or the exception that refused it (FieldError /
        ImageRejectedError, INVALID_ARGUMENT, naming `texts[i]` / `images[i]`).
    model_id, embedding_dim: the manifest's.
    encode_ms: wall time of this call's encoder work (tokenize/decode + towers) for cache misses, ms; 0 when every
        item was a hit or refused.
    """

    items: list[Embedding | Exception]
    model_id: str
    embedding_dim: int
    encode_ms: float


class EmbedQueries:
    """Texts and images -> embeddings through the length buckets, the encoder and the query embedding cache.

    Args:
        model_id, embedding_dim: the manifest's (cache keys, responses).
        tokenizer: open_clip-equal tokenizer (its `clean` gives the cache key's text).
        buckets: ascending padded text lengths, the last = context_length (manifest `text.buckets` or settings
            `text_length_buckets`); (context_length,) for a fixed-length text graph.
        encoder: the Triton towers.
        decoder: encoded image bytes -> uint8 [H, W, 3] (executor).
        cache: the query embedding cache (may be disabled).
        limits: items per call, characters per text.

    One instance per server, one event loop; safe for concurrent calls.
    """

    def __init__(self, *, model_id: str, embedding_dim: int, tokenizer: TextTokenizer, buckets: Sequence[int],
                 encoder: EncoderClient, decoder: ImageDecoder, cache: EmbeddingCache, limits: EmbedLimits) -> None:
        self.model_id = model_id
        self.embedding_dim = embedding_dim
        self.buckets = tuple(buckets)
        self._tokenizer = tokenizer
        self._encoder = encoder
        self._decoder = decoder
        self._cache = cache
        self._limits = limits

    # --- one query (SearchImages) ------------------------------------------------------------------------------

    async def embed_text(self, text: str, *, field: str = "text") -> tuple[Embedding, float]:
        """One text's embedding and the encode time spent on it (ms; 0 on a cache hit).

        Raises:
            FieldError (`field`): empty, too long, or nothing left after cleaning.
            DependencyUnavailableError: the encoder is down.
        """
        cleaned = self._clean(text, field)
        (item,), encode_ms = await self._texts([cleaned])
        return item, encode_ms

    async def embed_image(self, content: bytes, *, field: str = "image") -> tuple[Embedding, float]:
        """One encoded image's embedding and the encode time spent on it (ms; 0 on a cache hit).

        Raises:
            FieldError (`field`): no bytes.
            ImageRejectedError (`field`): undecodable or breaks a limit.
            DependencyUnavailableError: the encoder is down.
        """
        if not content:
            raise FieldError(field, f"{field} is empty: send the encoded image bytes")
        (item,), encode_ms = await self._images([content], [field])
        if isinstance(item, Exception):
            raise item
        return item, encode_ms

    # --- many items (EmbedTexts / EmbedImages) -----------------------------------------------------------------

    async def embed_texts(self, texts: Sequence[str]) -> EmbedBatch:
        """Embed 1..max_items texts; one item per text, in order (a refused text is its FieldError "texts[i]").

        Raises:
            FieldError ("texts"): no texts, or more than max_items.
            DependencyUnavailableError: the encoder is down (the whole call fails).
        """
        self._check_count(len(texts), "texts")
        items: list[Embedding | Exception] = []
        good: list[int] = []
        cleaned: list[str] = []
        for i, text in enumerate(texts):
            try:
                cleaned.append(self._clean(text, f"texts[{i}]"))
                good.append(i)
                items.append(None)  # type: ignore[arg-type]  # filled below
            except FieldError as exc:
                items.append(exc)
        encode_ms = 0.0
        if good:
            embedded, encode_ms = await self._texts(cleaned)
            for i, embedding in zip(good, embedded):
                items[i] = embedding
        return EmbedBatch(items, self.model_id, self.embedding_dim, encode_ms)

    async def embed_images(self, contents: Sequence[bytes]) -> EmbedBatch:
        """Embed 1..max_items encoded images; one item per image, in order (a refused image is its
        ImageRejectedError naming "images[i]", ErrorInfo reason IMAGE_*).

        Raises:
            FieldError ("images"): no images, or more than max_items.
            DependencyUnavailableError: the encoder is down (the whole call fails).
        """
        self._check_count(len(contents), "images")
        items, encode_ms = await self._images(list(contents), [f"images[{i}]" for i in range(len(contents))])
        return EmbedBatch(items, self.model_id, self.embedding_dim, encode_ms)

    # --- internals ---------------------------------------------------------------------------------------------

    def _check_count(self, n: int, field: str) -> None:
        if not 1 <= n <= self._limits.max_items:
            raise FieldError(field, f"{field} must hold 1..{self._limits.max_items} items, got {n}")

    def _clean(self, text: str, field: str) -> str:
        """Validate one text; open_clip's cleaning of it (the tokenizer's input and the cache key)."""
        if not text.strip():
            raise FieldError(field, f"{field} is empty")
        if len(text) > self._limits.max_text_chars:
            raise FieldError(field, f"{field} has {len(text)} characters; the limit is "
                                    f"{self._limits.max_text_chars}")
        cleaned = self._tokenizer.clean(text)
        if not cleaned:  # e.g. only control characters
            raise FieldError(field, f"{field} has nothing to embed after open_clip's text cleaning")
        return cleaned

    async def _texts(self, cleaned: list[str]) -> tuple[list[Embedding], float]:
        """Embeddings of cleaned texts (cache, then the text tower per length bucket), and the encode ms."""
        keys = [EmbeddingCache.text_key(self.model_id, text) for text in cleaned]
        found = await self._cache.get_many(keys, "text") if self._cache.enabled else [None] * len(keys)
        misses = [i for i, hit in enumerate(found) if hit is None]
        if not misses:
            return found, 0.0  # type: ignore[return-value]
        started = time.perf_counter()
        unique = list(dict.fromkeys(cleaned[i] for i in misses))  # a text asked twice in one call is encoded once
        tokens = self._tokenizer.encode_padded(unique, self.buckets, cleaned=True)
        groups: dict[int, list[int]] = {}
        for row, count in enumerate(tokens.token_counts.tolist()):
            groups.setdefault(bucket_for(count, self.buckets), []).append(row)
        vectors = np.empty((len(unique), self.embedding_dim), dtype=np.float32)

        async def run(length: int, rows: list[int]) -> None:
            vectors[rows] = await self._encoder.encode_texts(np.ascontiguousarray(tokens.ids[rows, :length]))

        if len(groups) == 1:
            ((length, rows),) = groups.items()
            await run(length, rows)
        else:
            await asyncio.gather(*(run(length, rows) for length, rows in groups.items()))
        encode_ms = (time.perf_counter() - started) * 1e3
        by_text = {text: Embedding(vectors[row], token_count=int(tokens.token_counts[row]),
                                   truncated=bool(tokens.truncated[row]))
                   for row, text in enumerate(unique)}
        for i in misses:
            found[i] = by_text[cleaned[i]]
        if self._cache.enabled:
            await self._cache.put_many([(EmbeddingCache.text_key(self.model_id, text), e)
                                        for text, e in by_text.items()], "text")
        return found, encode_ms  # type: ignore[return-value]

    async def _images(self, contents: list[bytes], fields: list[str]) -> tuple[list[Embedding | Exception], float]:
        """Embeddings of encoded images (cache, then decode + the image tower), refused ones as exceptions."""
        keys: list[str] = []
        found: list[Embedding | Exception | None] = [None] * len(contents)
        if self._cache.enabled:
            if sum(map(len, contents)) > _HASH_IN_LOOP_BYTES:
                keys = await asyncio.get_running_loop().run_in_executor(
                    self._decoder.executor, lambda: [EmbeddingCache.image_key(self.model_id, c) for c in contents])
            else:
                keys = [EmbeddingCache.image_key(self.model_id, c) for c in contents]
            found = list(await self._cache.get_many(keys, "image"))
        misses = [i for i, hit in enumerate(found) if hit is None]
        if not misses:
            return found, 0.0  # type: ignore[return-value]
        started = time.perf_counter()
        decoded = await self._decoder.decode([contents[i] for i in misses])
        ready: list[int] = []
        for i, pixels in zip(misses, decoded):
            if isinstance(pixels, ImageRejectedError):
                pixels.field = fields[i]
                found[i] = pixels
            else:
                ready.append(i)
        new: list[tuple[str, Embedding]] = []
        if ready:
            position = {i: k for k, i in enumerate(misses)}
            pixels = np.stack([decoded[position[i]] for i in ready])
            vectors = await self._encoder.encode_images(pixels)
            for i, vector in zip(ready, vectors):
                found[i] = Embedding(vector)
                if keys:
                    new.append((keys[i], found[i]))  # type: ignore[arg-type]
        encode_ms = (time.perf_counter() - started) * 1e3 if ready else 0.0
        if new:
            await self._cache.put_many(new, "image")
        return found, encode_ms  # type: ignore[return-value]


__all__ = ["EmbedBatch", "EmbedLimits", "EmbedQueries"]
