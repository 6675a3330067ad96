"""GenerateImages end to end: real gRPC service, real Triton and Milvus Lite, the real google-genai SDK pointed at
the local fake Gemini server (tests/fake_gemini.py) — the only stand-in, since the Gemini API can't be reached.
"""

from __future__ import annotations

import asyncio
import io
import time

import grpc
import pytest
from fake_gemini import FakeGemini
from PIL import Image

from retrieval_service.grpc.server import create_server
from retrieval_service.settings import Settings
from vitrine.v1 import retrieval_service_pb2 as pb
from vitrine.v1 import retrieval_service_pb2_grpc as pb_grpc

pytestmark = pytest.mark.asyncio(loop_scope="session")
API_KEY = "test-key-0123456789abcdef"


@pytest.fixture(scope="module")
def fake():
    with FakeGemini() as server:
        yield server


async def _start(demo, encoder_server, tmp_path_factory, **generation):
    settings = Settings(model_repository=demo.repository, encoder_url=encoder_server.grpc_url,
                        milvus_uri=str(tmp_path_factory.mktemp("gen") / "milvus.db"),
                        blob_dir=tmp_path_factory.mktemp("genblobs"), port=0,
                        generation={"max_retries": 1, **generation})
    server = create_server(settings)
    await server.start()
    return server


@pytest.fixture(scope="module")
async def stack(demo, encoder_server, fake, tmp_path_factory):
    """A service with references ingested: 20 held-out digits."""
    server = await _start(demo, encoder_server, tmp_path_factory, api_key=API_KEY, base_url=fake.base_url)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.RetrievalServiceStub(channel)

        async def requests():
            for i, item in enumerate(demo.items[:20]):
                req = pb.IngestImagesRequest(index=i, content=(demo.dataset / item.filename).read_bytes(),
                                             filename=item.filename)
                req.metadata.update({"label": item.label})
                yield req

        ids = {r.index: r.image_id async for r in stub.IngestImages(requests())}
        yield stub, [ids[i] for i in range(20)]
    await server.stop(grace_s=1)


async def collect(call) -> tuple[list[pb.GenerateImagesResponse], grpc.aio.AioRpcError | None]:
    messages = []
    try:
        async for msg in call:
            messages.append(msg)
    except grpc.aio.AioRpcError as exc:
        return messages, exc
    return messages, None


async def test_references_by_query_reach_gemini_inline_and_stream_in_order(stack, fake, demo):
    stub, _ = stack
    fake.reset()
    req = pb.GenerateImagesRequest(prompt="turn this digit into a neon sign", reference_count=3,
                                   reference_query=pb.ReferenceQuery(text="a handwritten digit seven"))
    messages, error = await collect(stub.GenerateImages(req))
    assert error is None
    kinds = [m.WhichOneof("event") for m in messages]
    assert kinds[0] == "references" and kinds[-1] == "finished"
    assert "text" in kinds and "image" in kinds
    assert kinds.count("references") == 1 and kinds.count("finished") == 1
    refs = messages[0].references.references
    assert len(refs) == 3
    (recorded,) = fake.requests
    assert recorded.prompt.startswith("turn this digit into a neon sign")
    sent = recorded.inline_images
    stored = {r.image.image_id: (demo.dataset / r.image.filename).read_bytes() for r in refs}
    assert [data for data, _ in sent] == [stored[r.image.image_id] for r in refs]
    assert {mime for _, mime in sent} == {"image/png"}
    image = next(m.image for m in messages if m.WhichOneof("event") == "image")
    assert Image.open(io.BytesIO(image.data)).format == "PNG" and image.mime_type == "image/png"
    finished = messages[-1].finished
    assert finished.finish_reason == "STOP" and not finished.blocked
    assert finished.total_tokens > 0 and finished.image_parts >= 1


async def test_references_by_explicit_ids(stack, fake):
    stub, ids = stack
    fake.reset()
    req = pb.GenerateImagesRequest(prompt="a poster", reference_ids=pb.ReferenceIds(image_ids=ids[:2]))
    messages, error = await collect(stub.GenerateImages(req))
    assert error is None
    assert [r.image.image_id for r in messages[0].references.references] == ids[:2]
    assert len(fake.requests[0].inline_images) == 2


@pytest.mark.parametrize("req,code", [
    (pb.GenerateImagesRequest(prompt=""), grpc.StatusCode.INVALID_ARGUMENT),
    (pb.GenerateImagesRequest(prompt="x", reference_count=99, reference_query=pb.ReferenceQuery(text="seven")),
     grpc.StatusCode.INVALID_ARGUMENT),
    (pb.GenerateImagesRequest(prompt="x", reference_ids=pb.ReferenceIds(image_ids=["0" * 64])),
     grpc.StatusCode.NOT_FOUND),
    (pb.GenerateImagesRequest(prompt="x", options=pb.GenerationOptions(temperature=5.0)),
     grpc.StatusCode.INVALID_ARGUMENT),
], ids=["empty-prompt", "too-many-references", "unknown-reference", "bad-temperature"])
async def test_bad_generation_requests(stack, fake, req, code):
    stub, _ = stack
    fake.reset()
    messages, error = await collect(stub.GenerateImages(req))
    assert error is not None and error.code() == code, error
    assert messages == [] and fake.requests == []  # rejected before anything was streamed or sent


@pytest.mark.parametrize("marker,code", [
    ("[fake:status=400]", grpc.StatusCode.INVALID_ARGUMENT),
    ("[fake:status=401]", grpc.StatusCode.PERMISSION_DENIED),
    ("[fake:status=403]", grpc.StatusCode.PERMISSION_DENIED),
    ("[fake:status=429]", grpc.StatusCode.RESOURCE_EXHAUSTED),
    ("[fake:status=500]", grpc.StatusCode.UNAVAILABLE),
])
async def test_gemini_errors_map_to_status_codes(stack, fake, marker, code):
    stub, _ = stack
    fake.reset()
    messages, error = await collect(stub.GenerateImages(pb.GenerateImagesRequest(prompt=f"{marker} go")))
    assert error is not None and error.code() == code, error
    assert [m.WhichOneof("event") for m in messages] == ["references"]
    assert API_KEY not in error.details()


async def test_server_errors_are_retried_a_bounded_number_of_times(stack, fake):
    stub, _ = stack
    fake.reset()
    _, error = await collect(stub.GenerateImages(pb.GenerateImagesRequest(prompt="[fake:status=503] go")))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert len(fake.requests) == 2  # max_retries=1


async def test_blocked_prompt_ends_with_a_blocked_finished_message(stack, fake):
    stub, _ = stack
    fake.reset()
    messages, error = await collect(stub.GenerateImages(pb.GenerateImagesRequest(prompt="[fake:blocked] go")))
    assert error is None
    assert messages[-1].finished.blocked and messages[-1].finished.block_reason


async def test_cancelling_the_call_cancels_the_gemini_stream(stack, fake):
    stub, _ = stack
    fake.reset()
    call = stub.GenerateImages(pb.GenerateImagesRequest(prompt="[fake:slow] a long story"))
    seen = []
    async for msg in call:
        seen.append(msg.WhichOneof("event"))
        if "text" in seen:
            break
    cancelled_at = time.monotonic()
    call.cancel()
    # the service runs in this event loop: wait in a thread so it can process the cancellation
    assert await asyncio.to_thread(fake.wait_for, lambda reqs: reqs and reqs[0].outcome != "in_progress", 5)
    assert fake.requests[0].outcome == "client_disconnected"
    assert fake.requests[0].ended_at - cancelled_at < 5


async def test_deadline_expiry_cancels_the_gemini_stream(stack, fake):
    stub, _ = stack
    fake.reset()
    messages, error = await collect(stub.GenerateImages(pb.GenerateImagesRequest(prompt="[fake:slow] story"),
                                                        timeout=1.0))
    assert error is not None and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert await asyncio.to_thread(fake.wait_for,
                                   lambda reqs: reqs and reqs[0].outcome == "client_disconnected", 5)


async def test_no_api_key_is_failed_precondition(demo, encoder_server, fake, tmp_path_factory):
    server = await _start(demo, encoder_server, tmp_path_factory, base_url=fake.base_url)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.RetrievalServiceStub(channel)
            messages, error = await collect(stub.GenerateImages(pb.GenerateImagesRequest(prompt="hello")))
        assert error is not None and error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "API key" in error.details() and messages == []
    finally:
        await server.stop(grace_s=1)
