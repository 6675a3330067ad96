"""Prometheus metrics of the retrieval service, the gRPC interceptor that records every RPC, and /metrics over HTTP.

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
| process_*, python_gc_*, python_info | | | prometheus_client's process, GC and platform collectors |

RPCs the server does not know (UNIMPLEMENTED) are counted with rpc="unknown" so callers cannot create series.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc
from google.rpc import code_pb2
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

from retrieval_service.logs import REQUEST_ID_KEY, bind_request, request_id_from_metadata
from vitrine.v1 import retrieval_service_pb2 as pb

log = logging.getLogger(__name__)
access_log = logging.getLogger("vitrine.access")

#: Histogram buckets, seconds: 0.5 ms to 5 min. Search and encoder calls are ms-scale (a text query ~5-50 ms on
#: CPU, a Milvus search ~4-20 ms, see ../shared/notes/environment.md); ingest batches and streams take seconds
#: to minutes. Roughly 2.5x apart, as prometheus_client's defaults (which stop at 10 s).
LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)
UNKNOWN_RPC = "unknown"
#: RPCs whose access-log line is written at DEBUG, not INFO: load-balancer health probes arrive every few seconds.
QUIET_PREFIXES: tuple[str, ...] = ("/grpc.health.v1.Health/",)
_OUTCOMES = {v: k for k, v in pb.IngestImagesResponse.Outcome.items()}


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

    def count_ingest(self, response: pb.IngestImagesResponse) -> None:
        """Count one ingest outcome; REJECTED is labelled with its google.rpc code name, others with OK."""
        outcome = _OUTCOMES.get(response.outcome, str(response.outcome))
        code = code_pb2.Code.Name(response.error.code) if response.HasField("error") else "OK"
        self.ingest_images.labels(outcome, code).inc()

    def track_dependencies(self, names: Iterable[str], down: Callable[[], Iterable[str]]) -> None:
        """Expose `vitrine_dependency_up{dependency}` for `names`, reading `down()` (the ones down) at scrape."""
        for name in names:
            self.dependency_up.labels(name).set_function(lambda name=name: 0.0 if name in down() else 1.0)

    def interceptor(self) -> "RpcObserver":
        """A grpc.aio server interceptor recording every RPC here; put it first (outermost)."""
        return RpcObserver(self)


class RpcObserver(grpc.aio.ServerInterceptor):
    """Records each RPC in `ServiceMetrics`, tags its log lines with a request id and writes its access-log line.

    Outermost interceptor: calls that an inner interceptor (auth) rejects by returning an aborting handler are
    counted too. For each call it (1) takes the request id from `x-request-id` metadata or makes one, binds it
    and the method name to the log context, (2) sends it back as initial metadata `x-request-id`, (3) when the
    handler returns, raises or the stream ends (also on abort and cancellation) records the status code and
    duration and logs `rpc code duration_ms peer request_id` at INFO (health checks at DEBUG). The status code
    is the one the handler set or aborted with (`context.code()`), CANCELLED / DEADLINE_EXCEEDED when the call
    was cancelled, UNKNOWN for an unhandled exception (as grpc answers), else OK.
    """

    def __init__(self, metrics: ServiceMetrics) -> None:
        self._m = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        """Bind the request id, look the handler up through the inner interceptors and wrap it."""
        rpc = handler_call_details.method
        request_id = request_id_from_metadata(handler_call_details.invocation_metadata)
        # grpc.aio runs each call's interceptors and handler in one fresh contextvars.Context
        # (grpc.aio.ServerInterceptor docs), so this binding covers the whole call and nothing else.
        bind_request(request_id, rpc)
        handler = await continuation(handler_call_details)
        if handler is None:  # grpc answers UNIMPLEMENTED; do not let callers mint label values
            self._m.rpc_requests.labels(UNKNOWN_RPC, grpc.StatusCode.UNIMPLEMENTED.name).inc()
            access_log.info("%s UNIMPLEMENTED", UNKNOWN_RPC, extra={"code": "UNIMPLEMENTED"})
            return None
        return _wrap_handler(handler, _CallRecorder(self._m, rpc, request_id))


class _CallRecorder:
    """Start/finish bookkeeping of one call (metrics, initial metadata, access log)."""

    def __init__(self, metrics: ServiceMetrics, rpc: str, request_id: str) -> None:
        self.m = metrics
        self.rpc = rpc
        self.request_id = request_id
        self.started = 0.0

    def begin(self) -> None:
        self.started = time.perf_counter()
        self.m.rpc_in_flight.labels(self.rpc).inc()

    async def send_request_id(self, context: grpc.aio.ServicerContext) -> None:
        try:
            await context.send_initial_metadata(((REQUEST_ID_KEY, self.request_id),))
        except grpc.aio.BaseError as exc:  # the call is already over (cancelled before the handler started)
            log.debug("could not send %s: %s", REQUEST_ID_KEY, exc)

    def finish(self, context: grpc.aio.ServicerContext, error: BaseException | None) -> None:
        seconds = time.perf_counter() - self.started
        self.m.rpc_in_flight.labels(self.rpc).dec()
        code = _status_code(context, error)
        self.m.rpc_requests.labels(self.rpc, code).inc()
        self.m.rpc_duration.labels(self.rpc).observe(seconds)
        level = logging.DEBUG if self.rpc.startswith(QUIET_PREFIXES) else logging.INFO
        duration_ms = round(seconds * 1e3, 3)
        peer = _peer(context)
        access_log.log(level, "%s %s %.1f ms peer=%s", self.rpc, code, duration_ms, peer,
                       extra={"code": code, "duration_ms": duration_ms, "peer": peer})


def _status_code(context: grpc.aio.ServicerContext, error: BaseException | None) -> str:
    """The status the caller gets (see RpcObserver), as a grpc.StatusCode name."""
    set_code = context.code()  # None unless the handler set a code or aborted
    if error is None or isinstance(error, grpc.aio.AbortError):
        return set_code.name if isinstance(set_code, grpc.StatusCode) else "OK"
    if not isinstance(error, Exception):  # CancelledError, GeneratorExit: the call was cancelled
        remaining = context.time_remaining()
        return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
    return "UNKNOWN"


def _peer(context: grpc.aio.ServicerContext) -> str:
    try:
        return context.peer()
    except RuntimeError:  # the call's transport is gone
        return "unknown"


def _wrap_handler(handler: grpc.RpcMethodHandler, call: _CallRecorder) -> grpc.RpcMethodHandler:
    """The same handler (serializers included) with its behavior wrapped to record `call`.

    grpc.aio accepts two shapes of streaming-response behavior: an async generator, or a coroutine that writes
    with `context.write` (grpc_health's Watch; grpc/grpc#28728). The wrapper keeps the shape of the original.
    """
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            _wrap_unary(handler.unary_unary, call), handler.request_deserializer, handler.response_serializer)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            _wrap_unary(handler.stream_unary, call), handler.request_deserializer, handler.response_serializer)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            _wrap_stream(handler.unary_stream, call), handler.request_deserializer, handler.response_serializer)
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(
            _wrap_stream(handler.stream_stream, call), handler.request_deserializer, handler.response_serializer)
    return handler


def _wrap_unary(behavior: Callable[..., Any], call: _CallRecorder) -> Callable[..., Awaitable[Any]]:
    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        call.begin()
        error: BaseException | None = None
        try:
            await call.send_request_id(context)
            result = behavior(request, context)
            return await result if inspect.isawaitable(result) else result
        except BaseException as exc:
            error = exc
            raise
        finally:
            call.finish(context, error)

    return unary


def _wrap_stream(behavior: Callable[..., Any], call: _CallRecorder) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(behavior):
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            call.begin()
            error: BaseException | None = None
            try:
                await call.send_request_id(context)
                async for response in behavior(request, context):
                    yield response
            except BaseException as exc:  # incl. GeneratorExit / CancelledError when the call is cancelled
                error = exc
                raise
            finally:
                call.finish(context, error)

        return stream
    return _wrap_unary(behavior, call)  # a coroutine writing with context.write


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


__all__ = ["LATENCY_BUCKETS_S", "MetricsHttpServer", "RpcObserver", "ServiceMetrics"]
