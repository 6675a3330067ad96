"""Health transitions and dependency failures of the retrieval service, and the serving process' imports."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from retrieval_service.grpc.server import create_server
from retrieval_service.settings import Settings
from tools.processes import free_port, spawn
from vitrine.v1 import retrieval_service_pb2 as pb
from vitrine.v1 import retrieval_service_pb2_grpc as pb_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def status_of(port: int) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        resp = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="vitrine.v1.RetrievalService"), timeout=5)
        return resp.status


async def wait_status(port: int, wanted: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (status := await status_of(port)) != wanted:
        assert time.monotonic() < deadline, f"health stayed {status}, wanted {wanted}"
        await asyncio.sleep(0.2)


def tiny_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.asyncio(loop_scope="session")
async def test_health_follows_the_encoder(demo, tmp_path):
    encoder_port = free_port()
    settings = Settings(model_repository=demo.repository, encoder_url=f"127.0.0.1:{encoder_port}",
                        milvus_uri=str(tmp_path / "milvus.db"), blob_dir=tmp_path / "blobs", port=0,
                        health_interval_s=0.2, encoder_timeout_s=5)
    server = create_server(settings)
    await server.start()
    encoder = None
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.RetrievalServiceStub(channel)
            assert await status_of(server.port) == NOT_SERVING  # no encoder yet
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.SearchImages(pb.SearchImagesRequest(text="seven"))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE

            async def one():
                yield pb.IngestImagesRequest(index=0, content=tiny_png())

            (resp,) = [r async for r in stub.IngestImages(one())]
            assert resp.outcome == pb.IngestImagesResponse.REJECTED
            assert resp.error.code == grpc.StatusCode.UNAVAILABLE.value[0]

            # the encoder in its own process, as in production: started late, killed later
            encoder = spawn("encoder", ["serve-encoder", "--repository", str(demo.repository),
                                        "--grpc-port", str(encoder_port), "--http-port", str(free_port()),
                                        "--metrics-port", str(free_port())], tmp_path)
            await wait_status(server.port, SERVING, timeout_s=120)
            (resp,) = [r async for r in stub.IngestImages(one())]
            assert resp.outcome == pb.IngestImagesResponse.INSERTED
            found = await stub.SearchImages(pb.SearchImagesRequest(text="seven", top_k=5))
            assert [r.image.image_id for r in found.results] == [resp.image_id]

            os.killpg(encoder.proc.pid, signal.SIGKILL)  # the whole process group, tritonserver included
            encoder.proc.wait()
            await wait_status(server.port, NOT_SERVING)
            with pytest.raises(grpc.aio.AioRpcError) as info:  # a text never asked: it needs the encoder
                await stub.SearchImages(pb.SearchImagesRequest(text="eight"))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            # a text asked while the encoder was up comes from the query embedding cache and still answers
            cached = await stub.SearchImages(pb.SearchImagesRequest(text="seven", top_k=5))
            assert [r.image.image_id for r in cached.results] == [resp.image_id] and cached.encode_ms == 0
            stats = await stub.GetCollectionStats(pb.GetCollectionStatsRequest())  # Milvus still answers
            assert stats.image_count == 1
    finally:
        if encoder is not None:
            encoder.stop()
        await server.stop(grace_s=1)


@pytest.mark.asyncio(loop_scope="session")
async def test_unreachable_milvus_is_unavailable_and_not_serving(demo, encoder_server, tmp_path):
    settings = Settings(model_repository=demo.repository, encoder_url=encoder_server.grpc_url,
                        milvus_uri=f"http://127.0.0.1:{free_port()}", blob_dir=tmp_path / "blobs", port=0,
                        health_interval_s=0.5)
    server = create_server(settings)
    await server.start()  # must not crash: Milvus is down
    try:
        assert await status_of(server.port) == NOT_SERVING
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.RetrievalServiceStub(channel)
            for call in (stub.SearchImages(pb.SearchImagesRequest(text="seven")),
                         stub.GetCollectionStats(pb.GetCollectionStatsRequest())):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
    finally:
        await server.stop(grace_s=1)


def test_serving_process_never_imports_torch(demo, encoder_server, tmp_path):
    """`vitrine serve` in its own process: SERVING, and no torch library mapped into it."""
    from vitrine.client import VitrineClient

    port = free_port()
    child = spawn("retrieval", ["serve", "--repository", str(demo.repository), "--port", str(port),
                                "--encoder-url", encoder_server.grpc_url, "--milvus-uri", str(tmp_path / "m.db"),
                                "--blob-dir", str(tmp_path / "blobs")], tmp_path)
    try:
        with VitrineClient(f"127.0.0.1:{port}") as client:
            client.wait_serving(timeout_s=90)
            assert client.search(text="the number 3", top_k=1).model_id == demo.manifest.model_id
        maps = Path(f"/proc/{child.proc.pid}/maps").read_text()
        assert "libtorch" not in maps and "/torch/" not in maps and "open_clip" not in maps
    finally:
        assert child.stop() == 0, child.tail()
