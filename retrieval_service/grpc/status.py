"""Service exceptions -> gRPC status (AIP-193), in one table, and the decorators every handler uses.

Every error carries a human message; INVALID_ARGUMENT errors also carry a `google.rpc.BadRequest` naming the field
and a `google.rpc.ErrorInfo` with a machine reason, so a client can branch without parsing text.

`ErrorMapper.status(exc)` is the one place where an error becomes a status and the one place where a dependency
is reported down (health NOT_SERVING until the next successful probe); unary handlers (`unary_errors`),
streaming handlers (`stream_errors`) and per-item ingest outcomes all go through it.

Deadlines: the caller's deadline is set for every RPC by `retrieval_service.grpc.interceptors.RpcObserver`
(retrieval_service.deadlines); a call that runs out of the caller's time is DEADLINE_EXCEEDED
(`DeadlineExceededError`) and does not mark a dependency down; a dependency that does not answer within its
own timeout setting (`encoder_timeout_s`, `milvus_timeout_s`) while the caller still has time is UNAVAILABLE.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from retrieval_service.adapters.gemini import (
    GenerationNotConfiguredError,
    GenerationPermissionError,
    GenerationQuotaError,
)
from retrieval_service.deadlines import DeadlineExceededError
from retrieval_service.errors import (
    AbortedError,
    DependencyUnavailableError,
    ImageRejectedError,
    InvalidFilterError,
    InvalidInputError,
    NotFoundError,
)

log = logging.getLogger(__name__)

ERROR_DOMAIN = "vitrine.v1"
#: THE table: exception class -> google.rpc code, first match wins (subclasses before their bases).
STATUS_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (InvalidInputError, code_pb2.INVALID_ARGUMENT),
    (NotFoundError, code_pb2.NOT_FOUND),
    (GenerationNotConfiguredError, code_pb2.FAILED_PRECONDITION),
    (GenerationPermissionError, code_pb2.PERMISSION_DENIED),
    (GenerationQuotaError, code_pb2.RESOURCE_EXHAUSTED),
    (DependencyUnavailableError, code_pb2.UNAVAILABLE),
    (AbortedError, code_pb2.ABORTED),
    # the caller's own deadline passed (retrieval_service.deadlines): not an outage, health is not affected
    (DeadlineExceededError, code_pb2.DEADLINE_EXCEEDED),
)
#: Dependencies whose outage does not make the service NOT_SERVING (search and ingest work without Gemini).
NOT_HEALTH_DEPENDENCIES = frozenset({"gemini"})
T = TypeVar("T")


def _pack(message) -> any_pb2.Any:  # noqa: ANN001 - any protobuf message
    detail = any_pb2.Any()
    detail.Pack(message)
    return detail


def _details(exc: BaseException, code: int) -> list[any_pb2.Any]:
    """ErrorInfo (and BadRequest for INVALID_ARGUMENT) of `exc`."""
    if code == code_pb2.INVALID_ARGUMENT:
        field = getattr(exc, "field", "")
        if isinstance(exc, ImageRejectedError):
            reason = f"IMAGE_{str(getattr(exc, 'reason', 'rejected')).upper()}"
        elif isinstance(exc, InvalidFilterError):
            reason, field = "INVALID_FILTER", field or "filter"
        else:
            reason = getattr(exc, "reason", "INVALID_ARGUMENT")
        details = [_pack(error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN))]
        if field:
            violation = error_details_pb2.BadRequest.FieldViolation(field=field, description=str(exc))
            details.append(_pack(error_details_pb2.BadRequest(field_violations=[violation])))
        return details
    if code == code_pb2.UNAVAILABLE:
        dep = getattr(exc, "dependency", "dependency")
        return [_pack(error_details_pb2.ErrorInfo(reason=f"{str(dep).upper()}_UNAVAILABLE", domain=ERROR_DOMAIN))]
    return []


def to_status(exc: BaseException) -> status_pb2.Status:
    """Map a service exception to a `google.rpc.Status` by `STATUS_CODES`; anything else -> INTERNAL
    (the message hidden from the client, the exception logged with its traceback)."""
    for kind, code in STATUS_CODES:
        if isinstance(exc, kind):
            return status_pb2.Status(code=code, message=str(exc), details=_details(exc, code))
    log.exception("internal error", exc_info=exc)
    return status_pb2.Status(code=code_pb2.INTERNAL, message=f"internal error ({type(exc).__name__})")


class ErrorMapper:
    """Turns exceptions into statuses and reports dependency outages to `mark_down(dependency)` on the way."""

    def __init__(self, mark_down: Callable[[str], None]) -> None:
        self._mark_down = mark_down

    def status(self, exc: BaseException) -> status_pb2.Status:
        """`to_status(exc)`; for DependencyUnavailableError (not Gemini's) also `mark_down(exc.dependency)`."""
        if isinstance(exc, DependencyUnavailableError) and exc.dependency not in NOT_HEALTH_DEPENDENCIES:
            self._mark_down(exc.dependency)
        return to_status(exc)


class _HasErrors(Protocol):
    errors: ErrorMapper


def unary_errors(handler: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Decorate a unary grpc.aio handler `(self, request, context)`: exceptions become statuses via
    `self.errors` (an ErrorMapper); unexpected ones INTERNAL. The server keeps serving."""

    @functools.wraps(handler)
    async def wrapper(self: _HasErrors, request, context: grpc.aio.ServicerContext) -> T:  # noqa: ANN001
        try:
            return await handler(self, request, context)
        except (grpc.aio.AbortError, grpc.aio.UsageError):
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a status; the server keeps serving
            await context.abort_with_status(rpc_status.to_status(self.errors.status(exc)))
        raise AssertionError("unreachable: abort_with_status raises")

    return wrapper


def stream_errors(handler: Callable[..., AsyncIterator[T]]) -> Callable[..., AsyncIterator[T]]:
    """Decorate a server-streaming grpc.aio handler (an async generator `(self, request, context)`): an
    exception raised while producing the stream ends it with its status (messages already sent stay sent).
    Cancellation (client gone, deadline) is not an error and propagates."""

    @functools.wraps(handler)
    async def wrapper(self: _HasErrors, request, context: grpc.aio.ServicerContext) -> AsyncIterator[T]:  # noqa: ANN001
        try:
            async with contextlib.aclosing(handler(self, request, context)) as stream:
                async for message in stream:
                    yield message
        except (grpc.aio.AbortError, grpc.aio.UsageError, GeneratorExit):
            raise
        except Exception as exc:  # noqa: BLE001
            await context.abort_with_status(rpc_status.to_status(self.errors.status(exc)))

    return wrapper
