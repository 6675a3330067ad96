"""asyncio client of the encoder (Triton KServe v2 gRPC) used by the retrieval service.

`EncoderClient` turns preprocessed images (uint8 [B, H, W, 3]) and token ids (int64 [B, L]) into
L2-normalized float32 [B, D] embeddings by calling the image and text towers named in the model
repository's manifest. It validates shapes/dtypes against the manifest before sending, splits batches
larger than the server's `max_batch_size` into chunks sent concurrently (Triton's dynamic batcher merges
them again as it sees fit), checks on first use (and again after an outage) that the server's model
configs match the manifest, and maps a down/unreachable server to `DependencyUnavailableError('encoder')`.
The channel, readiness, config cache and error translation are `TritonChannel`'s.

This module imports neither torch nor open_clip.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import numpy as np
from tritonclient.grpc import InferInput, model_config_pb2, service_pb2
from tritonclient.utils import InferenceServerException

from retrieval_service.adapters.triton.channel import TritonChannel, TritonError
from retrieval_service.deadlines import DeadlineExceededError
from retrieval_service.errors import DependencyUnavailableError, InvalidInputError
from vitrine.manifest import ImageTower, Manifest, TextTower

DEFAULT_URL = "127.0.0.1:8001"


class EncoderError(TritonError):
    """The encoder answered, but not as expected (an internal server error, a malformed response)."""


class EncoderMismatchError(EncoderError):
    """The Triton model configs do not match the manifest (wrong repository served, or stale manifest)."""


@dataclasses.dataclass(frozen=True)
class _Tower:
    """One tower as the manifest describes it and the server confirmed it."""

    model: str
    input_name: str
    output_name: str
    input_dtype: np.dtype
    triton_dtype: str  # KServe v2 datatype string, e.g. "UINT8"
    input_shape: tuple[int, ...]  # per item, without the batch dimension
    max_batch_size: int = 0
    kind: str = ""  # "image" | "text": the `tower` label of metrics

    @classmethod
    def of(
        cls, spec: ImageTower | TextTower, dtype: type[np.generic], triton_dtype: str,
        input_shape: tuple[int, ...], *, kind: str,
    ) -> _Tower:
        """The tower the manifest's `spec` describes (not yet confirmed: max_batch_size 0)."""
        return cls(model=spec.triton_model, input_name=spec.input_name, output_name=spec.output_name,
                   input_dtype=np.dtype(dtype), triton_dtype=triton_dtype, input_shape=input_shape, kind=kind)


class EncoderClient(TritonChannel[_Tower]):
    """Async client of the image and text towers served by Triton.

    Args:
        url: Triton KServe v2 gRPC endpoint `host:port` (e.g. `DEFAULT_URL` = '127.0.0.1:8001').
        manifest: the model repository's manifest (tower model names, input/output names, sizes).
        timeout_s: deadline of one gRPC call (one chunk, one readiness probe), seconds.

    The gRPC channel is opened lazily on first use, inside the running event loop, so the client can be
    constructed outside one. Use one client per event loop; `close()` it when done.

    Raises:
        ValueError: timeout_s <= 0.
    """

    subject = "encoder"
    error_class = EncoderError
    mismatch_class = EncoderMismatchError

    def __init__(self, url: str, manifest: Manifest, *, timeout_s: float = 30.0) -> None:
        super().__init__(url, timeout_s=timeout_s)
        self.manifest = manifest
        height, width = manifest.image.size
        self._image = _Tower.of(manifest.image, np.uint8, "UINT8", (height, width, 3), kind="image")
        # A dynamic-length text tower takes int64 [B, L] for any L <= context_length (config.pbtxt dims [-1]).
        text_shape = (-1,) if manifest.text.dynamic_length else (manifest.text.context_length,)
        self._text = _Tower.of(manifest.text, np.int64, "INT64", text_shape, kind="text")
        self._towers = {tower.model: tower for tower in (self._image, self._text)}
        # Called after each inference request with (tower "image" | "text", seconds, failed); metrics hook.
        self.call_observer: Callable[[str, float, bool], None] | None = None

    # ------------------------------------------------------------------------------------------ public
    async def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        """Embed preprocessed images with the image tower.

        Args:
            pixels: uint8 [B, H, W, 3], RGB, already resized/cropped to the manifest's `image.size`
                (H, W). B may exceed the server's max_batch_size (split into concurrent chunks).

        Returns:
            float32 [B, D] (D = manifest.embedding_dim), each row L2-normalized; [0, D] for B = 0.

        Raises:
            InvalidInputError: not a uint8 array of shape [B, H, W, 3] (checked before sending).
            DependencyUnavailableError: the encoder is down, unreachable, not ready or timed out.
            EncoderMismatchError: the served image model does not match the manifest.
            EncoderError: any other server-side failure or a malformed response.
        """
        self._validate(pixels, self._image, "pixels", "[B, H, W, 3] RGB")
        return await self._encode(self._image, pixels)

    async def encode_texts(self, input_ids: np.ndarray) -> np.ndarray:
        """Embed tokenized texts with the text tower.

        Args:
            input_ids: int64 [B, L] open_clip token ids, padded; L = manifest.text.context_length, or for a
                `dynamic_length` tower any 2 <= L <= context_length (a length bucket, so that Triton's dynamic
                batcher merges requests of one length).

        Returns:
            float32 [B, D], each row L2-normalized; [0, D] for B = 0.

        Raises:
            InvalidInputError: not an int64 array of shape [B, L] (checked before sending).
            DependencyUnavailableError: the encoder is down, unreachable, not ready or timed out.
            EncoderMismatchError: the served text model does not match the manifest.
            EncoderError: any other server-side failure or a malformed response.
        """
        self._validate(input_ids, self._text, "input_ids", "[B, L] token ids")
        if not 2 <= input_ids.shape[1] <= self.manifest.text.context_length:
            raise InvalidInputError(f"input_ids must have shape [B, L] with 2 <= L <= context length "
                                    f"{self.manifest.text.context_length}, got {list(input_ids.shape)}")
        return await self._encode(self._text, input_ids)

    async def ready(self) -> bool:
        """True when the server answers and both tower models are READY (and match the manifest).

        Never raises for a down server: returns False (connection refused, timeout, model loading).
        A model whose config contradicts the manifest also gives False, with the reason logged.
        """
        return await self.is_model_ready([self._image.model, self._text.model])

    async def model_statistics(self, name: str) -> service_pb2.ModelStatistics:
        """Triton's inference statistics of model `name` (its first listed version; Vitrine serves one).

        Returns:
            `ModelStatistics` protobuf: `inference_count` (items inferred), `execution_count` (model
            executions, i.e. batches run; < inference_count when the dynamic batcher merged requests),
            `inference_stats` (success/fail/queue/compute_* counts and cumulative ns), `batch_stats`.

        Raises:
            DependencyUnavailableError: the encoder is down or unreachable.
            EncoderError: unknown model, or the statistics endpoint is restricted (needs a token).
        """
        client = self._get_client()
        try:
            response = await client.get_inference_statistics(model_name=name, client_timeout=self.timeout_s)
        except InferenceServerException as exc:
            raise self.translate(exc, f"statistics of {name!r}") from exc
        if not response.model_stats:
            raise EncoderError(f"encoder at {self.url} has no statistics for model {name!r}")
        return response.model_stats[0]

    # --------------------------------------------------------------------------------------- internals
    @staticmethod
    def _validate(array: object, tower: _Tower, name: str, layout: str) -> None:
        if not isinstance(array, np.ndarray):
            raise InvalidInputError(f"{name} must be a numpy array {layout}, got {type(array).__name__}")
        if array.dtype != tower.input_dtype:
            raise InvalidInputError(f"{name} must have dtype {tower.input_dtype}, got {array.dtype}")
        expected = ("B", *tower.input_shape)
        if array.ndim != 1 + len(tower.input_shape) or not _dims_match(tower.input_shape, array.shape[1:]):
            raise InvalidInputError(
                f"{name} must have shape {list(expected)} {layout} for model {tower.model!r}, "
                f"got {list(array.shape)}"
            )

    def _check_config(self, model: str, config: model_config_pb2.ModelConfig) -> _Tower:
        """Confirm the served config of a tower matches the manifest; the tower with its max_batch_size."""
        tower = self._towers[model]
        problems: list[str] = []
        inputs = {t.name: t for t in config.input}
        outputs = {t.name: t for t in config.output}
        if config.max_batch_size <= 0:
            problems.append(f"max_batch_size is {config.max_batch_size} (a batching model is required)")
        served_in = inputs.get(tower.input_name)
        if served_in is None:
            problems.append(f"no input {tower.input_name!r} (inputs: {sorted(inputs)})")
        else:
            dtype = model_config_pb2.DataType.Name(served_in.data_type)
            if dtype != f"TYPE_{tower.triton_dtype}":
                problems.append(
                    f"input {tower.input_name!r} is {dtype}, manifest implies TYPE_{tower.triton_dtype}"
                )
            if not _dims_match(served_in.dims, tower.input_shape):
                problems.append(
                    f"input {tower.input_name!r} dims {list(served_in.dims)}, "
                    f"manifest implies {list(tower.input_shape)}"
                )
        served_out = outputs.get(tower.output_name)
        if served_out is None:
            problems.append(f"no output {tower.output_name!r} (outputs: {sorted(outputs)})")
        else:
            dtype = model_config_pb2.DataType.Name(served_out.data_type)
            if dtype != "TYPE_FP32":
                problems.append(f"output {tower.output_name!r} is {dtype}, expected TYPE_FP32")
            if not _dims_match(served_out.dims, (self.manifest.embedding_dim,)):
                problems.append(
                    f"output {tower.output_name!r} dims {list(served_out.dims)}, manifest embedding_dim is "
                    f"{self.manifest.embedding_dim}"
                )
        if problems:
            raise EncoderMismatchError(
                f"Triton model {tower.model!r} at {self.url} does not match manifest "
                f"{self.manifest.model_id}: "
                + "; ".join(problems)
            )
        return dataclasses.replace(tower, max_batch_size=int(config.max_batch_size))

    async def _encode(self, tower: _Tower, array: np.ndarray) -> np.ndarray:
        if array.shape[0] == 0:
            return np.empty((0, self.manifest.embedding_dim), dtype=np.float32)
        confirmed = await self.checked(tower.model)
        return await self.infer_in_chunks(
            array, confirmed.max_batch_size, lambda chunk: self._infer_chunk(confirmed, chunk)
        )

    def _observe(self, tower: _Tower, started: float, *, failed: bool) -> None:
        if self.call_observer is not None:
            self.call_observer(tower.kind, time.perf_counter() - started, failed)

    async def _infer_chunk(self, tower: _Tower, chunk: np.ndarray) -> np.ndarray:
        infer_input = InferInput(tower.input_name, list(chunk.shape), tower.triton_dtype)
        infer_input.set_data_from_numpy(np.ascontiguousarray(chunk))
        started = time.perf_counter()
        try:
            embedding = await self.infer(tower.model, [infer_input], tower.output_name)
        except (DependencyUnavailableError, EncoderError, DeadlineExceededError):
            self._observe(tower, started, failed=True)
            raise
        self._observe(tower, started, failed=False)
        expected = (chunk.shape[0], self.manifest.embedding_dim)
        if embedding is None or embedding.dtype != np.float32 or embedding.shape != expected:
            got = None if embedding is None else (embedding.dtype, embedding.shape)
            raise EncoderError(
                f"encoder model {tower.model!r} returned {got}, expected float32 {list(expected)}"
            )
        return embedding


def _dims_match(served: Sequence[int], expected: Sequence[int]) -> bool:
    """Triton dims vs expected per-item shape; -1 in `served` accepts any size (-1 in `expected` only -1)."""
    return len(served) == len(expected) and all(s == e or s == -1 for s, e in zip(served, expected))
