"""Image embeddings in a Milvus collection, through pymilvus' `MilvusClient`.

The same code serves Milvus Lite (`uri` is a local path ending in `.db`; milvus-lite runs an in-process
gRPC server for it) and a Milvus server (`uri` like `http://127.0.0.1:19530`).

Collection schema (explicit, no dynamic fields):

    id           VARCHAR(64)   primary key: sha256 hex of the image bytes (auto_id off)
    embedding    FLOAT_VECTOR  [dim], searched with metric COSINE
    filename     VARCHAR(1024) as uploaded (at most 1024 UTF-8 bytes)
    ingest_time  INT64         unix time, milliseconds
    metadata     JSON          client-supplied object, filterable: metadata["label"] == 3

The model id is recorded in the collection's properties (`vitrine.model_id`) and description; Milvus Lite
keeps properties but drops descriptions, so properties are what `open()` checks.

Design decisions:
* Writes are upserts: an id is the hash of the image bytes, so writing it again can only refresh its
  filename / ingest_time / metadata (last write wins) and never creates a second row. (A plain insert of an
  existing id duplicates it on a Milvus server; Milvus Lite overwrites.)
* Consistency: `count` is Strong (exact). `search`, `get` and `existing_ids` are Session: they see every
  write made through this process (read-your-writes; pymilvus keeps the session timestamp per connection)
  without waiting for the server's time tick on every call (Strong costs ~200 ms per search on a Milvus
  server, Session ~2 ms; right after a write Session waits like Strong once). Writes by other processes
  become visible within the server's staleness bound. Milvus Lite answers every level immediately.
* `flush()`: Milvus Lite searches unflushed rows ~100x slower, so call it after each ingest batch; on a
  Milvus server rows are already durable (its WAL) and searchable, and a flush seals segments (~3 s here,
  and Milvus advises against frequent flushes), so there it only runs when asked with `seal=True`.
* `min_score` is applied to the returned page (hits are sorted by score, so pagination stays consistent:
  a page cut short by min_score has no successors above it), the same on both backends.
* Counts returned by `delete` are measured with a Strong `count(*)` (filter) or an id lookup (ids) right
  before the delete, under this object's write lock: Milvus' own delete_count is the number of ids
  *requested* (server) or a list of requested ids (Lite), not rows actually deleted.

Thread safety: one `VectorStore` may be used from many threads (the gRPC servicer calls it from a thread
pool). Reads run concurrently; writes (insert, delete) and (re)opening are serialized by a lock.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import grpc
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pymilvus import DataType, MilvusClient
from pymilvus.exceptions import (
    ConnectError,
    ConnectionConfigException,
    MilvusException,
    MilvusUnavailableException,
)

from retrieval_service.adapters.blob_store import check_content_id
from retrieval_service.usecases.filters import validate_filter
from retrieval_service.tls import ClientTlsSettings, milvus_tls_kwargs
from retrieval_service.errors import (
    CollectionMismatchError,
    DependencyUnavailableError,
    InvalidFilterError,
    InvalidInputError,
)

log = logging.getLogger(__name__)

#: Milvus' limit on offset + top_k of one search (server error "top k should be in range [1, 16384]").
MILVUS_MAX_WINDOW = 16384
#: Milvus' limit on query vectors per search (proxy `maxNq`).
MILVUS_MAX_NQ = 16384
#: Milvus' default maximum size of one JSON field value, bytes.
MILVUS_MAX_JSON_BYTES = 65536
MAX_FILENAME_BYTES = 1024
MODEL_ID_PROPERTY = "vitrine.model_id"
SCHEMA_VERSION_PROPERTY = "vitrine.schema_version"
SCHEMA_VERSION = "1"

_OUTPUT_FIELDS = ["id", "filename", "ingest_time", "metadata"]
_READ_CONSISTENCY: Literal["Session"] = "Session"
_IDS_PER_EXPR = 1000  # ids per `id in [...]` expression
_ROWS_PER_UPSERT = 1000
_COLLECTION_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")
# pymilvus.client.types.Status.CONNECT_FAILED: raised when the channel to the server cannot be (re)made.
_CONNECT_FAILED = 2
# Milvus Lite's status code for a bad filter (legacy ErrorCode ILLEGAL_ARGUMENT,
# milvus_lite.adapter.grpc.errors).
_LITE_ILLEGAL_ARGUMENT = 6
_COLLECTION_NOT_FOUND = (4, 100)
# How Milvus server 2.3 words expression errors (proxy: "failed to create query plan: cannot parse
# expression: ...", delete: "failed to create expr plan, expr = ...").
_SERVER_FILTER_MARKERS = (
    "cannot parse expression",
    "failed to create query plan",
    "failed to create expr plan",
)
_UNAVAILABLE_GRPC = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
# A transport failure mid-call (server killed or restarting: "Stream removed", RST_STREAM, "Socket closed"),
# which pymilvus' retry wrapper re-raises as MilvusException(code=<grpc.StatusCode>) once its retries are over.
_TRANSPORT_GRPC = (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL,
                   grpc.StatusCode.ABORTED)
# Milvus server states that pass while it starts or recovers (milvus 2.3 pkg/util/merr): service not ready (1,
# only with that message: pymilvus uses 1 for its own "Unexpected error"), service unavailable (2), collection /
# partition not (fully) loaded (101, 103, 201, 202), replica not available (401), channel not found / lacking /
# not available (500, 501, 503), segment not loaded / lacking (601, 602), node not found / offline / lacking /
# not available (901, 902, 903, 905).
_SERVER_RECOVERING = frozenset({2, 101, 103, 201, 202, 401, 500, 501, 503, 601, 602, 901, 902, 903, 905})


class IndexSettings(BaseModel):
    """Vector index of the `embedding` field and its search parameters (Milvus names and ranges).

    Build parameters are used when the collection is created; search parameters on every search.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    index_type: Literal["FLAT", "IVF_FLAT", "HNSW"] = "HNSW"
    metric_type: Literal["COSINE"] = Field("COSINE", description="fixed: scores are cosine similarities")
    nlist: int = Field(128, ge=1, le=65536, description="IVF_FLAT: number of clusters")
    nprobe: int = Field(16, ge=1, le=65536, description="IVF_FLAT search: clusters visited (<= nlist)")
    M: int = Field(16, ge=2, le=2048, description="HNSW: graph degree")
    efConstruction: int = Field(200, ge=8, le=512, description="HNSW: build-time candidate list size")
    ef: int = Field(
        64, ge=1, le=32768, description="HNSW search: candidate list size (raised to offset + top_k)"
    )

    @model_validator(mode="after")
    def _nprobe_within_nlist(self) -> "IndexSettings":
        if self.index_type == "IVF_FLAT" and self.nprobe > self.nlist:
            raise ValueError(f"nprobe ({self.nprobe}) must be <= nlist ({self.nlist})")
        return self

    def build_params(self) -> dict[str, int]:
        """Index build parameters for `index_type` (Milvus names)."""
        if self.index_type == "IVF_FLAT":
            return {"nlist": self.nlist}
        if self.index_type == "HNSW":
            return {"M": self.M, "efConstruction": self.efConstruction}
        return {}


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


def redact_uri(uri: str) -> str:
    """`uri` with any `user:password@` userinfo replaced by `***@`, for logs and error messages."""
    return re.sub(r"//[^/@]*@", "//***@", uri)


class VectorStore:
    """A Milvus collection of image embeddings; see the module docstring for schema and semantics."""

    def __init__(
        self,
        uri: str,
        collection: str,
        dim: int,
        index: IndexSettings | None = None,
        *,
        token: str = "",
        model_id: str = "",
        timeout_s: float = 10.0,
        tls: ClientTlsSettings | None = None,
    ) -> None:
        """Describe the store; nothing is contacted until `open()` (or the first call, which opens).

        Args:
            uri: Milvus Lite file (a path ending in '.db'; its directory is created) or a server URI
                ('http://host:19530', 'https://...', 'tcp://...', 'unix:...').
            collection: collection name (letters, digits, '_'; not starting with a digit; <= 255).
            dim: embedding dimension.
            index: vector index settings (default HNSW, see `IndexSettings`).
            token: Milvus token ('user:password' or an API key); '' for none.
            model_id: the encoder's model id. Recorded at creation; `open()` refuses a collection recorded
                with another model id. '' accepts any collection (read-only tools).
            timeout_s: deadline of each Milvus call, seconds (open uses at least 60 s).
            tls: TLS to a Milvus server (retrieval_service.tls); None or disabled = as the URI says
                (https:// turns TLS on with the system roots).

        Raises:
            ValueError: malformed uri, collection name or dim; tls set for a Milvus Lite file.
            retrieval_service.tls.TlsConfigError: a TLS file is missing or not PEM.
        """
        if not (uri.endswith(".db") or uri.startswith(("http://", "https://", "tcp://", "unix:"))):
            raise ValueError(
                f"milvus uri {redact_uri(uri)!r} is neither a Milvus Lite file (ending in .db) nor a server URI "
                "(http://host:19530)"
            )
        if not _COLLECTION_NAME.fullmatch(collection):
            raise ValueError(
                f"collection name {collection!r} must be letters, digits and '_', not start with a digit, "
                "<= 255 characters"
            )
        if not isinstance(dim, int) or not 1 <= dim <= 32768:
            raise ValueError(f"dim must be an int in [1, 32768], got {dim!r}")
        self.uri = uri
        self.collection = collection
        self.dim = dim
        self.index = index or IndexSettings()
        self.model_id = model_id
        self.timeout_s = float(timeout_s)
        self._token = token
        self._tls_kwargs = milvus_tls_kwargs(tls) if tls is not None else {}
        if self._tls_kwargs and uri.endswith(".db"):
            raise ValueError("milvus_tls applies to a Milvus server URI, not to a Milvus Lite file")
        self._lock = threading.RLock()
        # Called after each Milvus call with (operation, seconds, failed), from the calling thread; metrics hook.
        self.call_observer: Callable[[str, float, bool], None] | None = None
        self._client: MilvusClient | None = None
        self._opened = False
        self._index_type: str = self.index.index_type
        self._index_params: dict[str, int] = self.index.build_params()
        self._stored_model_id = model_id

    @property
    def is_lite(self) -> bool:
        """True for Milvus Lite (a local .db path), False for a Milvus server."""
        return self.uri.endswith(".db")

    # --- lifecycle ---------------------------------------------------------------------------------------

    def open(self) -> None:
        """Connect, create the collection and its index if missing, check an existing one, and load it.

        Idempotent; other methods call it on first use, and again after the collection disappeared.

        Raises:
            DependencyUnavailableError: Milvus cannot be reached (or Milvus Lite cannot open its file).
            CollectionMismatchError: the collection exists with another dim, model id or schema.
        """
        with self._lock, self._translate("open"):
            client = self._connect()
            timeout = max(self.timeout_s, 60.0)
            if not client.has_collection(self.collection, timeout=timeout):
                try:
                    self._create(client, timeout)
                except MilvusException:
                    # another process may have created it between the two calls; then check theirs
                    if not client.has_collection(self.collection, timeout=timeout):
                        raise
            self._check_existing(client, timeout)
            client.load_collection(self.collection, timeout=timeout)
            self._opened = True

    def close(self) -> None:
        """Release this client's connection (a Milvus Lite file stays served until the process exits)."""
        with self._lock:
            if self._client is not None:
                self._client.close()
            self._client = None
            self._opened = False

    def _connect(self) -> MilvusClient:
        if self._client is None:
            if self.is_lite:
                Path(self.uri).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
            kwargs: dict[str, Any] = {}
            if self.is_lite:
                # Milvus Lite's in-process gRPC server keeps grpc's default ping policy (at most one ping per
                # 5 min without data) while pymilvus pings every 10 s even when idle: after ~30 s idle the
                # server answers GOAWAY "too_many_pings" and the next call fails UNAVAILABLE. Match it.
                kwargs["grpc_options"] = {
                    "grpc.keepalive_time_ms": 300_000,
                    "grpc.keepalive_permit_without_calls": 0,
                }
            kwargs.update(self._tls_kwargs)
            self._client = MilvusClient(uri=self.uri, token=self._token, timeout=self.timeout_s, **kwargs)
        return self._client

    def _create(self, client: MilvusClient, timeout: float) -> None:
        schema = MilvusClient.create_schema(
            auto_id=False,
            enable_dynamic_field=False,
            description=f"Vitrine image embeddings; model_id={self.model_id}",
        )
        schema.add_field("id", DataType.VARCHAR, max_length=64, is_primary=True)
        schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=self.dim)
        schema.add_field("filename", DataType.VARCHAR, max_length=MAX_FILENAME_BYTES)
        schema.add_field("ingest_time", DataType.INT64)
        schema.add_field("metadata", DataType.JSON)
        client.create_collection(
            self.collection,
            schema=schema,
            index_params=self._index_spec(),
            consistency_level="Strong",
            properties={MODEL_ID_PROPERTY: self.model_id, SCHEMA_VERSION_PROPERTY: SCHEMA_VERSION},
            timeout=timeout,
        )
        log.info("created Milvus collection %s (dim %d, %s, model %s)", self.collection, self.dim,
                 self.index.index_type, self.model_id or "-")

    def _index_spec(self) -> Any:
        spec = MilvusClient.prepare_index_params()
        # Build parameters nested under "params": Milvus Lite only reads them there; the server accepts both.
        build = self.index.build_params()
        spec.add_index(
            "embedding",
            index_type=self.index.index_type,
            index_name="embedding",
            metric_type=self.index.metric_type,
            params={"params": build} if build else {},
        )
        return spec

    def _check_existing(self, client: MilvusClient, timeout: float) -> None:
        desc = client.describe_collection(self.collection, timeout=timeout)
        fields = {f["name"]: f for f in desc.get("fields", [])}
        expected = {
            "id": DataType.VARCHAR,
            "embedding": DataType.FLOAT_VECTOR,
            "filename": DataType.VARCHAR,
            "ingest_time": DataType.INT64,
            "metadata": DataType.JSON,
        }
        wrong = [n for n, t in expected.items() if n not in fields or fields[n]["type"] != t]
        if wrong or not fields["id"].get("is_primary"):
            raise CollectionMismatchError(
                f"collection {self.collection!r} exists with another schema (fields {sorted(fields)}; "
                f"expected {sorted(expected)} with primary key 'id'); use another collection name"
            )
        stored_dim = int(fields["embedding"].get("params", {}).get("dim", -1))
        if stored_dim != self.dim:
            raise CollectionMismatchError(
                f"collection {self.collection!r} stores {stored_dim}-d embeddings but this model produces "
                f"{self.dim}-d ones; use another collection name or drop it"
            )
        properties = desc.get("properties") or {}
        stored = properties.get(MODEL_ID_PROPERTY)
        if stored is None:
            match = re.search(r"model_id=(\S*)", desc.get("description") or "")
            stored = match.group(1) if match else ""
        self._stored_model_id = stored
        if self.model_id and stored != self.model_id:
            raise CollectionMismatchError(
                f"collection {self.collection!r} holds embeddings of model {stored or '(unrecorded)'!r}, "
                f"not {self.model_id!r}; use another collection name (vitrine derives one per model)"
            )
        indexes = client.list_indexes(self.collection, field_name="embedding", timeout=timeout)
        if not indexes:
            client.create_index(self.collection, self._index_spec(), timeout=timeout)
            indexes = client.list_indexes(self.collection, field_name="embedding", timeout=timeout)
        info = client.describe_index(self.collection, indexes[0], timeout=timeout)
        self._index_type = str(info.get("index_type", self.index.index_type))
        self._index_params = _index_build_params(info)
        if info.get("metric_type", "COSINE") != "COSINE":
            raise CollectionMismatchError(
                f"collection {self.collection!r} is indexed with metric {info.get('metric_type')}, not COSINE"
            )
        if self._index_type != self.index.index_type:
            log.warning(
                "collection %s already has a %s index; configured %s is ignored (drop the collection to "
                "rebuild)", self.collection, self._index_type, self.index.index_type,
            )

    def _ready(self) -> MilvusClient:
        client = self._client
        if not self._opened or client is None:
            self.open()
            client = self._client
        if client is None:  # closed by another thread meanwhile
            raise DependencyUnavailableError("milvus", f"the store for {self.collection!r} was closed")
        return client

    # --- error mapping -----------------------------------------------------------------------------------

    @contextmanager
    def _translate(self, operation: str, filter_expr: str = "") -> Iterator[None]:
        """Map pymilvus / gRPC exceptions to this service's typed errors (see `_map_error`).

        Reports the call to `call_observer` (operation, seconds, failed); an input error is not a failure.
        """
        started = time.perf_counter()
        failed = True
        try:
            yield
            failed = False
        except InvalidInputError:
            failed = False  # the request's fault (e.g. a filter Milvus cannot parse), not Milvus'
            raise
        except (DependencyUnavailableError, CollectionMismatchError):
            raise
        except (MilvusException, grpc.RpcError, grpc.FutureTimeoutError) as exc:
            mapped = self._map_error(exc, operation, filter_expr)
            failed = not isinstance(mapped, InvalidInputError)
            if mapped is None:
                raise
            raise mapped from exc
        finally:
            if self.call_observer is not None:
                self.call_observer(operation, time.perf_counter() - started, failed)

    def _map_error(self, exc: Exception, operation: str, filter_expr: str) -> Exception | None:
        """Return the typed error for a pymilvus/gRPC exception, or None to re-raise it unchanged.

        Mapping (pymilvus 3.0.2 against Milvus Lite 3.2.2 and Milvus server 2.3.5):
          * MilvusException code 2 (Status.CONNECT_FAILED, "Fail connecting to server on ..."), ConnectError,
            MilvusUnavailableException, a code that is grpc UNAVAILABLE / DEADLINE_EXCEEDED (pymilvus'
            retry gave up), grpc.RpcError with those codes, grpc.FutureTimeoutError, and
            ConnectionConfigException "Open local milvus failed" (Lite)  -> DependencyUnavailableError.
          * server only: a transport failure after pymilvus' retries (grpc CANCELLED / UNKNOWN / INTERNAL /
            ABORTED, `_TRANSPORT_GRPC`) or a state a restarting server passes through (`_SERVER_RECOVERING`:
            not ready, collection not loaded, channel / node not available...) -> DependencyUnavailableError,
            and the next call re-opens (re-loads) the collection.
          * collection not found (code 100 / legacy 4; dropped behind our back) -> DependencyUnavailableError,
            and the next call re-opens (re-creates) it.
          * with a filter: Lite code 6 (ILLEGAL_ARGUMENT from its filter parser) or a server message
            "cannot parse expression" / "failed to create query plan" / "failed to create expr plan"
            -> InvalidFilterError carrying Milvus' message.
        """
        where = f"{operation} on {self.collection!r} at {redact_uri(self.uri)}"
        if isinstance(exc, grpc.FutureTimeoutError):
            return DependencyUnavailableError("milvus", f"{where}: timed out")
        if isinstance(exc, grpc.RpcError):
            code = exc.code() if callable(getattr(exc, "code", None)) else None
            if code in _UNAVAILABLE_GRPC:
                return DependencyUnavailableError("milvus", f"{where}: {code.name}: {exc.details()}")
            return None
        assert isinstance(exc, MilvusException)
        code, message = exc.code, exc.message or str(exc)
        if (
            isinstance(exc, (ConnectError, MilvusUnavailableException))
            or code == _CONNECT_FAILED
            or code in _UNAVAILABLE_GRPC
            or (isinstance(exc, ConnectionConfigException) and "open local milvus" in message.lower())
        ):
            self._opened = False
            if isinstance(exc, ConnectionConfigException) and self.is_lite:
                message += " (is another process using this Milvus Lite file? is its directory writable?)"
            return DependencyUnavailableError("milvus", f"{where}: {message}")
        if not self.is_lite and (
            code in _TRANSPORT_GRPC
            or code in _SERVER_RECOVERING
            or (code == 1 and "not ready" in message.lower())
        ):
            self._opened = False  # re-open (and re-load) the collection on the next call
            return DependencyUnavailableError("milvus", f"{where}: server not answering normally ({message})")
        if code in _COLLECTION_NOT_FOUND and operation != "open":
            self._opened = False
            return DependencyUnavailableError(
                "milvus", f"{where}: collection not found ({message}); re-opening"
            )
        if filter_expr and (
            (self.is_lite and code == _LITE_ILLEGAL_ARGUMENT)
            or any(marker in message for marker in _SERVER_FILTER_MARKERS)
            or isinstance(exc.__cause__, UnicodeError)  # pymilvus: an escape in the filter decoded to a surrogate
        ):
            return InvalidFilterError(f"invalid filter {filter_expr!r}: {message}")
        return None

    # --- validation --------------------------------------------------------------------------------------

    @staticmethod
    def _check_filter(filter_expr: object) -> str:
        """Validate a client filter against the schema (retrieval_service.usecases.filters); return Milvus' expression."""
        if not isinstance(filter_expr, str):
            raise InvalidFilterError(f"filter must be a string, got {type(filter_expr).__name__}")
        return validate_filter(filter_expr)

    def _check_row(self, row: Row) -> dict[str, Any]:
        check_content_id(row.id)
        if row.embedding is None:
            raise InvalidInputError(f"row {row.id}: embedding is missing")
        vec = np.asarray(row.embedding, dtype=np.float32)
        if vec.shape != (self.dim,):
            raise InvalidInputError(f"row {row.id}: embedding has shape {vec.shape}, expected ({self.dim},)")
        if not np.all(np.isfinite(vec)) or not np.any(vec):
            raise InvalidInputError(f"row {row.id}: embedding has NaN/inf values or is all zeros")
        if not isinstance(row.filename, str) or len(row.filename.encode("utf-8")) > MAX_FILENAME_BYTES:
            raise InvalidInputError(
                f"row {row.id}: filename must be a str of at most {MAX_FILENAME_BYTES} UTF-8 bytes"
            )
        t = row.ingest_time_ms
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= int(t) < 2**63:
            raise InvalidInputError(f"row {row.id}: ingest_time_ms must be a non-negative int64, got {t!r}")
        if not isinstance(row.metadata, dict):
            raise InvalidInputError(f"row {row.id}: metadata must be a JSON object (dict)")
        try:
            size = len(json.dumps(row.metadata, ensure_ascii=False, allow_nan=False).encode("utf-8"))
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"row {row.id}: metadata is not JSON-serializable: {exc}") from None
        if size > MILVUS_MAX_JSON_BYTES:
            raise InvalidInputError(
                f"row {row.id}: metadata is {size} bytes of JSON; the limit is {MILVUS_MAX_JSON_BYTES}"
            )
        return {
            "id": row.id,
            "embedding": vec,
            "filename": row.filename,
            "ingest_time": int(row.ingest_time_ms),
            "metadata": row.metadata,
        }

    @staticmethod
    def _ids_exprs(ids: Sequence[str]) -> Iterator[tuple[list[str], str]]:
        """Yield (chunk, 'id in [...]') for validated ids (hex only, so the expression cannot be injected)."""
        unique = list(dict.fromkeys(check_content_id(i) for i in ids))
        for start in range(0, len(unique), _IDS_PER_EXPR):
            chunk = unique[start : start + _IDS_PER_EXPR]
            yield chunk, f"id in {json.dumps(chunk)}"

    # --- operations --------------------------------------------------------------------------------------

    def existing_ids(
        self, ids: Sequence[str], *, consistency: Literal["Strong", "Session"] = _READ_CONSISTENCY
    ) -> set[str]:
        """Return the subset of `ids` stored in the collection (Session consistency unless told).

        Raises:
            InvalidInputError: an id is not 64 lowercase hex characters.
            DependencyUnavailableError: Milvus is unreachable.
        """
        found: set[str] = set()
        exprs = list(self._ids_exprs(ids))
        with self._translate("existing_ids"):
            client = self._ready()
            for _, expr in exprs:
                rows = client.query(
                    self.collection, filter=expr, output_fields=["id"], consistency_level=consistency,
                    timeout=self.timeout_s,
                )
                found.update(r["id"] for r in rows)
        return found

    def insert(self, rows: Sequence[Row]) -> int:
        """Write rows (upsert: an existing id is overwritten, never duplicated; last row of an id wins).

        Does not flush; call `flush()` after a batch (needed for fast searches on Milvus Lite).

        Args:
            rows: Rows with embedding float32 [dim].

        Returns:
            Number of distinct ids written.

        Raises:
            InvalidInputError: a row is malformed (id, embedding shape/values, filename, time, metadata).
            DependencyUnavailableError: Milvus is unreachable.
        """
        data = list({r["id"]: r for r in (self._check_row(row) for row in rows)}.values())
        if not data:
            return 0
        # Milvus Lite flushes synchronously inside an upsert; at ~60k rows x 512-d on 2 busy cores that alone took
        # ~11 s (vitrine bench scale), so Lite writes get the same floor as flush.
        timeout = max(self.timeout_s, 60.0) if self.is_lite else self.timeout_s
        with self._lock, self._translate("insert"):
            client = self._ready()
            for start in range(0, len(data), _ROWS_PER_UPSERT):
                client.upsert(self.collection, data[start : start + _ROWS_PER_UPSERT], timeout=timeout)
        return len(data)

    def flush(self, *, seal: bool = False) -> None:
        """Make written rows fast to search: flushes on Milvus Lite; on a server only when `seal` is True.

        On a Milvus server rows are durable and searchable without a flush; `seal=True` seals the growing
        segments (seconds; do it before backups or shutdown, not per batch).

        Raises:
            DependencyUnavailableError: Milvus is unreachable.
        """
        if not (self.is_lite or seal):
            return
        with self._translate("flush"):
            self._ready().flush(self.collection, timeout=max(self.timeout_s, 60.0))

    def search(
        self,
        vectors: np.ndarray,
        top_k: int,
        *,
        offset: int = 0,
        filter: str = "",  # noqa: A002 - Milvus' name for the boolean expression
        min_score: float | None = None,
        with_vectors: bool = False,
    ) -> list[list[Hit]]:
        """Nearest stored images by cosine similarity.

        Args:
            vectors: float32 [Q, dim] query embeddings (any norm; COSINE normalizes).
            top_k: results per query, >= 1.
            offset: results to skip (pagination); offset + top_k <= 16384 (Milvus' window).
            filter: boolean expression over id / filename / ingest_time / metadata, e.g.
                'metadata["label"] == 3 and filename like "cat%"'; '' for none. Checked and re-rendered by
                retrieval_service.usecases.filters (grammar there) before Milvus sees it.
            min_score: drop hits whose cosine similarity is below it.
            with_vectors: also return each hit's stored embedding (Hit.embedding, float32 [dim]; as
                stored, i.e. L2-normalized by the encoder), e.g. for a rerank stage; else it is None.

        Returns:
            Q lists of at most top_k Hits, best (highest score) first.

        Raises:
            InvalidInputError: bad shape/dtype/values, top_k, offset or window.
            InvalidFilterError: `filter` is outside the grammar of retrieval_service.usecases.filters (the message names
                the token and position), or Milvus cannot parse it (its message included).
            DependencyUnavailableError: Milvus is unreachable.
        """
        queries = np.asarray(vectors)
        if queries.ndim != 2 or queries.shape[1] != self.dim or not 1 <= queries.shape[0] <= MILVUS_MAX_NQ:
            raise InvalidInputError(
                f"vectors must be [Q, {self.dim}] with 1 <= Q <= {MILVUS_MAX_NQ}, got shape {queries.shape}"
            )
        if not np.issubdtype(queries.dtype, np.floating):
            raise InvalidInputError(f"vectors must be floating point, got {queries.dtype}")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if not np.all(np.isfinite(queries)):
            raise InvalidInputError("vectors contain NaN or inf")
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
            raise InvalidInputError(f"top_k must be an int >= 1, got {top_k!r}")
        if isinstance(offset, bool) or not isinstance(offset, (int, np.integer)) or offset < 0:
            raise InvalidInputError(f"offset must be an int >= 0, got {offset!r}")
        if offset + top_k > MILVUS_MAX_WINDOW:
            raise InvalidInputError(
                f"offset + top_k = {offset + top_k} exceeds Milvus' search window of {MILVUS_MAX_WINDOW}"
            )
        if min_score is not None and (not isinstance(min_score, (int, float)) or math.isnan(min_score)):
            raise InvalidInputError(f"min_score must be a number, got {min_score!r}")
        expr = self._check_filter(filter)
        with self._translate("search", expr):
            client = self._ready()
            results = client.search(
                self.collection,
                data=queries,
                filter=expr,
                limit=int(top_k),
                offset=int(offset),
                output_fields=_OUTPUT_FIELDS + (["embedding"] if with_vectors else []),
                search_params={"metric_type": "COSINE", "params": self._search_params(int(offset + top_k))},
                anns_field="embedding",
                consistency_level=_READ_CONSISTENCY,
                timeout=self.timeout_s,
            )
        out: list[list[Hit]] = []
        for hits in results:
            page = []
            for hit in hits:
                score = float(hit["distance"])
                if min_score is not None and score < min_score:
                    continue
                entity = hit.get("entity") or {}
                page.append(
                    Hit(
                        id=str(hit["id"]),
                        score=score,
                        filename=str(entity.get("filename", "")),
                        ingest_time_ms=int(entity.get("ingest_time", 0)),
                        metadata=dict(entity.get("metadata") or {}),
                        embedding=(
                            np.asarray(entity["embedding"], dtype=np.float32) if with_vectors else None
                        ),
                    )
                )
            out.append(page)
        return out

    def _search_params(self, window: int) -> dict[str, int]:
        if self._index_type == "HNSW":
            return {"ef": max(self.index.ef, window)}  # Milvus requires ef >= top_k (offset included)
        if self._index_type.startswith("IVF"):
            return {"nprobe": min(self.index.nprobe, int(self._index_params.get("nlist", self.index.nprobe)))}
        return {}

    def get(self, ids: Sequence[str], *, with_vectors: bool = False) -> list[Row]:
        """Stored rows for `ids`, in the order asked; ids not stored are left out (duplicates once).

        Args:
            ids: content ids.
            with_vectors: also return embeddings (float32 [dim]); else Row.embedding is None.

        Raises:
            InvalidInputError: an id is malformed.
            DependencyUnavailableError: Milvus is unreachable.
        """
        fields = _OUTPUT_FIELDS + (["embedding"] if with_vectors else [])
        exprs = list(self._ids_exprs(ids))
        by_id: dict[str, Row] = {}
        with self._translate("get"):
            client = self._ready()
            for _, expr in exprs:
                for r in client.query(
                    self.collection, filter=expr, output_fields=fields, consistency_level=_READ_CONSISTENCY,
                    timeout=self.timeout_s,
                ):
                    by_id[r["id"]] = Row(
                        id=r["id"],
                        embedding=np.asarray(r["embedding"], dtype=np.float32) if with_vectors else None,
                        filename=r["filename"],
                        ingest_time_ms=int(r["ingest_time"]),
                        metadata=dict(r.get("metadata") or {}),
                    )
        return [by_id[i] for i in dict.fromkeys(ids) if i in by_id]

    def delete(self, ids: Sequence[str] | None = None, filter: str | None = None) -> int:  # noqa: A002
        """Delete rows by ids or by a filter expression (exactly one of them).

        Returns:
            How many stored rows were deleted (ids not stored do not count).

        Raises:
            InvalidInputError: both or neither given, an empty filter, or a malformed id.
            InvalidFilterError: Milvus cannot parse `filter`.
            DependencyUnavailableError: Milvus is unreachable.
        """
        if (ids is None) == (filter is None):
            raise InvalidInputError("delete needs exactly one of ids and filter")
        with self._lock:
            if ids is not None:
                present = self.existing_ids(ids, consistency="Strong")
                with self._translate("delete"):
                    client = self._ready()
                    for _, expr in self._ids_exprs(sorted(present)):
                        client.delete(self.collection, filter=expr, timeout=self.timeout_s)
                return len(present)
            expr = self._check_filter(filter)
            if not expr:
                raise InvalidInputError(
                    "delete filter is empty; to delete every image use a filter that matches all, "
                    "e.g. 'id != \"\"'"
                )
            matched = self.count(expr)
            if matched:
                with self._translate("delete", expr):
                    self._ready().delete(self.collection, filter=expr, timeout=self.timeout_s)
            return matched

    def count(self, filter: str = "") -> int:  # noqa: A002
        """Exact number of stored rows (matching `filter` when given), Strong consistency.

        Raises:
            InvalidFilterError: Milvus cannot parse `filter`.
            DependencyUnavailableError: Milvus is unreachable.
        """
        expr = self._check_filter(filter)
        with self._translate("count", expr):
            rows = self._ready().query(
                self.collection, filter=expr, output_fields=["count(*)"], consistency_level="Strong",
                timeout=self.timeout_s,
            )
        return int(rows[0]["count(*)"])

    def describe(self) -> dict[str, Any]:
        """Collection facts: collection, backend ('milvus-lite' | 'milvus'), uri (credentials redacted), dim,
        metric_type, index_type and params (as built), search_params, model_id, count.

        Raises:
            DependencyUnavailableError: Milvus is unreachable.
        """
        count = self.count()
        return {
            "collection": self.collection,
            "backend": "milvus-lite" if self.is_lite else "milvus",
            "uri": redact_uri(self.uri),
            "dim": self.dim,
            "metric_type": "COSINE",
            "index_type": self._index_type,
            "params": dict(self._index_params),
            "search_params": self._search_params(1),
            "model_id": self._stored_model_id,
            "count": count,
        }


def _index_build_params(info: dict[str, Any]) -> dict[str, int]:
    """Build parameters from `describe_index` output, which nests them under 'params' (Lite, or when
    created nested) or flattens them as strings (server)."""
    params: dict[str, Any] = {}
    nested = info.get("params")
    if isinstance(nested, str):
        try:
            nested = json.loads(nested)
        except ValueError:
            nested = {}
    if isinstance(nested, dict):
        params.update(nested)
    for key in ("nlist", "M", "efConstruction"):
        if key in info:
            params[key] = info[key]
    out: dict[str, int] = {}
    for key, value in params.items():
        try:
            out[key] = int(value)
        except (TypeError, ValueError):
            continue
    return out
