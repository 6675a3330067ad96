"""Rerank stage against real parts: Milvus Lite, the Milvus standalone server, a Triton-served ONNX scorer.

Synthetic unit vectors make every expected answer computable with numpy.

Why the recall test runs on the Milvus server: Milvus Lite 3.2.2 without faiss-cpu (not installed here)
answers IVF_FLAT / HNSW searches exactly (measured: recall@10 = 1.0 with IVF_FLAT nlist 256, nprobe 1),
so only the server has a truly approximate index to rerank.
"""

from __future__ import annotations

import hashlib
import itertools
import socket
import time
import uuid
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from pymilvus import MilvusClient

from retrieval_service.errors import DependencyUnavailableError, InvalidInputError
from retrieval_service.adapters.triton.reranker import (
    CANDIDATE_INPUT,
    QUERY_INPUT,
    SCORE_OUTPUT,
    ModelReranker,
    RerankerError,
)
from retrieval_service.usecases.rerank import (
    Reranker,
    RerankMethod,
    RerankRequest,
    RerankSettings,
    build_rerankers,
    exact_rerank,
    mmr_rerank,
    rerank_page,
    validate_request,
)
from retrieval_service.adapters.milvus import Hit, IndexSettings, Row, VectorStore

pytest_plugins = ["milvus_server"]


def _ids(n: int, prefix: str) -> list[str]:
    return [hashlib.sha256(f"{prefix}-{i}".encode()).hexdigest() for i in range(n)]


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _rows(ids: list[str], vectors: np.ndarray) -> list[Row]:
    return [Row(id=i, embedding=v, filename=f"{n}.png", ingest_time_ms=1, metadata={"n": n})
            for n, (i, v) in enumerate(zip(ids, vectors))]


def _recall(found: list[list[str]], truth: list[list[str]]) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


WITHOUT_MODEL = build_rerankers(None)


async def _rerank(method: str | RerankMethod, query: np.ndarray, hits: list[Hit], top_k: int, *,
                  lambda_: float = 0.5, offset: int = 0,
                  rerankers: dict[RerankMethod, Reranker] = WITHOUT_MODEL) -> list[Hit]:
    """`rerank_page` for an already valid request (method, mmr lambda) over these candidates."""
    plan = RerankRequest(RerankMethod(method), len(hits), lambda_)
    return await rerank_page(rerankers, plan, query, hits, top_k=top_k, offset=offset)


# ------------------------------------------------------------------------------ Milvus Lite (small data)
DIM = 32
N_RANDOM = 400
RNG = np.random.default_rng(7)
RANDOM_VECTORS = _unit(RNG.standard_normal((N_RANDOM, DIM)))
RANDOM_IDS = _ids(N_RANDOM, "random")
# near-duplicate groups: 5 base images, each stored with 3 near copies (cosine > 0.999 to the base)
GROUPS, COPIES = 5, 3
GROUP_BASES = _unit(RNG.standard_normal((GROUPS, DIM)))
DUP_VECTORS = _unit(
    np.repeat(GROUP_BASES, COPIES + 1, axis=0)
    + 0.02 / np.sqrt(DIM) * RNG.standard_normal((GROUPS * (COPIES + 1), DIM))
)
DUP_IDS = _ids(len(DUP_VECTORS), "dup")
DUP_GROUP = {i: n // (COPIES + 1) for n, i in enumerate(DUP_IDS)}
# a query equally close to the five bases (cosine ~0.45 to each): every group competes for the top
DUP_QUERY = _unit(GROUP_BASES.sum(axis=0))
NEAR_DUPLICATE_COSINE = 0.99


@pytest.fixture(scope="module")
def lite_store(tmp_path_factory: pytest.TempPathFactory):
    store = VectorStore(str(tmp_path_factory.mktemp("rerank") / "v.db"), "rerank_test", DIM,
                        IndexSettings(index_type="FLAT"))
    store.insert(_rows(RANDOM_IDS, RANDOM_VECTORS) + _rows(DUP_IDS, DUP_VECTORS))
    store.flush()
    yield store
    store.close()


ALL_VECTORS = {**dict(zip(RANDOM_IDS, RANDOM_VECTORS)), **dict(zip(DUP_IDS, DUP_VECTORS))}


def test_search_with_vectors_returns_the_stored_embeddings(lite_store: VectorStore) -> None:
    query = RANDOM_VECTORS[:2] + 0.1
    plain = lite_store.search(query, 20)
    with_vectors = lite_store.search(query, 20, with_vectors=True)
    assert [[h.id for h in hits] for hits in plain] == [[h.id for h in hits] for hits in with_vectors]
    assert all(h.embedding is None for h in plain[0])
    for hit in with_vectors[0] + with_vectors[1]:
        assert hit.embedding is not None and hit.embedding.dtype == np.float32
        np.testing.assert_allclose(hit.embedding, ALL_VECTORS[hit.id], atol=1e-7)


def test_exact_rerank_sorts_candidates_by_exact_cosine(lite_store: VectorStore) -> None:
    query = _unit(RNG.standard_normal(DIM))
    hits = lite_store.search(query[None], 100, with_vectors=True)[0]
    shuffled = [hits[i] for i in np.random.default_rng(0).permutation(len(hits))]
    ranked = exact_rerank(query * 3.0, shuffled, 10)  # any query norm
    candidate_ids = [h.id for h in hits]
    sims = np.array([ALL_VECTORS[i] @ query for i in candidate_ids], dtype=np.float64)
    expected = [candidate_ids[i] for i in np.argsort(-sims, kind="stable")[:10]]
    assert [h.id for h in ranked] == expected
    # Milvus Lite searched exactly: the reranked top 10 is also Milvus' own top 10
    assert [h.id for h in ranked] == candidate_ids[:10]
    np.testing.assert_allclose([h.score for h in ranked], np.sort(sims)[::-1][:10], atol=1e-6)
    assert [h.filename for h in ranked] == [next(c.filename for c in hits if c.id == h.id) for h in ranked]


async def test_mmr_with_lambda_one_equals_no_rerank(lite_store: VectorStore) -> None:
    queries = np.vstack([_unit(RNG.standard_normal((5, DIM))), DUP_QUERY[None]])
    for query in queries:
        candidates = lite_store.search(query[None], 100, with_vectors=True)[0]
        plain = lite_store.search(query[None], 10)[0]
        ranked = await _rerank(RerankMethod.MMR, query, candidates, 10, lambda_=1.0)
        assert [h.id for h in ranked] == [h.id for h in plain]
        np.testing.assert_allclose([h.score for h in ranked], [h.score for h in plain], atol=1e-6)


def _near_duplicate_pairs(hits: list[Hit]) -> int:
    vectors = np.stack([ALL_VECTORS[h.id] for h in hits])
    sims = vectors @ vectors.T
    pairs = itertools.combinations(range(len(hits)), 2)
    return sum(1 for a, b in pairs if sims[a, b] > NEAR_DUPLICATE_COSINE)


async def test_mmr_with_lower_lambda_returns_fewer_near_duplicates(lite_store: VectorStore) -> None:
    candidates = lite_store.search(DUP_QUERY[None], 100, with_vectors=True)[0]
    top_k = 10
    relevance = await _rerank("mmr", DUP_QUERY, candidates, top_k, lambda_=1.0)
    diverse = await _rerank("mmr", DUP_QUERY, candidates, top_k, lambda_=0.3)
    pairs_relevance, pairs_diverse = _near_duplicate_pairs(relevance), _near_duplicate_pairs(diverse)
    groups_relevance = {DUP_GROUP[h.id] for h in relevance if h.id in DUP_GROUP}
    groups_diverse = {DUP_GROUP[h.id] for h in diverse if h.id in DUP_GROUP}
    print(f"\nnear-duplicate pairs (cosine > {NEAR_DUPLICATE_COSINE}) in top {top_k}: lambda 1.0 -> "
          f"{pairs_relevance} ({len(groups_relevance)} groups), lambda 0.3 -> {pairs_diverse} "
          f"({len(groups_diverse)} groups)")
    assert pairs_relevance >= 6  # pure relevance fills the top 10 with whole groups of near copies
    assert pairs_diverse < pairs_relevance
    assert pairs_diverse == 0 and groups_diverse == set(range(GROUPS))  # one image per group
    # scores stay the query similarity (not the MMR objective)
    for hit in diverse:
        assert hit.score == pytest.approx(float(ALL_VECTORS[hit.id] @ DUP_QUERY), abs=1e-6)


def _hit(name: str, vector: list[float]) -> Hit:
    return Hit(id=name, score=0.0, filename=name, ingest_time_ms=0, metadata={},
               embedding=np.asarray(vector, dtype=np.float32))


def test_mmr_follows_carbonell_goldstein_on_a_worked_example() -> None:
    query = np.array([1.0, 0.0, 0.0], dtype=np.float32)
    a = _hit("a", [0.9, 0.43589, 0.0])        # sim(q, a) = 0.9
    a_copy = _hit("a2", [0.89, 0.45596, 0.0])  # sim(q, a2) = 0.89, sim(a, a2) ~ 0.9998
    b = _hit("b", [0.5, -0.5, 0.70711])       # sim(q, b) = 0.5, sim(a, b) ~ 0.232
    # lambda 0.5: after a, a2 -> 0.5 * 0.89 - 0.5 * 0.9998 = -0.055 < b -> 0.5 * 0.5 - 0.5 * 0.232 = 0.134
    assert [h.id for h in mmr_rerank(query, [b, a_copy, a], 3, 0.5)] == ["a", "b", "a2"]
    # lambda 0.9: a2 -> 0.9 * 0.89 - 0.1 * 0.9998 = 0.701 > b -> 0.45 - 0.0232 = 0.427
    assert [h.id for h in mmr_rerank(query, [b, a_copy, a], 3, 0.9)] == ["a", "a2", "b"]
    # lambda 0: the first pick is still the most relevant, then the least similar to it
    assert [h.id for h in mmr_rerank(query, [b, a_copy, a], 2, 0.0)] == ["a", "b"]
    assert [h.id for h in exact_rerank(query, [b, a_copy, a], 3)] == ["a", "a2", "b"]


async def test_rerank_pages_partition_the_reranked_window(lite_store: VectorStore) -> None:
    query = DUP_QUERY
    candidates = lite_store.search(query[None], 60, with_vectors=True)[0]
    for method in ("exact", "mmr", "none"):
        whole = await _rerank(method, query, candidates, 30, lambda_=0.3)
        pages = [await _rerank(method, query, candidates, 10, lambda_=0.3, offset=o) for o in (0, 10, 20)]
        assert [h.id for page in pages for h in page] == [h.id for h in whole]
    assert [h.id for h in await _rerank("none", query, candidates, 5)] == [h.id for h in candidates[:5]]


async def test_rerank_refuses_candidates_without_embeddings(lite_store: VectorStore) -> None:
    hits = lite_store.search(DUP_QUERY[None], 5)[0]
    for method in ("exact", "mmr"):
        with pytest.raises(ValueError, match="with_vectors=True"):
            await _rerank(method, DUP_QUERY, hits, 3)
    with pytest.raises(ValueError, match="ModelReranker"):
        await _rerank("model", DUP_QUERY, hits, 3)
    with pytest.raises(InvalidInputError, match="query"):
        exact_rerank(np.zeros(DIM, dtype=np.float32), hits, 3)


# ------------------------------------------------------------------------------------------ validation
SETTINGS = RerankSettings()  # method none, rerank_top_n 100, max 1000, mmr_lambda 0.5, no model
WITH_MODEL = RerankSettings(model="reranker", method="exact")


def test_validate_request_fills_defaults() -> None:
    assert validate_request(None, 10, None, None, SETTINGS) == (RerankMethod.NONE, 10, 0.5)
    assert validate_request("", 10, 0, None, WITH_MODEL) == (RerankMethod.EXACT, 100, 0.5)
    assert validate_request("MMR", 10, 50, 0.0, SETTINGS) == (RerankMethod.MMR, 50, 0.0)
    assert validate_request("mmr", 200, 0, 1.0, SETTINGS) == (RerankMethod.MMR, 200, 1.0)  # raised to top_k
    assert validate_request("mmr", 10, 0, None, SETTINGS, offset=150) == (RerankMethod.MMR, 160, 0.5)
    assert validate_request("model", 10, 1000, None, WITH_MODEL).method == RerankMethod.MODEL


@pytest.mark.parametrize(
    ("args", "kwargs", "field"),
    [
        (("exact", 10, 5, None, SETTINGS), {}, "rerank_top_n"),            # < top_k
        (("exact", 10, 20, None, SETTINGS), {"offset": 15}, "rerank_top_n"),  # < offset + top_k
        (("exact", 10, 1001, None, SETTINGS), {}, "rerank_top_n"),         # > max_rerank_top_n
        (("mmr", 10, 0, None, SETTINGS), {"offset": 995}, "max_rerank_top_n"),
        (("mmr", 10, 100, 1.5, SETTINGS), {}, "mmr_lambda"),
        (("mmr", 10, 100, -0.1, SETTINGS), {}, "mmr_lambda"),
        (("mmr", 10, 100, float("nan"), SETTINGS), {}, "mmr_lambda"),
        (("model", 10, 100, None, SETTINGS), {}, "model"),                # no reranker configured
        (("bm25", 10, 100, None, SETTINGS), {}, "rerank method"),
        (("exact", 0, 100, None, SETTINGS), {}, "top_k"),
    ],
)
def test_validate_request_rejects(args, kwargs, field: str) -> None:
    with pytest.raises(InvalidInputError, match=field):
        validate_request(*args, **kwargs)


def test_settings_reject_inconsistent_values() -> None:
    with pytest.raises(ValueError, match="max_rerank_top_n"):
        RerankSettings(rerank_top_n=2000, max_rerank_top_n=1000)
    with pytest.raises(ValueError, match="model"):
        RerankSettings(method="model")
    with pytest.raises(ValueError, match="mmr_lambda"):
        RerankSettings(mmr_lambda=2.0)
    assert RerankSettings(method="mmr").method is RerankMethod.MMR


# --------------------------------------------------------- Milvus server: an approximate index, recall
N_LARGE, DIM_LARGE, CLUSTERS, QUERIES, TOP_K, TOP_N = 20_000, 64, 256, 50, 10, 100


def _clustered_data() -> tuple[np.ndarray, np.ndarray]:
    """20k unit vectors in 256 tight clusters, and 50 queries halfway between two cluster centres.

    The true neighbours of such a query lie in two IVF cells, and nprobe = 1 visits one of them.
    """
    rng = np.random.default_rng(2024)
    centres = _unit(rng.standard_normal((CLUSTERS, DIM_LARGE)))
    members = rng.integers(0, CLUSTERS, N_LARGE)
    vectors = _unit(centres[members] + 0.6 / np.sqrt(DIM_LARGE) * rng.standard_normal((N_LARGE, DIM_LARGE)))
    pairs = rng.choice(CLUSTERS, (QUERIES, 2))
    noise = 0.3 / np.sqrt(DIM_LARGE) * rng.standard_normal((QUERIES, DIM_LARGE))
    queries = _unit(centres[pairs].sum(axis=1) + noise)
    return vectors, queries


def _wait_for_index_and_reload(uri: str, collection: str, rows: int, timeout_s: float = 120.0) -> None:
    """Wait until Milvus indexed every sealed row, then reload the collection so searches use the index.

    Until the reload the query node keeps serving the rows it loaded while they were growing (brute force
    / its interim index), which is not the configured index.
    """
    client = MilvusClient(uri)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            info = client.describe_index(collection, "embedding")
            if info.get("indexed_rows") == rows and not info.get("pending_index_rows"):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"index of {collection} not built after {timeout_s} s: {info}")
            time.sleep(0.5)
        client.release_collection(collection)
        client.load_collection(collection)
    finally:
        client.close()


@pytest.mark.milvus_server
@pytest.mark.parametrize(
    "index",
    [
        IndexSettings(index_type="IVF_FLAT", nlist=256, nprobe=1),
        IndexSettings(index_type="HNSW", M=8, efConstruction=32, ef=10),
    ],
    ids=["ivf_flat-nprobe1", "hnsw-ef10"],
)
def test_exact_rerank_against_brute_force_on_an_approximate_index(
    milvus_server_uri: str, index: IndexSettings, record_property
) -> None:
    vectors, queries = _clustered_data()
    ids = _ids(N_LARGE, "large")
    position = {i: n for n, i in enumerate(ids)}
    exact_top = np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :TOP_K]
    truth = [[ids[i] for i in row] for row in exact_top]

    collection = f"rerank_{index.index_type.lower()}_{uuid.uuid4().hex[:8]}"
    store = VectorStore(milvus_server_uri, collection, DIM_LARGE, index)
    try:
        store.insert(_rows(ids, vectors))
        store.flush(seal=True)
        _wait_for_index_and_reload(milvus_server_uri, collection, N_LARGE)

        approximate = [[h.id for h in hits] for hits in store.search(queries, TOP_K)]
        candidates = store.search(queries, TOP_N, with_vectors=True)
        reranked = []
        for query, hits in zip(queries, candidates):
            ranked = exact_rerank(query, hits, TOP_K)
            # the reranked order is the exact order over the candidate set (true vectors, numpy)
            cand = np.array([position[h.id] for h in hits])
            sims = vectors[cand].astype(np.float64) @ query.astype(np.float64)
            assert [h.id for h in ranked] == [hits[i].id for i in np.argsort(-sims, kind="stable")[:TOP_K]]
            np.testing.assert_allclose([h.score for h in ranked], np.sort(sims)[::-1][:TOP_K], atol=1e-6)
            reranked.append([h.id for h in ranked])
    finally:
        store.close()
        cleanup = MilvusClient(milvus_server_uri)
        cleanup.drop_collection(collection)
        cleanup.close()

    approx_recall, rerank_recall = _recall(approximate, truth), _recall(reranked, truth)
    candidate_recall = _recall([[h.id for h in hits] for hits in candidates], truth)
    record_property("recall_at_10", {"approximate": approx_recall, "reranked": rerank_recall})
    print(f"\n{index.index_type} {index.build_params()}: recall@{TOP_K} vs brute force over {QUERIES} "
          f"queries: approximate top {TOP_K} {approx_recall:.3f}, exact rerank of top {TOP_N} "
          f"{rerank_recall:.3f} (true top {TOP_K} inside the {TOP_N} candidates: {candidate_recall:.3f})")
    assert approx_recall < 0.9, "the index answered (nearly) exactly: the test would prove nothing"
    # the candidates come from a search at least as wide as the plain one (same nprobe, ef >= window)
    assert rerank_recall >= approx_recall
    # everything found among the candidates is kept: the rerank loses none of the true top 10 it was given
    assert rerank_recall == pytest.approx(candidate_recall)
    if index.index_type == "HNSW":
        # ef is raised to the candidate window (100): the wider candidate search finds more true neighbours
        assert rerank_recall > approx_recall


# --------------------------------------------------------------- Triton: a served ONNX scorer model
SCORER_DIM = 8
SCORER_MAX_BATCH = 16
SCORER_WEIGHTS = np.linspace(2.0, -1.0, SCORER_DIM).astype(np.float32)  # a diagonal bilinear "cross-encoder"

SCORER_CONFIG = f"""
name: "scorer"
platform: "onnxruntime_onnx"
max_batch_size: {SCORER_MAX_BATCH}
input [
  {{ name: "{QUERY_INPUT}" data_type: TYPE_FP32 dims: [ {SCORER_DIM} ] }},
  {{ name: "{CANDIDATE_INPUT}" data_type: TYPE_FP32 dims: [ {SCORER_DIM} ] }}
]
output [ {{ name: "{SCORE_OUTPUT}" data_type: TYPE_FP32 dims: [ 1 ] }} ]
dynamic_batching {{ max_queue_delay_microseconds: 1000 }}
"""
NOT_A_RERANKER_CONFIG = f"""
name: "not_a_reranker"
platform: "onnxruntime_onnx"
max_batch_size: 4
input [ {{ name: "x" data_type: TYPE_FP32 dims: [ {SCORER_DIM} ] }} ]
output [ {{ name: "y" data_type: TYPE_FP32 dims: [ {SCORER_DIM} ] }} ]
"""


def _scorer_onnx() -> onnx.ModelProto:
    """score[b, 0] = sum_d query[b, d] * w[d] * candidate[b, d] (ONNX opset 17)."""
    batch_dim = ["batch", SCORER_DIM]
    graph = helper.make_graph(
        [
            helper.make_node("Mul", [QUERY_INPUT, CANDIDATE_INPUT], ["qc"]),
            helper.make_node("Mul", ["qc", "w"], ["weighted"]),
            helper.make_node("ReduceSum", ["weighted", "axes"], [SCORE_OUTPUT], keepdims=1),
        ],
        "scorer",
        [helper.make_tensor_value_info(QUERY_INPUT, TensorProto.FLOAT, batch_dim),
         helper.make_tensor_value_info(CANDIDATE_INPUT, TensorProto.FLOAT, batch_dim)],
        [helper.make_tensor_value_info(SCORE_OUTPUT, TensorProto.FLOAT, ["batch", 1])],
        initializer=[numpy_helper.from_array(SCORER_WEIGHTS, "w"),
                     numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _identity_onnx() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", SCORER_DIM])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", SCORER_DIM])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def scorer_server(tmp_path_factory: pytest.TempPathFactory):
    """EncoderServer over a model repository holding only the scorer (no Vitrine manifest)."""
    from encoder_server.server import EncoderServer

    repository: Path = tmp_path_factory.mktemp("reranker_repository")
    for name, config, model in (("scorer", SCORER_CONFIG, _scorer_onnx()),
                                ("not_a_reranker", NOT_A_RERANKER_CONFIG, _identity_onnx())):
        (repository / name / "1").mkdir(parents=True)
        (repository / name / "config.pbtxt").write_text(config)
        onnx.save(model, repository / name / "1" / "model.onnx")
    assert not (repository / "manifest.json").exists()
    server = EncoderServer(repository, http_port=_free_port(), grpc_port=_free_port(),
                           metrics_port=_free_port(), ort_threads=1)
    server.start()
    yield server
    server.stop()


async def test_model_reranker_orders_candidates_by_the_served_score(tmp_path: Path, scorer_server) -> None:
    rng = np.random.default_rng(11)
    n = 3 * SCORER_MAX_BATCH + 5  # several requests per call (max_batch_size 16)
    vectors = _unit(rng.standard_normal((n, SCORER_DIM)))
    ids = _ids(n, "scored")
    store = VectorStore(str(tmp_path / "s.db"), "scored", SCORER_DIM, IndexSettings(index_type="FLAT"))
    store.insert(_rows(ids, vectors))
    store.flush()
    query = _unit(rng.standard_normal(SCORER_DIM))
    candidates = store.search(query[None], n, with_vectors=True)[0]
    store.close()
    assert len(candidates) == n

    async with ModelReranker(scorer_server.grpc_url, "scorer", timeout_s=10) as reranker:
        assert await reranker.ready()
        ranked = await _rerank("model", query, candidates, 10, rerankers=build_rerankers(reranker))
        scores = await reranker.score(query, np.stack([h.embedding for h in candidates]))

    cand_vectors = np.stack([h.embedding for h in candidates])
    expected_scores = cand_vectors @ (query * SCORER_WEIGHTS)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-6)
    expected = [candidates[i].id for i in np.argsort(-expected_scores, kind="stable")[:10]]
    assert [h.id for h in ranked] == expected
    np.testing.assert_allclose([h.score for h in ranked], np.sort(expected_scores)[::-1][:10], atol=1e-5)
    # the model decided, not cosine: its order differs from the exact one
    assert expected != [h.id for h in exact_rerank(query, candidates, 10)]


async def test_model_reranker_errors(scorer_server) -> None:
    query = np.ones(SCORER_DIM, dtype=np.float32)
    candidates = np.ones((3, SCORER_DIM), dtype=np.float32)
    async with ModelReranker(scorer_server.grpc_url, "not_a_reranker", timeout_s=10) as wrong:
        assert not await wrong.ready()
        with pytest.raises(RerankerError, match="no input 'query'"):
            await wrong.score(query, candidates)
    async with ModelReranker(scorer_server.grpc_url, "scorer", timeout_s=10) as reranker:
        with pytest.raises(RerankerError, match="8-d embeddings, got 16-d"):
            await reranker.score(np.ones(16, np.float32), np.ones((2, 16), np.float32))
        with pytest.raises(InvalidInputError, match="candidates"):
            await reranker.score(query, np.ones((2, 5), np.float32))
        assert (await reranker.score(query, np.empty((0, SCORER_DIM), np.float32))).shape == (0,)
    async with ModelReranker(scorer_server.grpc_url, "no_such_model", timeout_s=10) as missing:
        assert not await missing.ready()
        with pytest.raises(DependencyUnavailableError, match="not ready"):
            await missing.score(query, candidates)
    async with ModelReranker(f"127.0.0.1:{_free_port()}", "scorer", timeout_s=5) as down:
        assert not await down.ready()
        with pytest.raises(DependencyUnavailableError, match="encoder unavailable"):
            await down.score(query, candidates)
