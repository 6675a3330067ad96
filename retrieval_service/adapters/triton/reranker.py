"""asyncio client of a reranker model served by Triton (the `model` rerank method's scorer).

Triton reranker model interface (`ModelReranker`; any backend, e.g. an ONNX cross-encoder over
embeddings deployed in the model repository, no service code change):

    inputs   "query"      TYPE_FP32  dims [D]   the query embedding, repeated for every candidate
             "candidate"  TYPE_FP32  dims [D]   one candidate's stored embedding (L2-normalized)
    output   "score"      TYPE_FP32  dims [1]   relevance of the candidate to the query, higher = better
    max_batch_size > 0 (the batch dimension B = number of candidates in one request; more candidates
    than max_batch_size are sent as several concurrent requests). D = the collection's embedding_dim,
    or -1 (any). Requests: "query" FP32 [B, D], "candidate" FP32 [B, D] -> "score" FP32 [B, 1].

Example `<model_repository>/reranker/config.pbtxt` (with `reranker/1/model.onnx`), for D = 512:

    name: "reranker"
    platform: "onnxruntime_onnx"
    max_batch_size: 256
    input [ { name: "query" data_type: TYPE_FP32 dims: [ 512 ] },
            { name: "candidate" data_type: TYPE_FP32 dims: [ 512 ] } ]
    output [ { name: "score" data_type: TYPE_FP32 dims: [ 1 ] } ]
    dynamic_batching { max_queue_delay_microseconds: 1000 }

`encoder_server.server.EncoderServer` serves it next to the towers (it serves every `<model>/config.pbtxt`
with `<model>/<version>/model.onnx`; the Vitrine manifest does not list it). Enable it with
`RerankSettings.model = "reranker"`. The channel, readiness, config cache and error translation are
`TritonChannel`'s; the reranker is served by the same Triton as the encoder towers, so its outages are
reported as the encoder's (`DependencyUnavailableError('encoder')`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from tritonclient.grpc import InferInput, model_config_pb2

from retrieval_service.adapters.triton.channel import TritonChannel, TritonError
from retrieval_service.errors import InvalidInputError

#: Tensor names of the Triton reranker model interface (see the module docstring).
QUERY_INPUT = "query"
CANDIDATE_INPUT = "candidate"
SCORE_OUTPUT = "score"


class RerankerError(TritonError):
    """The Triton reranker answered, but not as the interface requires (config mismatch, bad output)."""


class _ScorerConfig(NamedTuple):
    """What the served config confirmed: requests of at most `max_batch_size` rows of `dim` (-1 any)."""

    max_batch_size: int
    dim: int


class ModelReranker(TritonChannel[_ScorerConfig]):
    """Async client of a reranker model served by Triton (interface in the module docstring).

    Args:
        url: Triton KServe v2 gRPC endpoint `host:port`.
        model_name: the reranker's Triton model name (e.g. 'reranker').
        timeout_s: deadline of one gRPC call, seconds.

    The channel opens lazily inside the running event loop; use one instance per loop and `close()` it.
    On first use (and again after an outage) the served config is checked against the interface.

    Raises:
        ValueError: empty model_name, timeout_s <= 0.
    """

    error_class = RerankerError
    mismatch_class = RerankerError
    unknown_model_is_down = True  # NOT_FOUND: the model was unloaded

    def __init__(self, url: str, model_name: str, *, timeout_s: float = 30.0) -> None:
        if not model_name:
            raise ValueError("model_name must not be empty")
        super().__init__(url, timeout_s=timeout_s)
        self.model_name = model_name
        self.subject = f"reranker {model_name!r}"

    async def score(self, query: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """Score candidates against a query with the served model.

        Args:
            query: float [D] query embedding (sent as float32, as given).
            candidates: float [N, D] candidate embeddings (sent as float32, as given).

        Returns:
            float32 [N] scores, higher = more relevant; [0] for N = 0.

        Raises:
            InvalidInputError: bad shapes or NaN/inf values.
            DependencyUnavailableError('encoder'): Triton is down, unreachable, timed out, or the model is
                not ready / unknown.
            RerankerError: the served config does not match the interface or D, or a malformed output.
        """
        q = np.asarray(query)
        c = np.asarray(candidates)
        if q.ndim != 1 or not np.issubdtype(q.dtype, np.floating):
            raise InvalidInputError(f"query must be a float vector [D], got {q.dtype} {list(q.shape)}")
        if c.ndim != 2 or c.shape[1] != q.shape[0] or not np.issubdtype(c.dtype, np.floating):
            raise InvalidInputError(
                f"candidates must be float [N, {q.shape[0]}], got {c.dtype} {list(c.shape)}"
            )
        if not (np.all(np.isfinite(q)) and np.all(np.isfinite(c))):
            raise InvalidInputError("query or candidate embeddings contain NaN or inf")
        if c.shape[0] == 0:
            return np.empty((0,), dtype=np.float32)
        config = await self.checked(self.model_name)
        if config.dim not in (-1, q.shape[0]):
            raise RerankerError(
                f"reranker {self.model_name!r} at {self.url} takes {config.dim}-d embeddings, "
                f"got {q.shape[0]}-d"
            )
        c32 = np.ascontiguousarray(c, dtype=np.float32)
        q32 = np.ascontiguousarray(q, dtype=np.float32)
        return await self.infer_in_chunks(
            c32, config.max_batch_size, lambda chunk: self._score_chunk(q32, chunk)
        )

    async def ready(self) -> bool:
        """True when Triton answers and the model is READY and matches the interface; never raises."""
        return await self.is_model_ready([self.model_name])

    # ----------------------------------------------------------------------------------- internals
    def _check_config(self, model: str, config: model_config_pb2.ModelConfig) -> _ScorerConfig:
        """Check the served config against the interface (module docstring); RerankerError if it is not."""
        problems: list[str] = []
        if config.max_batch_size <= 0:
            problems.append(f"max_batch_size is {config.max_batch_size} (a batching model is required)")
        inputs = {t.name: t for t in config.input}
        outputs = {t.name: t for t in config.output}
        dims: list[int] = []
        for name in (QUERY_INPUT, CANDIDATE_INPUT):
            spec = inputs.get(name)
            if spec is None:
                problems.append(f"no input {name!r} (inputs: {sorted(inputs)})")
                continue
            if spec.data_type != model_config_pb2.TYPE_FP32:
                dtype = model_config_pb2.DataType.Name(spec.data_type)
                problems.append(f"input {name!r} is {dtype}, not TYPE_FP32")
            if len(spec.dims) != 1:
                problems.append(f"input {name!r} has dims {list(spec.dims)}, expected [D]")
            else:
                dims.append(int(spec.dims[0]))
        if len(set(dims)) > 1:
            problems.append(f"inputs {QUERY_INPUT!r} and {CANDIDATE_INPUT!r} have different dims {dims}")
        out = outputs.get(SCORE_OUTPUT)
        if out is None:
            problems.append(f"no output {SCORE_OUTPUT!r} (outputs: {sorted(outputs)})")
        else:
            if out.data_type != model_config_pb2.TYPE_FP32:
                problems.append(f"output {SCORE_OUTPUT!r} is {model_config_pb2.DataType.Name(out.data_type)}")
            if list(out.dims) not in ([1], [-1]):
                problems.append(f"output {SCORE_OUTPUT!r} has dims {list(out.dims)}, expected [1]")
        if problems:
            raise RerankerError(
                f"Triton model {model!r} at {self.url} is not a reranker: " + "; ".join(problems)
            )
        return _ScorerConfig(int(config.max_batch_size), dims[0] if dims else -1)

    async def _score_chunk(self, query: np.ndarray, chunk: np.ndarray) -> np.ndarray:
        """float32 [B] scores of one request: `query` float32 [D] against `chunk` float32 [B, D]."""
        batch = chunk.shape[0]
        q_input = InferInput(QUERY_INPUT, [batch, query.shape[0]], "FP32")
        q_input.set_data_from_numpy(np.ascontiguousarray(np.broadcast_to(query, (batch, query.shape[0]))))
        c_input = InferInput(CANDIDATE_INPUT, list(chunk.shape), "FP32")
        c_input.set_data_from_numpy(chunk)
        scores = await self.infer(self.model_name, [q_input, c_input], SCORE_OUTPUT)
        if scores is None or scores.dtype != np.float32 or scores.shape not in ((batch, 1), (batch,)):
            got = None if scores is None else (scores.dtype, scores.shape)
            raise RerankerError(
                f"reranker {self.model_name!r} returned {got}, expected float32 [{batch}, 1]"
            )
        scores = scores.reshape(batch)
        if not np.all(np.isfinite(scores)):
            raise RerankerError(f"reranker {self.model_name!r} returned NaN/inf scores")
        return scores
