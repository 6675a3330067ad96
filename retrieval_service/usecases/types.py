"""Plain typed values the use cases take and return: no protobuf, no transport.

A transport (retrieval_service.grpc, or an HTTP/JSON API) converts its messages to these, calls a use case and
converts the answer back. Stored images come back as the Milvus adapter's `Row` (a record) and `Hit` (a record
with its score), which are plain frozen dataclasses too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Union

import numpy as np

from retrieval_service.adapters.milvus import Hit, Row
from retrieval_service.errors import FieldError
from vitrine.image_ids import is_image_id


@dataclass(frozen=True)
class TextQuery:
    """Search by a sentence; `text` is the raw request text (stripped and length-checked by the use case)."""

    text: str


@dataclass(frozen=True)
class ImageQuery:
    """Search by an example image: `content` is the encoded file (JPEG, PNG, WebP, ...), bytes."""

    content: bytes


@dataclass(frozen=True)
class StoredImageQuery:
    """Search by an image already in the collection ("more like this"): its 64-hex `image_id`."""

    image_id: str


Query = Union[TextQuery, ImageQuery, StoredImageQuery]


@dataclass(frozen=True)
class RerankOptions:
    """A request's rerank fields as sent; None / 0 / '' mean "the settings' default".

    method: 'none' | 'exact' | 'mmr' | 'model' or None; top_n: candidates to rerank (0 = default);
    mmr_lambda: MMR relevance weight in [0, 1] or None.
    """

    method: str | None = None
    top_n: int = 0
    mmr_lambda: float | None = None


@dataclass(frozen=True)
class SearchRequest:
    """One SearchImages call. `query` None is an error (the use case says which field is missing).

    top_k: results per page, 0 = the default (10); min_score: cosine in [-1, 1] or None; filter: the Milvus
    boolean expression ('' for none); page_token: '' for the first page.
    """

    query: Query | None
    top_k: int = 0
    min_score: float | None = None
    filter: str = ""
    page_token: str = ""
    rerank: RerankOptions = field(default_factory=RerankOptions)


@dataclass(frozen=True)
class SearchPage:
    """The answer to a SearchRequest: `hits` best first, ranks start at `offset`; timings in ms."""

    hits: list[Hit]
    offset: int
    next_page_token: str
    model_id: str
    encode_ms: float  # 0 on a query embedding cache hit
    search_ms: float
    text_truncated: bool = False  # the text query had more tokens than the context length (tail cut)


@dataclass(frozen=True)
class Embedding:
    """One query's embedding, as the embed use case and the query embedding cache hand it around.

    vector: float32 [D], L2-normalized (D = the manifest's embedding_dim).
    token_count: for a text, the token ids fed to the text tower including <sot> and <eot>, after truncation
        (<= the model's context length); 0 for an image.
    truncated: the text had more tokens than the context length and its tail was cut (open_clip's rule: the first
        context_length - 2 ids, then <eot>); always False for an image.
    cached: served from the query embedding cache (no encoder call for it).
    """

    vector: np.ndarray
    token_count: int = 0
    truncated: bool = False
    cached: bool = False


@dataclass(frozen=True)
class StoredImage:
    """An image's record with its original bytes and their MIME type (e.g. 'image/png')."""

    record: Row
    content: bytes
    mime_type: str


@dataclass(frozen=True)
class CollectionStats:
    """What GetCollectionStats reports; `milvus_kind` is 'lite' or 'server'."""

    collection: str
    image_count: int
    model_id: str
    embedding_dim: int
    index_type: str
    metric_type: str
    index_params: dict[str, str]
    milvus_kind: Literal["lite", "server"]


@dataclass(frozen=True)
class IngestItem:
    """One image of an ingest stream as sent: `index` is the caller's, echoed in the outcome.

    metadata: the client's JSON object (None when absent), already plain Python (see grpc.convert).
    """

    index: int
    content: bytes
    filename: str = ""
    metadata: dict[str, Any] | None = None


IngestOutcomeKind = Literal["INSERTED", "ALREADY_PRESENT", "REJECTED"]


@dataclass(frozen=True)
class IngestOutcome:
    """What became of one IngestItem. `error` is set exactly when `outcome` is REJECTED: the exception that
    refused the item (InvalidInputError, DependencyUnavailableError, AbortedError, ...)."""

    index: int
    image_id: str
    outcome: IngestOutcomeKind
    error: BaseException | None = None



def require_image_id(image_id: str, field: str = "image_id") -> str:
    """Return `image_id` if it is 64 lowercase hex characters (a sha256), else raise FieldError naming `field`."""
    if not is_image_id(image_id):
        raise FieldError(field, f"{field} must be 64 lowercase hex characters (sha256 of the image bytes), "
                                f"got {image_id[:80]!r}")
    return image_id
