"""GeminiGenerator against the local fake Gemini server, through the real google-genai SDK (no mocks).

Covers the request shape (prompt, then references as inline data), streamed order, Finished, every error
mapping (400, 401/403, 429, 5xx after bounded retries, connection refused, timeout, blocked prompt/output,
stream cut short), retry rules (only before output), cancellation reaching the server, and that the API key
leaks nowhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time
from collections.abc import AsyncIterator, Iterator

import pytest
from fake_gemini import INPUT_IMAGE_TOKENS, OUTPUT_IMAGE_TOKENS, FakeGemini, RecordedRequest, free_port
from google import genai
from google.genai import types
from PIL import Image

from retrieval_service.errors import DependencyUnavailableError, InvalidInputError
from retrieval_service.adapters.gemini import (
    DEFAULT_MODEL,
    Finished,
    GeminiGenerator,
    GenerationEvent,
    GenerationNotConfiguredError,
    GenerationOptions,
    GenerationPermissionError,
    GenerationQuotaError,
    ImageChunk,
    TextChunk,
)

API_KEY = "test-key-Zq8vX3-never-print-me"

# google-genai 3.6.1 subclasses aiohttp.ClientSession, which aiohttp 3.14 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Inheritance class AiohttpClientSession:DeprecationWarning")


def _png(color: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


def _jpeg(color: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 48), color).save(out, format="JPEG")
    return out.getvalue()


RED_PNG = _png((220, 20, 20))
BLUE_JPEG = _jpeg((20, 20, 220))


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeGemini]:
    with FakeGemini() as server:
        yield server


@pytest.fixture(autouse=True)
def _fresh(fake: FakeGemini) -> None:
    fake.reset()


@pytest.fixture
async def generator(fake: FakeGemini) -> AsyncIterator[GeminiGenerator]:
    gen = GeminiGenerator(
        API_KEY, base_url=fake.base_url, max_retries=2, timeout_s=10, retry_initial_backoff_s=0.01
    )
    yield gen
    await gen.close()


async def _collect(stream: AsyncIterator[GenerationEvent]) -> list[GenerationEvent]:
    return [event async for event in stream]


def _settled(fake: FakeGemini) -> list[RecordedRequest]:
    """The requests the fake received, once all have finished (the server thread may lag the client)."""
    fake.wait_for(lambda reqs: all(r.outcome != "in_progress" for r in reqs), timeout=2.0)
    return fake.requests


def _only(fake: FakeGemini) -> RecordedRequest:
    requests = _settled(fake)
    assert len(requests) == 1, [r.outcome for r in requests]
    return requests[0]


# ---------------------------------------------------------------------------------------------------- success


async def test_references_reach_gemini_as_inline_data_after_the_prompt(fake, generator):
    refs = [(RED_PNG, "image/png"), (BLUE_JPEG, "image/jpeg")]
    await _collect(generator.stream("a red cape on a runway", refs))

    rec = _only(fake)
    assert rec.path == f"/v1beta/models/{DEFAULT_MODEL}:streamGenerateContent"
    assert rec.query == {"alt": "sse"}
    assert rec.api_key == API_KEY  # sent, in the x-goog-api-key header
    assert all(API_KEY not in v for v in rec.headers.values())
    kinds = ["text" if "text" in p else "inlineData" if "inlineData" in p else "?" for p in rec.parts]
    assert kinds == ["text", "inlineData", "inlineData"]
    assert rec.prompt == "a red cape on a runway"
    assert rec.inline_images == [(RED_PNG, "image/png"), (BLUE_JPEG, "image/jpeg")]
    assert rec.body["generationConfig"]["responseModalities"] == ["TEXT", "IMAGE"]


async def test_stream_yields_text_then_image_then_one_finished(fake, generator):
    events = await _collect(generator.stream("one red reference", [(RED_PNG, "image/png")]))

    kinds = [type(e).__name__ for e in events]
    assert kinds == ["TextChunk", "TextChunk", "TextChunk", "ImageChunk", "Finished"]
    texts = [e.text for e in events if isinstance(e, TextChunk)]
    assert texts[0] == "Local fake Gemini: " and "1 reference image" in texts[1]
    image = events[3]
    assert isinstance(image, ImageChunk) and image.mime_type == "image/png" and image.candidate_index == 0
    assert image.data.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(io.BytesIO(image.data)) as im:
        im.verify()

    finished = events[-1]
    assert isinstance(finished, Finished)
    assert finished.finish_reason == "STOP" and not finished.blocked and finished.block_reason == ""
    assert finished.prompt_tokens == len("one red reference".split()) + INPUT_IMAGE_TOKENS
    assert finished.candidates_tokens == sum(len(t.split()) for t in texts) + OUTPUT_IMAGE_TOKENS
    assert finished.total_tokens == finished.prompt_tokens + finished.candidates_tokens
    assert (finished.text_parts, finished.image_parts, finished.attempts) == (3, 1, 1)
    assert finished.first_part_ms is not None and 0 < finished.first_part_ms <= finished.total_ms
    assert _only(fake).outcome == "completed"


async def test_generated_image_depends_on_the_references(generator):
    async def image_for(refs: list[tuple[bytes, str]]) -> Image.Image:
        events = await _collect(generator.stream("same prompt", refs))
        data = next(e.data for e in events if isinstance(e, ImageChunk))
        return Image.open(io.BytesIO(data)).convert("RGB")

    red = await image_for([(RED_PNG, "image/png")])
    blue = await image_for([(_png((20, 20, 220)), "image/png")])
    center = (red.width // 2, red.height // 2)
    r, _, b = red.getpixel(center)
    r2, _, b2 = blue.getpixel(center)
    assert r > b and b2 > r2  # each collage shows its own reference


async def test_options_reach_the_generation_config(fake, generator):
    options = GenerationOptions(
        temperature=0.4,
        top_p=0.9,
        top_k=20,
        seed=7,
        max_output_tokens=2048,
        candidate_count=2,
        response_modalities=["image", "text"],
        aspect_ratio="16:9",
        safety_threshold="BLOCK_ONLY_HIGH",
    )
    events = await _collect(generator.stream("two candidates", [(RED_PNG, "image/png")], options=options))

    body = _only(fake).body
    assert body["generationConfig"] == {
        "temperature": 0.4,
        "topP": 0.9,
        "topK": 20.0,
        "seed": 7,
        "maxOutputTokens": 2048,
        "candidateCount": 2,
        "responseModalities": ["IMAGE", "TEXT"],
        "imageConfig": {"aspectRatio": "16:9"},
    }
    assert {s["threshold"] for s in body["safetySettings"]} == {"BLOCK_ONLY_HIGH"}
    assert len(body["safetySettings"]) == 4
    images = [e for e in events if isinstance(e, ImageChunk)]
    assert sorted(e.candidate_index for e in images) == [0, 1]
    assert {e.candidate_index for e in events if isinstance(e, TextChunk)} == {0, 1}
    with Image.open(io.BytesIO(images[0].data)) as im:
        assert im.size == (512, 288)  # the fake honours imageConfig.aspectRatio


async def test_model_override_and_unsupported_reference_type_sent_as_png(fake, generator):
    gif = io.BytesIO()
    Image.new("P", (16, 16), 3).save(gif, format="GIF")
    refs = [(gif.getvalue(), "image/gif")]
    await _collect(generator.stream("gif reference", refs, model="gemini-other-image"))

    rec = _only(fake)
    assert rec.model == "gemini-other-image"
    (data, mime), = rec.inline_images
    assert mime == "image/png"
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG" and im.size == (16, 16)


async def test_client_and_connection_are_reused_across_streams(fake, generator):
    await _collect(generator.stream("first"))
    await _collect(generator.stream("second"))
    first, second = fake.requests
    assert first.peer == second.peer  # one SDK client, one kept-alive connection


async def test_fake_serves_non_streaming_generate_content(fake):
    client = genai.Client(api_key=API_KEY, http_options=types.HttpOptions(base_url=fake.base_url))
    try:
        parts = [
            types.Part.from_text(text="unary"),
            types.Part.from_bytes(data=RED_PNG, mime_type="image/png"),
        ]
        response = await client.aio.models.generate_content(model=DEFAULT_MODEL, contents=parts)
    finally:
        await client.aio.aclose()
        client.close()
    rec = _only(fake)
    assert rec.method == "generateContent" and rec.inline_images == [(RED_PNG, "image/png")]
    candidate = response.candidates[0]
    assert candidate.finish_reason == types.FinishReason.STOP
    assert candidate.content.parts[0].text.startswith("Local fake Gemini")
    assert candidate.content.parts[1].inline_data.data.startswith(b"\x89PNG")
    assert response.usage_metadata.candidates_token_count > OUTPUT_IMAGE_TOKENS


# ---------------------------------------------------------------------------------------------- bad requests


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("temperature", {"temperature": 2.5}),
        ("temperature", {"temperature": -0.1}),
        ("top_p", {"top_p": 1.5}),
        ("top_k", {"top_k": 0}),
        ("seed", {"seed": 2**31}),
        ("max_output_tokens", {"max_output_tokens": 0}),
        ("candidate_count", {"candidate_count": 9}),
        ("candidate_count", {"candidate_count": 0}),
        ("response_modalities", {"response_modalities": []}),
        ("response_modalities", {"response_modalities": ["AUDIO"]}),
        ("response_modalities", {"response_modalities": "TEXT"}),
        ("aspect_ratio", {"aspect_ratio": "7:3"}),
        ("safety_threshold", {"safety_threshold": "BLOCK_EVERYTHING"}),
    ],
)
def test_invalid_options_name_the_field(field, kwargs):
    with pytest.raises(InvalidInputError, match=field):
        GenerationOptions(**kwargs)


async def test_bad_requests_are_rejected_before_any_http(fake, generator):
    with pytest.raises(InvalidInputError, match="prompt is empty"):
        generator.stream("   ", [])
    with pytest.raises(InvalidInputError, match="reference 1 is empty"):
        generator.stream("x", [(RED_PNG, "image/png"), (b"", "image/png")])
    with pytest.raises(InvalidInputError, match="reference 0 .*could not be decoded"):
        generator.stream("x", [(b"not an image", "image/bmp")])
    assert fake.requests == []


@pytest.mark.parametrize("api_key", ["", None, "   "])
async def test_no_api_key_raises_not_configured(fake, api_key):
    gen = GeminiGenerator(api_key, base_url=fake.base_url)
    assert not gen.configured
    with pytest.raises(GenerationNotConfiguredError, match="no API key"):
        gen.stream("hello")
    assert fake.requests == []


# ------------------------------------------------------------------------------------------ error mapping


async def test_http_400_maps_to_invalid_input_with_gemini_message(fake, generator):
    expected = "Gemini rejected the request: Request contains an invalid argument"
    with pytest.raises(InvalidInputError, match=expected):
        await _collect(generator.stream("[fake:status=400]"))
    assert _only(fake).status == 400  # not retried


@pytest.mark.parametrize("status", [401, 403])
async def test_http_401_403_map_to_permission_error(fake, generator, status):
    with pytest.raises(GenerationPermissionError, match=f"HTTP {status}") as info:
        await _collect(generator.stream(f"[fake:status={status}]"))
    assert info.value.http_status == status
    assert _only(fake).status == status


async def test_http_400_api_key_invalid_maps_to_permission_error(fake, generator):
    # the Gemini API answers a wrong key with 400 INVALID_ARGUMENT + ErrorInfo reason API_KEY_INVALID
    with pytest.raises(GenerationPermissionError, match="API key not valid") as info:
        await _collect(generator.stream("[fake:invalid-key]"))
    assert info.value.http_status == 400
    assert _only(fake).status == 400


async def test_http_429_maps_to_quota_error_without_retry(fake, generator):
    with pytest.raises(GenerationQuotaError, match="HTTP 429"):
        await _collect(generator.stream("[fake:status=429]"))
    assert _only(fake).status == 429


@pytest.mark.parametrize("status", [500, 503])
async def test_http_5xx_is_retried_then_unavailable(fake, generator, status):
    with pytest.raises(DependencyUnavailableError, match=f"gemini unavailable: HTTP {status}") as info:
        await _collect(generator.stream(f"[fake:status={status}]"))
    assert info.value.dependency == "gemini"
    assert [r.status for r in _settled(fake)] == [status] * 3  # 1 + max_retries; no SDK retries


async def test_sdk_retries_are_disabled_so_the_bound_is_ours(fake):
    gen = GeminiGenerator(API_KEY, base_url=fake.base_url, max_retries=0)
    try:
        with pytest.raises(DependencyUnavailableError):
            await _collect(gen.stream("[fake:status=503]"))
    finally:
        await gen.close()
    assert len(fake.requests) == 1


async def test_retry_then_success_after_two_failures(fake, generator):
    events = await _collect(generator.stream("[fake:fail-first=2] flaky"))
    finished = events[-1]
    assert isinstance(finished, Finished) and finished.finish_reason == "STOP" and finished.attempts == 3
    assert [r.status for r in _settled(fake)] == [500, 500, 200]


async def test_connection_refused_is_unavailable_after_retries(caplog):
    nowhere = f"http://127.0.0.1:{free_port()}"
    gen = GeminiGenerator(API_KEY, base_url=nowhere, max_retries=2, retry_initial_backoff_s=0.01)
    caplog.set_level(logging.WARNING, logger="retrieval_service.adapters.gemini.client")
    try:
        with pytest.raises(DependencyUnavailableError, match="gemini unavailable: ClientConnectorError"):
            await _collect(gen.stream("nobody listens"))
    finally:
        await gen.close()
    retries = [r for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retries) == 2


async def test_timeout_before_output_is_retried_then_unavailable(fake):
    gen = GeminiGenerator(
        API_KEY, base_url=fake.base_url, max_retries=1, timeout_s=0.3, retry_initial_backoff_s=0.01
    )
    try:
        with pytest.raises(DependencyUnavailableError, match="within 0.3 s"):
            await _collect(gen.stream("[fake:delay=3000] too slow"))
    finally:
        await gen.close()
    assert len(fake.requests) == 2


async def test_no_retry_after_output_started(fake, generator):
    received: list[GenerationEvent] = []
    with pytest.raises(DependencyUnavailableError, match="gemini unavailable"):
        async for event in generator.stream("[fake:break-after=1] cut"):
            received.append(event)
    assert [type(e) for e in received] == [TextChunk]
    rec = _only(fake)
    assert rec.outcome == "dropped_by_server" and rec.chunks_sent == 1


async def test_stream_without_finish_reason_is_unavailable(fake, generator):
    with pytest.raises(DependencyUnavailableError, match="before a finish reason"):
        await _collect(generator.stream("[fake:no-finish]"))
    assert len(fake.requests) == 1  # output had started: no retry


async def test_blocked_prompt_is_a_finished_event_not_an_error(fake, generator):
    events = await _collect(generator.stream("[fake:blocked] something bad", [(RED_PNG, "image/png")]))
    assert len(events) == 1
    finished = events[0]
    assert isinstance(finished, Finished)
    assert finished.blocked and finished.block_reason == "SAFETY" and finished.finish_reason == ""
    assert finished.prompt_tokens > 0 and finished.first_part_ms is None
    assert len(fake.requests) == 1


async def test_blocked_output_is_a_finished_event(generator):
    events = await _collect(generator.stream("[fake:blocked-output]"))
    assert events == [events[-1]] and isinstance(events[-1], Finished)
    assert events[-1].blocked and events[-1].block_reason == "IMAGE_SAFETY" == events[-1].finish_reason


# -------------------------------------------------------------------------------------------- cancellation


async def test_closing_the_stream_disconnects_upstream(fake, generator):
    stream = generator.stream("[fake:slow] long")
    first = await stream.__anext__()
    assert isinstance(first, TextChunk)
    closed_at = time.monotonic()
    await stream.aclose()

    assert fake.wait_for(lambda reqs: reqs and reqs[0].outcome != "in_progress", timeout=2.0)
    rec = _only(fake)
    assert rec.outcome == "client_disconnected"
    assert rec.chunks_sent < 30  # it did not run to the end
    print(f"disconnect seen by the server {1000 * (rec.ended_at - closed_at):.0f} ms after aclose()")


async def test_cancelling_the_consumer_task_disconnects_upstream(fake, generator):
    got_first = asyncio.Event()

    async def consume() -> None:
        async with contextlib.aclosing(generator.stream("[fake:slow] cancelled")) as stream:
            async for _ in stream:
                got_first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(got_first.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert fake.wait_for(lambda reqs: reqs and reqs[0].outcome != "in_progress", timeout=2.0)
    assert _only(fake).outcome == "client_disconnected"


# ------------------------------------------------------------------------------------------------- secrecy


async def test_api_key_never_appears_in_logs_or_errors(fake, caplog):
    caplog.set_level(logging.DEBUG)
    nowhere = f"http://127.0.0.1:{free_port()}"
    refused = GeminiGenerator(API_KEY, base_url=nowhere, max_retries=1, retry_initial_backoff_s=0)
    gen = GeminiGenerator(API_KEY, base_url=fake.base_url, max_retries=1, retry_initial_backoff_s=0)
    errors: list[BaseException] = []
    try:
        await _collect(gen.stream("fine"))
        failing = ["[fake:status=400]", "[fake:status=401]", "[fake:invalid-key]", "[fake:status=500]"]
        for prompt in [*failing, "[fake:break-after=1]"]:
            expected = (InvalidInputError, GenerationPermissionError, DependencyUnavailableError)
            with pytest.raises(expected) as info:
                await _collect(gen.stream(prompt))
            errors.append(info.value)
        with pytest.raises(DependencyUnavailableError) as info:
            await _collect(refused.stream("x"))
        errors.append(info.value)
    finally:
        await gen.close()
        await refused.close()

    assert caplog.records  # the module does log
    assert API_KEY not in caplog.text
    for error in errors:
        chain: BaseException | None = error
        while chain is not None:
            assert API_KEY not in str(chain) and API_KEY not in repr(chain)
            chain = chain.__cause__ or chain.__context__
    assert API_KEY not in repr(gen)
