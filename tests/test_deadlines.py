"""Caller deadlines (retrieval_service.deadlines): every encoder and Milvus call is bounded by the caller's
gRPC deadline and by its own setting (`encoder_timeout_s`, `milvus_timeout_s`).

A frozen dependency (SIGSTOP: the process holds its sockets open and answers nothing, the way a hung or
swapping server does) makes callers fail within min(caller's deadline, setting) + slack instead of hanging
until it wakes:
    * the caller's deadline binds -> DEADLINE_EXCEEDED (the caller's time is spent; health is not blamed)
    * the setting binds, or no deadline -> UNAVAILABLE, and the dependency is marked down (NOT_SERVING)
Health goes NOT_SERVING while it is frozen and SERVING again after SIGCONT. The only times asserted are those
bounds, with generous slack.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import psutil
import pytest
from google.rpc import code_pb2

from retrieval_service import deadlines
from retrieval_service.adapters.milvus import Row, VectorStore
from retrieval_service.adapters.milvus.async_store import AsyncVectorStore
from retrieval_service.deadlines import DeadlineExceededError, remaining, scope
from retrieval_service.errors import DependencyUnavailableError
from retrieval_service.grpc.server import create_server
from retrieval_service.grpc.status import ErrorMapper
from retrieval_service.settings import Settings
from stack_helpers import NOT_SERVING, SERVING, EncoderProcess, wait_health
from vitrine.tokenizer import TextTokenizer
from vitrine.v1 import retrieval_service_pb2 as pb
from vitrine.v1 import retrieval_service_pb2_grpc as pb_grpc

#: Added to every bound: scheduling on 2 busy cores, gRPC connection handling, the health poll period.
SLACK_S = 3.0


# --- remaining(), scope(), check(): no servers --------------------------------------------------------------

def test_remaining_without_a_deadline_is_the_cap():
    assert deadlines.deadline() is None and deadlines.time_left() is None
    assert remaining(7.5) == 7.5
    assert not deadlines.expired()
    deadlines.check()  # no deadline: nothing to exceed


def test_remaining_is_the_smaller_of_the_cap_and_the_time_left():
    with scope(100.0) as at:
        assert at is not None and deadlines.deadline() == at
        assert 99.0 < remaining(1000.0) <= 100.0  # the caller's deadline binds
        assert remaining(2.0) == 2.0  # the setting binds
    assert deadlines.deadline() is None  # the block's deadline is gone after it


def test_remaining_has_a_floor_then_raises_once_the_deadline_passed():
    with scope(0.0):
        assert deadlines.expired()
        with pytest.raises(DeadlineExceededError, match="deadline passed"):
            remaining(5.0)
        with pytest.raises(DeadlineExceededError):
            deadlines.check()
    with scope(deadlines.MIN_TIMEOUT_S / 2):  # less time left than the floor
        try:
            assert remaining(5.0) == deadlines.MIN_TIMEOUT_S  # a short real timeout, never 0 or negative
        except DeadlineExceededError:
            pass  # the 0.5 ms passed before remaining() looked: raising is then the right answer


def test_nested_scopes_never_extend_the_outer_deadline():
    with scope(10.0) as outer:
        with scope(3600.0) as inner:
            assert inner == outer
        with scope(1.0) as tighter:
            assert tighter < outer
            assert remaining(60.0) <= 1.0
        with scope(None) as unchanged:  # no deadline from this caller: the outer one still applies
            assert unchanged == outer
        assert deadlines.deadline() == outer


async def test_the_deadline_follows_tasks_and_copied_contexts_not_bare_executor_threads():
    """What AsyncVectorStore relies on: asyncio copies the context into tasks, run_in_executor does not."""
    async def read() -> float | None:
        return deadlines.deadline()

    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(1) as pool, scope(30.0) as at:
        assert await asyncio.create_task(read()) == at
        assert await loop.run_in_executor(pool, deadlines.deadline) is None
        assert await loop.run_in_executor(pool, contextvars.copy_context().run, deadlines.deadline) == at


def test_deadline_exceeded_is_DEADLINE_EXCEEDED_and_blames_no_dependency():
    down: list[str] = []
    errors = ErrorMapper(down.append)
    status = errors.status(DeadlineExceededError("the caller's deadline passed during inference"))
    assert status.code == code_pb2.DEADLINE_EXCEEDED
    assert "deadline" in status.message
    assert down == []  # health is not affected by a caller's short deadline
    assert errors.status(DependencyUnavailableError("encoder", "no answer")).code == code_pb2.UNAVAILABLE
    assert down == ["encoder"]


# --- AsyncVectorStore: the caller's deadline crosses the thread hop, and bounds the caller's wait -----------

def _row(i: int, dim: int = 4) -> Row:
    vector = np.zeros(dim, dtype=np.float32)
    vector[i % dim] = 1.0
    return Row(id=hashlib.sha256(f"row-{i}".encode()).hexdigest(), embedding=vector, filename=f"{i}.png",
               ingest_time_ms=1_700_000_000_000 + i)


async def test_milvus_calls_see_the_callers_deadline_in_their_thread(tmp_path):
    store = AsyncVectorStore(VectorStore(str(tmp_path / "m.db"), "deadlines", 4), ThreadPoolExecutor(1))
    try:
        await store.open()
        with scope(30.0) as at:
            assert await store._run(deadlines.deadline) == at  # noqa: SLF001 - the hop itself
            assert await store.insert([_row(0)]) == 1
            await store.flush()
            assert await store.count() == 1
        assert await store._run(deadlines.deadline) is None  # noqa: SLF001
    finally:
        store.shutdown()


async def test_a_stuck_milvus_thread_does_not_hold_the_caller_past_its_deadline(tmp_path):
    """The store's only thread is busy (stuck); a call with a 0.5 s deadline gives up at its deadline, and the
    queued call never reaches Milvus; without a deadline the caller waits for the thread."""
    store = AsyncVectorStore(VectorStore(str(tmp_path / "m.db"), "deadlines", 4), ThreadPoolExecutor(1))
    calls: list[tuple[str, bool]] = []
    try:
        await store.open()
        store.sync.call_observer = lambda operation, _s, failed: calls.append((operation, failed))
        loop = asyncio.get_running_loop()
        release = threading.Event()
        stuck = loop.run_in_executor(store.executor, release.wait, 60)
        try:
            started = time.monotonic()
            with scope(0.5), pytest.raises(DeadlineExceededError, match="did not finish before"):
                await store.count()
            assert time.monotonic() - started < 0.5 + SLACK_S
            waiting = asyncio.create_task(store.count())  # no deadline: waits for the thread
            await asyncio.sleep(0.2)
            assert not waiting.done()
        finally:
            release.set()
        assert await stuck
        assert await waiting == 0
        assert calls == [("count", False)]  # only the call without a deadline ran
        with scope(0.0), pytest.raises(DeadlineExceededError):  # already passed: refused before queueing
            await store.count()
        assert calls == [("count", False)]
    finally:
        store.shutdown()


# --- a frozen Milvus server (SIGSTOP) -----------------------------------------------------------------------

@pytest.mark.milvus_server
async def test_a_frozen_milvus_server_fails_callers_within_the_bound(tmp_path):
    from milvus_server import BIN_CACHE  # noqa: PLC0415
    from tools.milvus_server import start_milvus_server_process  # noqa: PLC0415

    milvus_timeout_s = 2.0
    server = await asyncio.to_thread(start_milvus_server_process, tmp_path / "milvus", bin_cache=BIN_CACHE)
    store = AsyncVectorStore(VectorStore(server.uri, "deadlines", 4, timeout_s=milvus_timeout_s))
    frozen: list[psutil.Process] = []
    try:
        await store.open()
        await store.insert([_row(0)])
        assert await store.count() == 1
        root = psutil.Process(server.pid)
        frozen = [root, *root.children(recursive=True)]
        for proc in frozen:
            proc.suspend()  # SIGSTOP
        try:
            started = time.monotonic()
            with scope(0.75), pytest.raises(DeadlineExceededError):
                await store.count()
            assert time.monotonic() - started < 0.75 + SLACK_S
            started = time.monotonic()
            with pytest.raises(DependencyUnavailableError):  # no caller deadline: milvus_timeout_s binds
                await store.count()
            assert time.monotonic() - started < milvus_timeout_s + SLACK_S
            started = time.monotonic()
            with scope(60.0), pytest.raises(DependencyUnavailableError):  # a longer deadline changes nothing
                await store.count()
            assert time.monotonic() - started < milvus_timeout_s + SLACK_S
        finally:
            for proc in frozen:
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.resume()  # SIGCONT
        for _ in range(60):  # answers again (the first calls may still meet the reconnecting channel)
            try:
                assert await store.count() == 1
                break
            except DependencyUnavailableError:
                await asyncio.sleep(0.5)
        else:
            pytest.fail("Milvus did not answer again after SIGCONT")
    finally:
        for proc in frozen:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.resume()
        await asyncio.to_thread(store.shutdown)
        await asyncio.to_thread(server.stop)


# --- a frozen encoder (SIGSTOP), through the whole service --------------------------------------------------

def _freeze(encoder: EncoderProcess, sig: int) -> None:
    """Send `sig` to the encoder's whole process group: the PyTriton process, tritonserver and its stubs."""
    assert encoder.child is not None
    os.killpg(encoder.child.proc.pid, sig)


async def _search_error(stub: pb_grpc.RetrievalServiceStub, text: str, timeout: float | None
                        ) -> tuple[grpc.StatusCode, float]:
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.SearchImages(pb.SearchImagesRequest(text=text, top_k=1), timeout=timeout)
    return info.value.code(), time.monotonic() - started


async def test_a_frozen_encoder_fails_callers_within_the_bound(demo, tmp_path):
    encoder_timeout_s = 3.0
    caller_deadline_s = 1.0
    encoder = EncoderProcess(demo.repository, tmp_path / "logs")
    await asyncio.to_thread(encoder.start)
    frozen = False
    server = None
    try:
        await asyncio.to_thread(encoder.wait_ready)
        settings = Settings(model_repository=demo.repository, encoder_url=encoder.url,
                            milvus_uri=str(tmp_path / "milvus.db"), blob_dir=tmp_path / "blobs", port=0,
                            health_interval_s=0.2, encoder_timeout_s=encoder_timeout_s)
        server = create_server(settings)
        await server.start()
        target = f"127.0.0.1:{server.port}"
        await wait_health(target, SERVING, 120)
        tokens = TextTokenizer.from_repository(demo.repository).encode_batch(["a handwritten digit four"])
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.RetrievalServiceStub(channel)
            # a first search while it answers: the encoder's model configs are checked and cached
            await stub.SearchImages(pb.SearchImagesRequest(text="zero", top_k=1), timeout=60)
            _freeze(encoder, signal.SIGSTOP)
            frozen = True
            # every query text is new, so no embedding cache can answer for the encoder
            code, took = await _search_error(stub, "one", timeout=caller_deadline_s)
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert took < caller_deadline_s + SLACK_S
            code, took = await _search_error(stub, "two", timeout=None)  # no deadline: encoder_timeout_s
            assert code == grpc.StatusCode.UNAVAILABLE
            assert took < encoder_timeout_s + SLACK_S
            code, took = await _search_error(stub, "three", timeout=60)  # a long deadline changes nothing
            assert code == grpc.StatusCode.UNAVAILABLE
            assert took < encoder_timeout_s + SLACK_S
            # the adapter itself, under a caller deadline and without one
            started = time.monotonic()
            with scope(caller_deadline_s), pytest.raises(DeadlineExceededError):
                await server.encoder.encode_texts(tokens)
            assert time.monotonic() - started < caller_deadline_s + SLACK_S
            started = time.monotonic()
            with pytest.raises(DependencyUnavailableError):
                await server.encoder.encode_texts(tokens)
            assert time.monotonic() - started < encoder_timeout_s + SLACK_S
            await wait_health(target, NOT_SERVING, 30)
            _freeze(encoder, signal.SIGCONT)
            frozen = False
            await wait_health(target, SERVING, 120)
            found = await stub.SearchImages(pb.SearchImagesRequest(text="five", top_k=1), timeout=60)
            assert found.model_id == demo.manifest.model_id
    finally:
        if frozen:
            _freeze(encoder, signal.SIGCONT)
        if server is not None:
            await server.stop(grace_s=1)
        await asyncio.to_thread(encoder.stop)
