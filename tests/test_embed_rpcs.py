"""EmbedTexts / EmbedImages end to end over real gRPC on loopback (real Triton serving the exported demo model,
Milvus Lite), with VitrineClient and `vitrine embed` once each; and SearchImagesResponse.text_truncated.

Vectors are checked against the towers themselves (the tokenizer and EncoderClient the server holds, called
directly) and against SearchImages scores of stored images.
"""

from __future__ import annotations

import asyncio
import io
import json

import grpc
import numpy as np
import pytest
from google.rpc import code_pb2, error_details_pb2
from grpc_status import rpc_status
from PIL import Image
from typer.testing import CliRunner

from retrieval_service.grpc.server import create_server
from retrieval_service.settings import Settings
from tools.cli import app
from tools.processes import free_port
from vitrine.client import VitrineClient
from vitrine.v1 import retrieval_service_pb2 as pb
from vitrine.v1 import retrieval_service_pb2_grpc as pb_grpc

pytestmark = pytest.mark.asyncio(loop_scope="session")

MAX_ITEMS = 24
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CONTROL_ONLY = "\x00\x07\x1b\x7f\x01"  # nothing left after open_clip's cleaning


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def vectors_of(response: pb.EmbedTextsResponse | pb.EmbedImagesResponse) -> np.ndarray:
    """float32 [N, D] of a response whose items all succeeded."""
    assert all(not e.HasField("error") for e in response.embeddings), [e.error for e in response.embeddings]
    return np.asarray([list(e.values) for e in response.embeddings], dtype=np.float32)


def violation_field(status) -> str:  # noqa: ANN001 - google.rpc.Status
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            return bad.field_violations[0].field
    return ""


def error_reason(status) -> str:  # noqa: ANN001 - google.rpc.Status
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    return ""


async def expect_invalid(call, field: str) -> None:  # noqa: ANN001 - a grpc.aio call
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert violation_field(rpc_status.from_call(info.value)) == field, info.value.details()


def long_text(context_length: int) -> str:
    """Plain lowercase words, many more tokens than `context_length`, fewer characters than max_text_chars."""
    text = " ".join(f"digit {WORDS[i % 10]}" for i in range(context_length))
    assert len(text) < 1000
    return text


# --- the stack under test -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
async def service(demo, encoder_server, tmp_path_factory):
    settings = Settings(model_repository=demo.repository, encoder_url=encoder_server.grpc_url,
                        milvus_uri=str(tmp_path_factory.mktemp("embed") / "milvus.db"),
                        blob_dir=tmp_path_factory.mktemp("embedblobs"), port=0, health_interval_s=0.5,
                        max_embed_items=MAX_ITEMS, index={"index_type": "FLAT"})
    server = create_server(settings)
    await server.start()
    yield server
    await server.stop(grace_s=1)


@pytest.fixture(scope="module")
async def stub(service):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        yield pb_grpc.RetrievalServiceStub(channel)


@pytest.fixture(scope="module")
def images(demo) -> list[bytes]:
    """Encoded bytes of 20 held-out digits."""
    return [(demo.dataset / item.filename).read_bytes() for item in demo.items[:20]]


@pytest.fixture(scope="module")
async def ingested(stub, images):
    async def requests():
        for i, content in enumerate(images):
            yield pb.IngestImagesRequest(index=i, content=content, filename=f"digit_{i}.png")

    responses = sorted([r async for r in stub.IngestImages(requests())], key=lambda r: r.index)
    assert all(r.outcome == pb.IngestImagesResponse.INSERTED for r in responses), responses
    return responses  # in the order of `images`


async def tower_vectors(service, texts: list[str]) -> np.ndarray:  # noqa: ANN001 - RetrievalServer
    """The text tower's own output for `texts`: the server's tokenizer at full context length, its encoder."""
    return await service.encoder.encode_texts(service.tokenizer.encode_batch(texts))


# --- EmbedTexts -----------------------------------------------------------------------------------------------

async def test_embed_texts_equal_the_text_tower_for_many_texts(stub, service, demo):
    texts = [f"a handwritten digit {w}" for w in WORDS] + [f"pen strokes forming a {w}" for w in WORDS] + [
        "手写数字七", "手写数字零", "scan of a hand-drawn 3", "somebody wrote the numeral eight"]
    assert len(texts) == MAX_ITEMS  # the most one call may carry
    response = await stub.EmbedTexts(pb.EmbedTextsRequest(texts=texts))
    assert len(response.embeddings) == len(texts)
    got = vectors_of(response)
    assert got.shape == (len(texts), demo.manifest.embedding_dim)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(got, await tower_vectors(service, texts), atol=2e-5)  # request order kept
    ids = service.tokenizer.encode_batch(texts)
    pad = service.tokenizer.pad_id
    for i, item in enumerate(response.embeddings):
        assert item.token_count == int((ids[i] != pad).sum()), texts[i]
        assert not item.truncated


async def test_embed_texts_agree_with_search_scores(stub, ingested, images):
    """text . image from the two embed RPCs == the cosine SearchImages reports for the stored image."""
    text = "a handwritten digit four"
    (query,) = vectors_of(await stub.EmbedTexts(pb.EmbedTextsRequest(texts=[text])))
    page = await stub.SearchImages(pb.SearchImagesRequest(text=text, top_k=5))
    assert len(page.results) == 5 and not page.text_truncated
    by_id = {r.image_id: content for r, content in zip(ingested, images)}
    stored = vectors_of(await stub.EmbedImages(pb.EmbedImagesRequest(
        images=[by_id[r.image.image_id] for r in page.results])))
    np.testing.assert_allclose(stored @ query, [r.score for r in page.results], atol=1e-4)
    # and the ranking over every stored image is the search's ranking
    everything = vectors_of(await stub.EmbedImages(pb.EmbedImagesRequest(images=images)))
    order = np.argsort(-(everything @ query))[:5]
    assert [ingested[i].image_id for i in order] == [r.image.image_id for r in page.results]


async def test_bad_texts_are_refused_alone(stub, service):
    texts = ["a handwritten digit one", "", CONTROL_ONLY, "a handwritten digit two", "   "]
    response = await stub.EmbedTexts(pb.EmbedTextsRequest(texts=texts))
    assert len(response.embeddings) == len(texts)
    for i in (1, 2, 4):
        item = response.embeddings[i]
        assert item.HasField("error") and not item.values, (i, item)
        assert item.error.code == code_pb2.INVALID_ARGUMENT, item.error
        assert violation_field(item.error) == f"texts[{i}]", item.error
    good = [0, 3]
    for i in good:
        assert not response.embeddings[i].HasField("error")
    got = np.asarray([list(response.embeddings[i].values) for i in good], dtype=np.float32)
    np.testing.assert_allclose(got, await tower_vectors(service, [texts[i] for i in good]), atol=2e-5)


async def test_no_texts_or_too_many_fail_the_call(stub):
    await expect_invalid(stub.EmbedTexts(pb.EmbedTextsRequest(texts=[])), "texts")
    too_many = [f"text number {i}" for i in range(MAX_ITEMS + 1)]
    await expect_invalid(stub.EmbedTexts(pb.EmbedTextsRequest(texts=too_many)), "texts")


async def test_model_id_and_dim_match_the_manifest(stub, demo, images):
    texts = await stub.EmbedTexts(pb.EmbedTextsRequest(texts=["a handwritten digit six"]))
    pictures = await stub.EmbedImages(pb.EmbedImagesRequest(images=images[:2]))
    for response in (texts, pictures):
        assert response.model_id == demo.manifest.model_id
        assert response.embedding_dim == demo.manifest.embedding_dim
        assert all(len(e.values) == demo.manifest.embedding_dim for e in response.embeddings)


async def test_repeated_text_is_served_from_the_cache(stub):
    texts = ["a handwritten digit nine, asked twice", "a handwritten digit eight, asked twice"]
    first = await stub.EmbedTexts(pb.EmbedTextsRequest(texts=texts))
    assert [e.cached for e in first.embeddings] == [False, False]
    assert first.encode_ms > 0
    second = await stub.EmbedTexts(pb.EmbedTextsRequest(texts=[texts[1], "a new text in the same call", texts[0]]))
    assert [e.cached for e in second.embeddings] == [True, False, True]
    np.testing.assert_array_equal(vectors_of(second)[[2, 0]], vectors_of(first))
    third = await stub.EmbedTexts(pb.EmbedTextsRequest(texts=texts))
    assert all(e.cached for e in third.embeddings) and third.encode_ms == 0


async def test_long_text_is_truncated_to_the_context_length(stub, service, demo):
    context_length = demo.manifest.text.context_length
    text = long_text(context_length)
    response = await stub.EmbedTexts(pb.EmbedTextsRequest(texts=[text, "a handwritten digit five"]))
    long_item, short_item = response.embeddings
    assert long_item.truncated and long_item.token_count == context_length
    assert not short_item.truncated and short_item.token_count < context_length
    # the truncated text's vector is the tower's output for open_clip's truncation of it
    np.testing.assert_allclose(vectors_of(response), await tower_vectors(service, [text, "a handwritten digit five"]),
                               atol=2e-5)


async def test_search_reports_a_truncated_text_query(stub, ingested, images, demo):
    long_page = await stub.SearchImages(pb.SearchImagesRequest(text=long_text(demo.manifest.text.context_length)))
    assert long_page.text_truncated
    short_page = await stub.SearchImages(pb.SearchImagesRequest(text="a handwritten digit five"))
    assert not short_page.text_truncated
    image_page = await stub.SearchImages(pb.SearchImagesRequest(image=images[0]))
    assert not image_page.text_truncated


# --- EmbedImages ----------------------------------------------------------------------------------------------

async def test_bad_image_is_refused_alone(stub, images):
    batch = [images[0], b"this is not an image", images[1], b"", images[2]]
    response = await stub.EmbedImages(pb.EmbedImagesRequest(images=batch))
    assert len(response.embeddings) == len(batch)
    for i, reason in ((1, "IMAGE_UNDECODABLE"), (3, "IMAGE_EMPTY")):
        item = response.embeddings[i]
        assert item.HasField("error") and not item.values, (i, item)
        assert item.error.code == code_pb2.INVALID_ARGUMENT, item.error
        assert error_reason(item.error) == reason, item.error
    good = [0, 2, 4]
    got = np.asarray([list(response.embeddings[i].values) for i in good], dtype=np.float32)
    alone = vectors_of(await stub.EmbedImages(pb.EmbedImagesRequest(images=images[:3])))
    np.testing.assert_allclose(got, alone, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert all(e.token_count == 0 and not e.truncated for e in response.embeddings)


async def test_no_images_or_too_many_fail_the_call(stub):
    await expect_invalid(stub.EmbedImages(pb.EmbedImagesRequest(images=[])), "images")
    tiny = png_bytes(Image.new("RGB", (32, 32), (120, 30, 200)))
    await expect_invalid(stub.EmbedImages(pb.EmbedImagesRequest(images=[tiny] * (MAX_ITEMS + 1))), "images")


async def test_embed_is_unavailable_without_the_encoder(demo, tmp_path):
    settings = Settings(model_repository=demo.repository, encoder_url=f"127.0.0.1:{free_port()}",
                        milvus_uri=str(tmp_path / "milvus.db"), blob_dir=tmp_path / "blobs", port=0,
                        health_interval_s=0.2, encoder_timeout_s=5)
    server = create_server(settings)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.RetrievalServiceStub(channel)
            tiny = png_bytes(Image.new("RGB", (32, 32), (1, 2, 3)))
            for call in (stub.EmbedTexts(pb.EmbedTextsRequest(texts=["a handwritten digit one"])),
                         stub.EmbedImages(pb.EmbedImagesRequest(images=[tiny]))):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
    finally:
        await server.stop(grace_s=1)


# --- VitrineClient and `vitrine embed` (blocking: run in a thread, the service lives in this loop) -----------

async def test_client_embeds_texts_and_images(service, stub, demo, images):
    target = f"127.0.0.1:{service.port}"
    path = demo.dataset / demo.items[0].filename
    texts = ["a handwritten digit three", CONTROL_ONLY, "a handwritten digit seven"]

    def calls():
        with VitrineClient(target) as client:
            return client.embed_texts(texts), client.embed_images([path, images[1], b"garbage"])

    text_result, image_result = await asyncio.to_thread(calls)
    dim = demo.manifest.embedding_dim
    assert text_result.vectors.shape == (3, dim) and text_result.vectors.dtype == np.float32
    assert text_result.ok.tolist() == [True, False, True]
    assert np.isnan(text_result.vectors[1]).all()
    assert text_result.errors[1].code == "INVALID_ARGUMENT" and text_result.errors[1].field == "texts[1]"
    np.testing.assert_allclose(text_result.vectors[[0, 2]], await tower_vectors(service, [texts[0], texts[2]]),
                               atol=2e-5)
    assert text_result.token_counts[0] > 2 and text_result.token_counts[1] == 0
    assert text_result.model_id == demo.manifest.model_id and text_result.embedding_dim == dim

    assert image_result.vectors.shape == (3, dim) and image_result.ok.tolist() == [True, True, False]
    assert list(image_result.errors) == [2] and image_result.errors[2].reason == "IMAGE_UNDECODABLE"
    np.testing.assert_allclose(image_result.vectors[:2], vectors_of(
        await stub.EmbedImages(pb.EmbedImagesRequest(images=[path.read_bytes(), images[1]]))), atol=1e-5)


async def test_cli_embed_prints_json_lines_and_writes_npy(service, stub, demo, tmp_path):
    target = f"127.0.0.1:{service.port}"
    path = demo.dataset / demo.items[2].filename
    out = tmp_path / "vectors.npy"
    runner = CliRunner()
    args = ["embed", "--text", "a handwritten digit two", "--text", "", "--image", str(path), "--target", target]
    with_out = await asyncio.to_thread(runner.invoke, app, [*args, "--out", str(out)])
    assert with_out.exit_code == 1, with_out.output + repr(with_out.exception)  # one item refused
    lines = [json.loads(line) for line in with_out.stdout.splitlines()]
    assert [(line["kind"], line["row"]) for line in lines] == [("text", 0), ("text", 1), ("image", 2)]
    assert lines[1]["error"]["code"] == "INVALID_ARGUMENT" and lines[1]["error"]["field"] == "texts[1]"
    assert "values" not in lines[0] and lines[0]["token_count"] > 2 and lines[2]["input"] == str(path)
    saved = np.load(out)
    assert saved.shape == (3, demo.manifest.embedding_dim) and saved.dtype == np.float32
    assert np.isnan(saved[1]).all()
    np.testing.assert_allclose(saved[0], (await tower_vectors(service, ["a handwritten digit two"]))[0], atol=2e-5)
    np.testing.assert_allclose(saved[2], vectors_of(
        await stub.EmbedImages(pb.EmbedImagesRequest(images=[path.read_bytes()])))[0], atol=1e-5)

    plain = await asyncio.to_thread(runner.invoke, app, ["embed", "--text", "a handwritten digit two",
                                                          "--target", target])
    assert plain.exit_code == 0, plain.output + repr(plain.exception)
    (line,) = [json.loads(x) for x in plain.stdout.splitlines()]
    np.testing.assert_allclose(np.asarray(line["values"], dtype=np.float32), saved[0], atol=1e-6)
    assert line["cached"] is True  # the first run embedded the same text
