"""VectorStore against real Milvus: Milvus Lite (a local .db) and a Milvus standalone server (`milvus`).

Synthetic unit vectors make the expected answers computable with numpy (cosine similarity = dot product).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from retrieval_service.adapters.blob_store import BlobStore, content_id
from retrieval_service.errors import (
    CollectionMismatchError,
    DependencyUnavailableError,
    InvalidFilterError,
    InvalidInputError,
    NotFoundError,
)
from retrieval_service.adapters.milvus import (
    MILVUS_MAX_WINDOW,
    IndexSettings,
    Row,
    VectorStore,
    is_lite_uri,
    validate_filter,
)
from retrieval_service.adapters.milvus import store as store_module
# Provides the session fixture `milvus_server_uri` (a real Milvus standalone server); registering the
# plugin again from tests/conftest.py is harmless (plugins register once per module name).
pytest_plugins = ["milvus_server"]

DIM = 16
N = 200
LABELS = 5
RNG = np.random.default_rng(1234)
VECTORS = RNG.standard_normal((N, DIM)).astype(np.float32)
VECTORS /= np.linalg.norm(VECTORS, axis=1, keepdims=True)
IDS = [hashlib.sha256(f"image-{i}".encode()).hexdigest() for i in range(N)]
QUERIES = RNG.standard_normal((3, DIM)).astype(np.float32) * 3.0  # not unit: COSINE normalizes


def _rows(indices=range(N), label_offset: int = 0) -> list[Row]:
    return [
        Row(
            id=IDS[i],
            embedding=VECTORS[i],
            filename=f"img_{i:03d}.png",
            ingest_time_ms=1_700_000_000_000 + i,
            metadata={"label": (i + label_offset) % LABELS, "tags": ["synthetic"], "n": i},
        )
        for i in indices
    ]


def _cosine(queries: np.ndarray, indices: np.ndarray) -> np.ndarray:
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    return q @ VECTORS[indices].T


def _expected(query: np.ndarray, k: int, indices=None) -> tuple[list[str], np.ndarray]:
    """Top-k ids and scores by exact cosine over `indices` (default: all)."""
    indices = np.arange(N) if indices is None else np.asarray(indices)
    sims = _cosine(query[None], indices)[0]
    order = np.argsort(-sims, kind="stable")[:k]
    return [IDS[i] for i in indices[order]], sims[order]


@pytest.fixture(scope="module")
def lite_uri(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("lite") / "vectors.db")


@pytest.fixture(scope="module", params=["lite", pytest.param("server", marks=pytest.mark.milvus_server)])
def backend_uri(request) -> str:
    return request.getfixturevalue("lite_uri" if request.param == "lite" else "milvus_server_uri")


def _open(uri: str, index: IndexSettings | None = None, *, collection: str | None = None, dim: int = DIM,
          model_id: str = "test-model") -> VectorStore:
    store = VectorStore(uri, collection or f"t_{uuid.uuid4().hex[:12]}", dim,
                        index or IndexSettings(index_type="FLAT"), model_id=model_id)
    store.open()
    return store


@pytest.fixture
def make_store(backend_uri):
    """Factory of opened stores on a fresh collection of the current backend."""
    stores: list[VectorStore] = []

    def make(*args, **kwargs) -> VectorStore:
        stores.append(_open(backend_uri, *args, **kwargs))
        return stores[-1]

    yield make
    for store in stores:
        store.close()


@pytest.fixture
def filled(make_store) -> VectorStore:
    """A fresh collection holding the N synthetic rows, for tests that modify it."""
    store = make_store()
    assert store.insert(_rows()) == N
    store.flush()
    return store


@pytest.fixture(scope="module")
def shared(backend_uri) -> VectorStore:
    """One collection holding the N synthetic rows, for read-only tests (creating one: ~3 s on a server)."""
    store = _open(backend_uri)
    assert store.insert(_rows()) == N
    store.flush()
    yield store
    store.close()


def test_search_returns_nearest_by_cosine_with_numpy_scores(shared):
    results = shared.search(QUERIES, 10)
    assert len(results) == len(QUERIES)
    for query, hits in zip(QUERIES, results):
        ids, scores = _expected(query, 10)
        assert [h.id for h in hits] == ids
        np.testing.assert_allclose([h.score for h in hits], scores, atol=1e-5)
    top = results[0][0]
    i = IDS.index(top.id)
    assert (top.filename, top.ingest_time_ms) == (f"img_{i:03d}.png", 1_700_000_000_000 + i)
    assert top.metadata == {"label": i % LABELS, "tags": ["synthetic"], "n": i}


@pytest.mark.parametrize(
    "index",
    [
        IndexSettings(index_type="FLAT"),
        IndexSettings(index_type="IVF_FLAT", nlist=8, nprobe=8),
        IndexSettings(index_type="HNSW", M=16, efConstruction=64, ef=64),
    ],
    ids=lambda s: s.index_type,
)
def test_index_types_find_the_exact_neighbours(make_store, index):
    store = make_store(index)
    store.insert(_rows())
    store.flush()
    info = store.describe()
    assert (info["index_type"], info["metric_type"]) == (index.index_type, "COSINE")
    assert (info["dim"], info["count"]) == (DIM, N)
    assert info["params"] == index.build_params()
    hits = store.search(VECTORS[:5], 10)
    for i, page in enumerate(hits):
        assert page[0].id == IDS[i] and page[0].score == pytest.approx(1.0, abs=1e-5)
        expected, _ = _expected(VECTORS[i], 10)
        recall = len(set(expected) & {h.id for h in page}) / 10
        assert recall >= (1.0 if index.index_type != "HNSW" else 0.9)


def test_filter_on_metadata_and_filename(shared):
    hits = shared.search(QUERIES[:1], 15, filter='metadata["label"] == 3')[0]
    label3 = [i for i in range(N) if i % LABELS == 3]
    ids, scores = _expected(QUERIES[0], 15, label3)
    assert [h.id for h in hits] == ids
    assert all(h.metadata["label"] == 3 for h in hits)
    np.testing.assert_allclose([h.score for h in hits], scores, atol=1e-5)

    hits = shared.search(QUERIES[:1], 50, filter='filename like "img_00%"')[0]
    assert sorted(h.filename for h in hits) == [f"img_{i:03d}.png" for i in range(10)]
    # (Milvus Lite rejects `metadata["label"] in [1, 2]`: 'left side of in must be a field reference')
    expr = '(metadata["label"] == 1 or metadata["label"] == 2) and ingest_time < 1700000000020'
    hits = shared.search(QUERIES[:1], 50, filter=expr)[0]
    assert sorted(IDS.index(h.id) for h in hits) == [i for i in range(20) if i % LABELS in (1, 2)]
    assert shared.count('metadata["label"] == 3') == len(label3)


def test_pagination_with_offset_gives_the_next_results(shared):
    first = shared.search(QUERIES[:1], 7)[0]
    second = shared.search(QUERIES[:1], 7, offset=7)[0]
    both = shared.search(QUERIES[:1], 14)[0]
    assert not {h.id for h in first} & {h.id for h in second}
    assert [h.id for h in first + second] == [h.id for h in both]
    scores = [h.score for h in first + second]
    assert scores == sorted(scores, reverse=True)
    filtered = shared.search(QUERIES[:1], 4, offset=4, filter='metadata["label"] == 0')[0]
    ids, _ = _expected(QUERIES[0], 8, [i for i in range(N) if i % LABELS == 0])
    assert [h.id for h in filtered] == ids[4:]


def test_min_score_drops_hits_below_it(shared):
    _, scores = _expected(QUERIES[1], 20)
    threshold = float(scores[12])
    hits = shared.search(QUERIES[1:2], 20, min_score=threshold)[0]
    assert len(hits) == 13
    assert all(h.score >= threshold - 1e-6 for h in hits)
    assert shared.search(QUERIES[1:2], 20, min_score=1.01)[0] == []


def test_delete_by_ids_and_by_filter(filled):
    missing = hashlib.sha256(b"never stored").hexdigest()
    assert filled.delete(ids=[IDS[0], IDS[1], IDS[2], missing, IDS[0]]) == 3
    assert filled.count() == N - 3
    assert filled.get([IDS[0], IDS[1], IDS[2]]) == []
    label4 = [i for i in range(3, N) if i % LABELS == 4]
    assert filled.delete(filter='metadata["label"] == 4') == len(label4)
    assert filled.count() == N - 3 - len(label4)
    assert filled.count('metadata["label"] == 4') == 0
    assert filled.delete(filter='metadata["label"] == 4') == 0
    assert filled.delete(ids=[]) == 0
    hits = filled.search(VECTORS[:5], 1)
    assert all(page[0].id not in {IDS[0], IDS[1], IDS[2]} for page in hits)
    with pytest.raises(InvalidInputError, match="exactly one"):
        filled.delete()
    with pytest.raises(InvalidInputError, match="exactly one"):
        filled.delete(ids=[IDS[5]], filter='metadata["label"] == 1')
    with pytest.raises(InvalidInputError, match="empty"):
        filled.delete(filter="  ")
    with pytest.raises(InvalidInputError, match="64 lowercase hex"):
        filled.delete(ids=["../../etc/passwd"])


def test_duplicate_ids_are_never_duplicated(filled):
    again = _rows(range(10), label_offset=1)  # same ids, new metadata
    assert filled.insert(again + again[:3]) == 10
    filled.flush()
    assert filled.count() == N
    assert filled.existing_ids(IDS[:10]) == set(IDS[:10])
    hits = filled.search(VECTORS[:1], 3)[0]
    assert [h.id for h in hits].count(IDS[0]) == 1
    assert hits[0].metadata["label"] == 1  # last write wins
    (row,) = filled.get([IDS[0]])
    assert row.metadata["label"] == 1


def test_get_and_existing_ids(shared):
    missing = hashlib.sha256(b"nope").hexdigest()
    rows = shared.get([IDS[7], missing, IDS[3], IDS[7]])
    assert [r.id for r in rows] == [IDS[7], IDS[3]]
    assert rows[0].embedding is None
    assert (rows[0].filename, rows[0].ingest_time_ms) == ("img_007.png", 1_700_000_000_007)
    assert rows[0].metadata["n"] == 7
    (with_vec,) = shared.get([IDS[3]], with_vectors=True)
    assert with_vec.embedding.dtype == np.float32 and with_vec.embedding.shape == (DIM,)
    np.testing.assert_array_equal(with_vec.embedding, VECTORS[3])
    assert shared.existing_ids([IDS[1], missing, IDS[150]]) == {IDS[1], IDS[150]}
    assert shared.existing_ids([]) == set()


def test_malformed_filter_raises_invalid_filter_error(shared):
    for bad in ['metadata["label" == 1', "nosuchfield > 3", "filename like", "1 +"]:
        with pytest.raises(InvalidFilterError) as info:
            shared.search(QUERIES[:1], 5, filter=bad)
        assert bad in str(info.value) and len(str(info.value)) > len(bad) + 20  # carries Milvus' message
    with pytest.raises(InvalidFilterError):
        shared.count('metadata["label" == 1')
    with pytest.raises(InvalidFilterError):
        shared.delete(filter="nosuchfield > 3")
    assert shared.count() == N


def test_validated_filter_is_not_parsed_again(shared, monkeypatch):
    expr = validate_filter("metadata['label'] == 3")
    parsed: list[str] = []

    def counting(text: str):
        parsed.append(text)
        return validate_filter(text)

    monkeypatch.setattr(store_module, "validate_filter", counting)
    label3 = len([i for i in range(N) if i % LABELS == 3])
    assert shared.count(expr) == label3
    assert all(h.metadata["label"] == 3 for h in shared.search(QUERIES[:1], 5, filter=expr)[0])
    assert parsed == []
    assert shared.count("metadata['label'] == 3") == label3  # a plain str is validated
    assert parsed == ["metadata['label'] == 3"]


def test_one_definition_of_a_lite_uri():
    from retrieval_service.settings import Settings

    for uri, lite in [("var/milvus.db", True), ("/abs/x.db", True), ("http://milvus:19530", False),
                      ("https://h:443", False), ("unix:/tmp/m.sock", False), ("vectors.sqlite", False)]:
        assert is_lite_uri(uri) is lite
        assert Settings(milvus_uri=uri).milvus_is_lite is lite
        if uri.startswith(("http", "unix")) or lite:
            assert VectorStore(uri, "c", DIM).is_lite is lite


def test_bad_search_arguments_raise_invalid_input(shared):
    with pytest.raises(InvalidInputError, match="vectors must be"):
        shared.search(np.zeros((1, DIM + 1), np.float32), 5)
    with pytest.raises(InvalidInputError, match="vectors must be"):
        shared.search(np.zeros(DIM, np.float32), 5)
    with pytest.raises(InvalidInputError, match="NaN"):
        shared.search(np.full((1, DIM), np.nan, np.float32), 5)
    with pytest.raises(InvalidInputError, match="top_k"):
        shared.search(QUERIES[:1], 0)
    with pytest.raises(InvalidInputError, match="16384"):
        shared.search(QUERIES[:1], 10, offset=MILVUS_MAX_WINDOW - 9)
    assert len(shared.search(QUERIES[:1], 10, offset=MILVUS_MAX_WINDOW - 10)[0]) == 0
    with pytest.raises(InvalidInputError, match="shape"):
        shared.insert([Row(IDS[0], np.zeros(DIM - 1, np.float32), "x.png", 0, {})])
    with pytest.raises(InvalidInputError, match="JSON"):
        shared.insert([Row(IDS[0], VECTORS[0], "x.png", 0, {"when": object()})])
    with pytest.raises(InvalidInputError, match="filename"):
        shared.insert([Row(IDS[0], VECTORS[0], "é" * 600, 0, {})])


def test_reopening_with_another_dim_or_model_is_refused(make_store, backend_uri):
    store = make_store(model_id="model-A")
    store.insert(_rows(range(5)))
    name = store.collection
    with pytest.raises(CollectionMismatchError, match="16-d"):
        VectorStore(backend_uri, name, DIM * 2, IndexSettings(index_type="FLAT"), model_id="model-A").open()
    with pytest.raises(CollectionMismatchError, match="model-A"):
        VectorStore(backend_uri, name, DIM, IndexSettings(index_type="FLAT"), model_id="model-B").open()
    same = make_store(collection=name, model_id="model-A", index=IndexSettings(index_type="HNSW"))
    assert same.count() == 5
    assert same.describe()["index_type"] == "FLAT"  # the existing index is kept
    anyone = make_store(collection=name, model_id="")
    assert anyone.describe()["model_id"] == "model-A"


def test_concurrent_searches_and_inserts_from_threads(make_store):
    store = make_store()
    store.insert(_rows(range(100)))
    store.flush()
    errors: list[BaseException] = []

    def search(k: int) -> list[str]:
        return [h.id for h in store.search(VECTORS[k : k + 1], 1)[0]]

    def insert(chunk: int) -> int:
        return store.insert(_rows(range(100 + chunk * 25, 125 + chunk * 25)))

    with ThreadPoolExecutor(8) as pool:
        searches = [pool.submit(search, k) for k in range(40)]
        inserts = [pool.submit(insert, c) for c in range(4)]
        for future in searches + inserts:
            try:
                future.result()
            except BaseException as exc:  # noqa: BLE001 - collected and asserted below
                errors.append(exc)
    assert not errors
    assert [f.result() for f in searches] == [[IDS[k]] for k in range(40)]
    store.flush()
    assert store.count() == N


def test_describe(shared):
    info = shared.describe()
    assert info["collection"] == shared.collection
    assert info["count"] == N and info["dim"] == DIM
    assert info["model_id"] == "test-model"
    assert info["backend"] == ("milvus-lite" if shared.is_lite else "milvus")


def test_lite_data_persists_across_processes(tmp_path):
    from milvus_lite.server_manager import server_manager_instance

    uri = str(tmp_path / "persist" / "vectors.db")
    store = VectorStore(uri, "persisted", DIM, IndexSettings(index_type="HNSW"), model_id="m")
    store.open()
    store.insert(_rows(range(50)))
    store.flush()
    store.close()
    server_manager_instance.release_server(uri)  # closes the in-process Milvus Lite server and its files

    script = textwrap.dedent(
        f"""
        import json, numpy as np
        from retrieval_service.adapters.milvus import VectorStore, IndexSettings
        s = VectorStore({uri!r}, "persisted", {DIM}, IndexSettings(index_type="HNSW"), model_id="m")
        q = np.array({VECTORS[7].tolist()!r}, dtype=np.float32)[None]
        print(json.dumps({{"count": s.count(), "top": s.search(q, 1)[0][0].id}}))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"count": 50, "top": IDS[7]}


def test_lite_file_held_by_another_process_is_unavailable(tmp_path):
    uri = str(tmp_path / "held.db")
    holder = VectorStore(uri, "held", DIM)
    holder.open()
    script = textwrap.dedent(
        f"""
        from retrieval_service.errors import DependencyUnavailableError
        from retrieval_service.adapters.milvus import VectorStore
        try:
            VectorStore({uri!r}, "held", {DIM}).open()
        except DependencyUnavailableError as exc:
            print("unavailable", exc.dependency, exc)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.stdout.startswith("unavailable milvus"), out.stdout + out.stderr[-2000:]
    assert "another process" in out.stdout
    holder.close()


def test_closed_port_is_unavailable():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store = VectorStore(f"http://127.0.0.1:{port}", "nothing_here", DIM, timeout_s=3)
    with pytest.raises(DependencyUnavailableError) as info:
        store.open()
    assert info.value.dependency == "milvus"
    with pytest.raises(DependencyUnavailableError):
        store.count()


@pytest.mark.milvus_server
def test_server_stopped_is_unavailable():
    from milvus_server import BIN_CACHE, start_milvus_server

    base = Path(tempfile.mkdtemp(prefix="vitrine-milvus-down-"))
    try:
        uri, stop = start_milvus_server(base, bin_cache=BIN_CACHE)
        try:
            store = VectorStore(uri, "soon_gone", DIM, IndexSettings(index_type="HNSW"), timeout_s=5)
            store.open()
            store.insert(_rows(range(10)))
            assert store.count() == 10
        finally:
            stop()
        for call in (lambda: store.search(QUERIES[:1], 3), store.count, lambda: store.insert(_rows(range(3))),
                     lambda: store.get(IDS[:2]), lambda: store.delete(ids=IDS[:1])):
            with pytest.raises(DependencyUnavailableError) as info:
                call()
            assert info.value.dependency == "milvus"
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_index_settings_validation():
    with pytest.raises(ValueError, match="nprobe"):
        IndexSettings(index_type="IVF_FLAT", nlist=8, nprobe=16)
    with pytest.raises(ValueError):
        IndexSettings(metric_type="L2")
    with pytest.raises(ValueError, match="neither"):
        VectorStore("vectors.sqlite", "c", DIM)
    with pytest.raises(ValueError, match="collection name"):
        VectorStore("x.db", "1-bad name", DIM)
    hnsw = IndexSettings(index_type="HNSW", M=8, efConstruction=40)
    assert hnsw.build_params() == {"M": 8, "efConstruction": 40}


def test_threads_share_one_lazily_opened_store(lite_uri):
    store = VectorStore(lite_uri, f"lazy_{uuid.uuid4().hex[:8]}", DIM, IndexSettings(index_type="FLAT"))
    barrier = threading.Barrier(4)

    def first_call() -> int:
        barrier.wait()
        return store.count()  # opens on first use; concurrent first uses must not race

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(lambda _: first_call(), range(4))) == [0, 0, 0, 0]
    store.close()


# --- blob store ------------------------------------------------------------------------------------------------


def test_blob_store_round_trip_and_layout(tmp_path):
    blobs = BlobStore(tmp_path / "blobs")
    data = b"\x89PNG fake but opaque bytes"
    image_id = blobs.put(data)
    assert image_id == hashlib.sha256(data).hexdigest() == content_id(data)
    assert blobs.path(image_id) == tmp_path / "blobs" / image_id[:2] / image_id[2:4] / image_id
    assert blobs.get(image_id) == data and blobs.exists(image_id)
    assert blobs.put(data) == image_id  # idempotent
    assert [p.name for p in blobs.path(image_id).parent.iterdir()] == [image_id]  # no temp files left
    assert blobs.delete(image_id) is True and blobs.delete(image_id) is False
    assert not blobs.exists(image_id)
    with pytest.raises(NotFoundError):
        blobs.get(image_id)


def test_blob_store_rejects_ids_that_are_not_sha256_hex(tmp_path):
    blobs = BlobStore(tmp_path)
    for bad in ["../../etc/passwd", "ab" * 31, "AB" * 32, "g" * 64, "", "a" * 64 + "/x", None]:
        with pytest.raises(InvalidInputError, match="64 lowercase hex"):
            blobs.get(bad)
        with pytest.raises(InvalidInputError):
            blobs.exists(bad)


def test_blob_store_concurrent_writers(tmp_path):
    blobs = BlobStore(tmp_path)
    payloads = [bytes([i]) * 100_000 for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(blobs.put, payloads * 4))  # each payload written 4 times concurrently
    assert ids == [content_id(p) for p in payloads * 4]
    assert all(blobs.get(content_id(p)) == p for p in payloads)
    assert not list(tmp_path.rglob("*.tmp"))
