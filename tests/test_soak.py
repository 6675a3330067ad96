"""Soak: 64 concurrent clients (each with its own grpc.aio channel) mixing text / image / stored-id searches and
small ingest streams against `vitrine serve` as a child process (real Triton, Milvus Lite) for a bounded time.

Asserts 0 errors and bounded memory: the service process' RSS (psutil, the child process alone — Milvus Lite's
server and Triton are other processes) after the run may exceed its RSS after a warm-up by at most
`RSS_GROWTH_BOUND` (64 MiB or 25 %, whichever is larger). Figures on a `FIGURES` line (`pytest -s`).

Duration: `VITRINE_SOAK_S` seconds (default 30; warm-up 5 s more). A longer manual run:
    VITRINE_SOAK_S=600 pytest tests/test_soak.py -s
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import random
import time

import grpc
import pytest

from stack_helpers import start_service, unique_images
from vitrine.v1 import retrieval_service_pb2 as pb
from vitrine.v1 import retrieval_service_pb2_grpc as pb_grpc

CLIENTS = 64
SOAK_S = float(os.environ.get("VITRINE_SOAK_S", "30"))
WARMUP_S = 5.0
MiB = 1024 * 1024
TEXTS = ["a handwritten digit seven", "the number 3", "手写数字零", "zero", "a photo of the digit 8", "nine",
         "eine handgeschriebene Vier", "digit two, thick strokes"]
Outcome = pb.IngestImagesResponse.Outcome


def rss_growth_bound(before: int) -> int:
    """Largest RSS growth accepted over the soak, bytes: 64 MiB or 25 % of the warmed-up RSS."""
    return max(64 * MiB, before // 4)


@pytest.fixture(scope="module")
def soak_service(demo, encoder_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("soak")
    svc = start_service(demo.repository, encoder_server.grpc_url, str(tmp / "m.db"), tmp / "blobs", tmp)
    try:
        yield svc
    finally:
        assert svc.child.stop() == 0, svc.child.tail()


async def client(target: str, until: float, pool: list[tuple[bytes, str, dict]], ids: list[str],
                 tally: collections.Counter, errors: list[str], seed: int) -> None:
    """One client on its own channel: 70 % text, 10 % image, 10 % stored-id searches, 10 % ingest streams."""
    rnd = random.Random(seed)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.RetrievalServiceStub(channel)
        while time.monotonic() < until:
            r = rnd.random()
            try:
                if r < 0.7:
                    await stub.SearchImages(pb.SearchImagesRequest(text=rnd.choice(TEXTS), top_k=rnd.randint(1, 20)),
                                            timeout=60)
                    tally["search_text"] += 1
                elif r < 0.8:
                    await stub.SearchImages(pb.SearchImagesRequest(image=rnd.choice(pool)[0], top_k=10), timeout=60)
                    tally["search_image"] += 1
                elif r < 0.9:
                    await stub.SearchImages(pb.SearchImagesRequest(image_id=rnd.choice(ids), top_k=10,
                                                                   filter='metadata["label"] >= 0'), timeout=60)
                    tally["search_id"] += 1
                else:
                    batch = rnd.sample(pool, rnd.randint(1, 4))
                    reqs = []
                    for i, (content, filename, meta) in enumerate(batch):
                        req = pb.IngestImagesRequest(index=i, content=content, filename=filename)
                        req.metadata.update(meta)
                        reqs.append(req)
                    answers = [a async for a in stub.IngestImages(iter(reqs), timeout=60)]
                    tally["ingest_streams"] += 1
                    tally["ingest_items"] += len(answers)
                    if len(answers) != len(reqs):
                        errors.append(f"ingest answered {len(answers)} of {len(reqs)} items")
                    errors.extend(f"ingest item rejected: {a.error.message}" for a in answers
                                  if a.outcome == Outcome.REJECTED)
            except grpc.aio.AioRpcError as exc:
                errors.append(f"{exc.code().name}: {exc.details()}")


async def run_clients(target: str, seconds: float, pool: list[tuple[bytes, str, dict]], ids: list[str],
                      ) -> tuple[collections.Counter, list[str], float]:
    """Run CLIENTS clients for `seconds`; return (request tally, error messages, elapsed seconds)."""
    tally: collections.Counter = collections.Counter()
    errors: list[str] = []
    t0 = time.monotonic()
    await asyncio.gather(*(client(target, t0 + seconds, pool, ids, tally, errors, seed) for seed in range(CLIENTS)))
    return tally, errors, time.monotonic() - t0


@pytest.mark.asyncio(loop_scope="session")
async def test_soak_64_clients_search_and_ingest(soak_service, demo):
    pool = unique_images(demo, 600)
    seed_items = pool[:50]
    async with grpc.aio.insecure_channel(soak_service.target) as channel:
        stub = pb_grpc.RetrievalServiceStub(channel)
        reqs = [pb.IngestImagesRequest(index=i, content=c, filename=f) for i, (c, f, _) in enumerate(seed_items)]
        ids = [a.image_id async for a in stub.IngestImages(iter(reqs))]
    warm, warm_errors, _ = await run_clients(soak_service.target, WARMUP_S, pool, ids)
    assert not warm_errors, warm_errors[:5]
    rss_before = soak_service.rss_bytes
    tally, errors, elapsed = await run_clients(soak_service.target, SOAK_S, pool, ids)
    rss_after = soak_service.rss_bytes
    requests = tally["search_text"] + tally["search_image"] + tally["search_id"] + tally["ingest_streams"]
    print("FIGURES", json.dumps({
        "test": "soak", "clients": CLIENTS, "seconds": round(elapsed, 1), "requests": requests,
        "requests_per_s": round(requests / elapsed, 1), "errors": len(errors), "mix": dict(tally),
        "rss_measured": "service child process (psutil), after 5 s warm-up and after the soak",
        "rss_before_mib": round(rss_before / MiB, 1), "rss_after_mib": round(rss_after / MiB, 1),
        "rss_growth_mib": round((rss_after - rss_before) / MiB, 1),
        "rss_growth_bound_mib": round(rss_growth_bound(rss_before) / MiB, 1)}))
    assert not errors, collections.Counter(errors).most_common(5)
    assert requests > CLIENTS  # every client got work done
    assert rss_after - rss_before <= rss_growth_bound(rss_before)
    assert soak_service.child.alive()
