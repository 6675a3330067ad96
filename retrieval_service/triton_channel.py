"""One lazily opened tritonclient asyncio gRPC channel, shared by the Triton-calling clients of this service."""

from __future__ import annotations

from tritonclient.grpc.aio import InferenceServerClient


class TritonChannel:
    """Owns one `tritonclient.grpc.aio.InferenceServerClient` to `url` ('host:port'), opened on first use.

    `close()` is idempotent and the next call opens a new channel, so a client survives a Triton restart.
    Subclasses (EncoderClient, ModelReranker) call `_get_client()` for every request.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._client: InferenceServerClient | None = None

    def _get_client(self) -> InferenceServerClient:
        if self._client is None:
            self._client = InferenceServerClient(self.url)
        return self._client

    async def close(self) -> None:
        """Close the gRPC channel (idempotent); the next call opens a new one."""
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def __aenter__(self):  # noqa: ANN204 - returns the subclass instance
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()
