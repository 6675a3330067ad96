"""The Milvus adapter: image embeddings in a Milvus collection (Milvus Lite file or server), through pymilvus.

    schema.py       ONE table of the collection's fields (name, DataType, max_length, output, filter kind) and
                    Milvus' limits; Row / Hit and their conversions; check_filename / check_metadata (shared with
                    ingest); is_lite_uri, the one definition of a Milvus Lite URI
    index.py        IndexSettings (the `index` settings section), the index spec, search parameters
    filters.py      the filter grammar: validate_filter -> FilterExpr (field table read from the schema)
    errors.py       pymilvus / gRPC exceptions -> DependencyUnavailableError / InvalidFilterError
    store.py        VectorStore, the synchronous store
    async_store.py  AsyncVectorStore, the store for coroutines (calls run in a thread pool)

Import the public names from this package. Nothing here imports the use cases or the transport.
"""

from retrieval_service.adapters.milvus.schema import (
    MAX_FILENAME_BYTES,
    MILVUS_MAX_JSON_BYTES,
    MILVUS_MAX_NQ,
    MILVUS_MAX_WINDOW,
    Hit,
    Row,
    check_filename,
    check_metadata,
    is_lite_uri,
    redact_uri,
)
from retrieval_service.adapters.milvus.index import IndexSettings
from retrieval_service.adapters.milvus.filters import (
    MAX_DEPTH,
    MAX_FILTER_CHARS,
    MAX_IN_VALUES,
    FilterExpr,
    FilterSyntaxError,
    validate_filter,
)
from retrieval_service.adapters.milvus.store import VectorStore
from retrieval_service.adapters.milvus.async_store import AsyncVectorStore

__all__ = [
    "MAX_DEPTH",
    "MAX_FILENAME_BYTES",
    "MAX_FILTER_CHARS",
    "MAX_IN_VALUES",
    "MILVUS_MAX_JSON_BYTES",
    "MILVUS_MAX_NQ",
    "MILVUS_MAX_WINDOW",
    "AsyncVectorStore",
    "FilterExpr",
    "FilterSyntaxError",
    "Hit",
    "IndexSettings",
    "Row",
    "VectorStore",
    "check_filename",
    "check_metadata",
    "is_lite_uri",
    "redact_uri",
    "validate_filter",
]
