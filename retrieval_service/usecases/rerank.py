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
    model  a reranker model served by Triton (`retrieval_service.adapters.triton.reranker.ModelReranker`,
           whose module docstring gives the model interface); scores are the model's scores.

Each method is an object behind the `Reranker` protocol (`NoRerank`, `ExactRerank`, `MmrRerank`,
`ModelRerank`); `build_rerankers` makes the method -> object dict once, at wiring time, and a new method
is one more object registered there. The request is checked once, by `validate_request`; `rerank_page`
and the method objects take its answer as given.

Candidate window and pagination: the reranked list is a function of the candidate set only, so page
`offset` of a reranked search is `rerank_page(..., top_k=top_k, offset=offset)` over the same
`rerank_top_n` candidates; `validate_request` enforces offset + top_k <= rerank_top_n. With Milvus'
raw-vector indexes (FLAT, IVF_FLAT, HNSW) the scores of the returned candidates are already exact float32
cosines, so `exact` changes their order only through rounding; what it adds is a wider candidate search
(HNSW's `ef` is raised to the window, so the best top_k among rerank_top_n candidates has higher recall
than a plain top_k search) and exact scores for quantized indexes. It cannot recover neighbours an IVF
index never visits (outside the `nprobe` probed clusters).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import NamedTuple, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from retrieval_service.adapters.milvus import MILVUS_MAX_WINDOW, Hit
from retrieval_service.adapters.triton.reranker import ModelReranker
from retrieval_service.errors import InvalidInputError


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


def _stored_embedding(hit: Hit) -> np.ndarray:
    """The hit's stored embedding float32 [D]; ValueError when the search did not return it."""
    if hit.embedding is None:
        raise ValueError(
            f"hit {hit.id} has no embedding: search the VectorStore with with_vectors=True to rerank"
        )
    return hit.embedding


def _unit_candidates(hits: Sequence[Hit], dim: int) -> np.ndarray:
    """float64 [N, D] unit rows of the hits' stored embeddings.

    Raises:
        ValueError: a hit carries no embedding (search without `with_vectors=True`), has another
            dimension than the query, or a zero / non-finite embedding.
    """
    rows = np.empty((len(hits), dim), dtype=np.float64)
    for i, hit in enumerate(hits):
        vec = np.asarray(_stored_embedding(hit))
        if vec.shape != (dim,):
            raise ValueError(f"hit {hit.id}: embedding shape {vec.shape} differs from the query's ({dim},)")
        rows[i] = vec
    norms = np.linalg.norm(rows, axis=1)
    bad = ~np.isfinite(norms) | (norms == 0.0)
    if bad.any():
        raise ValueError(f"hit {hits[int(np.argmax(bad))].id}: embedding has NaN/inf values or is all zeros")
    return rows / norms[:, None]


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
        top_k: results kept, >= 1 (checked by `validate_request`, not here).

    Returns:
        At most top_k hits sorted by exact cosine (float64, rounded to a Python float) descending; each
        hit's `score` is replaced by that cosine. Ties keep the candidates' order (stable sort).

    Raises:
        InvalidInputError: bad query (shape, NaN/inf, zero).
        ValueError: a hit without embedding, of another dimension, or zero/non-finite.
    """
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
        top_k: results kept, >= 1 (checked by `validate_request`, not here).
        lambda_: relevance weight in [0, 1]: 1 pure relevance, 0 pure novelty (checked by
            `validate_request`, not here).

    Returns:
        At most top_k hits in MMR selection order; each hit's `score` is its exact cosine to the query.

    Raises:
        InvalidInputError: bad query (shape, NaN/inf, zero).
        ValueError: a hit without embedding, of another dimension, or zero/non-finite.
    """
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


# ------------------------------------------------------------------------------------- method objects
class Reranker(Protocol):
    """One rerank method: reorder the candidates and keep the best `top_k` of them.

    Args (of `rerank`):
        query: float [D] query embedding.
        hits: the candidates, best first as Milvus returned them (with `embedding` where the method
            needs it).
        top_k: results kept, >= 1 (already checked by `validate_request`).
        mmr_lambda: MMR relevance weight in [0, 1] (already checked); methods other than 'mmr' ignore it.

    Returns (of `rerank`): at most top_k hits, scores as the method defines (module docstring).
    """

    async def rerank(
        self, query: np.ndarray, hits: Sequence[Hit], top_k: int, *, mmr_lambda: float
    ) -> list[Hit]: ...


class NoRerank:
    """Method 'none': Milvus' order and scores, unchanged."""

    async def rerank(
        self, query: np.ndarray, hits: Sequence[Hit], top_k: int, *, mmr_lambda: float
    ) -> list[Hit]:
        """The first top_k candidates as they are."""
        return list(hits[:top_k])


class ExactRerank:
    """Method 'exact': `exact_rerank` (exact cosine on the stored embeddings)."""

    async def rerank(
        self, query: np.ndarray, hits: Sequence[Hit], top_k: int, *, mmr_lambda: float
    ) -> list[Hit]:
        """`exact_rerank(query, hits, top_k)`; raises as it does."""
        return exact_rerank(query, hits, top_k)


class MmrRerank:
    """Method 'mmr': `mmr_rerank` (maximal marginal relevance with the request's `mmr_lambda`)."""

    async def rerank(
        self, query: np.ndarray, hits: Sequence[Hit], top_k: int, *, mmr_lambda: float
    ) -> list[Hit]:
        """`mmr_rerank(query, hits, top_k, mmr_lambda)`; raises as it does."""
        return mmr_rerank(query, hits, top_k, mmr_lambda)


class ModelRerank:
    """Method 'model': order the candidates by a Triton reranker model's score."""

    def __init__(self, model_reranker: ModelReranker) -> None:
        self.model_reranker = model_reranker

    async def rerank(
        self, query: np.ndarray, hits: Sequence[Hit], top_k: int, *, mmr_lambda: float
    ) -> list[Hit]:
        """Order candidates by the model's score, descending (stable), and keep top_k.

        Returns:
            At most top_k hits; each `score` is the model's score (its own scale, not a cosine).

        Raises:
            ValueError: a hit without embedding.
            InvalidInputError, DependencyUnavailableError('encoder'), RerankerError: from
                `ModelReranker.score`.
        """
        if not hits:
            return []
        embeddings = np.stack([np.asarray(_stored_embedding(hit), dtype=np.float32) for hit in hits])
        scores = await self.model_reranker.score(np.asarray(query, dtype=np.float32), embeddings)
        order = np.argsort(-scores, kind="stable")[:top_k]
        return [replace(hits[i], score=float(scores[i])) for i in order]


def build_rerankers(model_reranker: ModelReranker | None) -> dict[RerankMethod, Reranker]:
    """The rerank method -> object registry, built once at wiring time.

    Args:
        model_reranker: the Triton reranker client, or None when `RerankSettings.model` is empty; method
            'model' is registered only when it is given.

    Returns:
        {NONE: NoRerank, EXACT: ExactRerank, MMR: MmrRerank[, MODEL: ModelRerank(model_reranker)]}.
    """
    rerankers: dict[RerankMethod, Reranker] = {
        RerankMethod.NONE: NoRerank(),
        RerankMethod.EXACT: ExactRerank(),
        RerankMethod.MMR: MmrRerank(),
    }
    if model_reranker is not None:
        rerankers[RerankMethod.MODEL] = ModelRerank(model_reranker)
    return rerankers


async def rerank_page(
    rerankers: Mapping[RerankMethod, Reranker],
    plan: RerankRequest,
    query: np.ndarray,
    hits: Sequence[Hit],
    *,
    top_k: int,
    offset: int,
) -> list[Hit]:
    """Rerank the window offset + top_k of the candidates with `plan.method`; return [offset, offset + top_k).

    Args:
        rerankers: the registry from `build_rerankers`.
        plan: the `validate_request` answer (method, top_n, mmr_lambda); nothing is checked again here.
        query: float [D] query embedding.
        hits: the candidates (best first as Milvus returned them); every method but 'none' needs
            `embedding` on each (VectorStore.search(..., with_vectors=True)).
        top_k: page size, >= 1 (the value `validate_request` checked).
        offset: results skipped, >= 0 (the value `validate_request` checked).

    Returns:
        At most top_k hits; scores as each method defines (module docstring).

    Raises:
        ValueError: no reranker registered for the method (method 'model' without a ModelReranker), or a
            hit without embedding.
        InvalidInputError: bad query vector (NaN/inf, zero, wrong shape).
        DependencyUnavailableError, RerankerError: from `ModelReranker` (method 'model').
    """
    reranker = rerankers.get(plan.method)
    if reranker is None:
        raise ValueError(
            f"rerank method {plan.method.value!r} has no reranker: method 'model' needs a ModelReranker "
            "(RerankSettings.model is empty?)"
        )
    window = offset + top_k
    ranked = await reranker.rerank(query, hits, window, mmr_lambda=plan.mmr_lambda)
    return ranked[offset:window]
