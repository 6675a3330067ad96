"""One lazily opened tritonclient asyncio gRPC channel, shared by the Triton-calling clients of this service."""

from __future__ import annotations

import grpc
from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE, KeepAliveOptions
from tritonclient.grpc.aio import InferenceServerClient

from retrieval_service.tls import ClientTlsSettings, client_channel_credentials


class TritonChannel:
    """Owns one `tritonclient.grpc.aio.InferenceServerClient` to `url` ('host:port'), opened on first use.

    `close()` is idempotent and the next call opens a new channel, so a client survives a Triton restart.
    Subclasses (EncoderClient, ModelReranker) call `_get_client()` for every request.
    """

    def __init__(self, url: str, *, tls: ClientTlsSettings | None = None) -> None:
        self.url = url
        self._client: InferenceServerClient | None = None
        self._creds: grpc.ChannelCredentials | None = None
        self._server_name = ""
        if tls is not None:
            self.use_tls(tls)

    def use_tls(self, tls: ClientTlsSettings) -> None:
        """Connect with TLS per `tls` from the next channel on (no-op when `tls.enabled` is false).

        The PEM files are read now, so a bad path fails at startup. Raises retrieval_service.tls.TlsConfigError.
        """
        self._creds = client_channel_credentials(tls, prefix="encoder_tls.")
        self._server_name = tls.server_name if self._creds is not None else ""

    def _channel_options(self) -> list[tuple[str, object]]:
        """tritonclient's default channel options, plus round_robin and the TLS server-name override.

        round_robin spreads calls over every address a `dns:///triton:8001` URL resolves to (several Triton
        replicas behind one DNS name); gRPC's default pick_first would send every call to one of them.
        """
        keepalive = KeepAliveOptions()  # tritonclient's own defaults, which channel_args replaces
        options: list[tuple[str, object]] = [
            ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
            ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
            ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
            ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
            ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
            ("grpc.lb_policy_name", "round_robin"),
        ]
        if self._server_name:
            options.append(("grpc.ssl_target_name_override", self._server_name))
        return options

    def _get_client(self) -> InferenceServerClient:
        if self._client is None:
            self._client = InferenceServerClient(self.url, creds=self._creds, channel_args=self._channel_options())
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
