"""Failure tests on loopback with real parts: kill the encoder mid-ingest, restart the Milvus server mid-ingest,
SIGTERM the service with calls in flight.

Guarantees checked (proto `IngestImages`): every item gets exactly one answer; items hit by the failure come back
REJECTED with UNAVAILABLE, the stream itself never fails; the service keeps running, its health goes
NOT_SERVING and back to SERVING when the dependency returns; re-sending the same images ends with one row per
unique image (none duplicated, none lost). Recovery times are printed on a `FIGURES` line (`pytest -s`).
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable

import grpc
import pytest
from google.rpc import code_pb2

from retrieval_service.grpc.server import create_server
from retrieval_service.settings import Settings
from stack_helpers import (
    NOT_SERVING,
    SERVING,
    EncoderProcess,
    MilvusProcess,
    sha256_hex,
    start_service,
    stored_ids,
    unique_images,
    wait_health,
)
from vitrine.v1 import retrieval_service_pb2 as pb
from vitrine.v1 import retrieval_service_pb2_grpc as pb_grpc

Outcome = pb.IngestImagesResponse.Outcome
N_IMAGES = 300  # a stream of a few hundred unique demo digits


def figures(name: str, **values: object) -> None:
    """Print measured figures on one greppable line."""
    print("FIGURES", json.dumps({"test": name, **values}))


async def paced_ingest(
    stub: pb_grpc.RetrievalServiceStub,
    items: list[tuple[bytes, str, dict]],
    *,
    pace_s: float = 0.0,
    fail_at: int | None = None,
    fail: Callable[[], Awaitable[None]] | None = None,
    on_response: Callable[[pb.IngestImagesResponse], None] | None = None,
) -> dict[int, pb.IngestImagesResponse]:
    """Stream `items` (one every `pace_s` seconds), run `fail()` just before sending item `fail_at`;
    return the answers by index. Fails if an item is answered twice or the stream ends with an error."""

    async def requests():
        for i, (content, filename, meta) in enumerate(items):
            if i == fail_at and fail is not None:
                await fail()
            req = pb.IngestImagesRequest(index=i, content=content, filename=filename)
            req.metadata.update(meta)
            yield req
            if pace_s:
                await asyncio.sleep(pace_s)

    answers: dict[int, pb.IngestImagesResponse] = {}
    async for resp in stub.IngestImages(requests()):
        assert resp.index not in answers, f"item {resp.index} answered twice"
        answers[resp.index] = resp
        if on_response is not None:
            on_response(resp)
    return answers


def check_outcomes(answers: dict[int, pb.IngestImagesResponse], items: list[tuple[bytes, str, dict]]) -> dict:
    """Every item answered once, with its id; only INSERTED, ALREADY_PRESENT or REJECTED-UNAVAILABLE.
    Returns the outcome counts."""
    assert sorted(answers) == list(range(len(items))), "some items got no answer"
    counts: collections.Counter = collections.Counter()
    for i, resp in answers.items():
        assert resp.image_id == sha256_hex(items[i][0])
        if resp.outcome == Outcome.REJECTED:
            assert resp.error.code == code_pb2.UNAVAILABLE, (i, resp.error)
            counts["REJECTED_UNAVAILABLE"] += 1
        else:
            assert resp.outcome in (Outcome.INSERTED, Outcome.ALREADY_PRESENT), (i, resp)
            counts[Outcome.Name(resp.outcome)] += 1
    return dict(counts)


async def reingest_and_check(stub, items, uri: str, collection: str) -> dict:
    """Re-send every image; afterwards the collection holds each unique image exactly once."""
    again = await paced_ingest(stub, items)
    assert sorted(again) == list(range(len(items)))
    bad = [r for r in again.values() if r.outcome not in (Outcome.INSERTED, Outcome.ALREADY_PRESENT)]
    assert not bad, bad[:3]
    stats = await stub.GetCollectionStats(pb.GetCollectionStatsRequest())
    ids = await asyncio.to_thread(stored_ids, uri, collection)
    expected = {sha256_hex(c) for c, _, _ in items}
    assert len(ids) == len(set(ids)), "duplicate rows"
    assert set(ids) == expected, f"lost {len(expected - set(ids))}, unexpected {len(set(ids) - expected)}"
    assert stats.image_count == len(expected)
    return dict(collections.Counter(Outcome.Name(r.outcome) for r in again.values()))


# --- 1. the encoder dies mid-ingest -----------------------------------------------------------------------------

@pytest.mark.asyncio(loop_scope="session")
async def test_encoder_killed_mid_ingest_then_restarted(demo, tmp_path):
    items = unique_images(demo, N_IMAGES)
    encoder = EncoderProcess(demo.repository, tmp_path / "logs")
    await asyncio.to_thread(encoder.start)
    await asyncio.to_thread(encoder.wait_ready)
    uri = str(tmp_path / "milvus.db")
    settings = Settings(model_repository=demo.repository, encoder_url=encoder.url, milvus_uri=uri,
                        blob_dir=tmp_path / "blobs", port=0, health_interval_s=0.2, encoder_timeout_s=5,
                        ingest_batch_size=16)
    server = create_server(settings)
    await server.start()
    target = f"127.0.0.1:{server.port}"
    try:
        await wait_health(target, SERVING, 60)
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.RetrievalServiceStub(channel)

            async def kill() -> None:
                await asyncio.to_thread(encoder.kill)

            answers = await paced_ingest(stub, items, pace_s=0.01, fail_at=N_IMAGES // 3, fail=kill)
            counts = check_outcomes(answers, items)
            assert counts.get("INSERTED", 0) > 0, counts  # the first third went in before the kill
            assert counts.get("REJECTED_UNAVAILABLE", 0) > 0, counts  # the rest could not be encoded
            not_serving_s = await wait_health(target, NOT_SERVING, 30)
            # the service is up: Milvus answers, and what was reported INSERTED is stored
            stats = await stub.GetCollectionStats(pb.GetCollectionStatsRequest())
            assert stats.image_count == counts["INSERTED"]
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.SearchImages(pb.SearchImagesRequest(text="seven"))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE

            restarted = time.monotonic()
            await asyncio.to_thread(encoder.start)
            encoder_ready = asyncio.create_task(asyncio.to_thread(encoder.wait_ready))
            await wait_health(target, SERVING, 180)
            recovery_s = time.monotonic() - restarted
            ready_s = await encoder_ready
            assert len((await stub.SearchImages(pb.SearchImagesRequest(text="seven", top_k=3))).results) == 3
            reingest = await reingest_and_check(stub, items, uri, server.store.collection)
        figures("encoder_killed_mid_ingest", images=len(items), first_pass=counts, reingest=reingest,
                not_serving_after_s=round(not_serving_s, 3),
                recovery_s_restart_to_serving=round(recovery_s, 3),
                encoder_boot_s=round(ready_s, 3), serving_after_encoder_ready_s=round(recovery_s - ready_s, 3))
    finally:
        await server.stop(grace_s=1)
        await asyncio.to_thread(encoder.stop)


# --- 2. the Milvus server restarts mid-ingest -------------------------------------------------------------------

@pytest.mark.asyncio(loop_scope="session")
async def test_milvus_restarted_mid_ingest(demo, encoder_server, tmp_path):
    items = unique_images(demo, N_IMAGES)
    milvus = MilvusProcess(tmp_path / "milvus")
    await asyncio.to_thread(milvus.start)
    settings = Settings(model_repository=demo.repository, encoder_url=encoder_server.grpc_url,
                        milvus_uri=milvus.uri, blob_dir=tmp_path / "blobs", port=0, health_interval_s=0.2,
                        ingest_batch_size=16)
    server = create_server(settings)
    await server.start()
    target = f"127.0.0.1:{server.port}"
    restart: asyncio.Task | None = None
    marks: dict[str, float] = {}
    try:
        await wait_health(target, SERVING, 60)
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.RetrievalServiceStub(channel)

            async def stop_milvus() -> None:
                marks["stopped"] = time.monotonic()
                await asyncio.to_thread(milvus.stop)

            async def start_again() -> float:
                marks["restart"] = time.monotonic()
                return await asyncio.to_thread(milvus.start)

            def on_response(resp: pb.IngestImagesResponse) -> None:
                nonlocal restart
                if resp.outcome == Outcome.REJECTED and restart is None:  # the outage was seen: bring it back
                    marks["first_rejected"] = time.monotonic()
                    restart = asyncio.create_task(start_again())

            answers = await paced_ingest(stub, items, pace_s=0.01, fail_at=N_IMAGES // 3, fail=stop_milvus,
                                         on_response=on_response)
            counts = check_outcomes(answers, items)
            assert counts.get("INSERTED", 0) > 0, counts
            assert counts.get("REJECTED_UNAVAILABLE", 0) > 0, counts
            assert restart is not None
            boot_s = await restart
            await wait_health(target, SERVING, 180)
            recovery_s = time.monotonic() - marks["restart"]
            inserted = {sha256_hex(items[i][0]) for i, r in answers.items() if r.outcome == Outcome.INSERTED}
            ids = await asyncio.to_thread(stored_ids, milvus.uri, server.store.collection)
            assert inserted <= set(ids), f"{len(inserted - set(ids))} items reported INSERTED were lost"
            reingest = await reingest_and_check(stub, items, milvus.uri, server.store.collection)
        figures("milvus_restarted_mid_ingest", images=len(items), first_pass=counts, reingest=reingest,
                first_rejection_after_stop_s=round(marks["first_rejected"] - marks["stopped"], 3),
                recovery_s_restart_to_serving=round(recovery_s, 3), milvus_boot_s=round(boot_s, 3),
                serving_after_milvus_up_s=round(recovery_s - boot_s, 3))
    finally:
        await server.stop(grace_s=1)
        if restart is not None and not restart.done():
            await restart
        await asyncio.to_thread(milvus.stop)


# --- 5. graceful shutdown -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fake_gemini():
    from fake_gemini import FakeGemini  # noqa: PLC0415

    with FakeGemini() as fake:
        yield fake


def test_sigterm_drains_in_flight_calls_and_exits_0(demo, encoder_server, fake_gemini, tmp_path):
    """A slow GenerateImages stream and an ingest stream still sending are in flight at SIGTERM: both complete
    OK, new calls are refused, the process exits 0 within its grace period (10 s, retrieval_service.grpc.server)."""
    items = unique_images(demo, 40)
    svc = start_service(demo.repository, encoder_server.grpc_url, str(tmp_path / "m.db"), tmp_path / "blobs",
                        tmp_path, env={"VITRINE_GENERATION__API_KEY": "test-key-0123456789",
                                       "VITRINE_GENERATION__BASE_URL": fake_gemini.base_url})
    sent_before = threading.Event()
    signalled = threading.Event()
    ingest_answers: list[pb.IngestImagesResponse] = []
    ingest_error: list[BaseException] = []
    try:
        with grpc.insecure_channel(svc.target) as channel:
            stub = pb_grpc.RetrievalServiceStub(channel)

            def slow_requests():
                for i, (content, filename, meta) in enumerate(items):
                    if i == 5:
                        sent_before.set()
                    if i == 20:
                        signalled.wait(30)  # half the stream is sent after SIGTERM
                    req = pb.IngestImagesRequest(index=i, content=content, filename=filename)
                    req.metadata.update(meta)
                    yield req
                    time.sleep(0.05)

            def run_ingest() -> None:
                try:
                    ingest_answers.extend(stub.IngestImages(slow_requests(), timeout=60))
                except grpc.RpcError as exc:
                    ingest_error.append(exc)

            ingester = threading.Thread(target=run_ingest)
            ingester.start()
            generation = stub.GenerateImages(pb.GenerateImagesRequest(prompt="[fake:slow=100] a long story"),
                                             timeout=60)
            received = [next(generation), next(generation)]  # references, first text chunk: mid-stream now
            assert [m.WhichOneof("event") for m in received] == ["references", "text"]
            assert sent_before.wait(30)
            sigterm_at = time.monotonic()
            svc.child.proc.send_signal(signal.SIGTERM)
            signalled.set()

            refused = None
            deadline = time.monotonic() + 5
            while refused is None and time.monotonic() < deadline:  # new calls are refused once it stops
                try:
                    with grpc.insecure_channel(svc.target) as fresh:
                        pb_grpc.RetrievalServiceStub(fresh).GetCollectionStats(pb.GetCollectionStatsRequest(),
                                                                                timeout=2)
                    time.sleep(0.05)
                except grpc.RpcError as exc:
                    refused = exc.code()
            # grpc.aio answers a call that reaches a stopping server CANCELLED, one that finds the port closed
            # UNAVAILABLE; both are refusals (never OK, never a hang)
            assert refused in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), refused

            received.extend(generation)  # the in-flight stream runs to its end
            kinds = [m.WhichOneof("event") for m in received]
            assert kinds[-1] == "finished" and received[-1].finished.finish_reason == "STOP"
            assert kinds.count("text") == 30 and "image" in kinds
            ingester.join(60)
            assert not ingest_error, ingest_error
            assert sorted(r.index for r in ingest_answers) == list(range(len(items)))
            assert {r.outcome for r in ingest_answers} == {Outcome.INSERTED}
        code = svc.child.proc.wait(timeout=20)
        exit_s = time.monotonic() - sigterm_at
        assert code == 0, svc.child.tail()
        assert exit_s < 10 + 5  # grace period of serve() plus process teardown
        figures("sigterm_graceful_shutdown", exit_code=code, sigterm_to_exit_s=round(exit_s, 3),
                generation_messages_after_sigterm=len(received) - 2,
                new_call_refused_with=refused.name, ingest_items_answered=len(ingest_answers))
    finally:
        if svc.child.alive():
            os.killpg(svc.child.proc.pid, signal.SIGKILL)
