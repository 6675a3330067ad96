"""The retrieval service end to end over real gRPC on loopback: real Triton (PyTriton) serving the exported demo
model, real Milvus (Lite file and the `milvus` package's standalone server), the demo's held-out digits.
"""

from __future__ import annotations

import hashlib
import io

import grpc
import pytest
from google.protobuf import json_format
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2
from grpc_status import rpc_status
from PIL import Image

from retrieval_service.grpc.server import create_server
from retrieval_service.settings import Settings
from vitrine.v1 import retrieval_service_pb2 as pb

pytestmark = pytest.mark.asyncio(loop_scope="session")
Outcome = pb.IngestImagesResponse.Outcome


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


async def ingest(stub, items: list[tuple[bytes, str, dict]]) -> list[pb.IngestImagesResponse]:
    async def requests():
        for i, (content, filename, meta) in enumerate(items):
            req = pb.IngestImagesRequest(index=i, content=content, filename=filename)
            if meta:
                req.metadata.update(meta)
            yield req

    responses = [r async for r in stub.IngestImages(requests())]
    return sorted(responses, key=lambda r: r.index)


def labels_of(resp: pb.SearchImagesResponse) -> list[int]:
    return [int(json_format.MessageToDict(r.image.metadata)["label"]) for r in resp.results]


async def expect_invalid(call, *needles: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    for needle in needles:
        assert needle in info.value.details(), info.value.details()
    return info.value


# --- the stack under test -------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["lite", "server"])
def milvus_uri(request, tmp_path_factory):
    if request.param == "lite":
        return str(tmp_path_factory.mktemp("lite") / "milvus.db")
    return request.getfixturevalue("milvus_server_uri")


@pytest.fixture(scope="module")
async def service(milvus_uri, demo, encoder_server, tmp_path_factory):
    settings = Settings(model_repository=demo.repository, encoder_url=encoder_server.grpc_url, milvus_uri=milvus_uri,
                        blob_dir=tmp_path_factory.mktemp("blobs"), port=0, health_interval_s=0.5)
    server = create_server(settings)
    await server.start()
    yield server
    await server.stop(grace_s=1)


@pytest.fixture(scope="module")
async def stub(service):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        yield pb_grpc_stub(channel)


def pb_grpc_stub(channel):
    from vitrine.v1 import retrieval_service_pb2_grpc as pb_grpc

    return pb_grpc.RetrievalServiceStub(channel)


@pytest.fixture(scope="module")
async def ingested(stub, demo):
    """Ingest the held-out digits once per backend; returns (items, responses)."""
    items = [((demo.dataset / it.filename).read_bytes(), it.filename, {"label": it.label, "split": it.split})
             for it in demo.items]
    return items, await ingest(stub, items)


# --- ingest, re-ingest, stats, get ----------------------------------------------------------------------------

async def test_ingest_inserts_every_image_and_reports_ids(ingested, stub):
    items, responses = ingested
    assert [r.index for r in responses] == list(range(len(items)))
    assert all(r.outcome == Outcome.INSERTED for r in responses), [r for r in responses if r.outcome != 1][:3]
    assert [r.image_id for r in responses] == [hashlib.sha256(c).hexdigest() for c, _, _ in items]
    stats = await stub.GetCollectionStats(pb.GetCollectionStatsRequest())
    assert stats.image_count == len(items)


async def test_reingest_adds_nothing(ingested, stub):
    items, _ = ingested
    again = await ingest(stub, items[:50])
    assert {r.outcome for r in again} == {Outcome.ALREADY_PRESENT}
    stats = await stub.GetCollectionStats(pb.GetCollectionStatsRequest())
    assert stats.image_count == len(items)


async def test_duplicates_within_one_stream_are_stored_once(ingested, stub, demo):
    content = png_bytes(Image.new("RGB", (40, 30), (10, 200, 30)))
    responses = await ingest(stub, [(content, "green.png", {"label": -1})] * 5)
    outcomes = sorted(r.outcome for r in responses)
    assert outcomes == [Outcome.INSERTED] + [Outcome.ALREADY_PRESENT] * 4
    stats = await stub.GetCollectionStats(pb.GetCollectionStatsRequest())
    assert stats.image_count == len(ingested[0]) + 1
    deleted = await stub.DeleteImages(pb.DeleteImagesRequest(image_ids=[responses[0].image_id]))
    assert deleted.deleted_count == 1


async def test_stats_describe_the_collection(ingested, stub, demo, milvus_uri):
    stats = await stub.GetCollectionStats(pb.GetCollectionStatsRequest())
    assert stats.model_id == demo.manifest.model_id
    assert stats.embedding_dim == demo.manifest.embedding_dim
    assert stats.metric_type == "COSINE"
    assert stats.index_type in {"FLAT", "IVF_FLAT", "HNSW"}
    assert stats.milvus_kind == ("lite" if milvus_uri.endswith(".db") else "server")


async def test_get_image_returns_original_bytes(ingested, stub):
    items, responses = ingested
    got = await stub.GetImage(pb.GetImageRequest(image_id=responses[3].image_id))
    assert got.content == items[3][0]
    assert got.mime_type == "image/png"
    assert got.image.filename == items[3][1]
    assert json_format.MessageToDict(got.image.metadata)["label"] == items[3][2]["label"]
    assert got.image.ingest_time.seconds > 1_700_000_000


async def test_get_unknown_image_is_not_found(stub):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.GetImage(pb.GetImageRequest(image_id="0" * 64))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


# --- search quality on held-out digits ------------------------------------------------------------------------

def _eval_queries():
    from export.demo.captions import EVALUATION_TEMPLATES

    return [(t, d) for t in EVALUATION_TEMPLATES for d in (0, 3, 7, 9)]


@pytest.mark.parametrize("template,digit", _eval_queries(), ids=lambda v: getattr(v, "text", str(v)))
async def test_text_query_precision_at_10(ingested, stub, template, digit):
    resp = await stub.SearchImages(pb.SearchImagesRequest(text=template.format(digit), top_k=10))
    labels = labels_of(resp)
    assert len(labels) == 10
    precision = sum(label == digit for label in labels) / 10
    # per query >= 0.8: the demo model is trained on the test machine (~6 min on 2 cores), and CPU training is not
    # bit-reproducible across machines; one held-out Chinese phrasing has come out at 0.8. The mean over every
    # evaluation query is held to 0.97 below.
    assert precision >= 0.8, (template.format(digit), labels)
    scores = [r.score for r in resp.results]
    assert scores == sorted(scores, reverse=True)


async def test_text_queries_mean_precision_at_10(ingested, stub):
    precisions = {}
    for template, digit in _eval_queries():
        resp = await stub.SearchImages(pb.SearchImagesRequest(text=template.format(digit), top_k=10))
        precisions[template.format(digit)] = sum(label == digit for label in labels_of(resp)) / 10
    mean = sum(precisions.values()) / len(precisions)
    assert mean >= 0.97, sorted(precisions.items(), key=lambda kv: kv[1])[:5]


async def test_image_query_mean_precision_at_10(ingested, stub):
    """Image -> image: 5 train-split scans per digit (never ingested) as queries; mean precision@10 >= 0.95."""
    from export.demo.data import load_split, render_item

    train = load_split("train")
    precisions = {}
    for digit in range(10):
        for query in [it for it in train if it.label == digit][:5]:
            resp = await stub.SearchImages(pb.SearchImagesRequest(image=png_bytes(render_item(query)), top_k=10))
            precisions[query.filename] = sum(label == digit for label in labels_of(resp)) / 10
    mean = sum(precisions.values()) / len(precisions)
    print(f"image->image mean precision@10 over {len(precisions)} queries: {mean:.3f}")
    assert mean >= 0.95, sorted(precisions.items(), key=lambda kv: kv[1])[:5]


async def test_search_by_stored_image_id_finds_itself_first(ingested, stub):
    _, responses = ingested
    resp = await stub.SearchImages(pb.SearchImagesRequest(image_id=responses[5].image_id, top_k=3))
    assert resp.results[0].image.image_id == responses[5].image_id
    assert resp.results[0].score == pytest.approx(1.0, abs=1e-4)


async def test_filter_restricts_results(ingested, stub):
    resp = await stub.SearchImages(pb.SearchImagesRequest(text="a handwritten digit seven", top_k=20,
                                                          filter='metadata["label"] == 1 or metadata["label"] == 4'))
    assert resp.results and set(labels_of(resp)) <= {1, 4}
    resp = await stub.SearchImages(pb.SearchImagesRequest(text="seven", top_k=5, filter='filename like "nope%"'))
    assert len(resp.results) == 0


async def test_min_score_drops_weak_results(ingested, stub):
    full = await stub.SearchImages(pb.SearchImagesRequest(text="the number 5", top_k=50))
    cut = full.results[9].score
    resp = await stub.SearchImages(pb.SearchImagesRequest(text="the number 5", top_k=50, min_score=cut))
    assert all(r.score >= cut - 1e-6 for r in resp.results)
    assert 10 <= len(resp.results) < 50


async def test_pagination_continues_without_overlap(ingested, stub):
    req = pb.SearchImagesRequest(text="a handwritten digit four", top_k=7)
    first = await stub.SearchImages(req)
    whole = await stub.SearchImages(pb.SearchImagesRequest(text="a handwritten digit four", top_k=14))
    assert first.next_page_token
    req.page_token = first.next_page_token
    second = await stub.SearchImages(req)
    ids = [r.image.image_id for r in list(first.results) + list(second.results)]
    assert len(set(ids)) == 14
    assert ids == [r.image.image_id for r in whole.results]
    assert [r.rank for r in second.results] == list(range(7, 14))
    other = pb.SearchImagesRequest(text="a handwritten digit five", top_k=7, page_token=first.next_page_token)
    await expect_invalid(stub.SearchImages(other), "page_token")


# --- delete ---------------------------------------------------------------------------------------------------

async def test_delete_by_ids_and_by_filter(ingested, stub):
    items, _ = ingested
    extra = [(png_bytes(Image.new("RGB", (16 + i, 16), (i * 20, 0, 0))), f"red_{i}.png", {"label": 100 + i % 2})
             for i in range(6)]
    responses = await ingest(stub, extra)
    assert {r.outcome for r in responses} == {Outcome.INSERTED}
    before = (await stub.GetCollectionStats(pb.GetCollectionStatsRequest())).image_count
    deleted = await stub.DeleteImages(pb.DeleteImagesRequest(image_ids=[responses[0].image_id, "f" * 64]))
    assert deleted.deleted_count == 1
    deleted = await stub.DeleteImages(pb.DeleteImagesRequest(filter='metadata["label"] >= 100'))
    assert deleted.deleted_count == 5
    after = (await stub.GetCollectionStats(pb.GetCollectionStatsRequest())).image_count
    assert after == before - 6 == len(items)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.GetImage(pb.GetImageRequest(image_id=responses[1].image_id))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    await expect_invalid(stub.DeleteImages(pb.DeleteImagesRequest()), "exactly one")
    await expect_invalid(stub.DeleteImages(pb.DeleteImagesRequest(image_ids=["../etc/passwd"])), "hex")


# --- bad input: INVALID_ARGUMENT, nothing lost, server keeps serving -------------------------------------------

def _huge_png() -> bytes:
    return png_bytes(Image.new("1", (9000, 9000)))  # 81 megapixels in a few kB


@pytest.mark.parametrize("request_fields,needle", [
    ({"text": ""}, "empty"),
    ({"text": "   \n\t "}, "empty"),
    ({"text": "x" * 1001}, "characters"),
    ({"text": "seven", "top_k": -1}, "top_k"),
    ({"text": "seven", "top_k": 100_000}, "top_k"),
    ({"text": "seven", "filter": 'metadata["label"] ==== 3'}, "filter"),
    ({"text": "seven", "filter": "no_such_field > 3"}, ""),
    ({"text": "seven", "min_score": 2.0}, "min_score"),
    ({"text": "seven", "page_token": "!!not-a-token!!"}, "page_token"),
    ({"image": b"definitely not an image"}, ""),
    ({"image": b"\x89PNG\r\n\x1a\n" + b"\x00" * 40}, ""),
    ({"image_id": "xyz"}, "hex"),
    ({}, "query"),
])
async def test_bad_search_input_is_invalid_argument(ingested, stub, request_fields, needle):
    before = (await stub.GetCollectionStats(pb.GetCollectionStatsRequest())).image_count
    await expect_invalid(stub.SearchImages(pb.SearchImagesRequest(**request_fields)), needle)
    assert (await stub.GetCollectionStats(pb.GetCollectionStatsRequest())).image_count == before


async def test_invalid_argument_carries_field_violation(ingested, stub):
    err = await expect_invalid(stub.SearchImages(pb.SearchImagesRequest(text="seven", top_k=-5)), "top_k")
    status = rpc_status.from_call(err)
    violations = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations += [v.field for v in bad.field_violations]
    assert violations == ["top_k"]


async def test_oversized_and_undecodable_images_are_rejected_alone(ingested, stub, service):
    items, _ = ingested
    good = png_bytes(Image.new("RGB", (20, 20), (1, 2, 3)))
    batch = [
        (b"garbage bytes", "garbage.png", {}),
        (_huge_png(), "huge.png", {}),
        (b"\x00" * (service.settings.max_image_bytes + 1), "big.bin", {}),
        (b"", "empty.png", {}),
        (good, "good.png", {"label": -2}),
    ]
    responses = await ingest(stub, batch)
    outcomes = [r.outcome for r in responses]
    assert outcomes == [Outcome.REJECTED] * 4 + [Outcome.INSERTED]
    assert all(r.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] for r in responses[:4])
    assert "pixels" in responses[1].error.message
    assert "bytes" in responses[2].error.message
    await expect_invalid(stub.SearchImages(pb.SearchImagesRequest(image=_huge_png())), "pixels")
    assert (await stub.GetCollectionStats(pb.GetCollectionStatsRequest())).image_count == len(items) + 1
    await stub.DeleteImages(pb.DeleteImagesRequest(image_ids=[responses[4].image_id]))


async def test_server_still_serving_after_bad_input(ingested, stub, service):
    from grpc_health.v1 import health_pb2_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        resp = await health.Check(health_pb2.HealthCheckRequest(service="vitrine.v1.RetrievalService"))
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    resp = await stub.SearchImages(pb.SearchImagesRequest(text="the number 1", top_k=3))
    assert len(resp.results) == 3


async def test_reflection_lists_the_services(service):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)

        async def one():
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        names = set()
        async for resp in stub.ServerReflectionInfo(one()):
            names |= {s.name for s in resp.list_services_response.service}
    assert {"vitrine.v1.RetrievalService", "grpc.health.v1.Health"} <= names



# --- rerank stage ---------------------------------------------------------------------------------------------

async def test_rerank_mmr_spreads_near_duplicates(ingested, stub, demo):
    item = demo.items[0]
    base = Image.open(demo.dataset / item.filename).convert("RGB")
    copies = []
    for i in range(4):  # the same scan with one pixel changed: new bytes (new id), nearly the same embedding
        img = base.copy()
        img.putpixel((i, 0), (255 - 10 * i, 250, 250))
        copies.append((png_bytes(img), f"dup_{i}.png", {"label": item.label, "dup": 1}))
    responses = await ingest(stub, copies)
    assert {r.outcome for r in responses} == {Outcome.INSERTED}
    dup_ids = {r.image_id for r in responses} | {hashlib.sha256((demo.dataset / item.filename).read_bytes())
                                                 .hexdigest()}
    try:
        query = pb.SearchImagesRequest(image=(demo.dataset / item.filename).read_bytes(), top_k=8)
        plain = await stub.SearchImages(query)
        query.rerank.method = pb.RerankOptions.MMR
        query.rerank.top_n = 50
        query.rerank.mmr_lambda = 1.0
        relevance = await stub.SearchImages(query)
        query.rerank.mmr_lambda = 0.3
        diverse = await stub.SearchImages(query)
        query.rerank.method = pb.RerankOptions.EXACT
        exact = await stub.SearchImages(query)
    finally:
        await stub.DeleteImages(pb.DeleteImagesRequest(image_ids=[r.image_id for r in responses]))

    def ids(resp):
        return [r.image.image_id for r in resp.results]

    assert set(ids(relevance)) == set(ids(plain)) == set(ids(exact))
    assert [r.score for r in relevance.results] == pytest.approx([r.score for r in plain.results], abs=1e-5)
    near_dups_plain = len(dup_ids & set(ids(plain)))
    near_dups_diverse = len(dup_ids & set(ids(diverse)))
    assert near_dups_plain == 5
    assert near_dups_diverse < near_dups_plain


async def test_rerank_bounds_are_validated(ingested, stub):
    req = pb.SearchImagesRequest(text="seven", top_k=20)
    req.rerank.method = pb.RerankOptions.MMR
    req.rerank.top_n = 10  # fewer candidates than top_k
    await expect_invalid(stub.SearchImages(req), "rerank")
    req.rerank.top_n = 100
    req.rerank.mmr_lambda = 1.5
    await expect_invalid(stub.SearchImages(req), "lambda")
    req.rerank.method = pb.RerankOptions.MODEL  # no reranker model configured
    await expect_invalid(stub.SearchImages(req), "model")
