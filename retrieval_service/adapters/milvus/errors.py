"""Translation of pymilvus / gRPC exceptions into the service's typed errors (retrieval_service.errors).

`map_error` is the one table: which pymilvus codes, exception classes and messages mean "Milvus is down or
restarting" (DependencyUnavailableError), "the filter is wrong" (InvalidFilterError), and which of them require
the store to re-open its collection on the next call. Measured with pymilvus 3.0.2 against Milvus Lite 3.2.2
and Milvus server 2.3.5.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from pymilvus.exceptions import (
    ConnectError,
    ConnectionConfigException,
    MilvusException,
    MilvusUnavailableException,
)

from retrieval_service.errors import DependencyUnavailableError, InvalidFilterError, InvalidInputError

#: What `map_error` translates; anything else passes through unchanged.
MILVUS_EXCEPTIONS = (MilvusException, grpc.RpcError, grpc.FutureTimeoutError)

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


@dataclass(frozen=True)
class Mapped:
    """A translated exception.

    Attributes:
        error: the typed error to raise in place of the pymilvus / gRPC one.
        reopen: the collection must be opened again (reconnect, re-create, re-load) before the next call.
    """

    error: DependencyUnavailableError | InvalidInputError
    reopen: bool = False


def map_error(exc: BaseException, *, where: str, operation: str, is_lite: bool, filter_expr: str = ""
              ) -> Mapped | None:
    """Return the typed error for a pymilvus/gRPC exception, or None to re-raise it unchanged.

    Args:
        exc: one of `MILVUS_EXCEPTIONS`.
        where: the call for messages, e.g. "search on 'images' at http://***@host:19530" (uri redacted).
        operation: the store method ('open', 'search', ...); a missing collection during 'open' is not mapped.
        is_lite: the store is on Milvus Lite (a file) rather than a server.
        filter_expr: the filter sent with the call ('' for none).

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
    if isinstance(exc, grpc.FutureTimeoutError):
        return Mapped(DependencyUnavailableError("milvus", f"{where}: timed out"))
    if isinstance(exc, grpc.RpcError):
        code = exc.code() if callable(getattr(exc, "code", None)) else None
        if code in _UNAVAILABLE_GRPC:
            return Mapped(DependencyUnavailableError("milvus", f"{where}: {code.name}: {exc.details()}"))
        return None
    if not isinstance(exc, MilvusException):
        return None
    code, message = exc.code, exc.message or str(exc)
    if (
        isinstance(exc, (ConnectError, MilvusUnavailableException))
        or code == _CONNECT_FAILED
        or code in _UNAVAILABLE_GRPC
        or (isinstance(exc, ConnectionConfigException) and "open local milvus" in message.lower())
    ):
        if isinstance(exc, ConnectionConfigException) and is_lite:
            message += " (is another process using this Milvus Lite file? is its directory writable?)"
        return Mapped(DependencyUnavailableError("milvus", f"{where}: {message}"), reopen=True)
    if not is_lite and (
        code in _TRANSPORT_GRPC
        or code in _SERVER_RECOVERING
        or (code == 1 and "not ready" in message.lower())
    ):
        # re-open (and re-load) the collection on the next call
        return Mapped(DependencyUnavailableError("milvus", f"{where}: server not answering normally ({message})"),
                      reopen=True)
    if code in _COLLECTION_NOT_FOUND and operation != "open":
        return Mapped(DependencyUnavailableError("milvus", f"{where}: collection not found ({message}); re-opening"),
                      reopen=True)
    if filter_expr and (
        (is_lite and code == _LITE_ILLEGAL_ARGUMENT)
        or any(marker in message for marker in _SERVER_FILTER_MARKERS)
        or isinstance(exc.__cause__, UnicodeError)  # pymilvus: an escape in the filter decoded to a surrogate
    ):
        return Mapped(InvalidFilterError(f"invalid filter {filter_expr!r}: {message}"))
    return None
