"""Typed exceptions raised by the retrieval service's storage and preprocessing layers.

The gRPC servicer maps them to status codes; nothing here knows about gRPC:

    InvalidInputError (and its subclasses)  -> INVALID_ARGUMENT
    DependencyUnavailableError              -> UNAVAILABLE
    NotFoundError                           -> NOT_FOUND
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


class NotFoundError(LookupError):
    """The requested object (image id, stored blob) does not exist."""


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
