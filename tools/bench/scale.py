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

Data: seeded clustered vectors (`tools.bench.scale_data`, whose doc says why not uniform random ones).

Layout: scale_config.py (ScaleConfig, QUICK, parse_sizes), scale_data.py (the Gaussian mixture, exact top-k,
recall@k), scale_case.py (one case on Milvus Lite / server in a spawned worker), scale_report.py (targets,
notes, plot); this module runs the sweep over sizes, backends and index types and writes the result.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tools.bench.report import BenchResult, write_result
from tools.bench.scale_case import INSERT_BATCH, WARMUP_QUERIES, measure_case
from tools.bench.scale_config import QUICK, ScaleConfig, parse_sizes
from tools.bench.scale_data import TOP_K, Mixture, exact_top_k
from tools.bench.scale_report import TITLE, plot_scale, scale_notes, scale_targets

__all__ = ["QUICK", "ScaleConfig", "parse_sizes", "run_scale"]


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
        TimeoutError: an index was not built within `scale_case.CALL_TIMEOUT_S`.
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
                    case_rows = measure_case(backend, n, index_type, work, config, bin_cache)
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
        targets=scale_targets(rows, config),
        notes=scale_notes(config),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    result.plots = [plot_scale(rows, out_dir / "scale.png").name]
    write_result(result, out_dir)
    return result
