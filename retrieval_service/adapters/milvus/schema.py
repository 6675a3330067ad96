"""The Vitrine collection as data: ONE table of its fields and limits (read by the store, filters and ingest).

Collection schema (explicit, no dynamic fields), as `FIELDS` states it:

    id           VARCHAR(64)   primary key: sha256 hex of the image bytes (auto_id off)
    embedding    FLOAT_VECTOR  [dim], searched with metric COSINE
    filename     VARCHAR(1024) as uploaded (at most 1024 UTF-8 bytes)
    ingest_time  INT64         unix time, milliseconds
    metadata     JSON          client-supplied object, filterable: metadata["label"] == 3

The model id is recorded in the collection's properties (`vitrine.model_id`) and description; Milvus Lite
keeps properties but drops descriptions, so properties are what `VectorStore.open()` checks.

Also here: the Python shapes of a stored image (`Row`) and of a search result (`Hit`) and the conversions
between them and Milvus entities (all driven by the table), the checks of a row's attributes that ingest
shares (`check_filename`, `check_metadata`), Milvus' limits, and what a Milvus Lite URI is (`is_lite_uri`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pymilvus import CollectionSchema, DataType, MilvusClient

from retrieval_service.adapters.blob_store import check_content_id
from retrieval_service.errors import CollectionMismatchError, InvalidInputError

#: Milvus' limit on offset + top_k of one search (server error "top k should be in range [1, 16384]"; Milvus
#: docs, "Search": `offset` + `limit` <= 16384).
MILVUS_MAX_WINDOW = 16384
#: Milvus' limit on query vectors per search (proxy `maxNq`).
MILVUS_MAX_NQ = 16384
#: Milvus' default maximum size of one JSON field value, bytes.
MILVUS_MAX_JSON_BYTES = 65536
#: Longest filename stored, UTF-8 bytes (the `filename` VARCHAR's max_length; Milvus counts it in bytes).
MAX_FILENAME_BYTES = 1024
#: Largest embedding dimension a collection may have (Milvus' default proxy `maxDimension`).
MAX_DIM = 32768

#: Collection property holding the encoder's model id.
MODEL_ID_PROPERTY = "vitrine.model_id"
#: Collection property holding `SCHEMA_VERSION`.
SCHEMA_VERSION_PROPERTY = "vitrine.schema_version"
SCHEMA_VERSION = "1"
#: Where the model id also stands in the collection's description (read back from collections made before
#: `MODEL_ID_PROPERTY` existed): "Vitrine image embeddings; model_id=<id>".
DESCRIPTION_MODEL_ID = re.compile(r"model_id=(\S*)")

#: URI prefixes of a Milvus server (what `VectorStore` accepts besides a Milvus Lite file).
SERVER_URI_PREFIXES = ("http://", "https://", "tcp://", "unix:")

#: How a filter may use a field (retrieval_service.adapters.milvus.filters): 'id' a content hash (==, !=, in),
#: 'string' (comparisons, like, in), 'int64' (numbers), 'json' (a path metadata["k"], any literal).
FilterKind = Literal["id", "string", "int64", "json"]


@dataclass(frozen=True)
class FieldSpec:
    """One field of the collection.

    Attributes:
        name: the Milvus field name.
        dtype: its Milvus DataType.
        attr: the `Row` / `Hit` attribute holding its value.
        max_length: VARCHAR limit, UTF-8 bytes; None for other types.
        output: returned by every search and get (the vector only on request, `with_vectors=True`).
        filter_kind: how a filter may use it; None = not filterable (the vector).
        primary: the primary key.
    """

    name: str
    dtype: DataType
    attr: str
    max_length: int | None = None
    output: bool = True
    filter_kind: FilterKind | None = None
    primary: bool = False


#: The collection's fields, in schema order.
FIELDS: tuple[FieldSpec, ...] = (
    FieldSpec("id", DataType.VARCHAR, "id", max_length=64, filter_kind="id", primary=True),  # sha256 hex
    FieldSpec("embedding", DataType.FLOAT_VECTOR, "embedding", output=False),
    FieldSpec("filename", DataType.VARCHAR, "filename", max_length=MAX_FILENAME_BYTES, filter_kind="string"),
    FieldSpec("ingest_time", DataType.INT64, "ingest_time_ms", filter_kind="int64"),
    FieldSpec("metadata", DataType.JSON, "metadata", filter_kind="json"),
)
PRIMARY: FieldSpec = next(f for f in FIELDS if f.primary)
VECTOR: FieldSpec = next(f for f in FIELDS if f.dtype == DataType.FLOAT_VECTOR)
#: Fields every search and get returns (`VECTOR` is added on request).
OUTPUT_FIELDS: tuple[str, ...] = tuple(f.name for f in FIELDS if f.output)


def is_lite_uri(uri: str) -> bool:
    """True when `uri` names a Milvus Lite file: it ends in '.db' (pymilvus' own rule,
    pymilvus/client/connection_manager.py, which then starts milvus-lite for it). Anything else is not Lite;
    `VectorStore` accepts it only as a server URI (`SERVER_URI_PREFIXES`)."""
    return uri.endswith(".db")


def redact_uri(uri: str) -> str:
    """`uri` with any `user:password@` userinfo replaced by `***@`, for logs and error messages."""
    return re.sub(r"//[^/@]*@", "//***@", uri)


def output_fields(with_vectors: bool) -> list[str]:
    """Field names a search or get asks for: `OUTPUT_FIELDS`, plus the vector when `with_vectors`."""
    return list(OUTPUT_FIELDS) + ([VECTOR.name] if with_vectors else [])


# --- the collection -------------------------------------------------------------------------------------------


def collection_schema(dim: int, model_id: str) -> CollectionSchema:
    """The pymilvus schema of a new collection: `FIELDS` with the vector of `dim`, no dynamic fields."""
    schema = MilvusClient.create_schema(
        auto_id=False,
        enable_dynamic_field=False,
        description=f"Vitrine image embeddings; model_id={model_id}",
    )
    for f in FIELDS:
        params: dict[str, int] = {"dim": dim} if f is VECTOR else {}
        if f.max_length is not None:
            params["max_length"] = f.max_length
        schema.add_field(f.name, f.dtype, is_primary=f.primary, **params)
    return schema


def collection_properties(model_id: str) -> dict[str, str]:
    """Properties recorded on a new collection: the model id and `SCHEMA_VERSION`."""
    return {MODEL_ID_PROPERTY: model_id, SCHEMA_VERSION_PROPERTY: SCHEMA_VERSION}


def check_fields(collection: str, desc: Mapping[str, Any], dim: int) -> None:
    """Check an existing collection (`MilvusClient.describe_collection` output) against `FIELDS` and `dim`.

    Raises:
        CollectionMismatchError: a field is missing or of another type, the primary key differs, or the vector
            has another dimension.
    """
    fields = {f["name"]: f for f in desc.get("fields", [])}
    wrong = [f.name for f in FIELDS if f.name not in fields or fields[f.name]["type"] != f.dtype]
    if wrong or not fields[PRIMARY.name].get("is_primary"):
        raise CollectionMismatchError(
            f"collection {collection!r} exists with another schema (fields {sorted(fields)}; "
            f"expected {sorted(f.name for f in FIELDS)} with primary key {PRIMARY.name!r}); use another collection name"
        )
    stored_dim = int(fields[VECTOR.name].get("params", {}).get("dim", -1))
    if stored_dim != dim:
        raise CollectionMismatchError(
            f"collection {collection!r} stores {stored_dim}-d embeddings but this model produces "
            f"{dim}-d ones; use another collection name or drop it"
        )


def stored_model_id(desc: Mapping[str, Any]) -> str:
    """The model id an existing collection records: its `MODEL_ID_PROPERTY`, else its description's; '' if none."""
    stored = (desc.get("properties") or {}).get(MODEL_ID_PROPERTY)
    if stored is None:
        match = DESCRIPTION_MODEL_ID.search(desc.get("description") or "")
        stored = match.group(1) if match else ""
    return str(stored)


# --- search arguments -----------------------------------------------------------------------------------------


def check_queries(vectors: np.ndarray, dim: int) -> np.ndarray:
    """Return query embeddings as contiguous float32 [Q, dim], 1 <= Q <= MILVUS_MAX_NQ.

    Raises:
        InvalidInputError: another shape, not floating point, or NaN / inf values.
    """
    queries = np.asarray(vectors)
    if queries.ndim != 2 or queries.shape[1] != dim or not 1 <= queries.shape[0] <= MILVUS_MAX_NQ:
        raise InvalidInputError(
            f"vectors must be [Q, {dim}] with 1 <= Q <= {MILVUS_MAX_NQ}, got shape {queries.shape}"
        )
    if not np.issubdtype(queries.dtype, np.floating):
        raise InvalidInputError(f"vectors must be floating point, got {queries.dtype}")
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if not np.all(np.isfinite(queries)):
        raise InvalidInputError("vectors contain NaN or inf")
    return queries


def check_window(top_k: int, offset: int) -> None:
    """Check a search page: top_k >= 1, offset >= 0 (ints), offset + top_k <= MILVUS_MAX_WINDOW.

    Raises:
        InvalidInputError: naming the bad value or the window.
    """
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise InvalidInputError(f"top_k must be an int >= 1, got {top_k!r}")
    if isinstance(offset, bool) or not isinstance(offset, (int, np.integer)) or offset < 0:
        raise InvalidInputError(f"offset must be an int >= 0, got {offset!r}")
    if offset + top_k > MILVUS_MAX_WINDOW:
        raise InvalidInputError(
            f"offset + top_k = {offset + top_k} exceeds Milvus' search window of {MILVUS_MAX_WINDOW}"
        )


# --- rows ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One stored image.

    Attributes:
        id: sha256 hex of the image bytes (64 lowercase hex characters).
        embedding: float32 [dim], L2-normalized by the encoder; None when read without vectors.
        filename: as uploaded, at most 1024 UTF-8 bytes.
        ingest_time_ms: unix time of ingestion, milliseconds.
        metadata: JSON object (str keys; values JSON-serializable), at most 64 KiB serialized.
    """

    id: str
    embedding: np.ndarray | None
    filename: str
    ingest_time_ms: int
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Hit:
    """One search result: `score` is the cosine similarity in [-1, 1], higher is more similar.

    `embedding` is the stored vector, float32 [dim], when the search asked for it (`with_vectors=True`),
    else None; it takes no part in equality or repr.
    """

    id: str
    score: float
    filename: str
    ingest_time_ms: int
    metadata: dict[str, Any]
    embedding: np.ndarray | None = field(default=None, compare=False, repr=False)


def check_filename(filename: object) -> str:
    """Return `filename` if it fits the `filename` field: a str of at most MAX_FILENAME_BYTES UTF-8 bytes.

    Raises:
        InvalidInputError: not a str, or too long (the Milvus VARCHAR limit is in bytes, not characters).
    """
    if not isinstance(filename, str):
        raise InvalidInputError(f"filename must be a str, got {type(filename).__name__}")
    size = len(filename.encode("utf-8"))
    if size > MAX_FILENAME_BYTES:
        raise InvalidInputError(f"filename is {size} UTF-8 bytes; the limit is {MAX_FILENAME_BYTES}")
    return filename


def check_metadata(metadata: object) -> dict[str, Any]:
    """Return `metadata` if it fits the `metadata` field: a JSON object of at most MILVUS_MAX_JSON_BYTES serialized.

    Raises:
        InvalidInputError: not a dict, not JSON-serializable (NaN / Infinity included), or over the limit.
    """
    if not isinstance(metadata, dict):
        raise InvalidInputError("metadata must be a JSON object (dict)")
    try:
        size = len(json.dumps(metadata, ensure_ascii=False, allow_nan=False).encode("utf-8"))
    except (TypeError, ValueError) as exc:  # not serializable; NaN / Infinity
        raise InvalidInputError(f"metadata is not valid JSON: {exc}") from None
    if size > MILVUS_MAX_JSON_BYTES:
        raise InvalidInputError(f"metadata is {size} bytes of JSON; the limit is {MILVUS_MAX_JSON_BYTES}")
    return metadata


def check_row(row: Row, dim: int) -> Row:
    """Return `row` checked against the schema, with its embedding as float32 [dim].

    Raises:
        InvalidInputError: a malformed id, embedding (missing, shape, NaN/inf, all zeros), filename,
            ingest time or metadata; the message starts with "row <id>:".
    """
    check_content_id(row.id)
    if row.embedding is None:
        raise InvalidInputError(f"row {row.id}: embedding is missing")
    vec = np.asarray(row.embedding, dtype=np.float32)
    if vec.shape != (dim,):
        raise InvalidInputError(f"row {row.id}: embedding has shape {vec.shape}, expected ({dim},)")
    if not np.all(np.isfinite(vec)) or not np.any(vec):
        raise InvalidInputError(f"row {row.id}: embedding has NaN/inf values or is all zeros")
    try:
        filename = check_filename(row.filename)
    except InvalidInputError as exc:
        raise InvalidInputError(f"row {row.id}: {exc}") from None
    t = row.ingest_time_ms
    if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= int(t) < 2**63:
        raise InvalidInputError(f"row {row.id}: ingest_time_ms must be a non-negative int64, got {t!r}")
    try:
        metadata = check_metadata(row.metadata)
    except InvalidInputError as exc:
        raise InvalidInputError(f"row {row.id}: {exc}") from None
    return Row(id=row.id, embedding=vec, filename=filename, ingest_time_ms=int(t), metadata=metadata)


# --- entities (what pymilvus sends and returns) ---------------------------------------------------------------


def to_entity(row: Row) -> dict[str, Any]:
    """The Milvus entity of a row already passed through `check_row`: {field name: value} for every field."""
    return {f.name: getattr(row, f.attr) for f in FIELDS}


#: Value read back from Milvus -> Python value, and the value of a field absent from the answer, per type.
_DECODE: dict[DataType, Callable[[Any], Any]] = {
    DataType.VARCHAR: lambda v: str(v if v is not None else ""),
    DataType.INT64: lambda v: int(v if v is not None else 0),
    DataType.JSON: lambda v: dict(v or {}),
    DataType.FLOAT_VECTOR: lambda v: np.asarray(v, dtype=np.float32),
}


def _attrs(entity: Mapping[str, Any], with_vectors: bool) -> dict[str, Any]:
    """`Row`/`Hit` keyword arguments from a Milvus entity; the embedding None unless `with_vectors`."""
    out = {f.attr: _DECODE[f.dtype](entity.get(f.name)) for f in FIELDS if f.output}
    out[VECTOR.attr] = _DECODE[VECTOR.dtype](entity[VECTOR.name]) if with_vectors else None
    return out


def row_of(entity: Mapping[str, Any], *, with_vectors: bool) -> Row:
    """The `Row` of one `MilvusClient.query` result (asked with `output_fields(with_vectors)`)."""
    return Row(**_attrs(entity, with_vectors))


def hit_of(hit: Mapping[str, Any], *, with_vectors: bool) -> Hit:
    """The `Hit` of one `MilvusClient.search` result: {'id', 'distance' (COSINE), 'entity': {output fields}}."""
    attrs = _attrs(hit.get("entity") or {}, with_vectors)
    attrs[PRIMARY.attr] = str(hit[PRIMARY.name])
    return Hit(score=float(hit["distance"]), **attrs)
