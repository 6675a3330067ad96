"""The exceptions every layer of the retrieval service raises; nothing here knows about gRPC or HTTP.

The one table that maps them to status codes is `retrieval_service.grpc.status` (AIP-193):

    InvalidInputError (and its subclasses)  -> INVALID_ARGUMENT (FieldError names the request field)
    DependencyUnavailableError              -> UNAVAILABLE
    NotFoundError                           -> NOT_FOUND
    AbortedError                            -> ABORTED
    CollectionMismatchError                 -> FAILED_PRECONDITION (a deployment error, raised at startup)

Every message names the problem so it can be returned to the client as is.
"""

from __future__ import annotations

from typing import Literal

RejectReason = Literal[
    "empty", "too_many_bytes", "undecodable", "too_many_pixels", "too_small", "unsupported_mode"
]
Dependency = Literal["milvus", "encoder", "gemini"]


class InvalidInputError(ValueError):
    """The request itself is wrong (bad argument, bad id, bad image); retrying it unchanged fails again."""


class ImageRejectedError(InvalidInputError):
    """An uploaded image was refused before reaching the encoder.

    Attributes:
        reason: short machine-readable cause, one of
            'empty'            zero bytes were sent,
            'too_many_bytes'   the encoded file is larger than the byte limit,
            'undecodable'      not an image in an accepted format, truncated or corrupt,
            'too_many_pixels'  width * height (read from the header, before decoding) is above the limit,
            'too_small'        the shorter side is below the minimum,
            'unsupported_mode' Pillow cannot convert the decoded mode to RGB.
    """

    def __init__(self, reason: RejectReason, message: str) -> None:
        super().__init__(f"image rejected ({reason}): {message}")
        self.reason: RejectReason = reason


class InvalidFilterError(InvalidInputError):
    """A Milvus boolean filter expression could not be parsed or refers to unknown fields.

    The message carries Milvus' own parser message.
    """


class FieldError(InvalidInputError):
    """An invalid request field: `field` is its proto path (e.g. 'top_k'), `reason` an UPPER_SNAKE reason.

    Raised by the use cases when they validate a request; a transport reports `field` to the client
    (gRPC: a `google.rpc.BadRequest` field violation).
    """

    def __init__(self, field: str, message: str, reason: str = "INVALID_FIELD") -> None:
        super().__init__(message)
        self.field = field
        self.reason = reason


class NotFoundError(LookupError):
    """The requested object (image id, stored blob) does not exist."""


class AbortedError(RuntimeError):
    """The work was cancelled before it finished (e.g. the ingest stream that owned an image went away)."""


class DependencyUnavailableError(RuntimeError):
    """A backing service is unreachable or not ready; the same request may succeed later.

    Attributes:
        dependency: which one, 'milvus', 'encoder' or 'gemini'.
    """

    def __init__(self, dependency: Dependency, message: str) -> None:
        super().__init__(f"{dependency} unavailable: {message}")
        self.dependency: Dependency = dependency


class CollectionMismatchError(RuntimeError):
    """An existing Milvus collection does not match what this service expects.

    Raised by `VectorStore.open()` when the collection was created for another embedding dimension,
    another model id or with another schema. Fix the configuration (collection name, model) or drop
    the collection; it is never caused by a client request.
    """
