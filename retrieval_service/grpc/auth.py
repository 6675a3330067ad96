"""Bearer-token authentication of the retrieval gRPC server, as a grpc.aio server interceptor.

A call must carry the metadata `authorization: Bearer <token>` with one of the configured tokens; otherwise it
ends with UNAUTHENTICATED before its handler runs (and before its request is deserialized). Health checking
(`grpc.health.v1.Health`) and server reflection stay open, so load balancers and tools work without a token.

Tokens come from `AuthSettings.tokens` (env `VITRINE_AUTH__TOKENS='["t1","t2"]'`) and/or `AuthSettings.tokens_file`
(one token per line; blank lines and lines starting with '#' ignored). They are compared with
`hmac.compare_digest` against every configured token (no early exit on the first match), and never logged or
echoed: rejection messages say what was wrong (missing header, wrong scheme, unknown token), not the token.
With no token configured the server is open, as before, and `TokenAuthInterceptor.from_settings` returns None.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import grpc

from retrieval_service.settings import AuthSettings

log = logging.getLogger(__name__)

#: Method-name prefixes that never need a token.
OPEN_PREFIXES: tuple[str, ...] = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
def _rejecting_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind as `handler` that ends the call with UNAUTHENTICATED."""

    async def reject(_request_or_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    serializer = handler.response_serializer
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(reject, response_serializer=serializer)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(reject, response_serializer=serializer)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(reject, response_serializer=serializer)
    return grpc.unary_unary_rpc_method_handler(reject, response_serializer=serializer)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Require `authorization: Bearer <token>` on every method except `open_prefixes`.

    Args:
        tokens: accepted tokens (non-empty).
        open_prefixes: method-name prefixes served without a token (default: health and reflection).

    Raises:
        ValueError: `tokens` is empty.
    """

    def __init__(self, tokens: Iterable[str], open_prefixes: Sequence[str] = OPEN_PREFIXES) -> None:
        self._tokens = [t.encode("utf-8") for t in tokens]
        if not self._tokens:
            raise ValueError("TokenAuthInterceptor needs at least one token")
        self._open = tuple(open_prefixes)

    @classmethod
    def from_settings(cls, auth: AuthSettings) -> "TokenAuthInterceptor | None":
        """The interceptor for `auth`, or None when no token is configured (open server).

        Raises:
            ValueError: see `AuthSettings.load_tokens`.
        """
        tokens = auth.load_tokens()
        return cls(tokens) if tokens else None

    @property
    def token_count(self) -> int:
        """How many tokens are accepted."""
        return len(self._tokens)

    def check(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
        """Return None if `metadata` carries an accepted bearer token, else the reason (safe to show; no token)."""
        values = [v for k, v in (metadata or ()) if k == "authorization"]
        if not values:
            return "missing 'authorization: Bearer <token>' metadata"
        if len(values) > 1:
            return "more than one 'authorization' metadata entry"
        value = values[0]
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        scheme, _, presented = value.strip().partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            return "the 'authorization' metadata must be 'Bearer <token>'"
        candidate = presented.strip().encode("utf-8")
        matched = False
        for token in self._tokens:  # compare against all: time does not depend on which token matched
            matched |= hmac.compare_digest(candidate, token)
        return None if matched else "invalid bearer token"

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """Pass authenticated (or open) calls on; answer others UNAUTHENTICATED with the reason."""
        method = handler_call_details.method
        if method.startswith(self._open):
            return await continuation(handler_call_details)
        reason = self.check(handler_call_details.invocation_metadata)
        handler = await continuation(handler_call_details)
        if reason is None or handler is None:  # unknown method: gRPC answers UNIMPLEMENTED
            return handler
        log.info("unauthenticated call to %s: %s", method, reason)
        return _rejecting_handler(handler, f"{method}: {reason}")
