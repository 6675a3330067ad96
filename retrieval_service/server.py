"""Assembly and lifecycle of the retrieval gRPC server (grpc.aio).

`create_server(settings)` builds every part from one Settings object and returns a `RetrievalServer`; `await
server.start()` binds the port (0 picks a free one, see `server.port`), opens Milvus, connects to Triton and starts
the health monitor; `await server.stop(grace_s)` drains in-flight calls and closes everything. Tests start it
in-process on 127.0.0.1:0 and talk to it over a real channel.

Served alongside `vitrine.v1.RetrievalService`: grpc.health.v1.Health (service names "" and
"vitrine.v1.RetrievalService") and server reflection.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from retrieval_service.blob_store import BlobStore
from retrieval_service.encoder_client import EncoderClient
from retrieval_service.errors import DependencyUnavailableError
from retrieval_service.generation import GeminiGenerator
from retrieval_service.health import HealthMonitor
from retrieval_service.ingest import IngestPipeline, InflightIds
from retrieval_service.preprocess import ImageLimits, preprocess_batch
from retrieval_service.rerank import ModelReranker
from retrieval_service.service import RetrievalService
from retrieval_service.settings import Settings
from retrieval_service.tokenizer import TextTokenizer
from retrieval_service.vector_store import VectorStore
from vitrine.manifest import Manifest
from vitrine.v1 import retrieval_service_pb2 as pb
from vitrine.v1 import retrieval_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RetrievalService"].full_name


class RetrievalServer:
    """A running (or startable) retrieval service; see `create_server`."""

    def __init__(self, settings: Settings) -> None:
        # pymilvus logs every failed call (a user's bad filter included) at ERROR with a traceback; the vector
        # store maps those failures to statuses, and this service logs what matters.
        logging.getLogger("pymilvus").setLevel(logging.CRITICAL)
        self.settings = settings
        self.manifest = Manifest.read(settings.model_repository)
        self.tokenizer = TextTokenizer.from_repository(settings.model_repository, self.manifest)
        self.decode_executor = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="vitrine-decode")
        self.store_executor = ThreadPoolExecutor(4, thread_name_prefix="vitrine-milvus")
        self.encoder = EncoderClient(settings.encoder_url, self.manifest, timeout_s=settings.encoder_timeout_s)
        self.store = VectorStore(
            settings.milvus_uri,
            settings.collection or self.manifest.collection_name,
            self.manifest.embedding_dim,
            settings.index,
            token=settings.milvus_token.get_secret_value(),
            model_id=self.manifest.model_id,
        )
        self.blobs = BlobStore(settings.blob_dir)
        limits = ImageLimits(max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels,
                             min_side=settings.min_image_side)
        self.preprocess = partial(preprocess_batch, spec=self.manifest.image, limits=limits)
        self.health_servicer = health_aio.HealthServicer()
        self.health = HealthMonitor(
            self.health_servicer,
            ["", SERVICE_NAME],
            {"encoder": self.encoder.ready, "milvus": self._milvus_ready},
            interval_s=settings.health_interval_s,
        )
        self._store_open = False
        self.ingest = IngestPipeline(
            encoder=self.encoder, store=self.store, blobs=self.blobs, preprocess=self.preprocess,
            decode_executor=self.decode_executor, store_executor=self.store_executor, inflight=InflightIds(),
            on_unavailable=lambda exc: self.health.mark_down(exc.dependency),
            batch_size=settings.ingest_batch_size, batch_wait_ms=settings.ingest_batch_wait_ms,
            max_inflight_batches=settings.ingest_max_inflight_batches, max_image_bytes=settings.max_image_bytes,
            max_filename_chars=settings.max_filename_chars,
        )
        rr = settings.rerank
        self.model_reranker = (
            ModelReranker(rr.model_url or settings.encoder_url, rr.model, timeout_s=rr.model_timeout_s)
            if rr.model else None
        )
        gen = settings.generation
        self.generator = GeminiGenerator(gen.api_key, base_url=gen.base_url or None, default_model=gen.model,
                                         max_retries=gen.max_retries, timeout_s=gen.timeout_s)
        self.service = RetrievalService(
            settings=settings, manifest=self.manifest, tokenizer=self.tokenizer, encoder=self.encoder,
            store=self.store, blobs=self.blobs, preprocess=self.preprocess, ingest=self.ingest,
            health=self.health, decode_executor=self.decode_executor, store_executor=self.store_executor,
            model_reranker=self.model_reranker, generator=self.generator,
        )
        options = [
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
        ]
        # Server interceptors, outermost first (e.g. metrics, then auth).
        interceptors: list[grpc.aio.ServerInterceptor] = []
        self.grpc_server = grpc.aio.server(options=options, interceptors=interceptors)
        pb_grpc.add_RetrievalServiceServicer_to_server(self.service, self.grpc_server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health_servicer, self.grpc_server)
        reflection.enable_server_reflection(
            [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            self.grpc_server,
        )
        self.port = 0

    async def _milvus_ready(self) -> bool:
        """Open the collection if needed (Milvus may have been down at start), then ping it."""
        loop = asyncio.get_running_loop()
        try:
            if not self._store_open:
                await loop.run_in_executor(self.store_executor, self.store.open)
                self._store_open = True
            await loop.run_in_executor(self.store_executor, self.store.count)
            return True
        except DependencyUnavailableError:
            return False

    async def start(self) -> int:
        """Bind, open dependencies (a down dependency leaves health NOT_SERVING, not a crash); return the port."""
        self.port = self.grpc_server.add_insecure_port(f"{self.settings.host}:{self.settings.port}")
        if self.port == 0:
            raise OSError(f"cannot bind gRPC server to {self.settings.host}:{self.settings.port}")
        await self.grpc_server.start()
        await self.health.start()
        log.info(
            "retrieval service on %s:%d  model=%s collection=%s milvus=%s encoder=%s health=%s",
            self.settings.host, self.port, self.manifest.model_id, self.store.collection, self.settings.milvus_uri,
            self.settings.encoder_url, "SERVING" if self.health.serving else f"NOT_SERVING {sorted(self.health.down)}",
        )
        return self.port

    async def stop(self, grace_s: float | None = 5.0) -> None:
        """Stop accepting calls, let in-flight calls finish for up to `grace_s` seconds, close clients."""
        await self.health.stop()
        await self.grpc_server.stop(grace_s)
        await self.encoder.close()
        if self.model_reranker is not None:
            await self.model_reranker.close()
        await self.generator.close()
        self.decode_executor.shutdown(wait=False, cancel_futures=True)
        self.store_executor.shutdown(wait=True, cancel_futures=True)
        close = getattr(self.store, "close", None)
        if close is not None:
            close()

    async def wait_for_termination(self) -> None:
        """Block until the gRPC server terminates."""
        await self.grpc_server.wait_for_termination()


def create_server(settings: Settings) -> RetrievalServer:
    """Build (not start) the retrieval server from `settings`.

    Raises:
        FileNotFoundError: `settings.model_repository` has no manifest.json.
    """
    return RetrievalServer(settings)


async def serve(settings: Settings) -> None:
    """Run the server until SIGINT/SIGTERM, then drain in-flight calls (graceful shutdown) and return."""
    server = create_server(settings)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: draining in-flight calls")
    await server.stop(grace_s=10.0)
