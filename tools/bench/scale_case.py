"""One case of the scale benchmark: a fresh collection on Milvus Lite or a Milvus server, filled, indexed,
searched and swept, measured in a spawned worker process (see `tools.bench.scale` for the columns).

`measure_case` starts the backend (a Milvus server process, or a Milvus Lite file), runs `run_case` in a
fresh spawned process (its own Milvus Lite, its own RSS) and cleans up. `run_case` and `Case` are top-level
so the spawned worker can unpickle them by module path.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from pymilvus import MilvusClient

from retrieval_service.adapters.milvus import IndexSettings, Row, VectorStore
from tools.bench.report import percentiles
from tools.bench.scale_config import ScaleConfig
from tools.bench.scale_data import TOP_K, recall_at_k, row_id
from tools.milvus_server import DEFAULT_BIN_CACHE, start_milvus_server_process

#: Rows per `VectorStore.insert` call (the store splits them into 1000-row upserts).
INSERT_BATCH = 5000
#: Unmeasured searches before each point's measured ones.
WARMUP_QUERIES = 5
#: Measured searches per point before `ScaleConfig.search_budget_s` may end it.
MIN_QUERIES = 20
#: Deadline of each Milvus call in the benchmark, seconds. The service's default (10 s) is too short for
#: Milvus Lite's synchronous flush inside an upsert past ~60k rows of 512-d on 2 busy cores (measured ~11 s).
CALL_TIMEOUT_S = 600.0
MIB = 2**20  # bytes


@dataclasses.dataclass(frozen=True)
class Case:
    """One (backend, size, index type) to measure, as handed (pickled) to the worker process.

    Attributes:
        backend: "lite" or "server".
        n: rows in the collection.
        index_type: "FLAT", "IVF_FLAT" or "HNSW".
        uri: Milvus Lite .db path or Milvus server URI.
        rss_pid: process whose RSS (with its children) is measured; None: this (worker) process hosts
            Milvus (Lite).
        vectors_path, queries_path, truth_path: .npy files, float32 [n, dim], float32 [Q, dim] and
            int64 [Q, TOP_K] (exact top-k row indices).
        config: the benchmark's settings.
    """

    backend: str
    n: int
    index_type: str
    uri: str
    rss_pid: int | None
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


def _wait_server_index(client: MilvusClient, collection: str, rows: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        info = client.describe_index(collection, "embedding")
        if info.get("indexed_rows") == rows and not info.get("pending_index_rows"):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"index of {collection} not built after {timeout_s:.0f} s: {info}")
        time.sleep(0.2)


def _search_all(store: VectorStore, queries: np.ndarray, truth: np.ndarray, index_to_row: dict[str, int],
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


def run_case(case: Case) -> list[dict[str, Any]]:
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


def _search_params(settings: IndexSettings) -> dict[str, Any]:
    """nlist/nprobe/M/efConstruction/ef columns: those that apply to the index type, None for the others."""
    t = settings.index_type
    return {
        "nlist": settings.nlist if t == "IVF_FLAT" else None,
        "nprobe": settings.nprobe if t == "IVF_FLAT" else None,
        "M": settings.M if t == "HNSW" else None,
        "efConstruction": settings.efConstruction if t == "HNSW" else None,
        "ef": max(settings.ef, TOP_K) if t == "HNSW" else None,
    }


def run_in_worker(case: Case) -> list[dict[str, Any]]:
    """Run `run_case` in a fresh spawned process (its own Milvus Lite, its own RSS); re-raises its error."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(run_case, case).result()


def measure_case(backend: str, n: int, index_type: str, work: Path, config: ScaleConfig,
                 bin_cache: Path | None = None) -> list[dict[str, Any]]:
    """Measure one (backend, n, index_type) on the dataset files `run_scale` wrote into `work`.

    Starts a Milvus server under `work/<backend>-<n>-<index>` (backend "server"; binaries from `bin_cache`,
    default `DEFAULT_BIN_CACHE`) or points at a Milvus Lite file there, runs `run_case` in a spawned worker,
    then stops the server and removes that folder.

    Returns:
        The case's rows: the default point first, then the sweep points.

    Raises:
        RuntimeError: the server did not start, or the collection lost rows.
        TimeoutError: the index was not built within CALL_TIMEOUT_S.
    """
    case_dir = work / f"{backend}-{n}-{index_type.lower()}"
    server = None
    if backend == "server":
        server = start_milvus_server_process(case_dir, bin_cache=bin_cache or DEFAULT_BIN_CACHE)
        uri, pid = server.uri, server.pid
    else:
        uri, pid = str(case_dir / "milvus.db"), None
    case = Case(backend, n, index_type, uri, pid, str(work / f"vectors_{n}.npy"),
                str(work / "queries.npy"), str(work / f"truth_{n}.npy"), config)
    try:
        return run_in_worker(case)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(case_dir, ignore_errors=True)
