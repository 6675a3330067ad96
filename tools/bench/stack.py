"""What the search and ingest benchmarks share: the model and images they use, and the stack they drive.

* `resolve_model` picks the model repository (default: the offline demo model, trained/exported once and cached)
  and the images (default: the demo's held-out digit PNGs; any folder of images works).
* `bench_stack` either starts a private stack (Triton encoder + retrieval service as child processes, Milvus Lite
  file and blob store in a fresh temporary folder, so every run has a fresh, empty collection) or targets a
  running one (`--target`, `--encoder-url`).
* `load_images` reads the images into memory once (so file I/O is not measured) and tags each with
  `metadata["bench_shard"] = i % SHARDS`, which the search benchmark filters on. Against a running stack each
  image's bytes get a per-run suffix (`salted`) so the run inserts new rows instead of getting ALREADY_PRESENT;
  `drop_run_rows` deletes them afterwards.
* `stream_ingest` drives IngestImages over grpc.aio from memory and counts the outcomes.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from export.demo.data import write_dataset
from retrieval_service.settings import Settings
from tools.demo import prepare_demo
from tools.processes import Ports, local_stack
from vitrine.client import VitrineClient, image_files
from vitrine.manifest import Manifest
from vitrine.v1 import retrieval_service_pb2 as pb
from vitrine.v1 import retrieval_service_pb2_grpc as pb_grpc

#: `metadata["bench_shard"]` takes values 0..SHARDS-1, so a filter on one value keeps ~1/SHARDS of the rows.
SHARDS = 10
#: Appended to an image's bytes (after the format's end marker; decoders ignore trailing data) to make per-run
#: unique ids when benchmarking a stack that may already hold these images.
SALT_PREFIX = b"\x00vitrine-bench-run:"
#: `encoder_timeout_s` of the private stack's retrieval service, seconds.
ENCODER_TIMEOUT_S = 120.0
DEMO_REPOSITORY = Path("demo") / "model_repository"
DEMO_DATASET = Path("demo") / "dataset"


@dataclass(frozen=True)
class BenchImage:
    """One image to ingest: encoded bytes, file name and metadata (a JSON object with `bench_shard`)."""

    content: bytes
    filename: str
    metadata: dict[str, Any]


@dataclass
class BenchStack:
    """A stack to benchmark.

    Attributes:
        target: retrieval service gRPC 'host:port'.
        encoder_url: Triton KServe v2 gRPC 'host:port'.
        repository: the model repository both sides use (manifest + tokenizer).
        manifest: its manifest.
        workdir: a private folder for this run (Milvus Lite files, logs); removed at exit.
        local: True when this run started the stack (fresh collection), False for `--target`.
        run_id: random hex naming this run (`metadata["bench_run"]`, salts).
        ingest_batch_size: the service's `ingest_batch_size` (the local stack's value; for a target, the
            default of `retrieval_service.settings.Settings` unless told).
        ingest_max_inflight_batches: likewise `ingest_max_inflight_batches`.
    """

    target: str
    encoder_url: str
    repository: Path
    manifest: Manifest
    workdir: Path
    local: bool
    run_id: str = field(default_factory=lambda: secrets.token_hex(6))
    ingest_batch_size: int = 32
    ingest_max_inflight_batches: int = 3


def resolve_model(repository: Path | None, images: Path | None, cache_dir: Path) -> tuple[Path, Path]:
    """Return (model repository, image folder), preparing the demo defaults when not given.

    No `repository`: the demo model (`tools.demo.prepare_demo` into `<cache_dir>/demo/`, trained and exported
    once, then reused; needs torch/open_clip the first time). No `images`: the demo's held-out digits, written
    to `<cache_dir>/demo/dataset` (`export.demo.data.write_dataset`, no training).

    Raises:
        FileNotFoundError: `repository` has no manifest.json, or `images` is not a folder.
    """
    if repository is None:
        prepared = prepare_demo(cache_dir, cache_dir / DEMO_REPOSITORY, cache_dir / DEMO_DATASET)
        repository = prepared.repository
        images = images or prepared.dataset
    if not (repository / "manifest.json").is_file():
        raise FileNotFoundError(f"{repository} is not a model repository (no manifest.json)")
    if images is None:
        images = cache_dir / DEMO_DATASET
        write_dataset(images, split="heldout")
    if not images.is_dir():
        raise FileNotFoundError(f"{images} is not a folder of images")
    return repository, images


def load_images(folder: Path, limit: int | None = None, *, salt: str = "") -> list[BenchImage]:
    """Read up to `limit` images of `folder` (sorted; metadata from `<folder>/metadata.jsonl` when present).

    Each image's metadata gains `bench_shard` (position % SHARDS) and, with `salt`, `bench_run` = salt; with
    `salt` its bytes also get the suffix SALT_PREFIX + salt (see `salted`).

    Raises:
        FileNotFoundError: `folder` is missing; ValueError: it holds no images.
    """
    files = image_files(folder)[:limit] if limit else image_files(folder)
    if not files:
        raise ValueError(f"no images (png, jpg, webp, ...) under {folder}")
    out = []
    for i, f in enumerate(files):
        meta = {**f.metadata, "bench_shard": i % SHARDS}
        content = f.path.read_bytes()
        if salt:
            meta["bench_run"] = salt
            content = salted(content, salt)
        out.append(BenchImage(content, f.path.name, meta))
    return out


def salted(content: bytes, salt: str) -> bytes:
    """`content` + SALT_PREFIX + salt: a different sha256 (a new image id) that decodes to the same pixels.

    PNG, JPEG, GIF, WebP and BMP decoders stop at their end marker / declared size and ignore trailing bytes.
    """
    return content + SALT_PREFIX + salt.encode()


@contextlib.contextmanager
def bench_stack(repository: Path, *, target: str | None = None, encoder_url: str | None = None,
                service_env: dict[str, str] | None = None, workdir: Path | None = None,
                ingest_batch_size: int | None = None,
                ingest_max_inflight_batches: int | None = None) -> Iterator[BenchStack]:
    """Start a private stack over `repository` (or use `target` + `encoder_url`) and yield a BenchStack.

    Private stack: `tools.processes.local_stack` on free loopback ports, Milvus Lite file and blob store in a
    fresh temporary folder (under `workdir` when given), `service_env` added to the retrieval service's
    environment (e.g. {"VITRINE_INGEST_BATCH_SIZE": "64"}; VITRINE_ENCODER_TIMEOUT_S defaults to
    ENCODER_TIMEOUT_S); both servers are stopped at exit.

    Raises:
        ValueError: `target` without `encoder_url`.
        RuntimeError / TimeoutError: a server did not start (its log tail is in the message).
    """
    manifest = Manifest.read(repository)
    # Benchmarks queue whole batches behind a busy encoder on shared cores: give each encoder call more than the
    # default 30 s before the service calls the encoder unavailable (a REJECTED item would end the run).
    env = {"VITRINE_ENCODER_TIMEOUT_S": str(ENCODER_TIMEOUT_S), **(service_env or {})}
    if ingest_batch_size is not None:
        env["VITRINE_INGEST_BATCH_SIZE"] = str(ingest_batch_size)
    if ingest_max_inflight_batches is not None:
        env["VITRINE_INGEST_MAX_INFLIGHT_BATCHES"] = str(ingest_max_inflight_batches)
    defaults = Settings.model_fields
    batch = ingest_batch_size or int(env.get("VITRINE_INGEST_BATCH_SIZE", defaults["ingest_batch_size"].default))
    inflight = ingest_max_inflight_batches or int(
        env.get("VITRINE_INGEST_MAX_INFLIGHT_BATCHES", defaults["ingest_max_inflight_batches"].default))
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="vitrine-bench-", dir=workdir) as tmp:
        tmp_path = Path(tmp)
        if target is not None:
            if not encoder_url:
                raise ValueError("--target needs --encoder-url (the Triton gRPC endpoint the service uses)")
            yield BenchStack(target, encoder_url, repository, manifest, tmp_path, local=False,
                             ingest_batch_size=batch, ingest_max_inflight_batches=inflight)
            return
        ports = Ports.free()
        with local_stack(repository, ports=ports, milvus_uri=str(tmp_path / "service.db"),
                         blob_dir=tmp_path / "blobs", log_dir=tmp_path / "logs", service_env=env) as stack:
            yield BenchStack(stack.target, f"127.0.0.1:{ports.encoder_grpc}", repository, manifest, tmp_path,
                             local=True, ingest_batch_size=batch, ingest_max_inflight_batches=inflight)


@dataclass
class StreamIngestResult:
    """Outcome of one IngestImages stream: counts per outcome name, wall time (s), first rejection message."""

    outcomes: Counter
    seconds: float
    first_error: str = ""

    @property
    def images_per_s(self) -> float:
        """Answered items per second of wall time (stream open to last response)."""
        total = sum(self.outcomes.values())
        return total / self.seconds if self.seconds > 0 else 0.0


async def stream_ingest_async(target: str, images: Sequence[BenchImage], *, timeout_s: float = 600.0
                              ) -> StreamIngestResult:
    """Stream `images` (from memory) through IngestImages on one grpc.aio channel; wait for every answer.

    Raises:
        grpc.aio.AioRpcError: the stream failed (service unreachable, deadline after `timeout_s` s).
    """
    requests = []
    for i, img in enumerate(images):
        req = pb.IngestImagesRequest(index=i, content=img.content, filename=img.filename)
        req.metadata.update(img.metadata)
        requests.append(req)
    outcomes: Counter = Counter()
    first_error = ""
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        stub = pb_grpc.RetrievalServiceStub(channel)
        start = time.perf_counter()
        async for resp in stub.IngestImages(iter(requests), timeout=timeout_s):
            outcomes[pb.IngestImagesResponse.Outcome.Name(resp.outcome)] += 1
            if resp.outcome == pb.IngestImagesResponse.REJECTED and not first_error:
                first_error = resp.error.message
        seconds = time.perf_counter() - start
    return StreamIngestResult(outcomes, seconds, first_error)


def stream_ingest(target: str, images: Sequence[BenchImage], *, timeout_s: float = 600.0) -> StreamIngestResult:
    """Blocking `stream_ingest_async` (runs its own event loop)."""
    return asyncio.run(stream_ingest_async(target, images, timeout_s=timeout_s))


def drop_run_rows(target: str, run_id: str) -> int:
    """Delete the rows this run inserted into a running stack (`metadata["bench_run"] == run_id`); return count."""
    with VitrineClient(target) as client:
        return client.delete(filter=f'metadata["bench_run"] == "{run_id}"')
