"""Gemini client layer: stream text and images from Gemini 2.5 Flash Image, given a prompt and references.

`GeminiGenerator.stream()` sends one user turn to `models/{model}:streamGenerateContent?alt=sse` through the
google-genai SDK: the prompt as a text part, then each reference image as an inline-data part, in that order
(the request shape of Google's image-editing examples,
https://ai.google.dev/gemini-api/docs/image-generation#image_editing_text-and-image-to-image). It yields the
parts in the order Gemini streams them (`TextChunk`, `ImageChunk`), then exactly one `Finished`.

Errors (the gRPC servicer maps them to status codes; nothing here knows about gRPC):

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
import io
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

from google import genai
from google.genai import errors as genai_errors
from google.genai import types
from PIL import Image, UnidentifiedImageError

from retrieval_service.errors import DependencyUnavailableError, InvalidInputError

try:  # the SDK streams with aiohttp when it is installed (google-genai[aiohttp]), else with httpx2
    import aiohttp

    _AIOHTTP_ERRORS: tuple[type[Exception], ...] = (aiohttp.ClientError,)
except ImportError:  # pragma: no cover - depends on the installed extras
    _AIOHTTP_ERRORS = ()

log = logging.getLogger(__name__)

#: Gemini 2.5 Flash Image ("Nano Banana"), https://ai.google.dev/gemini-api/docs/models#gemini-2.5-flash-image
DEFAULT_MODEL = "gemini-2.5-flash-image"

#: Input image MIME types Gemini accepts as inline data
#: (https://ai.google.dev/gemini-api/docs/image-understanding, "Supported image formats").
#: References of other types (GIF, BMP, TIFF) are transcoded to PNG.
GEMINI_IMAGE_MIME_TYPES: frozenset[str] = frozenset(
    {"image/png", "image/jpeg", "image/webp", "image/heic", "image/heif"}
)

#: Inline data must keep the whole request under 20 MB
#: (https://ai.google.dev/gemini-api/docs/image-understanding, "Passing images inline"); checked on the raw
#: reference bytes (base64 adds a third on the wire).
MAX_INLINE_BYTES = 20 * 1000 * 1000

#: Aspect ratios Gemini 2.5 Flash Image accepts in `imageConfig.aspectRatio`
#: (https://ai.google.dev/gemini-api/docs/image-generation#aspect_ratios).
ASPECT_RATIOS: tuple[str, ...] = ("1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9")

#: Output modalities of `generationConfig.responseModalities`.
RESPONSE_MODALITIES: tuple[str, ...] = ("TEXT", "IMAGE")

#: `HarmBlockThreshold` values a caller may pass as `safety_threshold` (google.genai.types).
SAFETY_THRESHOLDS: tuple[str, ...] = (
    "BLOCK_LOW_AND_ABOVE",
    "BLOCK_MEDIUM_AND_ABOVE",
    "BLOCK_ONLY_HIGH",
    "BLOCK_NONE",
    "OFF",
)

#: The harm categories a `safety_threshold` is applied to: the four the Gemini API lets callers adjust
#: (https://ai.google.dev/gemini-api/docs/safety-settings#safety-filters).
SAFETY_CATEGORIES: tuple[types.HarmCategory, ...] = (
    types.HarmCategory.HARM_CATEGORY_HARASSMENT,
    types.HarmCategory.HARM_CATEGORY_HATE_SPEECH,
    types.HarmCategory.HARM_CATEGORY_SEXUALLY_EXPLICIT,
    types.HarmCategory.HARM_CATEGORY_DANGEROUS_CONTENT,
)

#: Candidate finish reasons meaning Gemini withheld the output for policy reasons (types.FinishReason).
BLOCKING_FINISH_REASONS: frozenset[str] = frozenset(
    {
        "SAFETY",
        "RECITATION",
        "BLOCKLIST",
        "PROHIBITED_CONTENT",
        "SPII",
        "IMAGE_SAFETY",
        "IMAGE_PROHIBITED_CONTENT",
        "IMAGE_RECITATION",
    }
)

_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


# ----------------------------------------------------------------------------------------------------------
# errors


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


# ----------------------------------------------------------------------------------------------------------
# options and events


@dataclass(frozen=True)
class GenerationOptions:
    """Options passed through to Gemini's `GenerateContentConfig`; None leaves Gemini's default.

    Attributes:
        temperature: sampling temperature, 0..2.
        top_p: nucleus sampling probability mass, 0..1.
        top_k: top-k sampling, >= 1.
        seed: sampling seed, a signed 32-bit integer.
        max_output_tokens: token limit of each candidate's output, >= 1.
        candidate_count: number of candidates, 1..8; each streamed part carries its candidate_index.
        response_modalities: non-empty subset of ("TEXT", "IMAGE"), case-insensitive; default both.
        aspect_ratio: aspect ratio of generated images, one of `ASPECT_RATIOS` (`imageConfig.aspectRatio`).
        safety_threshold: one of `SAFETY_THRESHOLDS`, applied to every category of `SAFETY_CATEGORIES`.

    Raises:
        InvalidInputError: a value is out of range; the message names the field.
    """

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    max_output_tokens: int | None = None
    candidate_count: int | None = None
    response_modalities: Sequence[str] = RESPONSE_MODALITIES  # stored as a tuple of upper-case names
    aspect_ratio: str | None = None
    safety_threshold: str | None = None

    def __post_init__(self) -> None:
        _check_range("temperature", self.temperature, 0.0, 2.0)
        _check_range("top_p", self.top_p, 0.0, 1.0)
        _check_int("top_k", self.top_k, 1, None)
        _check_int("seed", self.seed, _INT32_MIN, _INT32_MAX)
        _check_int("max_output_tokens", self.max_output_tokens, 1, None)
        _check_int("candidate_count", self.candidate_count, 1, 8)

        modalities = self.response_modalities
        if isinstance(modalities, str) or not isinstance(modalities, Sequence):
            raise InvalidInputError("response_modalities must be a list of 'TEXT' and/or 'IMAGE'")
        normalized = tuple(str(m).strip().upper() for m in modalities)
        if not normalized:
            raise InvalidInputError("response_modalities must name at least one of 'TEXT', 'IMAGE'")
        unknown = [m for m in normalized if m not in RESPONSE_MODALITIES]
        if unknown:
            raise InvalidInputError(f"response_modalities: unknown modality {unknown}; allowed: TEXT, IMAGE")
        if len(set(normalized)) != len(normalized):
            raise InvalidInputError(f"response_modalities: duplicate modality in {list(normalized)}")
        object.__setattr__(self, "response_modalities", normalized)

        if self.aspect_ratio is not None and self.aspect_ratio not in ASPECT_RATIOS:
            raise InvalidInputError(
                f"aspect_ratio {self.aspect_ratio!r} is not supported; allowed: {', '.join(ASPECT_RATIOS)}"
            )
        if self.safety_threshold is not None and self.safety_threshold not in SAFETY_THRESHOLDS:
            raise InvalidInputError(
                f"safety_threshold {self.safety_threshold!r} is not supported; "
                f"allowed: {', '.join(SAFETY_THRESHOLDS)}"
            )

    def to_config(self) -> types.GenerateContentConfig:
        """Build the SDK request config (automatic function calling and stream continuation disabled)."""
        safety = (
            [types.SafetySetting(category=c, threshold=self.safety_threshold) for c in SAFETY_CATEGORIES]
            if self.safety_threshold is not None
            else None
        )
        return types.GenerateContentConfig(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            max_output_tokens=self.max_output_tokens,
            candidate_count=self.candidate_count,
            response_modalities=list(self.response_modalities),
            image_config=types.ImageConfig(aspect_ratio=self.aspect_ratio) if self.aspect_ratio else None,
            safety_settings=safety,
            automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True),
            automatic_continuation=False,
        )


def _check_range(name: str, value: float | None, low: float, high: float) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise InvalidInputError(f"{name} must be a number in [{low:g}, {high:g}], got {value!r}")


def _check_int(name: str, value: int | None, low: int, high: int | None) -> None:
    if value is None:
        return
    out_of_range = isinstance(value, int) and (value < low or (high is not None and value > high))
    if isinstance(value, bool) or not isinstance(value, int) or out_of_range:
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise InvalidInputError(f"{name} must be an integer {bound}, got {value!r}")


@dataclass(frozen=True)
class TextChunk:
    """A text part, in the order Gemini streamed it."""

    text: str
    candidate_index: int = 0


@dataclass(frozen=True)
class ImageChunk:
    """A generated image part: encoded bytes exactly as Gemini returned them (e.g. PNG)."""

    data: bytes
    mime_type: str
    candidate_index: int = 0


@dataclass(frozen=True)
class Finished:
    """The last event of every stream.

    Attributes:
        finish_reason: Gemini's finish reason of candidate 0 (or of the blocked candidate), e.g. 'STOP',
            'MAX_TOKENS', 'IMAGE_SAFETY'; '' when the prompt itself was blocked (Gemini then sends no
            candidate).
        blocked: True when Gemini blocked the prompt (`promptFeedback.blockReason`) or an output
            (finish reason in `BLOCKING_FINISH_REASONS`).
        block_reason: the prompt's block reason (e.g. 'SAFETY', 'PROHIBITED_CONTENT') or the blocking finish
            reason; '' when not blocked.
        prompt_tokens, candidates_tokens, total_tokens: Gemini's `usageMetadata` (0 where it sent none).
        first_part_ms: milliseconds from the call to the first streamed part; None when no part came.
        total_ms: milliseconds from the call to the end of the stream (retries and backoff included).
        text_parts, image_parts: counts of the TextChunk / ImageChunk events yielded.
        attempts: HTTP requests made (1 + retries).
    """

    finish_reason: str
    blocked: bool = False
    block_reason: str = ""
    prompt_tokens: int = 0
    candidates_tokens: int = 0
    total_tokens: int = 0
    first_part_ms: float | None = None
    total_ms: float = 0.0
    text_parts: int = 0
    image_parts: int = 0
    attempts: int = 1


GenerationEvent = Union[TextChunk, ImageChunk, Finished]


# ----------------------------------------------------------------------------------------------------------
# the generator


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
        api_key: Any,
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
        secret = api_key.get_secret_value() if hasattr(api_key, "get_secret_value") else api_key
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
        parts.extend(types.Part.from_bytes(data=d, mime_type=m) for d, m in _prepare_references(references))
        contents = [types.Content(role="user", parts=parts)]
        config = options.to_config()
        client = self._get_client()
        return self._events(client, model_name, contents, config, n_references=len(parts) - 1)

    async def _events(
        self,
        client: genai.Client,
        model: str,
        contents: list[types.Content],
        config: types.GenerateContentConfig,
        n_references: int,
    ) -> AsyncIterator[GenerationEvent]:
        # The SDK streams through several nested async generators; closing the outer one does not close
        # the inner ones (they are only finalized on garbage collection). So the upstream loop runs in its
        # own task that only ever waits inside the SDK (the queue is unbounded, `put` never waits):
        # cancelling it throws CancelledError into the innermost read, every layer's `finally` runs at once
        # and aiohttp closes the not fully read connection. The buffer is bounded by what Gemini sends (a
        # few text parts and images).
        started = time.perf_counter()
        log.info("gemini stream start: model=%s references=%d", model, n_references)
        queue: asyncio.Queue[GenerationEvent | _Failure] = asyncio.Queue()
        producer = asyncio.create_task(self._produce(client, model, contents, config, queue, started))
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

    async def _produce(
        self,
        client: genai.Client,
        model: str,
        contents: list[types.Content],
        config: types.GenerateContentConfig,
        queue: asyncio.Queue[GenerationEvent | _Failure],
        started: float,
    ) -> None:
        """Upstream loop (its own task): puts events, then Finished or one _Failure, on `queue`."""
        try:
            await self._attempts(client, model, contents, config, queue, started)
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            queue.put_nowait(_Failure(exc))

    async def _attempts(
        self,
        client: genai.Client,
        model: str,
        contents: list[types.Content],
        config: types.GenerateContentConfig,
        queue: asyncio.Queue[GenerationEvent | _Failure],
        started: float,
    ) -> None:
        tally = _Tally(started)
        attempt = 0
        while True:
            attempt += 1
            state = _StreamState()
            try:
                upstream = await client.aio.models.generate_content_stream(
                    model=model, contents=contents, config=config
                )
                try:
                    async for response in upstream:
                        for event in state.events(response):
                            tally.count(event)
                            queue.put_nowait(event)
                finally:
                    await upstream.aclose()
                if not state.complete:
                    raise _TruncatedStream()
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
        if isinstance(exc, _TruncatedStream):
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


def _error_reasons(details: Any) -> set[str]:
    """The `reason`s of the google.rpc.ErrorInfo entries in a Gemini error body's `error.details`."""
    error = details.get("error", details) if isinstance(details, dict) else {}
    entries = error.get("details") if isinstance(error, dict) else None
    return {str(d["reason"]) for d in entries or [] if isinstance(d, dict) and d.get("reason")}


def _unavailable(detail: str) -> DependencyUnavailableError:
    # 'gemini' is not (yet) in retrieval_service.errors.Dependency
    return DependencyUnavailableError("gemini", detail)


def _prepare_references(references: Sequence[tuple[bytes, str]]) -> list[tuple[bytes, str]]:
    """Check references and transcode types Gemini does not accept to PNG.

    Raises:
        InvalidInputError: a reference is not a (bytes, str) pair, is empty, cannot be decoded for
            transcoding, or the references total more than `MAX_INLINE_BYTES`.
    """
    prepared: list[tuple[bytes, str]] = []
    for i, ref in enumerate(references):
        if not (isinstance(ref, tuple) and len(ref) == 2):
            raise InvalidInputError(f"reference {i} must be a (bytes, mime_type) pair")
        data, mime_type = ref
        if not isinstance(data, (bytes, bytearray)) or not data:
            raise InvalidInputError(f"reference {i} is empty")
        mime = (mime_type or "").strip().lower()
        if mime == "image/jpg":
            mime = "image/jpeg"
        if mime not in GEMINI_IMAGE_MIME_TYPES:
            data, mime = _to_png(bytes(data), i, mime_type)
        prepared.append((bytes(data), mime))
    total = sum(len(d) for d, _ in prepared)
    if total > MAX_INLINE_BYTES:
        raise InvalidInputError(
            f"reference images total {total} bytes; Gemini inline data is limited to {MAX_INLINE_BYTES} bytes"
        )
    return prepared


def _to_png(data: bytes, index: int, mime_type: str) -> tuple[bytes, str]:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.seek(0)  # first frame of animations
            alpha = "A" in image.getbands() or "transparency" in image.info
            converted = image.convert("RGBA" if alpha else "RGB")
    except (UnidentifiedImageError, OSError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise InvalidInputError(
            f"reference {index} ({mime_type or 'no MIME type'}) is not an image Gemini accepts "
            f"({', '.join(sorted(GEMINI_IMAGE_MIME_TYPES))}) and could not be decoded to convert it: {exc}"
        ) from exc
    out = io.BytesIO()
    converted.save(out, format="PNG")
    return out.getvalue(), "image/png"


# ----------------------------------------------------------------------------------------------------------
# stream bookkeeping


@dataclass
class _Failure:
    error: BaseException


class _TruncatedStream(Exception):
    """The HTTP stream ended cleanly but without a finish reason or prompt feedback."""


@dataclass
class _Tally:
    started: float
    emitted: int = 0
    text_parts: int = 0
    image_parts: int = 0
    first_part_at: float | None = None

    def count(self, event: GenerationEvent) -> None:
        if self.first_part_at is None:
            self.first_part_at = time.perf_counter()
        self.emitted += 1
        if isinstance(event, TextChunk):
            self.text_parts += 1
        elif isinstance(event, ImageChunk):
            self.image_parts += 1


@dataclass
class _StreamState:
    """What one HTTP stream said so far: finish reasons per candidate, prompt block, latest usage."""

    finish_reasons: dict[int, str] = field(default_factory=dict)
    prompt_block_reason: str = ""
    usage: types.GenerateContentResponseUsageMetadata | None = None

    @property
    def complete(self) -> bool:
        return bool(self.finish_reasons) or bool(self.prompt_block_reason)

    def events(self, response: types.GenerateContentResponse) -> list[GenerationEvent]:
        if response.usage_metadata is not None:
            self.usage = response.usage_metadata  # running total of this request; the latest one wins
        feedback = response.prompt_feedback
        if feedback is not None and feedback.block_reason is not None:
            self.prompt_block_reason = _enum_str(feedback.block_reason)
        out: list[GenerationEvent] = []
        for candidate in response.candidates or []:
            index = candidate.index or 0
            if candidate.content is not None:
                for part in candidate.content.parts or []:
                    if part.thought:
                        continue  # model reasoning, not output
                    if part.text:
                        out.append(TextChunk(text=part.text, candidate_index=index))
                    elif part.inline_data is not None and part.inline_data.data:
                        mime = part.inline_data.mime_type or "application/octet-stream"
                        out.append(ImageChunk(part.inline_data.data, mime, candidate_index=index))
            if candidate.finish_reason is not None:
                self.finish_reasons[index] = _enum_str(candidate.finish_reason)
        return out

    def finished(self, tally: _Tally, attempts: int) -> Finished:
        blocking = [
            (i, r) for i, r in sorted(self.finish_reasons.items()) if r in BLOCKING_FINISH_REASONS
        ]
        if self.prompt_block_reason:
            finish_reason, blocked, block_reason = "", True, self.prompt_block_reason
        elif blocking:
            finish_reason, blocked, block_reason = blocking[0][1], True, blocking[0][1]
        else:
            lowest = min(self.finish_reasons) if self.finish_reasons else 0
            finish_reason, blocked, block_reason = self.finish_reasons.get(lowest, ""), False, ""
        usage = self.usage
        now = time.perf_counter()
        first = tally.first_part_at
        return Finished(
            finish_reason=finish_reason,
            blocked=blocked,
            block_reason=block_reason,
            prompt_tokens=(usage.prompt_token_count or 0) if usage else 0,
            candidates_tokens=(usage.candidates_token_count or 0) if usage else 0,
            total_tokens=(usage.total_token_count or 0) if usage else 0,
            first_part_ms=None if first is None else (first - tally.started) * 1000.0,
            total_ms=(now - tally.started) * 1000.0,
            text_parts=tally.text_parts,
            image_parts=tally.image_parts,
            attempts=attempts,
        )


def _enum_str(value: Any) -> str:
    """'STOP' from FinishReason.STOP (or an unknown value the SDK kept as a plain string)."""
    return str(getattr(value, "value", value))
