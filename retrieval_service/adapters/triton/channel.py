"""The one Triton channel of this service and what every Triton-calling client shares.

`TritonChannel` owns one lazily opened tritonclient asyncio gRPC channel and, once for all its
subclasses (`EncoderClient`, `ModelReranker`):

- the tritonclient status codes that mean "Triton is down" and `translate`, which turns a tritonclient
  error into `DependencyUnavailableError('encoder')` (down: retry later) or the subclass' `TritonError`;
- `is_model_ready`, the readiness of a list of models (never raises for a down server);
- a per-model cache of checked configs (`checked`; the check itself, `_check_config`, is the
  subclass'), filled on first use under one asyncio lock and cleared after an outage;
- `infer` (one request, errors translated) and `infer_in_chunks` (a batch split by max_batch_size).

Deadlines: an inference request and a first-use config check get `remaining(timeout_s)` as their gRPC deadline
(retrieval_service.deadlines): the caller's time left, at most `timeout_s`. A request that fails once the
caller's deadline has passed raises `DeadlineExceededError` (DEADLINE_EXCEEDED; health unaffected); one that
times out on `timeout_s` with the caller's time left is DependencyUnavailableError('encoder') (UNAVAILABLE).
Readiness probes (`is_model_ready`, run by the health monitor) keep `timeout_s` as theirs.

The reranker is served by the same Triton as the encoder towers, so every outage is reported as the
encoder's (`DEPENDENCY`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

import grpc
import numpy as np
from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE, InferInput, InferRequestedOutput, KeepAliveOptions
from tritonclient.grpc import model_config_pb2
from tritonclient.grpc.aio import InferenceServerClient
from tritonclient.utils import InferenceServerException

from retrieval_service.deadlines import DeadlineExceededError, expired, remaining
from retrieval_service.errors import DependencyUnavailableError
from retrieval_service.tls import ClientTlsSettings, client_channel_credentials

log = logging.getLogger(__name__)

#: Every Triton outage is reported as the encoder's (the reranker is served by the same Triton).
DEPENDENCY = "encoder"
#: gRPC status codes (as tritonclient spells them) that mean "Triton is not reachable or not serving
#: right now"; a caller may retry later. Anything else is a bug or a misconfiguration.
UNAVAILABLE_CODES = frozenset(
    {"StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.CANCELLED"}
)
#: A model that passed the first-use check can vanish (server stopping, model unloaded): with
#: `gone_is_down`, NOT_FOUND (unknown model) also means unavailable.
NOT_FOUND = "StatusCode.NOT_FOUND"

ConfigT = TypeVar("ConfigT")
ChannelT = TypeVar("ChannelT", bound="TritonChannel")


class TritonError(RuntimeError):
    """Triton answered, but not as expected (an internal server error, a malformed response)."""


def describe_error(exc: InferenceServerException) -> str:
    """'<status>: <message>' of a tritonclient error, e.g. 'StatusCode.UNAVAILABLE: failed to connect'."""
    return f"{exc.status() or 'error'}: {exc.message()}"


class TritonChannel(Generic[ConfigT]):
    """One `tritonclient.grpc.aio.InferenceServerClient` to `url` ('host:port'), opened on first use.

    Args:
        url: Triton KServe v2 gRPC endpoint `host:port` (a `dns:///name:8001` URL spreads calls over
            every address the name resolves to).
        timeout_s: deadline of one gRPC call (one inference request, one readiness probe), seconds; a request
            made for a caller with less time left gets that instead (retrieval_service.deadlines).
        tls: connect with TLS per these settings (see `use_tls`); None = plaintext.

    `close()` is idempotent and the next call opens a new channel, so a client survives a Triton restart.
    Subclasses call `_get_client()` for every request, set `subject` / `error_class` / `mismatch_class`,
    and implement `_check_config` (the model-config check whose result `checked` caches, per model).
    The channel opens inside the running event loop: use one instance per loop.

    Raises:
        ValueError: timeout_s <= 0.
    """

    #: Who failed, in error messages: "encoder", "reranker 'scorer'".
    subject: str = "Triton"
    #: Raised for an answer that is wrong rather than absent (`translate` of a non-outage status).
    error_class: type[TritonError] = TritonError
    #: Raised by `_check_config` when a served config contradicts what the client needs; `is_model_ready`
    #: logs it as an error (a deployment mistake) rather than as a passing outage.
    mismatch_class: type[TritonError] = TritonError
    #: Whether NOT_FOUND during a config check means down (the model was unloaded) or a wrong answer.
    unknown_model_is_down: bool = False

    def __init__(self, url: str, *, timeout_s: float = 30.0, tls: ClientTlsSettings | None = None) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.url = url
        self.timeout_s = float(timeout_s)
        self._client: InferenceServerClient | None = None
        self._creds: grpc.ChannelCredentials | None = None
        self._server_name = ""
        self._checked: dict[str, ConfigT] = {}
        self._check_lock: asyncio.Lock | None = None  # created inside the running loop, on first use
        if tls is not None:
            self.use_tls(tls)

    # ----------------------------------------------------------------------------------------- channel
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

    async def __aenter__(self: ChannelT) -> ChannelT:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    # -------------------------------------------------------------------------------------------- errors
    def translate(self, exc: InferenceServerException, what: str, *, gone_is_down: bool = False) -> Exception:
        """Map a tritonclient error to DependencyUnavailableError('encoder') (down) or `error_class`.

        Args:
            exc: the tritonclient error.
            what: the failed step for the message, e.g. "inference on 'clip_image'".
            gone_is_down: NOT_FOUND (unknown model) also means unavailable, for models already checked.

        Returns:
            The exception to raise (`raise channel.translate(exc, ...) from exc`); DeadlineExceededError when
            the current caller's deadline (retrieval_service.deadlines) has passed, whatever the status: the
            call was cut by the caller's time, which says nothing about Triton's health.
        """
        status = exc.status()
        detail = describe_error(exc)
        if expired():
            return DeadlineExceededError(
                f"the caller's deadline passed during {what} on {self.subject} at {self.url} ({detail})")
        if status in UNAVAILABLE_CODES or (gone_is_down and status == NOT_FOUND):
            return DependencyUnavailableError(DEPENDENCY, f"Triton at {self.url} failed {what} ({detail})")
        return self.error_class(f"{self.subject} at {self.url} failed {what} ({detail})")

    # ----------------------------------------------------------------------------- readiness and configs
    async def is_model_ready(self, models: Sequence[str]) -> bool:
        """True when Triton answers and every model in `models` is READY and passes `_check_config`.

        Never raises for a down server: returns False (connection refused, timeout, model loading) and
        forgets the checked configs. A served config that contradicts the client (`mismatch_class`) also
        gives False, with the reason logged as an error.
        """
        try:
            client = self._get_client()
            for model in models:
                if not await client.is_model_ready(model, client_timeout=self.timeout_s):
                    self._checked.clear()
                    return False
            for model in models:
                await self.checked(model)
            return True
        except self.mismatch_class as exc:
            log.error("%s at %s does not serve what it needs: %s", self.subject, self.url, exc)
            return False
        except (InferenceServerException, DependencyUnavailableError, self.error_class) as exc:
            log.debug("%s at %s not ready: %s", self.subject, self.url, exc)
            self._checked.clear()
            return False

    async def checked(self, model: str) -> ConfigT:
        """The checked config of `model`: read and checked on first use (and again after an outage).

        The check's two calls are bounded by `remaining(timeout_s)` (the caller's time left, at most
        timeout_s).

        Raises:
            DeadlineExceededError: the caller's deadline passed.
            DependencyUnavailableError: Triton is down, or the model is not ready (unknown or loading).
            mismatch_class: the served config does not pass `_check_config`.
            error_class: any other failure reading the config.
        """
        confirmed = self._checked.get(model)
        if confirmed is not None:
            return confirmed
        if self._check_lock is None:
            self._check_lock = asyncio.Lock()
        async with self._check_lock:
            confirmed = self._checked.get(model)
            if confirmed is None:
                confirmed = self._check_config(model, await self._read_config(model))
                self._checked[model] = confirmed
        return confirmed

    def _check_config(self, model: str, config: model_config_pb2.ModelConfig) -> ConfigT:
        """Check the served `config` of `model`; return what `checked` caches. Raise `mismatch_class`."""
        raise NotImplementedError(f"{type(self).__name__} does not check model configs")

    async def _read_config(self, model: str) -> model_config_pb2.ModelConfig:
        client = self._get_client()
        try:
            if not await client.is_model_ready(model, client_timeout=remaining(self.timeout_s)):
                raise DependencyUnavailableError(
                    DEPENDENCY,
                    f"Triton at {self.url}: model {model!r} is not ready (unknown or still loading)",
                )
            return (await client.get_model_config(model, client_timeout=remaining(self.timeout_s))).config
        except InferenceServerException as exc:
            what = f"config check of {model!r}"
            raise self.translate(exc, what, gone_is_down=self.unknown_model_is_down) from exc

    # ------------------------------------------------------------------------------------------ inference
    async def infer(self, model: str, inputs: Sequence[InferInput], output: str) -> np.ndarray | None:
        """One inference request on `model`; returns `output` as Triton sent it (None when absent).

        Its gRPC deadline is `remaining(timeout_s)`: the caller's time left (retrieval_service.deadlines), at
        most `timeout_s` seconds.

        Raises:
            DeadlineExceededError: the caller's deadline passed (before the request, or while it ran).
            DependencyUnavailableError: Triton is down, did not answer within `timeout_s`, or the model
                vanished (NOT_FOUND).
            error_class: any other server-side failure.
        """
        try:
            result = await self._get_client().infer(
                model, list(inputs), outputs=[InferRequestedOutput(output)],
                client_timeout=remaining(self.timeout_s),
            )
        except InferenceServerException as exc:
            raise self.translate(exc, f"inference on {model!r}", gone_is_down=True) from exc
        return result.as_numpy(output)

    async def infer_in_chunks(
        self,
        batch: np.ndarray,
        max_batch_size: int,
        infer_chunk: Callable[[np.ndarray], Awaitable[np.ndarray]],
    ) -> np.ndarray:
        """Split `batch` [N, ...] into chunks of at most max_batch_size rows, infer them concurrently.

        Triton's dynamic batcher merges the chunks again as it sees fit. Returns the chunk results
        concatenated along axis 0, in order (N >= 1). On DependencyUnavailableError the checked configs
        are forgotten (the server may come back with other models: they are checked again).
        """
        chunks = [batch[i : i + max_batch_size] for i in range(0, batch.shape[0], max_batch_size)]
        try:
            results = await asyncio.gather(*(infer_chunk(chunk) for chunk in chunks))
        except DependencyUnavailableError:
            self._checked.clear()
            raise
        return results[0] if len(results) == 1 else np.concatenate(results, axis=0)
