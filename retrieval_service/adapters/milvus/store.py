"""`VectorStore`: image embeddings in a Milvus collection, through pymilvus' `MilvusClient`.

The same code serves Milvus Lite (`uri` is a local path ending in `.db`; milvus-lite runs an in-process
gRPC server for it) and a Milvus server (`uri` like `http://127.0.0.1:19530`).

The collection's fields, limits and row conversions are the table in retrieval_service.adapters.milvus.schema;
the vector index in .index; the translation of pymilvus errors in .errors; the filter grammar in .filters.

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

Deadlines: every pymilvus call's `timeout` is `remaining(cap)` (retrieval_service.deadlines): the current
caller's time left, at most the call's own cap (`timeout_s`, or the 60 s floor of open / flush / Lite writes).
The deadline is a contextvar of the calling thread's context (AsyncVectorStore runs each call in a copy of the
caller's context). A call that fails once the caller's deadline has passed raises `DeadlineExceededError`
(DEADLINE_EXCEEDED, not an outage: the collection is not re-opened and health is unaffected); one that times
out on its own cap while the caller still has time is DependencyUnavailableError('milvus') as before.

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
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pymilvus import MilvusClient, MilvusException

from retrieval_service.adapters.blob_store import check_content_id
from retrieval_service.adapters.milvus.errors import MILVUS_EXCEPTIONS, map_error
from retrieval_service.adapters.milvus.filters import FilterExpr, validate_filter
from retrieval_service.adapters.milvus.index import IndexSettings, built_params
from retrieval_service.adapters.milvus.schema import (
    MAX_DIM,
    PRIMARY,
    SERVER_URI_PREFIXES,
    VECTOR,
    Hit,
    Row,
    check_fields,
    check_queries,
    check_row,
    check_window,
    collection_properties,
    collection_schema,
    hit_of,
    is_lite_uri,
    output_fields,
    redact_uri,
    row_of,
    stored_model_id,
    to_entity,
)
from retrieval_service.deadlines import DeadlineExceededError, expired, remaining
from retrieval_service.errors import CollectionMismatchError, DependencyUnavailableError, InvalidInputError
from retrieval_service.tls import ClientTlsSettings, milvus_tls_kwargs

log = logging.getLogger(__name__)

_READ_CONSISTENCY: Literal["Session"] = "Session"
_IDS_PER_EXPR = 1000  # ids per `id in [...]` expression
_ROWS_PER_UPSERT = 1000
_COLLECTION_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")


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
            timeout_s: deadline of each Milvus call, seconds (open uses at least 60 s); a call made for a
                caller with less time left gets that instead (retrieval_service.deadlines).
            tls: TLS to a Milvus server (retrieval_service.tls); None or disabled = as the URI says
                (https:// turns TLS on with the system roots).

        Raises:
            ValueError: malformed uri, collection name or dim; tls set for a Milvus Lite file.
            retrieval_service.tls.TlsConfigError: a TLS file is missing or not PEM.
        """
        if not (is_lite_uri(uri) or uri.startswith(SERVER_URI_PREFIXES)):
            raise ValueError(
                f"milvus uri {redact_uri(uri)!r} is neither a Milvus Lite file (ending in .db) nor a server URI "
                "(http://host:19530)"
            )
        if not _COLLECTION_NAME.fullmatch(collection):
            raise ValueError(
                f"collection name {collection!r} must be letters, digits and '_', not start with a digit, "
                "<= 255 characters"
            )
        if not isinstance(dim, int) or not 1 <= dim <= MAX_DIM:
            raise ValueError(f"dim must be an int in [1, {MAX_DIM}], got {dim!r}")
        self.uri = uri
        self.collection = collection
        self.dim = dim
        self.index = index or IndexSettings()
        self.model_id = model_id
        self.timeout_s = float(timeout_s)
        self._token = token
        self._tls_kwargs = milvus_tls_kwargs(tls) if tls is not None else {}
        if self._tls_kwargs and is_lite_uri(uri):
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
        """True for Milvus Lite (a local .db path, `schema.is_lite_uri`), False for a Milvus server."""
        return is_lite_uri(self.uri)

    # --- lifecycle ---------------------------------------------------------------------------------------

    def open(self) -> None:
        """Connect, create the collection and its index if missing, check an existing one, and load it.

        Idempotent; other methods call it on first use, and again after the collection disappeared.

        Raises:
            DependencyUnavailableError: Milvus cannot be reached (or Milvus Lite cannot open its file).
            DeadlineExceededError: the caller's deadline passed (retrieval_service.deadlines).
            CollectionMismatchError: the collection exists with another dim, model id or schema.
        """
        with self._lock, self._translate("open"):
            client = self._connect()
            timeout = max(self.timeout_s, 60.0)  # the cap of each call; the caller's deadline may cut it
            if not client.has_collection(self.collection, timeout=remaining(timeout)):
                try:
                    self._create(client, timeout)
                except MilvusException:
                    # another process may have created it between the two calls; then check theirs
                    if not client.has_collection(self.collection, timeout=remaining(timeout)):
                        raise
            self._check_existing(client, timeout)
            client.load_collection(self.collection, timeout=remaining(timeout))
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
            self._client = MilvusClient(uri=self.uri, token=self._token, timeout=remaining(self.timeout_s),
                                        **kwargs)
        return self._client

    def _create(self, client: MilvusClient, timeout: float) -> None:
        client.create_collection(
            self.collection,
            schema=collection_schema(self.dim, self.model_id),
            index_params=self.index.index_spec(),
            consistency_level="Strong",
            properties=collection_properties(self.model_id),
            timeout=remaining(timeout),
        )
        log.info("created Milvus collection %s (dim %d, %s, model %s)", self.collection, self.dim,
                 self.index.index_type, self.model_id or "-")

    def _check_existing(self, client: MilvusClient, timeout: float) -> None:
        desc = client.describe_collection(self.collection, timeout=remaining(timeout))
        check_fields(self.collection, desc, self.dim)
        stored = stored_model_id(desc)
        self._stored_model_id = stored
        if self.model_id and stored != self.model_id:
            raise CollectionMismatchError(
                f"collection {self.collection!r} holds embeddings of model {stored or '(unrecorded)'!r}, "
                f"not {self.model_id!r}; use another collection name (vitrine derives one per model)"
            )
        indexes = client.list_indexes(self.collection, field_name=VECTOR.name, timeout=remaining(timeout))
        if not indexes:
            client.create_index(self.collection, self.index.index_spec(), timeout=remaining(timeout))
            indexes = client.list_indexes(self.collection, field_name=VECTOR.name, timeout=remaining(timeout))
        info = client.describe_index(self.collection, indexes[0], timeout=remaining(timeout))
        self._index_type = str(info.get("index_type", self.index.index_type))
        self._index_params = built_params(info)
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
        """Map pymilvus / gRPC exceptions to this service's typed errors (`errors.map_error`).

        A failure once the caller's deadline has passed (retrieval_service.deadlines) is
        DeadlineExceededError, whatever pymilvus raised (its timeout was the caller's time left), and does not
        re-open the collection.
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
        except (DependencyUnavailableError, CollectionMismatchError, DeadlineExceededError):
            raise
        except MILVUS_EXCEPTIONS as exc:
            if expired():
                raise DeadlineExceededError(
                    f"the caller's deadline passed during {operation} on {self.collection!r} "
                    f"at {redact_uri(self.uri)} ({type(exc).__name__}: {exc})"
                ) from exc
            mapped = map_error(exc, where=f"{operation} on {self.collection!r} at {redact_uri(self.uri)}",
                               operation=operation, is_lite=self.is_lite, filter_expr=filter_expr)
            if mapped is None:
                raise
            failed = not isinstance(mapped.error, InvalidInputError)
            if mapped.reopen:
                self._opened = False
            raise mapped.error from exc
        finally:
            if self.call_observer is not None:
                self.call_observer(operation, time.perf_counter() - started, failed)

    # --- validation --------------------------------------------------------------------------------------

    @staticmethod
    def _check_filter(filter_expr: str) -> FilterExpr:
        """Milvus' expression for a filter: a `FilterExpr` as is, a plain str validated (.filters) first.

        Raises:
            InvalidFilterError: not a str, or outside the grammar.
        """
        if isinstance(filter_expr, FilterExpr):
            return filter_expr
        return validate_filter(filter_expr)

    @staticmethod
    def _ids_exprs(ids: Sequence[str]) -> Iterator[tuple[list[str], str]]:
        """Yield (chunk, 'id in [...]') for validated ids (hex only, so the expression cannot be injected)."""
        unique = list(dict.fromkeys(check_content_id(i) for i in ids))
        for start in range(0, len(unique), _IDS_PER_EXPR):
            chunk = unique[start : start + _IDS_PER_EXPR]
            yield chunk, f"{PRIMARY.name} in {json.dumps(chunk)}"

    # --- operations --------------------------------------------------------------------------------------

    def existing_ids(
        self, ids: Sequence[str], *, consistency: Literal["Strong", "Session"] = _READ_CONSISTENCY
    ) -> set[str]:
        """Return the subset of `ids` stored in the collection (Session consistency unless told).

        Raises:
            InvalidInputError: an id is not 64 lowercase hex characters.
            DependencyUnavailableError: Milvus is unreachable.
            DeadlineExceededError: the caller's deadline passed (retrieval_service.deadlines).
        """
        found: set[str] = set()
        exprs = list(self._ids_exprs(ids))
        with self._translate("existing_ids"):
            client = self._ready()
            for _, expr in exprs:
                rows = client.query(
                    self.collection, filter=expr, output_fields=[PRIMARY.name], consistency_level=consistency,
                    timeout=remaining(self.timeout_s),
                )
                found.update(r[PRIMARY.name] for r in rows)
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
            DeadlineExceededError: the caller's deadline passed (retrieval_service.deadlines).
        """
        data = list({r.id: to_entity(r) for r in (check_row(row, self.dim) for row in rows)}.values())
        if not data:
            return 0
        # Milvus Lite flushes synchronously inside an upsert; at ~60k rows x 512-d on 2 busy cores that alone took
        # ~11 s (vitrine bench scale), so Lite writes get the same floor as flush.
        timeout = max(self.timeout_s, 60.0) if self.is_lite else self.timeout_s
        with self._lock, self._translate("insert"):
            client = self._ready()
            for start in range(0, len(data), _ROWS_PER_UPSERT):
                client.upsert(self.collection, data[start : start + _ROWS_PER_UPSERT],
                              timeout=remaining(timeout))
        return len(data)

    def flush(self, *, seal: bool = False) -> None:
        """Make written rows fast to search: flushes on Milvus Lite; on a server only when `seal` is True.

        On a Milvus server rows are durable and searchable without a flush; `seal=True` seals the growing
        segments (seconds; do it before backups or shutdown, not per batch).

        Raises:
            DependencyUnavailableError: Milvus is unreachable.
            DeadlineExceededError: the caller's deadline passed (retrieval_service.deadlines).
        """
        if not (self.is_lite or seal):
            return
        with self._translate("flush"):
            self._ready().flush(self.collection, timeout=remaining(max(self.timeout_s, 60.0)))

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
                'metadata["label"] == 3 and filename like "cat%"'; '' for none. A plain str is checked and
                re-rendered by retrieval_service.adapters.milvus.filters (grammar there) before Milvus sees it;
                a `FilterExpr` (what `validate_filter` returns) is sent as is.
            min_score: drop hits whose cosine similarity is below it.
            with_vectors: also return each hit's stored embedding (Hit.embedding, float32 [dim]; as
                stored, i.e. L2-normalized by the encoder), e.g. for a rerank stage; else it is None.

        Returns:
            Q lists of at most top_k Hits, best (highest score) first.

        Raises:
            InvalidInputError: bad shape/dtype/values, top_k, offset or window.
            InvalidFilterError: `filter` is outside the grammar of retrieval_service.adapters.milvus.filters (the
                message names the token and position), or Milvus cannot parse it (its message included).
            DependencyUnavailableError: Milvus is unreachable.
            DeadlineExceededError: the caller's deadline passed (retrieval_service.deadlines).
        """
        queries = check_queries(vectors, self.dim)
        check_window(top_k, offset)
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
                output_fields=output_fields(with_vectors),
                search_params={"metric_type": "COSINE", "params": self._search_params(int(offset + top_k))},
                anns_field=VECTOR.name,
                consistency_level=_READ_CONSISTENCY,
                timeout=remaining(self.timeout_s),
            )
        out: list[list[Hit]] = []
        for hits in results:
            page = [hit_of(hit, with_vectors=with_vectors) for hit in hits]
            out.append([h for h in page if min_score is None or h.score >= min_score])
        return out

    def _search_params(self, window: int) -> dict[str, int]:
        """Search parameters of the index the collection has (as built), for offset + top_k = `window`."""
        return self.index.search_params(self._index_type, self._index_params, window)

    def get(self, ids: Sequence[str], *, with_vectors: bool = False) -> list[Row]:
        """Stored rows for `ids`, in the order asked; ids not stored are left out (duplicates once).

        Args:
            ids: content ids.
            with_vectors: also return embeddings (float32 [dim]); else Row.embedding is None.

        Raises:
            InvalidInputError: an id is malformed.
            DependencyUnavailableError: Milvus is unreachable.
            DeadlineExceededError: the caller's deadline passed (retrieval_service.deadlines).
        """
        fields = output_fields(with_vectors)
        exprs = list(self._ids_exprs(ids))
        by_id: dict[str, Row] = {}
        with self._translate("get"):
            client = self._ready()
            for _, expr in exprs:
                for r in client.query(
                    self.collection, filter=expr, output_fields=fields, consistency_level=_READ_CONSISTENCY,
                    timeout=remaining(self.timeout_s),
                ):
                    row = row_of(r, with_vectors=with_vectors)
                    by_id[row.id] = row
        return [by_id[i] for i in dict.fromkeys(ids) if i in by_id]

    def delete(self, ids: Sequence[str] | None = None, filter: str | None = None) -> int:  # noqa: A002
        """Delete rows by ids or by a filter expression (exactly one of them; a str or a `FilterExpr`, as `search`).

        Returns:
            How many stored rows were deleted (ids not stored do not count).

        Raises:
            InvalidInputError: both or neither given, an empty filter, or a malformed id.
            InvalidFilterError: `filter` is outside the grammar, or Milvus cannot parse it.
            DependencyUnavailableError: Milvus is unreachable.
            DeadlineExceededError: the caller's deadline passed (retrieval_service.deadlines).
        """
        if (ids is None) == (filter is None):
            raise InvalidInputError("delete needs exactly one of ids and filter")
        with self._lock:
            if ids is not None:
                present = self.existing_ids(ids, consistency="Strong")
                with self._translate("delete"):
                    client = self._ready()
                    for _, expr in self._ids_exprs(sorted(present)):
                        client.delete(self.collection, filter=expr, timeout=remaining(self.timeout_s))
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
                    self._ready().delete(self.collection, filter=expr, timeout=remaining(self.timeout_s))
            return matched

    def count(self, filter: str = "") -> int:  # noqa: A002
        """Exact number of stored rows (matching `filter`, a str or a `FilterExpr` as `search`), Strong consistency.

        Raises:
            InvalidFilterError: `filter` is outside the grammar, or Milvus cannot parse it.
            DependencyUnavailableError: Milvus is unreachable.
            DeadlineExceededError: the caller's deadline passed (retrieval_service.deadlines).
        """
        expr = self._check_filter(filter)
        with self._translate("count", expr):
            rows = self._ready().query(
                self.collection, filter=expr, output_fields=["count(*)"], consistency_level="Strong",
                timeout=remaining(self.timeout_s),
            )
        return int(rows[0]["count(*)"])

    def describe(self) -> dict[str, Any]:
        """Collection facts: collection, backend ('milvus-lite' | 'milvus'), uri (credentials redacted), dim,
        metric_type, index_type and params (as built), search_params, model_id, count.

        Raises:
            DependencyUnavailableError: Milvus is unreachable.
            DeadlineExceededError: the caller's deadline passed (retrieval_service.deadlines).
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

