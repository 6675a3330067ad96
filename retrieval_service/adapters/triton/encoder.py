"""asyncio client of the encoder (Triton KServe v2 gRPC) used by the retrieval service.

`EncoderClient` turns preprocessed images (uint8 [B, H, W, 3]) and token ids (int64 [B, L]) into
L2-normalized float32 [B, D] embeddings by calling the image and text towers named in the model
repository's manifest. It validates shapes/dtypes against the manifest before sending, splits batches
larger than the server's `max_batch_size` into chunks sent concurrently (Triton's dynamic batcher merges
them again as it sees fit), checks on first use (and again after an outage) that the server's model
configs match the manifest, and maps a down/unreachable server to `DependencyUnavailableError('encoder')`.

This module imports neither torch nor open_clip.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence

import numpy as np
from tritonclient.grpc import InferInput, InferRequestedOutput, model_config_pb2, service_pb2
from tritonclient.utils import InferenceServerException

from retrieval_service.errors import DependencyUnavailableError, InvalidInputError
from retrieval_service.adapters.triton.channel import TritonChannel
from vitrine.manifest import Manifest

log = logging.getLogger(__name__)

DEPENDENCY = "encoder"
DEFAULT_URL = "127.0.0.1:8001"
# gRPC status codes (as tritonclient spells them) that mean "the encoder is not reachable or not
# serving right now"; a caller may retry later. Anything else is a bug or a misconfiguration.
_UNAVAILABLE_CODES = frozenset(
    {"StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.CANCELLED"}
)
# During inference a model that passed the first-use check can vanish (server stopping, model unloaded).
_NOT_FOUND = "StatusCode.NOT_FOUND"


class EncoderError(RuntimeError):
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


def _describe_error(exc: InferenceServerException) -> str:
    return f"{exc.status() or 'error'}: {exc.message()}"


class EncoderClient(TritonChannel):
    """Async client of the image and text towers served by Triton.

    Args:
        url: Triton KServe v2 gRPC endpoint `host:port` (e.g. `DEFAULT_URL` = '127.0.0.1:8001').
        manifest: the model repository's manifest (tower model names, input/output names, sizes).
        timeout_s: deadline of one gRPC call (one chunk, one readiness probe), seconds.

    The gRPC channel is opened lazily on first use, inside the running event loop, so the client can be
    constructed outside one. Use one client per event loop; `close()` it when done.
    """

    def __init__(self, url: str, manifest: Manifest, *, timeout_s: float = 30.0) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        super().__init__(url)
        self.manifest = manifest
        self.timeout_s = float(timeout_s)
        height, width = manifest.image.size
        self._image = _Tower(
            model=manifest.image.triton_model,
            input_name=manifest.image.input_name,
            output_name=manifest.image.output_name,
            input_dtype=np.dtype(np.uint8),
            triton_dtype="UINT8",
            input_shape=(height, width, 3),
            kind="image",
        )
        self._text = _Tower(
            model=manifest.text.triton_model,
            input_name=manifest.text.input_name,
            output_name=manifest.text.output_name,
            input_dtype=np.dtype(np.int64),
            triton_dtype="INT64",
            input_shape=(manifest.text.context_length,),
            kind="text",
        )
        self._checked: dict[str, _Tower] = {}
        self._check_lock: asyncio.Lock | None = None
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
            input_ids: int64 [B, L], L = manifest.text.context_length (open_clip token ids, padded).

        Returns:
            float32 [B, D], each row L2-normalized; [0, D] for B = 0.

        Raises:
            InvalidInputError: not an int64 array of shape [B, L] (checked before sending).
            DependencyUnavailableError: the encoder is down, unreachable, not ready or timed out.
            EncoderMismatchError: the served text model does not match the manifest.
            EncoderError: any other server-side failure or a malformed response.
        """
        self._validate(input_ids, self._text, "input_ids", "[B, L] token ids")
        return await self._encode(self._text, input_ids)

    async def ready(self) -> bool:
        """True when the server answers and both tower models are READY (and match the manifest).

        Never raises for a down server: returns False (connection refused, timeout, model loading).
        A model whose config contradicts the manifest also gives False, with the reason logged.
        """
        try:
            client = self._get_client()
            for tower in (self._image, self._text):
                if not await client.is_model_ready(tower.model, client_timeout=self.timeout_s):
                    self._checked.clear()
                    return False
            await self._ensure_checked(self._image)
            await self._ensure_checked(self._text)
            return True
        except EncoderMismatchError as exc:
            log.error("encoder at %s does not serve this manifest's models: %s", self.url, exc)
            return False
        except (InferenceServerException, DependencyUnavailableError, EncoderError) as exc:
            log.debug("encoder at %s not ready: %s", self.url, exc)
            self._checked.clear()
            return False

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
            raise self._translate(exc, f"statistics of {name!r}") from exc
        if not response.model_stats:
            raise EncoderError(f"encoder at {self.url} has no statistics for model {name!r}")
        return response.model_stats[0]



    # --------------------------------------------------------------------------------------- internals

    def _translate(
        self, exc: InferenceServerException, what: str, *, gone_is_down: bool = False
    ) -> Exception:
        """Map a tritonclient error to DependencyUnavailableError (down/unreachable) or EncoderError.

        `gone_is_down`: NOT_FOUND (unknown model) also means unavailable, for models already checked.
        """
        if exc.status() in _UNAVAILABLE_CODES or (gone_is_down and exc.status() == _NOT_FOUND):
            return DependencyUnavailableError(
                DEPENDENCY, f"Triton at {self.url} failed {what} ({_describe_error(exc)})"
            )
        return EncoderError(f"encoder at {self.url} failed during {what} ({_describe_error(exc)})")

    @staticmethod
    def _validate(array: object, tower: _Tower, name: str, layout: str) -> None:
        if not isinstance(array, np.ndarray):
            raise InvalidInputError(f"{name} must be a numpy array {layout}, got {type(array).__name__}")
        if array.dtype != tower.input_dtype:
            raise InvalidInputError(f"{name} must have dtype {tower.input_dtype}, got {array.dtype}")
        expected = ("B", *tower.input_shape)
        if array.ndim != 1 + len(tower.input_shape) or tuple(array.shape[1:]) != tower.input_shape:
            raise InvalidInputError(
                f"{name} must have shape {list(expected)} {layout} for model {tower.model!r}, "
                f"got {list(array.shape)}"
            )

    async def _ensure_checked(self, tower: _Tower) -> _Tower:
        """On first use, confirm the served config matches the manifest; cache the confirmed tower."""
        confirmed = self._checked.get(tower.model)
        if confirmed is not None:
            return confirmed
        if self._check_lock is None:
            self._check_lock = asyncio.Lock()
        async with self._check_lock:
            confirmed = self._checked.get(tower.model)
            if confirmed is None:
                confirmed = await self._check_config(tower)
                self._checked[tower.model] = confirmed
        return confirmed

    async def _check_config(self, tower: _Tower) -> _Tower:
        client = self._get_client()
        try:
            if not await client.is_model_ready(tower.model, client_timeout=self.timeout_s):
                raise DependencyUnavailableError(
                    DEPENDENCY,
                    f"Triton at {self.url}: model {tower.model!r} is not ready (unknown or still loading)",
                )
            config: model_config_pb2.ModelConfig = (
                await client.get_model_config(tower.model, client_timeout=self.timeout_s)
            ).config
        except InferenceServerException as exc:
            raise self._translate(exc, f"config check of {tower.model!r}") from exc

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
        dim = self.manifest.embedding_dim
        if array.shape[0] == 0:
            return np.empty((0, dim), dtype=np.float32)
        confirmed = await self._ensure_checked(tower)
        step = confirmed.max_batch_size
        chunks = [array[i : i + step] for i in range(0, array.shape[0], step)]
        try:
            results = await asyncio.gather(*(self._infer(confirmed, chunk) for chunk in chunks))
        except DependencyUnavailableError:
            self._checked.clear()  # the server may come back with other models: check them again
            raise
        return results[0] if len(results) == 1 else np.concatenate(results, axis=0)

    def _observe(self, tower: _Tower, started: float, *, failed: bool) -> None:
        if self.call_observer is not None:
            self.call_observer(tower.kind, time.perf_counter() - started, failed)

    async def _infer(self, tower: _Tower, chunk: np.ndarray) -> np.ndarray:
        infer_input = InferInput(tower.input_name, list(chunk.shape), tower.triton_dtype)
        infer_input.set_data_from_numpy(np.ascontiguousarray(chunk))
        started = time.perf_counter()
        try:
            result = await self._get_client().infer(
                tower.model,
                [infer_input],
                outputs=[InferRequestedOutput(tower.output_name)],
                client_timeout=self.timeout_s,
            )
        except InferenceServerException as exc:
            self._observe(tower, started, failed=True)
            raise self._translate(exc, f"inference on {tower.model!r}", gone_is_down=True) from exc
        self._observe(tower, started, failed=False)
        embedding = result.as_numpy(tower.output_name)
        expected = (chunk.shape[0], self.manifest.embedding_dim)
        if embedding is None or embedding.dtype != np.float32 or embedding.shape != expected:
            got = None if embedding is None else (embedding.dtype, embedding.shape)
            raise EncoderError(
                f"encoder model {tower.model!r} returned {got}, expected float32 {list(expected)}"
            )
        return embedding


def _dims_match(served: Sequence[int], expected: Sequence[int]) -> bool:
    """Triton dims vs expected per-item shape; -1 in the served config accepts any size."""
    return len(served) == len(expected) and all(s == e or s == -1 for s, e in zip(served, expected))
