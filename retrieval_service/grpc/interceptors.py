"""grpc.aio server interceptors: `RpcObserver` records every RPC in `ServiceMetrics`, tags its log lines with a
request id, writes its access-log line (metric names: retrieval_service.metrics) and sets the call's deadline
for the adapters (retrieval_service.deadlines). Bearer-token auth is retrieval_service.grpc.auth.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from retrieval_service import deadlines
from retrieval_service.logs import REQUEST_ID_KEY, bind_request, request_id_from_metadata
from retrieval_service.metrics import QUIET_PREFIXES, UNKNOWN_RPC, ServiceMetrics, access_log

log = logging.getLogger(__name__)


class RpcObserver(grpc.aio.ServerInterceptor):
    """Records each RPC in `ServiceMetrics`, tags its log lines with a request id and writes its access-log line.

    Outermost interceptor: calls that an inner interceptor (auth) rejects by returning an aborting handler are
    counted too. For each call it (1) takes the request id from `x-request-id` metadata or makes one, binds it
    and the method name to the log context, (2) sends it back as initial metadata `x-request-id`, (3) when the
    handler returns, raises or the stream ends (also on abort and cancellation) records the status code and
    duration and logs `rpc code duration_ms peer request_id` at INFO (health checks at DEBUG). The status code
    is the one the handler set or aborted with (`context.code()`), CANCELLED / DEADLINE_EXCEEDED when the call
    was cancelled, UNKNOWN for an unhandled exception (as grpc answers), else OK. (4) It runs the handler
    inside `deadlines.scope(context.time_remaining())`: every encoder and Milvus call the RPC makes is bounded
    by the client's deadline (None: no deadline, only the adapters' own timeouts); for a stream
    (IngestImages) the deadline covers the whole stream.
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
            with deadlines.scope(context.time_remaining()):
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
                with deadlines.scope(context.time_remaining()):
                    async for response in behavior(request, context):
                        yield response
            except BaseException as exc:  # incl. GeneratorExit / CancelledError when the call is cancelled
                error = exc
                raise
            finally:
                call.finish(context, error)

        return stream
    return _wrap_unary(behavior, call)  # a coroutine writing with context.write
