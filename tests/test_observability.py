"""Observability of the retrieval service over real servers: Prometheus metrics scraped over HTTP, request ids
echoed to callers and carried by every JSON log line of a call, the access log, and the metrics endpoint's
lifecycle. Real Triton (PyTriton, the `encoder_server` fixture), Milvus Lite in a temporary folder, real gRPC.
"""

from __future__ import annotations

import asyncio
import collections
import io
import json
import logging
import re
import urllib.error
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from retrieval_service.logs import REQUEST_ID_KEY, configure_logging, make_handler, request_id_from_metadata
from retrieval_service.grpc.server import create_server
from retrieval_service.settings import Settings
from vitrine.v1 import retrieval_service_pb2 as pb
from vitrine.v1 import retrieval_service_pb2_grpc as pb_grpc

Outcome = pb.IngestImagesResponse.Outcome
SEARCH = "/vitrine.v1.RetrievalService/SearchImages"
INGEST = "/vitrine.v1.RetrievalService/IngestImages"
STATS = "/vitrine.v1.RetrievalService/GetCollectionStats"
SECRET = "s3cr3t-" + "x" * 40  # sent as an authorization header: must never reach a log line


# --- helpers ----------------------------------------------------------------------------------------------------

def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics and return {(sample name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    """The sample `name{labels}`, 0 when absent (a labelled series exists only once observed)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def png_bytes(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), color).save(buf, format="PNG")
    return buf.getvalue()


class JsonLines:
    """Captures the JSON log lines of the service's loggers while active."""

    LOGGERS = {"vitrine.access": logging.INFO, "retrieval_service": logging.DEBUG}

    def __init__(self) -> None:
        self.buffer = io.StringIO()
        self.handler = make_handler("json", self.buffer)
        self.handler.setLevel(logging.DEBUG)
        self._levels: dict[str, int] = {}

    def __enter__(self) -> "JsonLines":
        root = logging.getLogger()
        root.addHandler(self.handler)
        for name, level in self.LOGGERS.items():
            self._levels[name] = logging.getLogger(name).level
            logging.getLogger(name).setLevel(level)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger().removeHandler(self.handler)
        for name, level in self._levels.items():
            logging.getLogger(name).setLevel(level)

    @property
    def text(self) -> str:
        return self.buffer.getvalue()

    def records(self) -> Iterator[dict]:
        for line in self.text.splitlines():
            yield json.loads(line)  # every line is one JSON object


async def ingest(stub, contents: list[bytes], metadata=()) -> list[pb.IngestImagesResponse]:
    async def requests():
        for i, content in enumerate(contents):
            yield pb.IngestImagesRequest(index=i, content=content, filename=f"{i}.png")

    return sorted([r async for r in stub.IngestImages(requests(), metadata=metadata)], key=lambda r: r.index)


# --- the stack under test ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
async def service(demo, encoder_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("observability")
    settings = Settings(model_repository=demo.repository, encoder_url=encoder_server.grpc_url,
                        milvus_uri=str(tmp / "milvus.db"), blob_dir=tmp / "blobs", port=0, metrics_port=0,
                        health_interval_s=0.5, ingest_batch_size=4)
    server = create_server(settings)
    await server.start()
    yield server
    await server.stop(grace_s=1)


@pytest.fixture(scope="module")
async def channel(service):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        yield channel


@pytest.fixture(scope="module")
def stub(channel):
    return pb_grpc.RetrievalServiceStub(channel)


# --- metrics --------------------------------------------------------------------------------------------------

async def test_metrics_count_rpcs_codes_latencies_and_ingest_outcomes(service, stub, demo):
    port = service.metrics_http.port
    assert port, "metrics endpoint not serving"
    before = await asyncio.to_thread(scrape, port)

    for text in ("a handwritten digit three", "手写数字七", "zero"):
        await stub.SearchImages(pb.SearchImagesRequest(text=text, top_k=5))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.SearchImages(pb.SearchImagesRequest(text="   "))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    digits = [(demo.dataset / it.filename).read_bytes() for it in demo.items[:5]]
    responses = await ingest(stub, [*digits, b"this is not an image", digits[0]])
    got = collections.Counter((Outcome.Name(r.outcome), r.error.code) for r in responses)
    assert got[("REJECTED", grpc.StatusCode.INVALID_ARGUMENT.value[0])] == 1, responses
    assert got[("INSERTED", 0)] + got[("ALREADY_PRESENT", 0)] == 6
    await stub.GetCollectionStats(pb.GetCollectionStatsRequest())

    after = await asyncio.to_thread(scrape, port)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    # requests by RPC and status code
    assert delta("vitrine_rpc_requests_total", rpc=SEARCH, code="OK") == 3
    assert delta("vitrine_rpc_requests_total", rpc=SEARCH, code="INVALID_ARGUMENT") == 1
    assert delta("vitrine_rpc_requests_total", rpc=INGEST, code="OK") == 1
    assert delta("vitrine_rpc_requests_total", rpc=STATS, code="OK") == 1
    # latency histograms: one observation per call; encoder and Milvus calls recorded by tower / operation
    assert delta("vitrine_rpc_duration_seconds_count", rpc=SEARCH) == 4
    assert delta("vitrine_rpc_duration_seconds_count", rpc=INGEST) == 1
    assert delta("vitrine_rpc_duration_seconds_sum", rpc=SEARCH) > 0
    assert delta("vitrine_rpc_duration_seconds_bucket", rpc=SEARCH, le="+Inf") == 4
    assert delta("vitrine_encoder_request_duration_seconds_count", tower="text") == 3  # the blank text never encodes
    assert delta("vitrine_encoder_request_duration_seconds_count", tower="image") >= 1
    assert delta("vitrine_milvus_request_duration_seconds_count", operation="search") == 3
    assert delta("vitrine_milvus_request_duration_seconds_count", operation="insert") >= 1
    assert delta("vitrine_milvus_request_duration_seconds_count", operation="existing_ids") >= 1
    assert value(after, "vitrine_encoder_errors_total", tower="text") == 0
    # ingest outcomes match what the stream answered
    for outcome, code in (("INSERTED", "OK"), ("ALREADY_PRESENT", "OK"), ("REJECTED", "INVALID_ARGUMENT")):
        wanted = got[(outcome, grpc.StatusCode[code].value[0])]
        assert delta("vitrine_ingest_images_total", outcome=outcome, code=code) == wanted, (outcome, responses)
    # nothing left in flight; dependencies up; the process collectors are there
    assert value(after, "vitrine_rpc_requests_in_flight", rpc=SEARCH) == 0
    assert value(after, "vitrine_rpc_requests_in_flight", rpc=INGEST) == 0
    assert value(after, "vitrine_ingest_streams_in_flight") == 0
    assert value(after, "vitrine_dependency_up", dependency="encoder") == 1
    assert value(after, "vitrine_dependency_up", dependency="milvus") == 1
    assert value(after, "process_resident_memory_bytes") > 0


async def test_in_flight_gauges_follow_an_open_ingest_stream(service, stub):
    port = service.metrics_http.port
    release = asyncio.Event()

    async def requests():
        await release.wait()
        yield pb.IngestImagesRequest(index=0, content=png_bytes((200, 10, 10)), filename="red.png")

    call = stub.IngestImages(requests())
    try:
        for _ in range(200):  # until the server has started handling the stream (bounded)
            samples = await asyncio.to_thread(scrape, port)
            if value(samples, "vitrine_ingest_streams_in_flight") == 1:
                break
            await asyncio.sleep(0.05)
        assert value(samples, "vitrine_ingest_streams_in_flight") == 1
        assert value(samples, "vitrine_rpc_requests_in_flight", rpc=INGEST) == 1
    finally:
        release.set()
    assert [r.outcome async for r in call] in ([Outcome.INSERTED], [Outcome.ALREADY_PRESENT])
    samples = await asyncio.to_thread(scrape, port)
    assert value(samples, "vitrine_ingest_streams_in_flight") == 0
    assert value(samples, "vitrine_rpc_requests_in_flight", rpc=INGEST) == 0


async def test_cancelled_stream_is_counted_and_leaves_nothing_in_flight(service, stub):
    port = service.metrics_http.port
    before = await asyncio.to_thread(scrape, port)
    never = asyncio.Event()

    async def requests():
        await never.wait()
        yield pb.IngestImagesRequest()

    call = stub.IngestImages(requests())
    for _ in range(200):
        samples = await asyncio.to_thread(scrape, port)
        if value(samples, "vitrine_rpc_requests_in_flight", rpc=INGEST) == 1:
            break
        await asyncio.sleep(0.05)
    call.cancel()
    for _ in range(200):
        after = await asyncio.to_thread(scrape, port)
        if value(after, "vitrine_rpc_requests_in_flight", rpc=INGEST) == 0:
            break
        await asyncio.sleep(0.05)
    assert value(after, "vitrine_rpc_requests_in_flight", rpc=INGEST) == 0
    assert value(after, "vitrine_ingest_streams_in_flight") == 0
    cancelled = (value(after, "vitrine_rpc_requests_total", rpc=INGEST, code="CANCELLED")
                 - value(before, "vitrine_rpc_requests_total", rpc=INGEST, code="CANCELLED"))
    assert cancelled == 1


# --- request ids and logs ---------------------------------------------------------------------------------------

async def test_request_id_is_echoed_and_tags_every_log_line_of_the_call(service, stub, channel, demo):
    metadata = ((REQUEST_ID_KEY, "obs-test-0001"), ("authorization", f"Bearer {SECRET}"))
    with JsonLines() as logs:
        call = stub.SearchImages(pb.SearchImagesRequest(text="a handwritten digit four", top_k=3), metadata=metadata)
        await call
        assert (REQUEST_ID_KEY, "obs-test-0001") in tuple(await call.initial_metadata())

        plain = stub.SearchImages(pb.SearchImagesRequest(text="four", top_k=3))
        await plain
        generated = dict(await plain.initial_metadata())[REQUEST_ID_KEY]
        assert re.fullmatch(r"[0-9a-f]{32}", generated)

        forged = (REQUEST_ID_KEY, 'x y "forged"')  # a valid header value, not a plausible id: replaced
        bad = stub.SearchImages(pb.SearchImagesRequest(text="four"), metadata=(forged,))
        await bad
        assert re.fullmatch(r"[0-9a-f]{32}", dict(await bad.initial_metadata())[REQUEST_ID_KEY])

        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.SearchImages(pb.SearchImagesRequest(text="four", top_k=-1),
                                    metadata=((REQUEST_ID_KEY, "obs-test-bad"),))
        assert dict(info.value.initial_metadata())[REQUEST_ID_KEY] == "obs-test-bad"

        images = [png_bytes((i * 40, 255 - i * 40, 90)) for i in range(3)]
        ingest_call_id = (REQUEST_ID_KEY, "obs-test-ingest")
        responses = await ingest(stub, images, metadata=(ingest_call_id,))
        assert len(responses) == 3

    records = list(logs.records())
    assert SECRET not in logs.text and "authorization" not in logs.text.lower()
    for record in records:
        assert {"ts", "level", "logger", "message", "request_id", "rpc"} <= record.keys()

    access = [r for r in records if r["logger"] == "vitrine.access"]
    mine = [r for r in access if r["request_id"] == "obs-test-0001"]
    assert len(mine) == 1, access
    line = mine[0]
    assert line["level"] == "INFO" and line["rpc"] == SEARCH and line["code"] == "OK"
    assert isinstance(line["duration_ms"], float) and line["duration_ms"] > 0
    assert line["peer"].startswith(("ipv4:127.0.0.1:", "ipv6:"))
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["ts"])
    assert [r["code"] for r in access if r["request_id"] == generated] == ["OK"]
    assert [r["code"] for r in access if r["request_id"] == "obs-test-bad"] == ["INVALID_ARGUMENT"]
    assert not any("forged" in json.dumps(r) for r in records)

    # lines written inside the ingest stream's tasks carry the stream's id
    ingest_lines = [r for r in records if r["request_id"] == "obs-test-ingest"]
    assert {r["logger"] for r in ingest_lines} >= {"vitrine.access", "retrieval_service.usecases.ingest"}, ingest_lines
    assert all(r["rpc"] == INGEST for r in ingest_lines)


def test_request_id_from_metadata_accepts_plausible_ids_only():
    assert request_id_from_metadata([(REQUEST_ID_KEY, "abc-123_x.y:z")]) == "abc-123_x.y:z"
    for bad in ("", "a" * 129, "has space", "new\nline", "ünïcode"):
        assert re.fullmatch(r"[0-9a-f]{32}", request_id_from_metadata([(REQUEST_ID_KEY, bad)])), bad
    assert re.fullmatch(r"[0-9a-f]{32}", request_id_from_metadata([(REQUEST_ID_KEY + "-bin", b"\x00")]))
    assert request_id_from_metadata(None) != request_id_from_metadata(None)


def test_text_and_json_formats():
    logger = logging.getLogger("vitrine.test_observability")
    old_level, old_handlers = logging.getLogger().level, list(logging.getLogger().handlers)
    try:
        for fmt in ("text", "json"):
            buf = io.StringIO()
            handler = configure_logging(fmt, "INFO", stream=buf)
            logger.info("hello %s", "world", extra={"images": 3})
            try:
                raise ValueError("boom")
            except ValueError:
                logger.exception("failed")
            logging.getLogger().removeHandler(handler)
            lines = buf.getvalue().splitlines()
            if fmt == "text":
                assert re.search(r" INFO vitrine\.test_observability \[-\] hello world$", lines[0]), lines
                assert "ValueError: boom" in buf.getvalue()
            else:
                first, second = (json.loads(line) for line in lines)
                assert first["message"] == "hello world" and first["images"] == 3 and first["request_id"] is None
                assert second["level"] == "ERROR" and "ValueError: boom" in second["exc"]
        with pytest.raises(ValueError, match="log_format"):
            configure_logging("xml")  # type: ignore[arg-type]
    finally:
        logging.getLogger().handlers[:] = old_handlers
        logging.getLogger().setLevel(old_level)


# --- endpoint lifecycle, a port in use, auth rejections ---------------------------------------------------------

async def test_port_in_use_is_not_fatal_and_auth_rejections_are_counted(service, demo, encoder_server, tmp_path):
    """A second server asked for the first one's metrics port still serves (the error is logged); its calls
    rejected by the auth interceptor are counted, because the metrics interceptor is outermost."""
    taken = service.metrics_http.port
    token = "t" * 40
    settings = Settings(model_repository=demo.repository, encoder_url=encoder_server.grpc_url,
                        milvus_uri=str(tmp_path / "milvus.db"), blob_dir=tmp_path / "blobs", port=0,
                        metrics_port=taken, auth={"tokens": [token]})
    server = create_server(settings)
    with JsonLines() as logs:
        await server.start()
        try:
            assert server.metrics_http.port is None
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                stub = pb_grpc.RetrievalServiceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.GetCollectionStats(pb.GetCollectionStatsRequest(),
                                                  metadata=(("authorization", "Bearer wrong-" + "w" * 40),))
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
                await stub.GetCollectionStats(pb.GetCollectionStatsRequest(),
                                              metadata=(("authorization", f"Bearer {token}"),))
            registry = server.metrics.registry
            assert registry.get_sample_value("vitrine_rpc_requests_total",
                                             {"rpc": STATS, "code": "UNAUTHENTICATED"}) == 1
            assert registry.get_sample_value("vitrine_rpc_requests_total", {"rpc": STATS, "code": "OK"}) == 1
        finally:
            await server.stop(grace_s=1)
    assert token not in logs.text and "wrong-" not in logs.text
    assert any(r["level"] == "ERROR" and "metrics endpoint not started" in r["message"] for r in logs.records())
    # the first server's registry did not see the second server's calls
    samples = await asyncio.to_thread(scrape, taken)
    assert value(samples, "vitrine_rpc_requests_total", rpc=STATS, code="UNAUTHENTICATED") == 0


async def test_metrics_endpoint_stops_with_the_server(demo, encoder_server, tmp_path):
    settings = Settings(model_repository=demo.repository, encoder_url=encoder_server.grpc_url,
                        milvus_uri=str(tmp_path / "milvus.db"), blob_dir=tmp_path / "blobs", port=0, metrics_port=0)
    server = create_server(settings)
    await server.start()
    port = server.metrics_http.port
    try:
        assert value(await asyncio.to_thread(scrape, port), "vitrine_ingest_streams_in_flight") == 0
    finally:
        await server.stop(grace_s=1)
    with pytest.raises(urllib.error.URLError):
        await asyncio.to_thread(scrape, port)

    off = create_server(settings.model_copy(update={"metrics_port": -1}))
    await off.start()
    try:
        assert off.metrics_http.port is None
    finally:
        await off.stop(grace_s=1)
