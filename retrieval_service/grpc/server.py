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

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from retrieval_service.adapters.blob_store import AsyncBlobStore, BlobStore
from retrieval_service.adapters.gemini import GeminiGenerator
from retrieval_service.adapters.milvus import AsyncVectorStore, VectorStore, redact_uri
from retrieval_service.adapters.triton.encoder import EncoderClient
from retrieval_service.adapters.triton.reranker import ModelReranker
from retrieval_service.errors import DependencyUnavailableError
from retrieval_service.grpc.auth import TokenAuthInterceptor
from retrieval_service.grpc.handlers import RetrievalService
from retrieval_service.grpc.health import HealthMonitor
from retrieval_service.grpc.interceptors import RpcObserver
from retrieval_service.grpc.status import ErrorMapper
from retrieval_service.metrics import MetricsHttpServer, ServiceMetrics
from retrieval_service.settings import Settings
from retrieval_service.tls import server_credentials
from retrieval_service.usecases.catalog import Catalog
from retrieval_service.usecases.embed import EmbedLimits, EmbedQueries
from retrieval_service.usecases.embedding_cache import EmbeddingCache, build_shared_cache
from retrieval_service.usecases.generate import GenerateImages
from retrieval_service.usecases.ingest import IngestImages, IngestLimits
from retrieval_service.usecases.preprocess import ImageDecoder, ImageLimits
from retrieval_service.usecases.rerank import build_rerankers
from retrieval_service.usecases.search import SearchImages, SearchLimits
from vitrine.manifest import Manifest, check_length_buckets
from vitrine.tokenizer import TextTokenizer
from vitrine.v1 import retrieval_service_pb2 as pb, retrieval_service_pb2_grpc as pb_grpc

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
        # --- adapters ---
        self.encoder = EncoderClient(settings.encoder_url, self.manifest, timeout_s=settings.encoder_timeout_s)
        self.encoder.use_tls(settings.encoder_tls)
        self.store = VectorStore(
            settings.milvus_uri,
            settings.collection or self.manifest.collection_name,
            self.manifest.embedding_dim,
            settings.index,
            token=settings.milvus_token.get_secret_value(),
            timeout_s=settings.milvus_timeout_s,
            model_id=self.manifest.model_id,
            tls=settings.milvus_tls,
        )
        self.async_store = AsyncVectorStore(self.store)
        self.blobs = AsyncBlobStore(BlobStore(settings.blob_dir))
        rr = settings.rerank
        self.model_reranker = (
            ModelReranker(rr.model_url or settings.encoder_url, rr.model, timeout_s=rr.model_timeout_s)
            if rr.model else None
        )
        if self.model_reranker is not None:
            self.model_reranker.use_tls(settings.encoder_tls)
        gen = settings.generation
        self.generator = GeminiGenerator(gen.api_key, base_url=gen.base_url or None, default_model=gen.model,
                                         max_retries=gen.max_retries, timeout_s=gen.timeout_s)
        # --- health (the one place a dependency is marked down is `self.errors`) ---
        self.health_servicer = health_aio.HealthServicer()
        self.health = HealthMonitor(
            self.health_servicer,
            ["", SERVICE_NAME],
            {"encoder": self.encoder.ready, "milvus": self._milvus_ready},
            interval_s=settings.health_interval_s,
        )
        self._store_open = False
        self.errors = ErrorMapper(self.health.mark_down)
        # --- use cases ---
        limits = ImageLimits(max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels,
                             min_side=settings.min_image_side)
        decoder = ImageDecoder(self.manifest.image, limits, self.decode_executor)
        # Prometheus metrics (retrieval_service/metrics.py), one registry per server; served in start().
        self.metrics = ServiceMetrics()
        self.cache = EmbeddingCache(settings.cache, shared=build_shared_cache(settings.cache),
                                    observer=self.metrics)
        self.embed = EmbedQueries(
            model_id=self.manifest.model_id, embedding_dim=self.manifest.embedding_dim, tokenizer=self.tokenizer,
            buckets=text_buckets(self.manifest, settings.text_length_buckets), encoder=self.encoder,
            decoder=decoder, cache=self.cache,
            limits=EmbedLimits(max_items=settings.max_embed_items, max_text_chars=settings.max_text_chars),
        )
        self.search = SearchImages(
            model_id=self.manifest.model_id, embed=self.embed, store=self.async_store,
            rerankers=build_rerankers(self.model_reranker), rerank_settings=rr,
            limits=SearchLimits(max_top_k=settings.max_top_k),
        )
        self.ingest = IngestImages(
            encoder=self.encoder, store=self.async_store, blobs=self.blobs, decoder=decoder,
            limits=IngestLimits(batch_size=settings.ingest_batch_size, batch_wait_ms=settings.ingest_batch_wait_ms,
                                max_inflight_batches=settings.ingest_max_inflight_batches,
                                max_image_bytes=settings.max_image_bytes,
                                max_filename_chars=settings.max_filename_chars),
        )
        catalog = Catalog(model_id=self.manifest.model_id, store=self.async_store, blobs=self.blobs)
        generate = GenerateImages(search=self.search, store=self.async_store, blobs=self.blobs,
                                  generator=self.generator, max_text_chars=settings.max_text_chars,
                                  max_reference_images=gen.max_reference_images)
        self.encoder.call_observer = self.metrics.observe_encoder
        self.store.call_observer = self.metrics.observe_milvus
        self.metrics.track_dependencies(["encoder", "milvus"], lambda: self.health.down)
        self.metrics_http = MetricsHttpServer(self.metrics.registry)
        # --- transport ---
        self.service = RetrievalService(search=self.search, ingest=self.ingest, catalog=catalog, generate=generate,
                                        embed=self.embed, errors=self.errors, metrics=self.metrics)
        options = [
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
        ]
        # Server interceptors, outermost first (e.g. metrics, then auth).
        interceptors: list[grpc.aio.ServerInterceptor] = [RpcObserver(self.metrics)]
        # Bearer-token auth (retrieval_service/grpc/auth.py) runs inside any metrics interceptor, so rejected calls count.
        self.auth = TokenAuthInterceptor.from_settings(settings.auth)
        if self.auth is not None:
            interceptors.append(self.auth)
        self._credentials = server_credentials(settings.tls)  # reads the PEM files now: bad paths fail here
        self.grpc_server = grpc.aio.server(options=options, interceptors=interceptors,
                                           maximum_concurrent_rpcs=settings.max_concurrent_rpcs or None)
        pb_grpc.add_RetrievalServiceServicer_to_server(self.service, self.grpc_server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health_servicer, self.grpc_server)
        reflection.enable_server_reflection(
            [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            self.grpc_server,
        )
        self.port = 0

    async def _milvus_ready(self) -> bool:
        """Open the collection if needed (Milvus may have been down at start), then ping it."""
        try:
            if not self._store_open:
                await self.async_store.open()
                self._store_open = True
            await self.async_store.count()
            return True
        except DependencyUnavailableError:
            return False

    def _start_metrics_endpoint(self) -> None:
        """Serve /metrics on metrics_host (or host):metrics_port; -1 = off. Failing to bind is logged, not fatal:
        metrics must not take search down (the port is `self.metrics_http.port`, None when not serving)."""
        port = self.settings.metrics_port
        if port < 0:
            return
        host = self.settings.metrics_host or self.settings.host
        try:
            bound = self.metrics_http.start(host, port)
        except OSError as exc:
            log.error("metrics endpoint not started: cannot bind %s:%d (%s); serving without /metrics",
                      host, port, exc.strerror or exc)
            return
        log.info("Prometheus metrics on http://%s:%d/metrics", host, bound)

    async def start(self) -> int:
        """Bind, open dependencies (a down dependency leaves health NOT_SERVING, not a crash); return the port."""
        address = f"{self.settings.host}:{self.settings.port}"
        if self._credentials is not None:
            self.port = self.grpc_server.add_secure_port(address, self._credentials)
        else:
            self.port = self.grpc_server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot bind gRPC server to {self.settings.host}:{self.settings.port}")
        await self.grpc_server.start()
        await self.health.start()
        self._start_metrics_endpoint()
        log.info(
            "retrieval service on %s:%d  model=%s collection=%s milvus=%s encoder=%s health=%s",
            self.settings.host, self.port, self.manifest.model_id, self.store.collection,
            redact_uri(self.settings.milvus_uri),
            self.settings.encoder_url, "SERVING" if self.health.serving else f"NOT_SERVING {sorted(self.health.down)}",
        )
        tls = self.settings.tls
        log.info(
            "security: transport=%s auth=%s max_concurrent_rpcs=%s",
            ("mutual TLS" if tls.require_client_auth else "TLS") if tls.enabled else "PLAINTEXT",
            f"bearer token ({self.auth.token_count} accepted)" if self.auth is not None
            else "NONE (open: any client may call every RPC; set auth.tokens or auth.tokens_file)",
            self.settings.max_concurrent_rpcs or "unlimited",
        )
        return self.port

    async def stop(self, grace_s: float | None = 5.0) -> None:
        """Stop accepting calls, let in-flight calls finish for up to `grace_s` seconds, close clients."""
        await self.health.stop()
        await self.grpc_server.stop(grace_s)
        self.metrics_http.stop()
        await self.encoder.close()
        if self.model_reranker is not None:
            await self.model_reranker.close()
        await self.generator.close()
        await self.cache.close()
        self.decode_executor.shutdown(wait=False, cancel_futures=True)
        self.blobs.shutdown()  # bytes of rows being inserted land before exit
        self.async_store.shutdown()

    async def wait_for_termination(self) -> None:
        """Block until the gRPC server terminates."""
        await self.grpc_server.wait_for_termination()


def text_buckets(manifest: Manifest, configured: list[int]) -> tuple[int, ...]:
    """The padded lengths text queries use: settings `text_length_buckets`, else the manifest's.

    Raises:
        ValueError: buckets configured for a fixed-length text graph, or not ascending / not ending at the
            context length.
    """
    text = manifest.text
    if not configured:
        return text.buckets
    buckets = tuple(sorted(set(configured)))
    if buckets == (text.context_length,):
        return buckets
    if not text.dynamic_length:
        raise ValueError(f"text_length_buckets {configured} need a dynamic-length text tower; the repository's "
                         f"{text.triton_model!r} takes only {text.context_length} tokens (re-export it)")
    return check_length_buckets(buckets, text.context_length)


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
