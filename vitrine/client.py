"""A small synchronous client for `vitrine.v1.RetrievalService`, used by the CLI and the demo.

It adds nothing to the API: each method is one RPC. Channels retry UNAVAILABLE for the idempotent unary calls
through gRPC's service-config retry policy (never for the ingest stream).
"""

from __future__ import annotations

import json
import mimetypes
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from vitrine.v1 import retrieval_service_pb2 as pb
from vitrine.v1 import retrieval_service_pb2_grpc as pb_grpc

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"}

# https://github.com/grpc/grpc/blob/master/doc/service_config.md — retry only UNAVAILABLE, idempotent calls.
_SERVICE_CONFIG = json.dumps({
    "methodConfig": [{
        "name": [{"service": "vitrine.v1.RetrievalService", "method": m}
                 for m in ("SearchImages", "GetImage", "GetCollectionStats", "EmbedTexts", "EmbedImages")],
        "retryPolicy": {"maxAttempts": 4, "initialBackoff": "0.1s", "maxBackoff": "2s",
                        "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]},
    }]
})


@dataclass
class IngestFile:
    """One image file to ingest with its metadata (a JSON object)."""

    path: Path
    metadata: dict[str, Any]


def image_files(folder: Path, metadata_file: Path | None = None) -> list[IngestFile]:
    """List image files under `folder` (sorted) with metadata from a JSONL file of {"filename": ..., ...} lines.

    Without `metadata_file`, `<folder>/metadata.jsonl` is used when present. Raises FileNotFoundError for a
    missing folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    meta: dict[str, dict[str, Any]] = {}
    metadata_file = metadata_file or (folder / "metadata.jsonl")
    if metadata_file.is_file():
        for line in metadata_file.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                meta[str(row.pop("filename"))] = row
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    return [IngestFile(p, meta.get(p.relative_to(folder).as_posix(), meta.get(p.name, {}))) for p in files]


@dataclass(frozen=True)
class ItemError:
    """Why one item of an EmbedTexts / EmbedImages call has no embedding (its `google.rpc.Status`).

    code: the status code name, e.g. "INVALID_ARGUMENT".
    message: the server's human message.
    field: the request field named by its BadRequest violation (e.g. "texts[3]"), "" when none.
    reason: its ErrorInfo reason (e.g. "IMAGE_UNDECODABLE"), "" when none.
    """

    code: str
    message: str
    field: str = ""
    reason: str = ""

    @classmethod
    def from_status(cls, status: status_pb2.Status) -> "ItemError":
        field = reason = ""
        for detail in status.details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                field = field or next((v.field for v in bad.field_violations if v.field), "")
            elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason = reason or info.reason
        try:
            code = code_pb2.Code.Name(status.code)
        except ValueError:
            code = str(status.code)
        return cls(code=code, message=status.message, field=field, reason=reason)


@dataclass(frozen=True)
class Embeddings:
    """The answer of `VitrineClient.embed_texts` / `embed_images`, one row per input in request order.

    vectors: float32 [N, D], L2-normalized rows; the row of a refused item is all NaN (so it cannot pass for a
        vector: any similarity computed with it is NaN); `ok` says which rows are real.
    errors: input index -> ItemError, for the refused items only (empty when every item was embedded).
    token_counts: int32 [N], texts: tokens fed to the text tower (<sot> and <eot> included, <= the context
        length); 0 for images and refused items.
    truncated: bool [N], texts: longer than the model's context length, tail cut (open_clip's rule).
    cached: bool [N], served from the service's query embedding cache.
    model_id, embedding_dim: the collection's model (manifest `model_id`, D).
    encode_ms: server time encoding the call's cache misses, milliseconds.
    """

    vectors: np.ndarray
    errors: dict[int, ItemError]
    token_counts: np.ndarray
    truncated: np.ndarray
    cached: np.ndarray
    model_id: str
    embedding_dim: int
    encode_ms: float

    @property
    def ok(self) -> np.ndarray:
        """bool [N]: True where the item has a vector."""
        mask = np.ones(len(self.vectors), dtype=bool)
        mask[list(self.errors)] = False
        return mask

    def __len__(self) -> int:
        return len(self.vectors)

    @classmethod
    def from_response(cls, response: pb.EmbedTextsResponse | pb.EmbedImagesResponse) -> "Embeddings":
        """Decode an EmbedTextsResponse / EmbedImagesResponse.

        Raises:
            ValueError: a vector's length differs from the response's embedding_dim.
        """
        dim = int(response.embedding_dim)
        n = len(response.embeddings)
        vectors = np.full((n, dim), np.nan, dtype=np.float32)
        errors: dict[int, ItemError] = {}
        for i, item in enumerate(response.embeddings):
            if item.HasField("error"):
                errors[i] = ItemError.from_status(item.error)
                continue
            if len(item.values) != dim:
                raise ValueError(f"embeddings[{i}] has {len(item.values)} values, expected embedding_dim {dim}")
            vectors[i] = np.asarray(item.values, dtype=np.float32)
        return cls(
            vectors=vectors, errors=errors,
            token_counts=np.asarray([e.token_count for e in response.embeddings], dtype=np.int32),
            truncated=np.asarray([e.truncated for e in response.embeddings], dtype=bool),
            cached=np.asarray([e.cached for e in response.embeddings], dtype=bool),
            model_id=response.model_id, embedding_dim=dim, encode_ms=response.encode_ms)


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                   grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call's metadata."""

    def __init__(self, token: str) -> None:
        self._entry = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = [m for m in (details.metadata or ()) if m[0] != "authorization"] + [self._entry]
        return _CallDetails(details.method, details.timeout, metadata, details.credentials,
                            details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, details, request):  # noqa: ANN001, ANN201
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):  # noqa: ANN001, ANN201
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):  # noqa: ANN001, ANN201
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):  # noqa: ANN001, ANN201
        return continuation(self._details(details), request_iterator)


@dataclass(frozen=True)
class _CallDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: Sequence[tuple[str, str]] | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


def _read(path: Path | str | None, what: str) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise FileNotFoundError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None


class VitrineClient:
    """Blocking client over one channel to `target` ('host:port').

    Security (all optional; each falls back to an environment variable, so every CLI command and helper that
    builds a client picks them up):
        token: bearer token sent as `authorization: Bearer <token>` (env VITRINE_TOKEN).
        tls_ca: PEM CA bundle to verify the server with; turns TLS on (env VITRINE_TLS_CA).
        tls_cert, tls_key: PEM client certificate and key for mutual TLS (env VITRINE_TLS_CERT, VITRINE_TLS_KEY).
        tls: True = TLS with the system roots when no tls_ca is given (env VITRINE_USE_TLS=1).

    Raises:
        FileNotFoundError: a TLS file cannot be read.
        ValueError: only one of tls_cert / tls_key.
    """

    def __init__(self, target: str = "127.0.0.1:50051", *, max_message_bytes: int = 64 * 1024 * 1024,
                 token: str | None = None, tls_ca: Path | str | None = None, tls_cert: Path | str | None = None,
                 tls_key: Path | str | None = None, tls: bool | None = None) -> None:
        self.target = target
        env = os.environ
        token = token if token is not None else env.get("VITRINE_TOKEN") or None
        tls_ca = tls_ca or env.get("VITRINE_TLS_CA") or None
        tls_cert = tls_cert or env.get("VITRINE_TLS_CERT") or None
        tls_key = tls_key or env.get("VITRINE_TLS_KEY") or None
        if tls is None:
            tls = bool(tls_ca or tls_cert) or env.get("VITRINE_USE_TLS", "").lower() in ("1", "true", "yes")
        if bool(tls_cert) != bool(tls_key):
            raise ValueError("tls_cert and tls_key (VITRINE_TLS_CERT, VITRINE_TLS_KEY) must be given together")
        options = [
            ("grpc.service_config", _SERVICE_CONFIG),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        if tls:
            creds = grpc.ssl_channel_credentials(
                root_certificates=_read(tls_ca, "tls_ca"), private_key=_read(tls_key, "tls_key"),
                certificate_chain=_read(tls_cert, "tls_cert"))
            channel = grpc.secure_channel(target, creds, options=options)
        else:
            channel = grpc.insecure_channel(target, options=options)
        self.channel = grpc.intercept_channel(channel, _BearerToken(token)) if token else channel
        self.stub = pb_grpc.RetrievalServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "VitrineClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_serving(self, timeout_s: float = 60.0) -> None:
        """Block until health reports SERVING. Raises TimeoutError after `timeout_s` seconds."""
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                status = self.health.Check(health_pb2.HealthCheckRequest(service="vitrine.v1.RetrievalService"),
                                           timeout=2).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
            except grpc.RpcError as exc:
                last = exc.code().name
            time.sleep(0.2)
        raise TimeoutError(f"{self.target} not SERVING after {timeout_s:.0f} s (last: {last})")

    def search(self, *, text: str | None = None, image: bytes | None = None, image_id: str | None = None,
               top_k: int = 10, filter: str = "", min_score: float | None = None, page_token: str = "",
               timeout_s: float = 30.0) -> pb.SearchImagesResponse:
        """SearchImages with exactly one of text / image bytes / image_id."""
        req = pb.SearchImagesRequest(top_k=top_k, filter=filter, page_token=page_token)
        if text is not None:
            req.text = text
        elif image is not None:
            req.image = image
        elif image_id is not None:
            req.image_id = image_id
        if min_score is not None:
            req.min_score = min_score
        return self.stub.SearchImages(req, timeout=timeout_s)

    def ingest(self, files: Iterable[IngestFile], timeout_s: float | None = None) -> Iterator[pb.IngestImagesResponse]:
        """Stream `files` to IngestImages; yield each item's response as it arrives (index = position)."""

        def requests() -> Iterator[pb.IngestImagesRequest]:
            for i, f in enumerate(files):
                req = pb.IngestImagesRequest(index=i, content=f.path.read_bytes(), filename=f.path.name)
                if f.metadata:
                    req.metadata.update(f.metadata)
                yield req

        yield from self.stub.IngestImages(requests(), timeout=timeout_s)

    def delete(self, *, image_ids: list[str] | None = None, filter: str = "") -> int:
        """DeleteImages; returns the number deleted."""
        return self.stub.DeleteImages(pb.DeleteImagesRequest(image_ids=image_ids or [], filter=filter)).deleted_count

    def get_image(self, image_id: str) -> pb.GetImageResponse:
        return self.stub.GetImage(pb.GetImageRequest(image_id=image_id))

    def stats(self) -> pb.GetCollectionStatsResponse:
        return self.stub.GetCollectionStats(pb.GetCollectionStatsRequest())

    def embed_texts(self, texts: Sequence[str], *, timeout_s: float = 60.0) -> Embeddings:
        """EmbedTexts: one L2-normalized float32 vector per text (`Embeddings.vectors` [N, D], request order).

        A bad text (empty, only whitespace or control characters, over `max_text_chars`) is not an exception:
        its row is NaN and `Embeddings.errors[i]` says why (field "texts[i]"). Retried on UNAVAILABLE.

        Raises:
            TypeError: `texts` is a single str.
            grpc.RpcError: INVALID_ARGUMENT for no texts or more than the server's `max_embed_items` (default
                256); UNAVAILABLE (encoder down); DEADLINE_EXCEEDED after `timeout_s` seconds.
        """
        if isinstance(texts, str):
            raise TypeError("embed_texts takes a list of texts, got a single str")
        response = self.stub.EmbedTexts(pb.EmbedTextsRequest(texts=list(texts)), timeout=timeout_s)
        return Embeddings.from_response(response)

    def embed_images(self, images: Sequence[bytes | Path | str], *, timeout_s: float = 60.0) -> Embeddings:
        """EmbedImages: one L2-normalized float32 vector per image (`Embeddings.vectors` [N, D], request order).

        Each image is encoded bytes or a file path (Path or str) read here. A bad image (empty, undecodable,
        oversized, too small) is not an exception: its row is NaN and `Embeddings.errors[i]` says why (reason
        IMAGE_*). Retried on UNAVAILABLE.

        Raises:
            FileNotFoundError: a path cannot be read.
            grpc.RpcError: INVALID_ARGUMENT for no images or more than the server's `max_embed_items` (default
                256); RESOURCE_EXHAUSTED when the request is over the message size limit (64 MiB default);
                UNAVAILABLE; DEADLINE_EXCEEDED after `timeout_s` seconds.
        """
        contents = [bytes(image) if isinstance(image, (bytes, bytearray, memoryview))
                    else _read(Path(image), "image") for image in images]
        response = self.stub.EmbedImages(pb.EmbedImagesRequest(images=contents), timeout=timeout_s)
        return Embeddings.from_response(response)

    def generate(self, prompt: str, *, reference_text: str | None = None,
                 reference_image: bytes | None = None, reference_ids: Sequence[str] = (),
                 reference_count: int = 0, filter: str = "", min_score: float | None = None, model: str = "",
                 options: pb.GenerationOptions | None = None,
                 timeout_s: float | None = None) -> Iterator[pb.GenerateImagesResponse]:
        """GenerateImages: yield the stream's messages as they arrive (one `references`, then `text` / `image`
        parts, then one `finished`; see the proto).

        References come from at most one of `reference_text` / `reference_image` (encoded image bytes), each a
        retrieval query taking `reference_count` images (0: the service default, 1) that pass `filter` and
        `min_score`, or from `reference_ids` (stored image ids, in order); none of them: text-to-image. Not
        retried (each call costs a Gemini request). Closing the generator early cancels the call, which
        cancels the upstream Gemini stream.

        Raises:
            ValueError: more than one reference source, or `filter` / `min_score` without a reference query.
            grpc.RpcError: the RPC's status (INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION,
                PERMISSION_DENIED, RESOURCE_EXHAUSTED, UNAVAILABLE, DEADLINE_EXCEEDED after `timeout_s` s).
        """
        sources = (("reference_text", reference_text), ("reference_image", reference_image),
                   ("reference_ids", list(reference_ids) or None))
        given = [name for name, value in sources if value is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one reference source, got {' and '.join(given)}")
        req = pb.GenerateImagesRequest(prompt=prompt, reference_count=reference_count, model=model,
                                       options=options or pb.GenerationOptions())
        if reference_text is not None or reference_image is not None:
            query = pb.ReferenceQuery(filter=filter)
            if reference_text is not None:
                query.text = reference_text
            else:
                query.image = reference_image
            if min_score is not None:
                query.min_score = min_score
            req.reference_query.CopyFrom(query)
        elif filter or min_score is not None:
            raise ValueError("filter and min_score apply only to a reference query "
                             "(reference_text or reference_image)")
        elif reference_ids:
            req.reference_ids.image_ids.extend(reference_ids)
        call = self.stub.GenerateImages(req, timeout=timeout_s)
        try:
            yield from call
        finally:
            call.cancel()  # no-op once the stream ended; cancels it when the caller stopped early


def guess_suffix(mime_type: str) -> str:
    """File suffix for a MIME type ('image/png' -> '.png'); '.bin' when unknown."""
    return mimetypes.guess_extension(mime_type) or ".bin"
