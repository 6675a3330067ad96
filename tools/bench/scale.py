"""`vitrine bench scale`: Milvus at 10k -> 1M vectors, FLAT vs IVF_FLAT vs HNSW, Milvus Lite vs Milvus server.

For each (backend, size, index type) the benchmark creates a fresh collection through the service's own
`retrieval_service.adapters.milvus.store.VectorStore` (same schema, upserts, COSINE, search parameters and output
fields as the retrieval service), and measures:

* insert_s: upserting all rows (batches of `INSERT_BATCH` rows; the store splits them into 1000-row upserts);
  insert_max_batch_s is the slowest batch (Milvus Lite flushes synchronously inside a write when its memtable
  reaches 128 MiB).
* build_s: from the end of the inserts until every row is served by the configured index: flush, index build
  and load. Milvus server: flush (seal), wait until `describe_index` reports every row indexed, then
  release + load (until then the query node serves growing segments by brute force / its interim index).
  Milvus Lite (milvus-lite 3.2, a pure-Python engine with per-segment faiss indexes built by a background
  thread after each flush): flush, then wait for that background compaction + index build to drain.
* search p50/p99 (ms): single-query searches (top_k 10, one client, sequential), through
  `VectorStore.search`, after `WARMUP_QUERIES` unmeasured ones.
* recall@10: |returned ids ∩ exact top-10| / 10, averaged over the queries; the exact top-10 is numpy brute
  force (float32 dot products of the L2-normalised vectors = cosine similarity) on the same vectors.
* memory: RSS (psutil) of the process(es) running Milvus. Server: the `milvus` server process and its
  children. Milvus Lite 3.2 runs inside the client process (gRPC server threads, no child process), so each
  Lite case runs in its own spawned worker process and its RSS is measured; `rss_delta_mib` (RSS growth since
  just before the collection was created, i.e. without the worker's Python, numpy and the memory-mapped
  dataset pages it touched before) is the number to compare. `rss_mib` is measured after the searches;
  `peak_rss_mib` is the highest RSS sampled every 0.2 s during insert + build.

A sweep of nprobe (IVF_FLAT) and ef (HNSW) on the same collection shows the recall/latency trade-off (rows
with point == "sweep"; they reuse the index, so their insert/build/memory columns are empty).

Data: seeded synthetic vectors from a Gaussian mixture (`MixtureSpec`): `clusters` centres in a
`latent_dim`-d space, points scattered around them, mapped into `dim` dimensions by a fixed random
orthonormal map, plus isotropic noise, then L2-normalised. Real image embeddings are clustered and have a low
intrinsic dimension (estimates for CLIP-like embeddings are a few tens); uniform random vectors in 512-d have
none of that structure (all pairwise cosines ~0), which makes every ANN index look far worse than on real
data. Queries are fresh draws from the same mixture (not stored vectors).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import logging
import multiprocessing
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from pymilvus import MilvusClient

from retrieval_service.adapters.milvus import IndexSettings, Row, VectorStore
from tools.bench.report import BenchResult, Target, percentiles, write_result
from tools.milvus_server import DEFAULT_BIN_CACHE, start_milvus_server_process

log = logging.getLogger(__name__)

BACKENDS = ("lite", "server")
INDEX_TYPES = ("FLAT", "IVF_FLAT", "HNSW")
TOP_K = 10
INSERT_BATCH = 5000
WARMUP_QUERIES = 5
MIN_QUERIES = 20
#: Deadline of each Milvus call in the benchmark, seconds. The service's default (10 s) is too short for
#: Milvus Lite's synchronous flush inside an upsert past ~60k rows of 512-d on 2 busy cores (measured ~11 s).
CALL_TIMEOUT_S = 600.0
MIB = 2**20
TITLE = "Milvus at scale: FLAT vs IVF_FLAT vs HNSW, Milvus Lite vs Milvus server"


@dataclasses.dataclass(frozen=True)
class MixtureSpec:
    """The synthetic data distribution (see module doc).

    Attributes:
        clusters: number of mixture components (centres ~ N(0, I) in the latent space).
        latent_dim: intrinsic dimension of the data.
        spread: standard deviation of points around their centre, per latent dimension (centres have 1).
        noise: standard deviation of the isotropic noise added in the `dim`-d space, relative to the norm of
            the mapped latent point.
    """

    clusters: int = 1000
    latent_dim: int = 32
    spread: float = 0.5
    noise: float = 0.1


class Mixture:
    """Seeded Gaussian-mixture sampler of L2-normalised float32 vectors [n, dim]."""

    def __init__(self, dim: int, spec: MixtureSpec = MixtureSpec(), seed: int = 0) -> None:
        """Fix the centres and the latent -> `dim` map from `seed` (numpy PCG64)."""
        if dim < 2:
            raise ValueError(f"dim must be >= 2, got {dim}")
        self.dim, self.spec = dim, spec
        rng = np.random.default_rng([seed, 0])
        latent = min(spec.latent_dim, dim)
        self.centres = rng.standard_normal((spec.clusters, latent)).astype(np.float32)
        q, _ = np.linalg.qr(rng.standard_normal((dim, latent)))  # orthonormal columns
        self.basis = q.T.astype(np.float32)  # [latent, dim]

    def sample(self, n: int, stream: int, chunk: int = 100_000) -> np.ndarray:
        """`n` vectors, float32 [n, dim], unit L2 norm; `stream` selects an independent seeded draw."""
        rng = np.random.default_rng([stream, 1])
        out = np.empty((n, self.dim), dtype=np.float32)
        latent = self.basis.shape[0]
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            labels = rng.integers(0, self.spec.clusters, size=m)
            z = self.centres[labels] + self.spec.spread * rng.standard_normal((m, latent), dtype=np.float32)
            x = z @ self.basis
            scale = self.spec.noise * np.linalg.norm(x, axis=1, keepdims=True) / np.sqrt(self.dim)
            x += scale * rng.standard_normal((m, self.dim), dtype=np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            out[start : start + m] = x
        return out


def exact_top_k(vectors: np.ndarray, queries: np.ndarray, k: int = TOP_K, chunk: int = 200_000) -> np.ndarray:
    """Exact top-k row indices by cosine similarity (dot products of unit vectors), best first.

    Args:
        vectors: float32 [N, dim], L2-normalised.
        queries: float32 [Q, dim], L2-normalised.
        k: neighbours per query (<= N).

    Returns:
        int64 [Q, k].
    """
    best_idx = np.empty((queries.shape[0], 0), dtype=np.int64)
    best_sim = np.empty((queries.shape[0], 0), dtype=np.float32)
    for start in range(0, vectors.shape[0], chunk):
        sims = queries @ vectors[start : start + chunk].T
        kk = min(k, sims.shape[1])
        part = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
        best_idx = np.concatenate([best_idx, part + start], axis=1)
        best_sim = np.concatenate([best_sim, np.take_along_axis(sims, part, axis=1)], axis=1)
        keep = np.argsort(-best_sim, axis=1, kind="stable")[:, :k]
        best_idx = np.take_along_axis(best_idx, keep, axis=1)
        best_sim = np.take_along_axis(best_sim, keep, axis=1)
    return best_idx


def recall_at_k(found: Sequence[Sequence[int]], truth: np.ndarray) -> float:
    """Mean over queries of |found_q ∩ truth_q| / k, where k = truth.shape[1] (recall@k)."""
    k = truth.shape[1]
    return float(np.mean([len(set(f) & set(t.tolist())) / k for f, t in zip(found, truth, strict=True)]))


def row_id(i: int) -> str:
    """Content id of synthetic row `i`: sha256 hex of its index (the store requires 64 hex characters)."""
    return hashlib.sha256(int(i).to_bytes(8, "little")).hexdigest()


def parse_sizes(text: str) -> tuple[int, ...]:
    """'10k,100k,1M' or '10000,100000' -> (10000, 100000, 1000000). Raises ValueError on a bad item."""
    sizes = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        mult = {"k": 1_000, "m": 1_000_000}.get(item[-1], 1)
        number = item[:-1] if mult > 1 else item
        try:
            value = int(float(number) * mult)
        except ValueError:
            raise ValueError(f"size {item!r} is not a number like 10000, 10k or 1M") from None
        if value < TOP_K:
            raise ValueError(f"size {value} must be >= top_k ({TOP_K})")
        sizes.append(value)
    if not sizes:
        raise ValueError("no sizes given")
    return tuple(sizes)


@dataclasses.dataclass(frozen=True)
class ScaleConfig:
    """What `run_scale` measures.

    Attributes:
        sizes: collection sizes (rows).
        dim: vector dimension.
        backends: subset of ("lite", "server").
        index_types: subset of ("FLAT", "IVF_FLAT", "HNSW").
        queries: measured single queries per (backend, size, index) at the default search parameters.
        sweep_queries: queries per nprobe/ef sweep point.
        search_budget_s: at most this many seconds of measured searches per point, once `MIN_QUERIES` are done
            (Milvus Lite's FLAT search copies the whole collection per query: ~0.4 s at 100k x 512); the
            `queries` column says how many were measured.
        nprobe_sweep: IVF_FLAT nprobe values (those <= nlist are used).
        ef_sweep: HNSW ef values (Milvus raises ef below top_k to top_k).
        nlist, nprobe, M, efConstruction, ef: index settings (defaults: the service's `IndexSettings`).
        mixture: the data distribution.
        seed: seeds data, queries and mixture.
    """

    sizes: tuple[int, ...] = (10_000, 100_000, 1_000_000)
    dim: int = 512
    backends: tuple[str, ...] = BACKENDS
    index_types: tuple[str, ...] = INDEX_TYPES
    queries: int = 1000
    sweep_queries: int = 200
    search_budget_s: float = 60.0
    nprobe_sweep: tuple[int, ...] = (1, 4, 16, 64)
    ef_sweep: tuple[int, ...] = (10, 32, 64, 128, 256)
    nlist: int = 128
    nprobe: int = 16
    M: int = 16
    efConstruction: int = 200
    ef: int = 64
    mixture: MixtureSpec = MixtureSpec()
    seed: int = 0

    def __post_init__(self) -> None:
        bad = [b for b in self.backends if b not in BACKENDS]
        if bad or not self.backends:
            raise ValueError(f"backends must be a non-empty subset of {BACKENDS}, got {self.backends}")
        bad = [i for i in self.index_types if i not in INDEX_TYPES]
        if bad or not self.index_types:
            raise ValueError(
                f"index types must be a non-empty subset of {INDEX_TYPES}, got {self.index_types}")
        if not self.sizes or min(self.sizes) < TOP_K:
            raise ValueError(f"sizes must be >= top_k ({TOP_K}), got {self.sizes}")
        if self.queries < 1 or self.sweep_queries < 0:
            raise ValueError("queries must be >= 1 and sweep_queries >= 0")
        # validates the index parameters (pydantic's ValidationError is a ValueError)
        self.index_settings("HNSW")
        self.index_settings("IVF_FLAT")

    def index_settings(self, index_type: str, **search: int) -> IndexSettings:
        """The service's `IndexSettings` for `index_type`, with search parameters overridden by `search`."""
        params = {"nlist": self.nlist, "nprobe": self.nprobe, "M": self.M,
                  "efConstruction": self.efConstruction, "ef": self.ef, **search}
        return IndexSettings(index_type=index_type, **params)


#: `make bench`'s short run (about 3 minutes on 2 idle cores).
QUICK = ScaleConfig(sizes=(10_000, 20_000), queries=100, sweep_queries=50, search_budget_s=10.0,
                    nprobe_sweep=(1, 4), ef_sweep=(10, 128))


# ---- measurement in a worker process -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Case:
    backend: str
    n: int
    index_type: str
    uri: str
    rss_pid: int | None  # None: this (worker) process hosts Milvus (Lite)
    vectors_path: str
    queries_path: str
    truth_path: str
    config: ScaleConfig


class _RssSampler:
    """Peak RSS (bytes) of a process and its children, sampled every `period_s` on a daemon thread."""

    def __init__(self, pid: int, period_s: float = 0.2) -> None:
        self.pid, self.period_s, self.peak = pid, period_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "_RssSampler":
        self.peak = rss_bytes(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.peak = max(self.peak, rss_bytes(self.pid))


def rss_bytes(pid: int) -> int:
    """Resident set size (bytes) of process `pid` plus all its descendants (psutil); 0 if it is gone."""
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total


def _drain_lite_background(uri: str, collection: str) -> bool:
    """Wait for Milvus Lite's background compaction + index build of `collection` (this process' Lite).

    milvus-lite 3.2 builds segment indexes on a single background thread after each flush and exposes no RPC
    to wait for it, so this reaches into its in-process server (`server_manager_instance`, private API).
    Returns False when that API is not there (another milvus-lite version); the caller then releases
    and reloads.
    """
    try:
        # Kept local: a private milvus-lite 3.2 module, probed per call (ImportError -> False, as documented).
        from milvus_lite.server_manager import server_manager_instance  # noqa: PLC0415

        servers = server_manager_instance._servers  # noqa: SLF001
        _server, db, _port = servers[os.path.abspath(uri)]
        db.get_collection(collection)._wait_for_bg()  # noqa: SLF001
    except (ImportError, AttributeError, KeyError, ValueError, TypeError):
        return False
    return True


def _wait_server_index(client: Any, collection: str, rows: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        info = client.describe_index(collection, "embedding")
        if info.get("indexed_rows") == rows and not info.get("pending_index_rows"):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"index of {collection} not built after {timeout_s:.0f} s: {info}")
        time.sleep(0.2)


def _search_all(store: Any, queries: np.ndarray, truth: np.ndarray, index_to_row: dict[str, int],
                budget_s: float) -> dict[str, Any]:
    """Sequential single-query searches: latency percentiles (ms), recall@10, and how many were measured."""
    for q in queries[:WARMUP_QUERIES]:
        store.search(q[None], TOP_K)
    latencies, found = [], []
    started = time.perf_counter()
    for q in queries:
        t0 = time.perf_counter()
        hits = store.search(q[None], TOP_K)[0]
        latencies.append((time.perf_counter() - t0) * 1e3)
        found.append([index_to_row[h.id] for h in hits])
        if len(found) >= MIN_QUERIES and time.perf_counter() - started > budget_s:
            break
    stats = percentiles(latencies, qs=(50, 99))
    return {"search_p50_ms": stats["p50_ms"], "search_p99_ms": stats["p99_ms"],
            "search_mean_ms": stats["mean_ms"], "recall_at_10": recall_at_k(found, truth[: len(found)]),
            "queries": len(found)}


def _run_case(case: _Case) -> list[dict[str, Any]]:
    """Measure one (backend, size, index) in this process; return its rows (default point, then sweeps)."""
    cfg = case.config
    vectors = np.load(case.vectors_path, mmap_mode="r")
    queries = np.load(case.queries_path)
    truth = np.load(case.truth_path)
    ids = [row_id(i) for i in range(case.n)]
    index_to_row = {rid: i for i, rid in enumerate(ids)}
    pid = case.rss_pid or os.getpid()
    collection = f"scale_{case.index_type.lower()}_{case.n}"
    settings = cfg.index_settings(case.index_type)
    rss_before = rss_bytes(pid)
    store = VectorStore(case.uri, collection, cfg.dim, settings, timeout_s=CALL_TIMEOUT_S)
    with _RssSampler(pid) as sampler:
        store.open()
        t0 = time.perf_counter()
        slowest = 0.0
        for start in range(0, case.n, INSERT_BATCH):
            stop = min(case.n, start + INSERT_BATCH)
            rows = [Row(ids[i], np.asarray(vectors[i]), "", 0, {}) for i in range(start, stop)]
            tb = time.perf_counter()
            store.insert(rows)
            slowest = max(slowest, time.perf_counter() - tb)
        insert_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        store.flush(seal=True)
        if store.is_lite:
            if not _drain_lite_background(case.uri, collection):
                client = MilvusClient(case.uri)
                client.release_collection(collection)
                client.load_collection(collection)
                client.close()
        else:
            client = MilvusClient(case.uri, timeout=CALL_TIMEOUT_S)
            _wait_server_index(client, collection, case.n, CALL_TIMEOUT_S)
            client.release_collection(collection)
            client.load_collection(collection, timeout=CALL_TIMEOUT_S)
            client.close()
        build_s = time.perf_counter() - t0
    if store.count() != case.n:
        raise RuntimeError(f"{collection}: {store.count()} rows stored, {case.n} inserted")
    base = {"backend": case.backend, "n": case.n, "dim": cfg.dim, "index": case.index_type}
    main = _search_all(store, queries[: cfg.queries], truth[: cfg.queries], index_to_row, cfg.search_budget_s)
    rss_after = rss_bytes(pid)
    rows_out = [{
        **base, "point": "default", **_search_params(settings), **main,
        "insert_s": insert_s, "insert_rows_per_s": case.n / insert_s, "insert_max_batch_s": slowest,
        "build_s": build_s, "rss_mib": rss_after / MIB, "rss_delta_mib": (rss_after - rss_before) / MIB,
        "peak_rss_mib": max(sampler.peak, rss_after) / MIB,
    }]
    sweep: list[dict[str, int]] = []
    if case.index_type == "IVF_FLAT":
        sweep = [{"nprobe": p} for p in cfg.nprobe_sweep if p <= cfg.nlist and p != cfg.nprobe]
    elif case.index_type == "HNSW":
        sweep = [{"ef": e} for e in cfg.ef_sweep if e != cfg.ef]
    nq = min(cfg.sweep_queries, len(queries))
    for params in sweep if nq else []:
        variant = VectorStore(case.uri, collection, cfg.dim, cfg.index_settings(case.index_type, **params),
                              timeout_s=CALL_TIMEOUT_S)
        stats = _search_all(variant, queries[:nq], truth[:nq], index_to_row, cfg.search_budget_s)
        variant.close()
        rows_out.append({**base, "point": "sweep", **_search_params(variant.index), **stats})
    store.close()
    return rows_out


def _search_params(settings: Any) -> dict[str, Any]:
    """nlist/nprobe/M/efConstruction/ef columns: those that apply to the index type, None for the others."""
    t = settings.index_type
    return {
        "nlist": settings.nlist if t == "IVF_FLAT" else None,
        "nprobe": settings.nprobe if t == "IVF_FLAT" else None,
        "M": settings.M if t == "HNSW" else None,
        "efConstruction": settings.efConstruction if t == "HNSW" else None,
        "ef": max(settings.ef, TOP_K) if t == "HNSW" else None,
    }


def _in_worker(case: _Case) -> list[dict[str, Any]]:
    """Run `_run_case` in a fresh spawned process (its own Milvus Lite, its own RSS); re-raises its error."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(_run_case, case).result()


# ---- orchestration -----------------------------------------------------------------------------------------


def run_scale(
    config: ScaleConfig,
    out_dir: Path,
    *,
    work_dir: Path | None = None,
    bin_cache: Path | None = None,
    progress: Callable[[str], None] = print,
) -> BenchResult:
    """Run the scale benchmark and write `scale.json`, `scale.csv` and `scale.png` into `out_dir`.

    Args:
        config: sizes, backends, index types, queries and sweeps.
        out_dir: output folder (created).
        work_dir: where datasets (.npy), Milvus Lite folders and server base dirs go; a temporary folder
            (removed afterwards) when None. 1M x 512 float32 needs ~2 GB there, plus Milvus' own copies.
        bin_cache: decompressed Milvus server binaries kept between runs (default `.cache/milvus-bin-2.3.5`).
        progress: called with one line per finished case.

    Returns:
        The `BenchResult` written (name "scale"); rows as described in the module doc.

    Raises:
        RuntimeError: a server did not start, or a collection lost rows.
        TimeoutError: an index was not built within CALL_TIMEOUT_S.
    """
    own_work = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="vitrine-scale-")) if work_dir is None else Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    mixture = Mixture(config.dim, config.mixture, config.seed)
    n_q = max(config.queries, config.sweep_queries)
    queries = mixture.sample(n_q, stream=config.seed * 1000 + 2)
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    try:
        np.save(work / "queries.npy", queries)
        for n in sorted(config.sizes):
            t0 = time.perf_counter()
            vectors = mixture.sample(n, stream=config.seed * 1000 + 1)
            np.save(work / f"vectors_{n}.npy", vectors)
            np.save(work / f"truth_{n}.npy", exact_top_k(vectors, queries))
            del vectors
            progress(f"scale: {n} x {config.dim} vectors + exact top-{TOP_K} in "
                     f"{time.perf_counter() - t0:.1f} s")
            for backend in config.backends:
                for index_type in config.index_types:
                    case_dir = work / f"{backend}-{n}-{index_type.lower()}"
                    server = None
                    if backend == "server":
                        server = start_milvus_server_process(
                            case_dir, bin_cache=bin_cache or DEFAULT_BIN_CACHE)
                        uri, pid = server.uri, server.pid
                    else:
                        uri, pid = str(case_dir / "milvus.db"), None
                    case = _Case(backend, n, index_type, uri, pid, str(work / f"vectors_{n}.npy"),
                                 str(work / "queries.npy"), str(work / f"truth_{n}.npy"), config)
                    try:
                        case_rows = _in_worker(case)
                    finally:
                        if server is not None:
                            server.stop()
                        shutil.rmtree(case_dir, ignore_errors=True)
                    rows.extend(case_rows)
                    # partial results survive an interrupted run (plot and targets come at the end)
                    write_result(BenchResult(name="scale", title=TITLE, config=dataclasses.asdict(config),
                                             rows=rows, notes=["partial: run still in progress"]), out_dir)
                    r = case_rows[0]
                    progress(f"scale: {backend:6s} n={n:<8d} {index_type:8s} insert {r['insert_s']:.1f} s, "
                             f"build {r['build_s']:.1f} s, p50 {r['search_p50_ms']:.2f} ms, "
                             f"p99 {r['search_p99_ms']:.2f} ms, recall@10 {r['recall_at_10']:.3f}, "
                             f"RSS +{r['rss_delta_mib']:.0f} MiB")
            (work / f"vectors_{n}.npy").unlink(missing_ok=True)
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    result = BenchResult(
        name="scale",
        title=TITLE,
        config={**dataclasses.asdict(config), "top_k": TOP_K, "insert_batch": INSERT_BATCH,
                "warmup_queries": WARMUP_QUERIES, "metric_type": "COSINE",
                "wall_s": round(time.perf_counter() - started, 1)},
        rows=rows,
        targets=_targets(rows, config),
        notes=_notes(config),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    result.plots = [plot_scale(rows, out_dir / "scale.png").name]
    write_result(result, out_dir)
    return result


def _targets(rows: list[dict[str, Any]], config: ScaleConfig) -> list[Target]:
    """Goals a demanding user would set, checked at the largest size measured per backend."""
    targets = []
    defaults = [r for r in rows if r["point"] == "default"]
    for backend in config.backends:
        mine = [r for r in defaults if r["backend"] == backend]
        if not mine:
            continue
        n = max(r["n"] for r in mine)
        at = {r["index"]: r for r in mine if r["n"] == n}
        if "FLAT" in at:
            targets.append(Target(
                f"{backend}: FLAT recall@10 at n={n} (exact search)", at["FLAT"]["recall_at_10"], 0.999,
                note="FLAT is exhaustive; anything below 1.0 is a bug or a tie"))
        if "HNSW" in at:
            r = at["HNSW"]
            targets.append(Target(
                f"{backend}: HNSW recall@10 at n={n}, ef={r['ef']}", r["recall_at_10"], 0.95,
                note="raise ef (see the sweep rows) to trade latency for recall"))
            targets.append(Target(
                f"{backend}: HNSW search p50 (ms) at n={n}", r["search_p50_ms"], 10.0, higher_is_better=False,
                note="single query through VectorStore.search, gRPC and output fields included"))
            targets.append(Target(
                f"{backend}: HNSW search p99/p50 at n={n}", r["search_p99_ms"] / r["search_p50_ms"], 2.0,
                higher_is_better=False, note="tail on 2 cores shared with the client and other work"))
        if "IVF_FLAT" in at:
            r = at["IVF_FLAT"]
            targets.append(Target(
                f"{backend}: IVF_FLAT recall@10 at n={n}, nlist={r['nlist']}, nprobe={r['nprobe']}",
                r["recall_at_10"], 0.95, note="raise nprobe (see the sweep rows)"))
    return targets


def _notes(config: ScaleConfig) -> list[str]:
    m = config.mixture
    return [
        f"Data: seeded Gaussian mixture, {m.clusters} clusters in a {m.latent_dim}-d latent space (spread "
        f"{m.spread}), mapped to {config.dim}-d by a random orthonormal map, isotropic noise {m.noise}, "
        "L2-normalised float32; queries are fresh draws (not stored vectors). Uniform random vectors "
        "would make ANN recall look far worse than on real, clustered embeddings.",
        "Insert and search go through retrieval_service.adapters.milvus.store.VectorStore (upserts of 1000 rows, "
        "the service's schema, Session consistency, output fields id/filename/ingest_time/metadata), "
        "metric COSINE.",
        "build_s = flush + index build + load. Server: flush (seal), wait for describe_index to report "
        "all rows indexed, release + load. Milvus Lite 3.2: flush, then wait for its background "
        "compaction + faiss index build (private milvus_lite API; no RPC exposes it).",
        "Memory: RSS (psutil). Server: the milvus process tree. Milvus Lite 3.2 runs in-process (gRPC "
        "threads, no child process), so each Lite case runs in its own spawned worker and rss_delta_mib "
        "(growth since before the collection was created) is Lite's share; rss_mib of Lite includes "
        "Python, numpy and the benchmark's own buffers.",
        "Search latency: one client, sequential single-query searches, top_k 10, after 5 warm-up "
        "queries; the client runs on the same cores as Milvus.",
        f"Index settings: the service defaults unless overridden (IVF_FLAT nlist={config.nlist}, "
        f"nprobe={config.nprobe}; HNSW M={config.M}, efConstruction={config.efConstruction}, "
        f"ef={config.ef}). Milvus' rule of thumb nlist ~ 4*sqrt(n) would use more clusters at 1M.",
    ]


def plot_scale(rows: list[dict[str, Any]], path: Path) -> Path:
    """Three panels into `path` (PNG): search p50 vs n, build time vs n, recall@10 vs p50 over the sweeps
    (largest n per backend/index). Returns `path`."""
    import matplotlib  # noqa: PLC0415 - matplotlib: a [dev] extra, not in the serving image

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 - after choosing the Agg backend

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    defaults = [r for r in rows if r["point"] == "default"]
    series = sorted({(r["backend"], r["index"]) for r in defaults})
    styles = {"lite": "--", "server": "-"}
    for backend, index in series:
        pts = sorted((r["n"], r["search_p50_ms"], r["build_s"]) for r in defaults
                     if r["backend"] == backend and r["index"] == index)
        ns = [p[0] for p in pts]
        label = f"{backend} {index}"
        axes[0].plot(ns, [p[1] for p in pts], styles.get(backend, "-"), marker="o", label=label)
        axes[1].plot(ns, [p[2] for p in pts], styles.get(backend, "-"), marker="o", label=label)
        if index in ("IVF_FLAT", "HNSW"):
            n_max = max(ns)
            curve = sorted(  # by nprobe / ef
                ((r["nprobe"] if index == "IVF_FLAT" else r["ef"]), r["search_p50_ms"], r["recall_at_10"])
                for r in rows if r["backend"] == backend and r["index"] == index and r["n"] == n_max
            )
            curve = [(x, y, p) for p, x, y in curve]
            axes[2].plot([c[0] for c in curve], [c[1] for c in curve], styles.get(backend, "-"), marker="o",
                         label=f"{backend} {index} n={n_max}")
            for x, y, p in curve:
                axes[2].annotate(("nprobe=" if index == "IVF_FLAT" else "ef=") + str(p), (x, y), fontsize=7,
                                 textcoords="offset points", xytext=(3, -8))
    for ax, title, ylabel in ((axes[0], "search p50 (single query, top_k 10)", "ms"),
                              (axes[1], "build: flush + index + load", "s")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("vectors in the collection")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    axes[2].set_xscale("log")
    axes[2].set_xlabel("search p50 (ms)")
    axes[2].set_ylabel("recall@10")
    axes[2].set_title("recall@10 vs latency (nprobe / ef sweep)")
    axes[2].grid(True, which="both", alpha=0.3)
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
