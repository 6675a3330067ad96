"""The generation-specific errors of the Gemini adapter; bad input and outages use the shared classes.

    no API key configured                    GenerationNotConfiguredError  -> FAILED_PRECONDITION
    Gemini HTTP 401 / 403, or 400 with
    reason API_KEY_INVALID (a bad key)       GenerationPermissionError      -> PERMISSION_DENIED
    Gemini HTTP 429                          GenerationQuotaError           -> RESOURCE_EXHAUSTED

A bad request or options (and Gemini HTTP 400 / other 4xx) raise `retrieval_service.errors.InvalidInputError`,
an outage `DependencyUnavailableError('gemini', ...)`. The gRPC codes are applied by
`retrieval_service.grpc.status`; nothing here knows about gRPC.
"""

from __future__ import annotations


class GenerationError(RuntimeError):
    """Base class of the generation-specific errors below (bad input and outages use the shared classes)."""


class GenerationNotConfiguredError(GenerationError):
    """No Gemini API key is configured, so generation cannot run (gRPC: FAILED_PRECONDITION)."""


class GenerationPermissionError(GenerationError):
    """Gemini refused the API key (gRPC: PERMISSION_DENIED).

    HTTP 401 or 403, or HTTP 400 whose google.rpc.ErrorInfo reason is API_KEY_INVALID: the Gemini API answers
    an invalid key with 400 INVALID_ARGUMENT, which is not the caller's request being wrong.

    Attributes:
        http_status: 400, 401 or 403.
    """

    def __init__(self, http_status: int, message: str) -> None:
        super().__init__(message)
        self.http_status = http_status


class GenerationQuotaError(GenerationError):
    """Gemini rate limit or quota exceeded: HTTP 429 (gRPC: RESOURCE_EXHAUSTED). Retry later, with backoff."""
