"""Prometheus metrics of the retrieval service and /metrics over HTTP (the gRPC interceptor that records every RPC
is retrieval_service.grpc.interceptors).

Each server owns one `ServiceMetrics` with its own `CollectorRegistry` (not prometheus_client's global one), so
several servers in one process (tests) keep separate counts. Names follow the Prometheus naming conventions
(https://prometheus.io/docs/practices/naming/): a `vitrine_` prefix, base units (seconds), `_total` on counters.

| metric | type | labels | what |
|---|---|---|---|
| vitrine_rpc_requests_total | counter | rpc, code | finished RPCs by full method name and gRPC status code |
| vitrine_rpc_duration_seconds | histogram | rpc | RPC time, handler start to end of the response (stream) |
| vitrine_rpc_requests_in_flight | gauge | rpc | RPCs being handled now |
| vitrine_encoder_request_duration_seconds | histogram | tower | one Triton inference request (tower image/text) |
| vitrine_encoder_errors_total | counter | tower | Triton inference requests that failed |
| vitrine_milvus_request_duration_seconds | histogram | operation | one VectorStore call (search, insert, flush, get,
|   |   |   | existing_ids, delete, count, open) |
| vitrine_milvus_errors_total | counter | operation | VectorStore calls that failed (a rejected filter is not one)|
| vitrine_ingest_images_total | counter | outcome, code | ingest outcomes: INSERTED / ALREADY_PRESENT (code OK) or
|   |   |   | REJECTED with its google.rpc code (INVALID_ARGUMENT, UNAVAILABLE, ABORTED) |
| vitrine_ingest_streams_in_flight | gauge | | open IngestImages streams |
| vitrine_dependency_up | gauge | dependency | 1 when the health monitor sees the dependency (encoder, milvus) up |
| vitrine_embedding_cache_requests_total | counter | tier, kind, result | query embedding cache lookups: tier local /
|   |   |   | redis, kind text / image, result hit / miss (redis: keys asked of Redis in calls that answered) |
| vitrine_embedding_cache_evictions_total | counter | kind | local entries evicted by the entry or byte bound |
| vitrine_embedding_cache_entries | gauge | | entries in the local embedding cache |
| vitrine_embedding_cache_bytes | gauge | | bytes the local embedding cache counts (vectors + keys) |
| vitrine_embedding_cache_redis_errors_total | counter | | shared-cache (Redis) calls that failed or timed out |
| process_*, python_gc_*, python_info | | | prometheus_client's process, GC and platform collectors |

RPCs the server does not know (UNIMPLEMENTED) are counted with rpc="unknown" so callers cannot create series.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.gc_collector import GCCollector


log = logging.getLogger(__name__)
access_log = logging.getLogger("vitrine.access")

#: Histogram buckets, seconds: 0.5 ms to 5 min. Search and encoder calls are ms-scale (a text query ~5-50 ms on
#: CPU, a Milvus search ~4-20 ms, see ../shared/notes/environment.md); ingest batches and streams take seconds
#: to minutes. Roughly 2.5x apart, as prometheus_client's defaults (which stop at 10 s).
LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)
UNKNOWN_RPC = "unknown"
#: label values of the embedding cache metrics (retrieval_service.usecases.embedding_cache)
CACHE_KINDS: tuple[str, ...] = ("text", "image")
CACHE_TIERS: tuple[str, ...] = ("local", "redis")
#: RPCs whose access-log line is written at DEBUG, not INFO: load-balancer health probes arrive every few seconds.
QUIET_PREFIXES: tuple[str, ...] = ("/grpc.health.v1.Health/",)


class ServiceMetrics:
    """All metrics of one server, in `self.registry` (see the module docstring for names and labels).

    Args:
        registry: where to register; a new CollectorRegistry (with process, GC and platform collectors) if None.

    Thread-safe (prometheus_client metrics are); `observe_milvus` is called from the store's thread pool.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        if registry is None:
            registry = CollectorRegistry()
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)
        self.registry = registry
        self.rpc_requests = Counter("vitrine_rpc_requests_total", "Finished gRPC calls by method and status code.",
                                    ["rpc", "code"], registry=registry)
        self.rpc_duration = Histogram("vitrine_rpc_duration_seconds", "gRPC call duration (streams: to the end).",
                                      ["rpc"], buckets=LATENCY_BUCKETS_S, registry=registry)
        self.rpc_in_flight = Gauge("vitrine_rpc_requests_in_flight", "gRPC calls being handled.", ["rpc"],
                                   registry=registry)
        self.encoder_duration = Histogram("vitrine_encoder_request_duration_seconds",
                                          "Duration of one Triton inference request.", ["tower"],
                                          buckets=LATENCY_BUCKETS_S, registry=registry)
        self.encoder_errors = Counter("vitrine_encoder_errors_total", "Triton inference requests that failed.",
                                      ["tower"], registry=registry)
        self.milvus_duration = Histogram("vitrine_milvus_request_duration_seconds",
                                         "Duration of one vector-store (Milvus) call.", ["operation"],
                                         buckets=LATENCY_BUCKETS_S, registry=registry)
        self.milvus_errors = Counter("vitrine_milvus_errors_total", "Vector-store (Milvus) calls that failed.",
                                     ["operation"], registry=registry)
        self.ingest_images = Counter("vitrine_ingest_images_total", "Ingested images by outcome and status code.",
                                     ["outcome", "code"], registry=registry)
        self.ingest_streams = Gauge("vitrine_ingest_streams_in_flight", "Open IngestImages streams.",
                                    registry=registry)
        self.dependency_up = Gauge("vitrine_dependency_up", "1 when the dependency passes its health probe.",
                                   ["dependency"], registry=registry)
        self.cache_requests = Counter("vitrine_embedding_cache_requests_total",
                                      "Query embedding cache lookups by tier, kind and result.",
                                      ["tier", "kind", "result"], registry=registry)
        self.cache_evictions = Counter("vitrine_embedding_cache_evictions_total",
                                       "Local query embedding cache entries evicted by its bounds.", ["kind"],
                                       registry=registry)
        self.cache_entries = Gauge("vitrine_embedding_cache_entries", "Entries in the local query embedding cache.",
                                   registry=registry)
        self.cache_bytes = Gauge("vitrine_embedding_cache_bytes",
                                 "Bytes of the local query embedding cache (vectors and keys).", registry=registry)
        self.cache_redis_errors = Counter("vitrine_embedding_cache_redis_errors_total",
                                          "Shared embedding cache (Redis) calls that failed or timed out.",
                                          registry=registry)
        for kind in CACHE_KINDS:  # every series exists from the start, so rate() and hit ratios work at once
            self.cache_evictions.labels(kind)
            for tier in CACHE_TIERS:
                for result in ("hit", "miss"):
                    self.cache_requests.labels(tier, kind, result)

    # --- hooks called by the layers below ----------------------------------------------------------------

    def observe_encoder(self, tower: str, seconds: float, failed: bool) -> None:
        """Record one Triton inference request of `tower` ("image" | "text") that took `seconds`."""
        self.encoder_duration.labels(tower).observe(seconds)
        if failed:
            self.encoder_errors.labels(tower).inc()

    def observe_milvus(self, operation: str, seconds: float, failed: bool) -> None:
        """Record one VectorStore call `operation` (e.g. "search") that took `seconds`."""
        self.milvus_duration.labels(operation).observe(seconds)
        if failed:
            self.milvus_errors.labels(operation).inc()

    def count_ingest(self, outcome: str, code: str) -> None:
        """Count one ingest outcome: INSERTED / ALREADY_PRESENT with code 'OK', or REJECTED with its google.rpc
        code name (e.g. 'INVALID_ARGUMENT')."""
        self.ingest_images.labels(outcome, code).inc()

    def count_cache_requests(self, tier: str, kind: str, hits: int, misses: int) -> None:
        """Count `hits` + `misses` query embedding cache lookups of `kind` ("text" | "image") in `tier`
        ("local" | "redis"); part of `retrieval_service.usecases.embedding_cache.CacheObserver`."""
        if hits:
            self.cache_requests.labels(tier, kind, "hit").inc(hits)
        if misses:
            self.cache_requests.labels(tier, kind, "miss").inc(misses)

    def count_cache_evictions(self, kind: str, count: int) -> None:
        """Count `count` local embedding cache entries of `kind` evicted by the cache's bounds."""
        self.cache_evictions.labels(kind).inc(count)

    def set_cache_size(self, entries: int, nbytes: int) -> None:
        """The local embedding cache now holds `entries` entries of `nbytes` bytes."""
        self.cache_entries.set(entries)
        self.cache_bytes.set(nbytes)

    def count_cache_redis_error(self) -> None:
        """Count one failed or timed-out shared embedding cache (Redis) call."""
        self.cache_redis_errors.inc()

    def track_dependencies(self, names: Iterable[str], down: Callable[[], Iterable[str]]) -> None:
        """Expose `vitrine_dependency_up{dependency}` for `names`, reading `down()` (the ones down) at scrape."""
        for name in names:
            self.dependency_up.labels(name).set_function(lambda name=name: 0.0 if name in down() else 1.0)


class MetricsHttpServer:
    """`GET /metrics` (Prometheus text format) of one registry on a background thread; start/stop any time."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        self._server: Any = None
        self._thread: Any = None
        self.port: int | None = None

    def start(self, host: str, port: int) -> int:
        """Listen on host:port (0 picks a free port) and return the bound port.

        Raises:
            OSError: the address cannot be bound (in use, bad host).
        """
        self._server, self._thread = start_http_server(port, addr=host, registry=self._registry)
        self.port = int(self._server.server_port)
        return self.port

    def stop(self) -> None:
        """Stop serving and close the socket (no-op when not started)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = self._thread = None
            self.port = None


__all__ = ["LATENCY_BUCKETS_S", "MetricsHttpServer", "ServiceMetrics"]
