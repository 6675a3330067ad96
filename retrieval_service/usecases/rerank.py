"""Rerank stage between the Milvus candidates and the search response.

A search with reranking asks Milvus for `rerank_top_n` candidates (with their stored embeddings,
`VectorStore.search(..., with_vectors=True)`), reorders them with one of these methods and keeps the
page the client asked for:

    none   Milvus' order and scores, unchanged.
    exact  exact cosine similarity between the query and each candidate's stored embedding (both
           L2-normalized, float64 arithmetic); scores are replaced by it; sorted descending.
    mmr    maximal marginal relevance (Carbonell & Goldstein, "The use of MMR, diversity-based reranking
           for reordering documents and producing summaries", SIGIR 1998): greedily pick
               argmax_{i not in S} [ lambda * sim(q, d_i) - (1 - lambda) * max_{j in S} sim(d_i, d_j) ]
           with sim = exact cosine; lambda = 1 is pure relevance (the `exact` order), lambda = 0 pure
           novelty. A hit's score stays its query similarity sim(q, d_i), not the MMR objective, so scores
           of an MMR page are not necessarily descending.
    model  a reranker model served by Triton (`ModelReranker`); scores are the model's scores.

Candidate window and pagination: the reranked list is a function of the candidate set only, so page
`offset` of a reranked search is `rerank(..., offset=offset, top_k=top_k)` over the same `rerank_top_n`
candidates; `validate_request` enforces offset + top_k <= rerank_top_n. With Milvus' raw-vector indexes
(FLAT, IVF_FLAT, HNSW) the scores of the returned candidates are already exact float32 cosines, so
`exact` changes their order only through rounding; what it adds is a wider candidate search (HNSW's
`ef` is raised to the window, so the best top_k among rerank_top_n candidates has higher recall than a
plain top_k search) and exact scores for quantized indexes. It cannot recover neighbours an IVF index
never visits (outside the `nprobe` probed clusters).

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
`RerankSettings.model = "reranker"`.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
from collections.abc import Sequence
from dataclasses import replace
from typing import NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tritonclient.grpc import InferInput, InferRequestedOutput, model_config_pb2

from tritonclient.utils import InferenceServerException

from retrieval_service.errors import DependencyUnavailableError, InvalidInputError
from retrieval_service.adapters.triton.channel import TritonChannel
from retrieval_service.adapters.milvus.store import MILVUS_MAX_WINDOW, Hit

log = logging.getLogger(__name__)

#: Tensor names of the Triton reranker model interface (see the module docstring).
QUERY_INPUT = "query"
CANDIDATE_INPUT = "candidate"
SCORE_OUTPUT = "score"
#: The reranker is served by the same Triton as the encoder towers; outages are reported as the encoder's.
DEPENDENCY = "encoder"
# gRPC status codes (tritonclient spelling) meaning "Triton is not reachable or not serving right now".
_UNAVAILABLE_CODES = frozenset(
    {"StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.CANCELLED",
     "StatusCode.NOT_FOUND"}  # NOT_FOUND: the model was unloaded
)


class RerankMethod(str, enum.Enum):
    """How candidates are reordered (see the module docstring); values are the lowercase names."""

    NONE = "none"
    EXACT = "exact"
    MMR = "mmr"
    MODEL = "model"


class RerankSettings(BaseModel):
    """Rerank defaults and limits (the `rerank` section of the service settings)."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    method: RerankMethod = Field(RerankMethod.NONE, description="method used when a request names none")
    rerank_top_n: int = Field(
        100, ge=1, le=MILVUS_MAX_WINDOW,
        description="candidates fetched from Milvus when a request does not say (raised to offset + top_k)",
    )
    max_rerank_top_n: int = Field(
        1000, ge=1, le=MILVUS_MAX_WINDOW, description="largest rerank_top_n a request may ask for"
    )
    mmr_lambda: float = Field(
        0.5, ge=0.0, le=1.0, description="MMR trade-off when a request does not say: 1 relevance, 0 novelty"
    )
    model: str = Field("", description="Triton model name of the reranker; '' disables method 'model'")
    model_url: str = Field("", description="Triton gRPC host:port of the reranker; '' = the encoder's")
    model_timeout_s: float = Field(30.0, gt=0, description="deadline of one reranker call, seconds")

    @model_validator(mode="after")
    def _consistent(self) -> RerankSettings:
        if self.rerank_top_n > self.max_rerank_top_n:
            raise ValueError(
                f"rerank_top_n ({self.rerank_top_n}) must be <= max_rerank_top_n ({self.max_rerank_top_n})"
            )
        if self.method == RerankMethod.MODEL and not self.model:
            raise ValueError("method 'model' needs `model` (the Triton reranker model name)")
        return self


def _parse_method(method: RerankMethod | str) -> RerankMethod:
    """RerankMethod from an enum member or its value (case-insensitive); InvalidInputError otherwise."""
    if isinstance(method, RerankMethod):
        return method
    try:
        return RerankMethod(str(method).lower())
    except ValueError:
        raise InvalidInputError(
            f"rerank method {method!r} is not one of {[m.value for m in RerankMethod]}"
        ) from None


class RerankRequest(NamedTuple):
    """A validated rerank request: method, candidates to fetch (`top_n`) and the MMR `mmr_lambda`."""

    method: RerankMethod
    top_n: int
    mmr_lambda: float


def validate_request(
    method: RerankMethod | str | None,
    top_k: int,
    rerank_top_n: int | None,
    mmr_lambda: float | None,
    settings: RerankSettings,
    *,
    offset: int = 0,
) -> RerankRequest:
    """Check a search request's rerank fields and fill in the defaults.

    Args:
        method: 'none' | 'exact' | 'mmr' | 'model' (case-insensitive) or a RerankMethod; None or ''
            -> `settings.method`.
        top_k: results per page, >= 1.
        rerank_top_n: candidates to fetch from Milvus and rerank; None or 0 -> `settings.rerank_top_n`
            raised to offset + top_k (an unset proto3 int reads 0). Else offset + top_k <= it <=
            `settings.max_rerank_top_n`.
        mmr_lambda: MMR trade-off in [0, 1]; None -> `settings.mmr_lambda` (0.0 is a valid value, so the
            proto field should be `optional` to tell unset from 0).
        settings: the service's rerank settings.
        offset: results skipped (pagination), >= 0; the page must lie inside the candidate window.

    Returns:
        RerankRequest(method, top_n, mmr_lambda); for method 'none' top_n is offset + top_k (what a plain
        search fetches).

    Raises:
        InvalidInputError: naming the field: unknown method, 'model' with no reranker model configured,
            rerank_top_n < offset + top_k or > max_rerank_top_n, mmr_lambda NaN or outside [0, 1].
    """
    chosen = settings.method if method is None or method == "" else _parse_method(method)
    if chosen == RerankMethod.MODEL and not settings.model:
        raise InvalidInputError("rerank method 'model' is not available: no reranker model is configured")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise InvalidInputError(f"top_k must be an int >= 1, got {top_k!r}")
    if isinstance(offset, bool) or not isinstance(offset, (int, np.integer)) or offset < 0:
        raise InvalidInputError(f"offset must be an int >= 0, got {offset!r}")
    window = int(offset) + int(top_k)
    limit = settings.max_rerank_top_n
    if rerank_top_n is None or rerank_top_n == 0:
        top_n = max(settings.rerank_top_n, window)
        if chosen != RerankMethod.NONE and top_n > limit:
            raise InvalidInputError(
                f"offset + top_k = {window} exceeds max_rerank_top_n ({limit}): a reranked search "
                "cannot page that deep"
            )
    else:
        if isinstance(rerank_top_n, bool) or not isinstance(rerank_top_n, (int, np.integer)):
            raise InvalidInputError(f"rerank_top_n must be an int, got {rerank_top_n!r}")
        top_n = int(rerank_top_n)
        if top_n < window:
            raise InvalidInputError(
                f"rerank_top_n ({top_n}) must be >= offset + top_k ({window}): the page must lie inside "
                "the reranked candidates"
            )
        if top_n > limit:
            raise InvalidInputError(f"rerank_top_n ({top_n}) exceeds max_rerank_top_n ({limit})")
    if mmr_lambda is None:
        lambda_ = settings.mmr_lambda
    else:
        if isinstance(mmr_lambda, bool) or not isinstance(mmr_lambda, (int, float, np.floating)):
            raise InvalidInputError(f"mmr_lambda must be a number, got {mmr_lambda!r}")
        lambda_ = float(mmr_lambda)
        if math.isnan(lambda_) or not 0.0 <= lambda_ <= 1.0:
            raise InvalidInputError(f"mmr_lambda must be in [0, 1], got {mmr_lambda!r}")
    if chosen == RerankMethod.NONE:
        top_n = window
    return RerankRequest(chosen, top_n, lambda_)


# ----------------------------------------------------------------------------------------- vector methods
def _unit_query(query: np.ndarray) -> np.ndarray:
    """float64 [D] unit vector of `query`; InvalidInputError for a bad shape, NaN/inf or a zero vector."""
    q = np.asarray(query)
    if q.ndim != 1 or q.shape[0] < 1 or not np.issubdtype(q.dtype, np.floating):
        raise InvalidInputError(f"query must be a float vector [D], got {q.dtype} {list(q.shape)}")
    q = q.astype(np.float64)
    norm = float(np.linalg.norm(q))
    if not math.isfinite(norm) or norm == 0.0:
        raise InvalidInputError("query embedding has NaN/inf values or is all zeros")
    return q / norm


def _unit_candidates(hits: Sequence[Hit], dim: int) -> np.ndarray:
    """float64 [N, D] unit rows of the hits' stored embeddings.

    Raises:
        ValueError: a hit carries no embedding (search without `with_vectors=True`), has another
            dimension than the query, or a zero / non-finite embedding.
    """
    rows = np.empty((len(hits), dim), dtype=np.float64)
    for i, hit in enumerate(hits):
        if hit.embedding is None:
            raise ValueError(
                f"hit {hit.id} has no embedding: search the VectorStore with with_vectors=True to rerank"
            )
        vec = np.asarray(hit.embedding)
        if vec.shape != (dim,):
            raise ValueError(f"hit {hit.id}: embedding shape {vec.shape} differs from the query's ({dim},)")
        rows[i] = vec
    norms = np.linalg.norm(rows, axis=1)
    bad = ~np.isfinite(norms) | (norms == 0.0)
    if bad.any():
        raise ValueError(f"hit {hits[int(np.argmax(bad))].id}: embedding has NaN/inf values or is all zeros")
    return rows / norms[:, None]


def _check_top_k(top_k: int) -> int:
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise InvalidInputError(f"top_k must be an int >= 1, got {top_k!r}")
    return int(top_k)


def _relevance(query: np.ndarray, hits: Sequence[Hit]) -> tuple[np.ndarray, np.ndarray]:
    """(unit candidates float64 [N, D], exact cosine to the query float64 [N])."""
    q = _unit_query(query)
    candidates = _unit_candidates(hits, q.shape[0])
    return candidates, candidates @ q


def exact_rerank(query: np.ndarray, hits: Sequence[Hit], top_k: int) -> list[Hit]:
    """Re-score candidates with exact cosine similarity on their stored embeddings and keep the best.

    Args:
        query: float [D] query embedding (any norm; normalized here).
        hits: candidates, each with `embedding` float32 [D] (VectorStore.search(..., with_vectors=True)).
        top_k: results kept, >= 1.

    Returns:
        At most top_k hits sorted by exact cosine (float64, rounded to a Python float) descending; each
        hit's `score` is replaced by that cosine. Ties keep the candidates' order (stable sort).

    Raises:
        InvalidInputError: bad query (shape, NaN/inf, zero) or top_k.
        ValueError: a hit without embedding, of another dimension, or zero/non-finite.
    """
    top_k = _check_top_k(top_k)
    if not hits:
        return []
    _, sims = _relevance(query, hits)
    order = np.argsort(-sims, kind="stable")[:top_k]
    return [replace(hits[i], score=float(sims[i])) for i in order]


def mmr_rerank(query: np.ndarray, hits: Sequence[Hit], top_k: int, lambda_: float) -> list[Hit]:
    """Maximal marginal relevance (Carbonell & Goldstein, SIGIR 1998) over the candidates.

    Greedy: S = []; repeat top_k times: pick argmax over unselected i of
    lambda_ * sim(q, d_i) - (1 - lambda_) * max_{j in S} sim(d_i, d_j) (the max term is 0 while S is
    empty), with sim = exact cosine of the stored embeddings. Candidates are first sorted by sim(q, d_i)
    (stable), and equal objectives are broken towards higher relevance, so lambda_ = 1 returns exactly
    `exact_rerank`'s order. Cost O(N * top_k * D).

    Args:
        query: float [D] query embedding (any norm).
        hits: candidates with `embedding` float32 [D] (VectorStore.search(..., with_vectors=True)).
        top_k: results kept, >= 1.
        lambda_: relevance weight in [0, 1]: 1 pure relevance, 0 pure novelty.

    Returns:
        At most top_k hits in MMR selection order; each hit's `score` is its exact cosine to the query.

    Raises:
        InvalidInputError: bad query, top_k, or lambda_ outside [0, 1].
        ValueError: a hit without embedding, of another dimension, or zero/non-finite.
    """
    top_k = _check_top_k(top_k)
    if isinstance(lambda_, bool) or not isinstance(lambda_, (int, float, np.floating)) or not (
        0.0 <= float(lambda_) <= 1.0
    ):
        raise InvalidInputError(f"mmr_lambda must be in [0, 1], got {lambda_!r}")
    lam = float(lambda_)
    if not hits:
        return []
    candidates, sims = _relevance(query, hits)
    order = np.argsort(-sims, kind="stable")
    candidates, sims = candidates[order], sims[order]
    n = len(order)
    max_sim = np.zeros(n, dtype=np.float64)  # max cosine to the selected set (0 while it is empty)
    available = np.ones(n, dtype=bool)
    picked: list[int] = []
    for _ in range(min(top_k, n)):
        objective = np.where(available, lam * sims - (1.0 - lam) * max_sim, -np.inf)
        best = int(np.argmax(objective))  # first maximum = the most relevant among equals
        picked.append(best)
        available[best] = False
        np.maximum(max_sim, candidates @ candidates[best], out=max_sim)
    return [replace(hits[int(order[i])], score=float(sims[i])) for i in picked]


# ------------------------------------------------------------------------------------------ model hook
class RerankerError(RuntimeError):
    """The Triton reranker answered, but not as the interface requires (config mismatch, bad output)."""


class ModelReranker(TritonChannel):
    """Async client of a reranker model served by Triton (interface in the module docstring).

    Args:
        url: Triton KServe v2 gRPC endpoint `host:port`.
        model_name: the reranker's Triton model name (e.g. 'reranker').
        timeout_s: deadline of one gRPC call, seconds.

    The channel opens lazily inside the running event loop; use one instance per loop and `close()` it.
    On first use (and again after an outage) the served config is checked against the interface.
    """

    def __init__(self, url: str, model_name: str, *, timeout_s: float = 30.0) -> None:
        if not model_name:
            raise ValueError("model_name must not be empty")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        super().__init__(url)
        self.model_name = model_name
        self.timeout_s = float(timeout_s)
        self._config: tuple[int, int] | None = None  # (max_batch_size, dim or -1)
        self._config_lock: asyncio.Lock | None = None

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
        max_batch, dim = await self._checked_config()
        if dim not in (-1, q.shape[0]):
            raise RerankerError(
                f"reranker {self.model_name!r} at {self.url} takes {dim}-d embeddings, got {q.shape[0]}-d"
            )
        c32 = np.ascontiguousarray(c, dtype=np.float32)
        q32 = np.ascontiguousarray(q, dtype=np.float32)
        chunks = [c32[i : i + max_batch] for i in range(0, c32.shape[0], max_batch)]
        try:
            results = await asyncio.gather(*(self._infer(q32, chunk) for chunk in chunks))
        except DependencyUnavailableError:
            self._config = None  # the server may come back with another model: check it again
            raise
        return np.concatenate(results)

    async def rerank(self, query: np.ndarray, hits: Sequence[Hit], top_k: int) -> list[Hit]:
        """Order candidates by the model's score, descending (stable), and keep top_k.

        Args:
            query: float [D] query embedding.
            hits: candidates with `embedding` float32 [D].
            top_k: results kept, >= 1.

        Returns:
            At most top_k hits; each `score` is the model's score (its own scale, not a cosine).

        Raises:
            the errors of `score`; ValueError for a hit without embedding.
        """
        top_k = _check_top_k(top_k)
        if not hits:
            return []
        embeddings = []
        for hit in hits:
            if hit.embedding is None:
                raise ValueError(
                    f"hit {hit.id} has no embedding: search the VectorStore with with_vectors=True to rerank"
                )
            embeddings.append(np.asarray(hit.embedding, dtype=np.float32))
        scores = await self.score(np.asarray(query, dtype=np.float32), np.stack(embeddings))
        order = np.argsort(-scores, kind="stable")[:top_k]
        return [replace(hits[i], score=float(scores[i])) for i in order]

    async def ready(self) -> bool:
        """True when Triton answers and the model is READY and matches the interface; never raises."""
        try:
            client = self._get_client()
            if not await client.is_model_ready(self.model_name, client_timeout=self.timeout_s):
                self._config = None
                return False
            await self._checked_config()
            return True
        except RerankerError as exc:
            log.error("reranker %r at %s does not match the interface: %s", self.model_name, self.url, exc)
            return False
        except (InferenceServerException, DependencyUnavailableError) as exc:
            log.debug("reranker %r at %s not ready: %s", self.model_name, self.url, exc)
            self._config = None
            return False



    # ----------------------------------------------------------------------------------- internals

    def _translate(self, exc: InferenceServerException, what: str) -> Exception:
        detail = f"{exc.status() or 'error'}: {exc.message()}"
        if exc.status() in _UNAVAILABLE_CODES:
            return DependencyUnavailableError(
                DEPENDENCY, f"Triton at {self.url} failed {what} of reranker {self.model_name!r} ({detail})"
            )
        return RerankerError(f"reranker {self.model_name!r} at {self.url} failed {what} ({detail})")

    async def _checked_config(self) -> tuple[int, int]:
        if self._config is not None:
            return self._config
        if self._config_lock is None:
            self._config_lock = asyncio.Lock()
        async with self._config_lock:
            if self._config is None:
                self._config = await self._read_config()
        return self._config

    async def _read_config(self) -> tuple[int, int]:
        client = self._get_client()
        try:
            if not await client.is_model_ready(self.model_name, client_timeout=self.timeout_s):
                raise DependencyUnavailableError(
                    DEPENDENCY,
                    f"Triton at {self.url}: reranker {self.model_name!r} is not ready (unknown or loading)",
                )
            config = (await client.get_model_config(self.model_name, client_timeout=self.timeout_s)).config
        except InferenceServerException as exc:
            raise self._translate(exc, "config check") from exc
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
                f"Triton model {self.model_name!r} at {self.url} is not a reranker: " + "; ".join(problems)
            )
        return int(config.max_batch_size), (dims[0] if dims else -1)

    async def _infer(self, query: np.ndarray, chunk: np.ndarray) -> np.ndarray:
        batch = chunk.shape[0]
        q_input = InferInput(QUERY_INPUT, [batch, query.shape[0]], "FP32")
        q_input.set_data_from_numpy(np.ascontiguousarray(np.broadcast_to(query, (batch, query.shape[0]))))
        c_input = InferInput(CANDIDATE_INPUT, list(chunk.shape), "FP32")
        c_input.set_data_from_numpy(chunk)
        try:
            result = await self._get_client().infer(
                self.model_name,
                [q_input, c_input],
                outputs=[InferRequestedOutput(SCORE_OUTPUT)],
                client_timeout=self.timeout_s,
            )
        except InferenceServerException as exc:
            raise self._translate(exc, "inference") from exc
        scores = result.as_numpy(SCORE_OUTPUT)
        if scores is None or scores.dtype != np.float32 or scores.shape not in ((batch, 1), (batch,)):
            got = None if scores is None else (scores.dtype, scores.shape)
            raise RerankerError(
                f"reranker {self.model_name!r} returned {got}, expected float32 [{batch}, 1]"
            )
        scores = scores.reshape(batch)
        if not np.all(np.isfinite(scores)):
            raise RerankerError(f"reranker {self.model_name!r} returned NaN/inf scores")
        return scores


# ------------------------------------------------------------------------------------------ dispatch
async def rerank(
    method: RerankMethod | str,
    query: np.ndarray,
    hits: Sequence[Hit],
    top_k: int,
    *,
    lambda_: float = 0.5,
    model_reranker: ModelReranker | None = None,
    offset: int = 0,
) -> list[Hit]:
    """Rerank Milvus candidates with `method` and return the page [offset, offset + top_k).

    Args:
        method: a RerankMethod (or its value).
        query: float [D] query embedding.
        hits: the candidates (best first as Milvus returned them); every method but 'none' needs
            `embedding` on each (VectorStore.search(..., with_vectors=True)).
        top_k: page size, >= 1.
        lambda_: MMR relevance weight in [0, 1] (method 'mmr' only).
        model_reranker: the Triton reranker client (method 'model' only).
        offset: results skipped, >= 0 (the whole window offset + top_k is reranked, then sliced).

    Returns:
        At most top_k hits; scores as each method defines (module docstring).

    Raises:
        InvalidInputError: unknown method, bad top_k / offset / lambda_ / query.
        ValueError: method 'model' without `model_reranker`, or a hit without embedding.
        DependencyUnavailableError, RerankerError: from `ModelReranker` (method 'model').
    """
    chosen = _parse_method(method)
    top_k = _check_top_k(top_k)
    if isinstance(offset, bool) or not isinstance(offset, (int, np.integer)) or offset < 0:
        raise InvalidInputError(f"offset must be an int >= 0, got {offset!r}")
    window = int(offset) + top_k
    if chosen == RerankMethod.NONE:
        ranked = list(hits[:window])
    elif chosen == RerankMethod.EXACT:
        ranked = exact_rerank(query, hits, window)
    elif chosen == RerankMethod.MMR:
        ranked = mmr_rerank(query, hits, window, lambda_)
    else:
        if model_reranker is None:
            raise ValueError("rerank method 'model' needs a ModelReranker (RerankSettings.model is empty?)")
        ranked = await model_reranker.rerank(query, hits, window)
    return ranked[int(offset) : window]
