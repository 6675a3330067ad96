"""Service exceptions -> gRPC status (AIP-193), in one place.

Every error carries a human message; INVALID_ARGUMENT errors also carry a `google.rpc.BadRequest` naming the field
and a `google.rpc.ErrorInfo` with a machine reason, so a client can branch without parsing text.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from retrieval_service.adapters.gemini.client import (
    GenerationNotConfiguredError,
    GenerationPermissionError,
    GenerationQuotaError,
)
from retrieval_service.errors import (
    DependencyUnavailableError,
    ImageRejectedError,
    InvalidFilterError,
    InvalidInputError,
    NotFoundError,
)

log = logging.getLogger(__name__)

ERROR_DOMAIN = "vitrine.v1"
_GENERATION_CODES = (
    (GenerationNotConfiguredError, code_pb2.FAILED_PRECONDITION),
    (GenerationPermissionError, code_pb2.PERMISSION_DENIED),
    (GenerationQuotaError, code_pb2.RESOURCE_EXHAUSTED),
)
T = TypeVar("T")


class FieldError(InvalidInputError):
    """An invalid request field: `field` is its proto path (e.g. 'top_k'), `reason` an UPPER_SNAKE reason."""

    def __init__(self, field: str, message: str, reason: str = "INVALID_FIELD") -> None:
        super().__init__(message)
        self.field = field
        self.reason = reason


def _pack(message) -> any_pb2.Any:  # noqa: ANN001 - any protobuf message
    detail = any_pb2.Any()
    detail.Pack(message)
    return detail


def to_status(exc: BaseException, field: str = "") -> status_pb2.Status:
    """Map a service exception to a `google.rpc.Status`.

    InvalidInputError (and subclasses) -> INVALID_ARGUMENT; NotFoundError -> NOT_FOUND;
    DependencyUnavailableError -> UNAVAILABLE; Gemini errors: not configured -> FAILED_PRECONDITION,
    401/403 -> PERMISSION_DENIED, 429 -> RESOURCE_EXHAUSTED; anything else -> INTERNAL (message hidden, logged).
    """
    if isinstance(exc, InvalidInputError):
        field = getattr(exc, "field", "") or field
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
        return status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=str(exc), details=details)
    if isinstance(exc, NotFoundError):
        return status_pb2.Status(code=code_pb2.NOT_FOUND, message=str(exc))
    for kind, code in _GENERATION_CODES:
        if isinstance(exc, kind):
            return status_pb2.Status(code=code, message=str(exc))
    if isinstance(exc, DependencyUnavailableError):
        dep = getattr(exc, "dependency", "dependency")
        info = error_details_pb2.ErrorInfo(reason=f"{str(dep).upper()}_UNAVAILABLE", domain=ERROR_DOMAIN)
        return status_pb2.Status(code=code_pb2.UNAVAILABLE, message=str(exc), details=[_pack(info)])
    log.exception("internal error", exc_info=exc)
    return status_pb2.Status(code=code_pb2.INTERNAL, message=f"internal error ({type(exc).__name__})")


def rpc_errors(handler: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Decorate a unary grpc.aio handler `(self, request, context)` so service exceptions become statuses.

    Before answering UNAVAILABLE it calls `self.dependency_failed(exc)` (health goes NOT_SERVING at once).
    Unexpected exceptions become INTERNAL; the server keeps serving.
    """

    @functools.wraps(handler)
    async def wrapper(self, request, context: grpc.aio.ServicerContext) -> T:  # noqa: ANN001
        try:
            return await handler(self, request, context)
        except (InvalidInputError, NotFoundError, DependencyUnavailableError) as exc:
            if isinstance(exc, DependencyUnavailableError):
                self.dependency_failed(exc)
            await context.abort_with_status(rpc_status.to_status(to_status(exc)))
        except (grpc.aio.AbortError, grpc.aio.UsageError):
            raise
        except Exception as exc:  # noqa: BLE001 - last line of defence: the server keeps serving
            await context.abort_with_status(rpc_status.to_status(to_status(exc)))
        raise AssertionError("unreachable: abort_with_status raises")

    return wrapper
