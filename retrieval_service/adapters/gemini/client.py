"""`GeminiGenerator`: stream text and images from Gemini 2.5 Flash Image, given a prompt and references.

`GeminiGenerator.stream()` sends one user turn to `models/{model}:streamGenerateContent?alt=sse` through the
google-genai SDK: the prompt as a text part, then each reference image as an inline-data part, in that order
(the request shape of Google's image-editing examples,
https://ai.google.dev/gemini-api/docs/image-generation#image_editing_text-and-image-to-image). It yields the
parts in the order Gemini streams them (`TextChunk`, `ImageChunk`), then exactly one `Finished`.

Errors (`retrieval_service.grpc.status` maps them to status codes; nothing here knows about gRPC):

    no API key configured                    GenerationNotConfiguredError  -> FAILED_PRECONDITION
    bad request / options, Gemini HTTP 400   InvalidInputError              -> INVALID_ARGUMENT
    Gemini HTTP 401 / 403, or 400 with
    reason API_KEY_INVALID (a bad key)       GenerationPermissionError      -> PERMISSION_DENIED
    Gemini HTTP 429                          GenerationQuotaError           -> RESOURCE_EXHAUSTED
    Gemini 5xx, connection failure, timeout,
    stream cut before a finish reason        DependencyUnavailableError('gemini', ...)  -> UNAVAILABLE

5xx, connection failures and timeouts are retried (`max_retries` times, exponential backoff) only while
nothing has been yielded; once output has started a failure raises at once. The SDK's own retries are disabled
(`HttpRetryOptions(attempts=1)`, `automatic_continuation=False`) so the bound is this module's. A prompt or an
output that Gemini blocks is not an error: the stream ends with `Finished(blocked=True, block_reason=...)`.

The API key is sent only in the SDK's `x-goog-api-key` header; it is never logged, and any upstream text put
into an exception message is scrubbed of it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Union

from google import genai
from google.genai import errors as genai_errors
from google.genai import types
from pydantic import SecretStr

from retrieval_service.adapters.gemini.errors import (
    GenerationNotConfiguredError,
    GenerationPermissionError,
    GenerationQuotaError,
)
from retrieval_service.adapters.gemini.events import Finished, GenerationEvent
from retrieval_service.adapters.gemini.options import GenerationOptions
from retrieval_service.adapters.gemini.references import prepare_references
from retrieval_service.adapters.gemini.stream import StreamState, Tally, TruncatedStreamError
from retrieval_service.errors import DependencyUnavailableError, InvalidInputError

try:  # the SDK streams with aiohttp when it is installed (google-genai[aiohttp]), else with httpx2
    import aiohttp

    _AIOHTTP_ERRORS: tuple[type[Exception], ...] = (aiohttp.ClientError,)
except ImportError:  # pragma: no cover - depends on the installed extras
    _AIOHTTP_ERRORS = ()

log = logging.getLogger(__name__)

#: Gemini 2.5 Flash Image ("Nano Banana"), https://ai.google.dev/gemini-api/docs/models#gemini-2.5-flash-image
DEFAULT_MODEL = "gemini-2.5-flash-image"


@dataclass(frozen=True)
class _Request:
    """The inputs of one `streamGenerateContent` call, the same for each of its attempts."""

    client: genai.Client
    model: str
    contents: list[types.Content]
    config: types.GenerateContentConfig


@dataclass
class _Failure:
    """An exception of the upstream task, handed through the queue to the consumer, which raises it."""

    error: BaseException


_Queue = asyncio.Queue[Union[GenerationEvent, _Failure]]


class GeminiGenerator:
    """Streams generations from the Gemini API through one long-lived google-genai client.

    Args:
        api_key: Gemini API key (str or pydantic SecretStr); empty/None leaves generation unconfigured
            (`stream()` then raises GenerationNotConfiguredError).
        base_url: API root, default https://generativelanguage.googleapis.com/ (tests: a local fake server).
        default_model: model used when `stream(model=None)`.
        max_retries: retries after the first attempt for 5xx / connection failure / timeout, only while
            nothing has been yielded.
        timeout_s: limit of one HTTP request, seconds, the whole stream included (aiohttp total timeout).
        retry_initial_backoff_s: wait before the first retry, seconds; doubled on each further retry.
        retry_max_backoff_s: cap of the wait between retries, seconds.

    Raises:
        ValueError: max_retries < 0, timeout_s <= 0, negative backoff or a base_url that is not http(s).
    """

    def __init__(
        self,
        api_key: str | SecretStr | None,
        *,
        base_url: str | None = None,
        default_model: str = DEFAULT_MODEL,
        max_retries: int = 2,
        timeout_s: float = 120.0,
        retry_initial_backoff_s: float = 0.5,
        retry_max_backoff_s: float = 8.0,
    ) -> None:
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if retry_initial_backoff_s < 0 or retry_max_backoff_s < 0:
            raise ValueError("retry backoff must be >= 0 seconds")
        if base_url is not None and not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        if not default_model.strip():
            raise ValueError("default_model must not be empty")
        secret = api_key.get_secret_value() if isinstance(api_key, SecretStr) else api_key
        self._api_key: str = (secret or "").strip()
        self._base_url = base_url
        self.default_model = default_model.strip()
        self.max_retries = max_retries
        self.timeout_s = float(timeout_s)
        self.retry_initial_backoff_s = float(retry_initial_backoff_s)
        self.retry_max_backoff_s = float(retry_max_backoff_s)
        self._client: genai.Client | None = None

    def __repr__(self) -> str:  # never shows the key
        return (
            f"GeminiGenerator(configured={self.configured}, base_url={self._base_url!r}, "
            f"default_model={self.default_model!r}, max_retries={self.max_retries}, "
            f"timeout_s={self.timeout_s})"
        )

    @property
    def configured(self) -> bool:
        """True when an API key is set."""
        return bool(self._api_key)

    def _get_client(self) -> genai.Client:
        if not self._api_key:
            raise GenerationNotConfiguredError(
                "Gemini generation is not configured: no API key (set the generation API key setting)"
            )
        if self._client is None:
            self._client = genai.Client(
                api_key=self._api_key,
                vertexai=False,
                http_options=types.HttpOptions(
                    base_url=self._base_url,
                    api_version="v1beta",
                    timeout=int(self.timeout_s * 1000),  # milliseconds
                    retry_options=types.HttpRetryOptions(attempts=1),  # retries are ours, see the docstring
                ),
            )
        return self._client

    async def close(self) -> None:
        """Close the SDK client and its connection pools; a later `stream()` makes a new client."""
        client, self._client = self._client, None
        if client is not None:
            await client.aio.aclose()
            client.close()

    def stream(
        self,
        prompt: str,
        references: Sequence[tuple[bytes, str]] = (),
        *,
        model: str | None = None,
        options: GenerationOptions | None = None,
    ) -> AsyncIterator[GenerationEvent]:
        """Generate from a prompt and reference images, streaming the result.

        The request is checked at the call; the HTTP request starts at the first iteration. Use it as
        `async for event in generator.stream(...)`, or `async with contextlib.aclosing(...)`: closing the
        iterator or cancelling the consuming task cancels the upstream HTTP stream at once.

        Args:
            prompt: the instruction, non-empty.
            references: (encoded image bytes, MIME type) pairs, sent in order after the prompt as inline
                data. Types Gemini does not accept (GIF, BMP, TIFF, ...) are transcoded to PNG with Pillow.
            model: Gemini model name; None or '' uses `default_model`.
            options: generation options; None uses `GenerationOptions()` (text and image output).

        Returns:
            An async iterator of TextChunk / ImageChunk in Gemini's order, then exactly one Finished.

        Raises:
            InvalidInputError: at the call for an empty prompt, an empty/undecodable reference or references
                over `MAX_INLINE_BYTES`; while iterating for Gemini HTTP 400 (its message included) or
                another 4xx (404: unknown model).
            GenerationNotConfiguredError: at the call when no API key is configured.
            GenerationPermissionError, GenerationQuotaError, DependencyUnavailableError: while iterating, see
                the module docstring.
        """
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidInputError("prompt is empty")
        options = options if options is not None else GenerationOptions()
        model_name = (model or "").strip() or self.default_model
        parts = [types.Part.from_text(text=prompt)]
        parts.extend(types.Part.from_bytes(data=d, mime_type=m) for d, m in prepare_references(references))
        contents = [types.Content(role="user", parts=parts)]
        config = options.to_config()
        request = _Request(client=self._get_client(), model=model_name, contents=contents, config=config)
        return self._events(request, n_references=len(parts) - 1)

    async def _events(self, request: _Request, n_references: int) -> AsyncIterator[GenerationEvent]:
        # The SDK streams through several nested async generators; closing the outer one does not close
        # the inner ones (they are only finalized on garbage collection). So the upstream loop runs in its
        # own task that only ever waits inside the SDK (the queue is unbounded, `put` never waits):
        # cancelling it throws CancelledError into the innermost read, every layer's `finally` runs at once
        # and aiohttp closes the not fully read connection. The buffer is bounded by what Gemini sends (a
        # few text parts and images).
        started = time.perf_counter()
        log.info("gemini stream start: model=%s references=%d", request.model, n_references)
        queue: _Queue = asyncio.Queue()
        producer = asyncio.create_task(self._produce(request, queue, started))
        try:
            while True:
                item = await queue.get()
                if isinstance(item, _Failure):
                    raise item.error
                yield item
                if isinstance(item, Finished):
                    return
        finally:
            if not producer.done():
                producer.cancel()
            await asyncio.wait([producer])  # never raises; a cancellation of *this* task still propagates
            if not producer.cancelled():
                producer.exception()  # mark retrieved; failures were already forwarded through the queue

    async def _produce(self, request: _Request, queue: _Queue, started: float) -> None:
        """Upstream loop (its own task): puts events, then Finished or one _Failure, on `queue`."""
        try:
            await self._attempts(request, queue, started)
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            queue.put_nowait(_Failure(exc))

    async def _attempts(self, request: _Request, queue: _Queue, started: float) -> None:
        """Run the HTTP attempts (retrying only before any output); put events, then Finished, on `queue`."""
        tally = Tally(started)
        attempt = 0
        while True:
            attempt += 1
            state = StreamState()
            try:
                upstream = await request.client.aio.models.generate_content_stream(
                    model=request.model, contents=request.contents, config=request.config
                )
                try:
                    async for response in upstream:
                        for event in state.events(response):
                            tally.count(event)
                            queue.put_nowait(event)
                finally:
                    await upstream.aclose()
                if not state.complete:
                    raise TruncatedStreamError()
            except Exception as exc:  # noqa: BLE001 - classified right below; unknown errors propagate as is
                mapped, retryable = self._classify(exc)
                if mapped is None:
                    raise
                if retryable and tally.emitted == 0 and attempt <= self.max_retries:
                    delay = min(self.retry_max_backoff_s, self.retry_initial_backoff_s * 2 ** (attempt - 1))
                    log.warning(
                        "gemini attempt %d/%d failed (%s); retrying in %.2f s",
                        attempt,
                        self.max_retries + 1,
                        mapped,
                        delay,
                    )
                    await asyncio.sleep(delay)
                    continue
                if retryable and tally.emitted:
                    log.warning("gemini stream failed after output started (%s); not retried", mapped)
                raise mapped from exc
            finished = state.finished(tally, attempt)
            log.info(
                "gemini stream done: finish_reason=%s blocked=%s text_parts=%d image_parts=%d "
                "total_ms=%.0f attempts=%d",
                finished.finish_reason or "-",
                finished.blocked,
                finished.text_parts,
                finished.image_parts,
                finished.total_ms,
                attempt,
            )
            queue.put_nowait(finished)
            return

    def _classify(self, exc: Exception) -> tuple[Exception | None, bool]:
        """Map an SDK or transport exception to (error to raise, retryable); (None, False) when unknown."""
        if isinstance(exc, genai_errors.APIError):
            code = int(exc.code or 0)
            msg = self._redact(exc.message or str(exc.status or "") or f"HTTP {code}")
            if code == 400 and "API_KEY_INVALID" not in _error_reasons(exc.details):
                return InvalidInputError(f"Gemini rejected the request: {msg}"), False
            if code in (400, 401, 403):
                error = GenerationPermissionError(code, f"Gemini refused the API key (HTTP {code}): {msg}")
                return error, False
            if code == 429:
                return GenerationQuotaError(f"Gemini quota or rate limit exceeded (HTTP 429): {msg}"), False
            if code == 404:
                return InvalidInputError(f"Gemini model or endpoint not found (HTTP 404): {msg}"), False
            if 400 <= code < 500 and code != 408:
                return InvalidInputError(f"Gemini rejected the request (HTTP {code}): {msg}"), False
            return _unavailable(f"HTTP {code}: {msg}"), True
        if isinstance(exc, TruncatedStreamError):
            return _unavailable("the stream ended before a finish reason"), True
        # httpx / httpx2: the SDK's transport when aiohttp is not installed
        httpx_error = type(exc).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore")
        timed_out = httpx_error and "Timeout" in type(exc).__name__  # httpx ReadTimeout, ConnectTimeout, ...
        if timed_out or isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
            return _unavailable(f"no complete answer within {self.timeout_s:g} s"), True
        if httpx_error or isinstance(exc, (*_AIOHTTP_ERRORS, OSError, genai_errors.UnknownApiResponseError)):
            return _unavailable(self._redact(f"{type(exc).__name__}: {exc}")), True
        return None, False

    def _redact(self, text: str) -> str:
        # Real keys are 39 characters; a very short test key would match ordinary words.
        return text.replace(self._api_key, "[redacted]") if len(self._api_key) >= 8 else text


def _error_reasons(details: object) -> set[str]:
    """The `reason`s of the google.rpc.ErrorInfo entries in a Gemini error body's `error.details`."""
    error = details.get("error", details) if isinstance(details, dict) else {}
    entries = error.get("details") if isinstance(error, dict) else None
    return {str(d["reason"]) for d in entries or [] if isinstance(d, dict) and d.get("reason")}


def _unavailable(detail: str) -> DependencyUnavailableError:
    """Gemini is down or unreachable (retryable): DependencyUnavailableError('gemini', detail)."""
    return DependencyUnavailableError("gemini", detail)
