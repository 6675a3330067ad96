"""The scale benchmark's report: its title, the targets checked at the largest size, the notes that say how
it measured, and the three-panel plot (scale.png)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tools.bench.report import Target
from tools.bench.scale_config import ScaleConfig

TITLE = "Milvus at scale: FLAT vs IVF_FLAT vs HNSW, Milvus Lite vs Milvus server"


def scale_targets(rows: list[dict[str, Any]], config: ScaleConfig) -> list[Target]:
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


def scale_notes(config: ScaleConfig) -> list[str]:
    """How the run measured (data, store path, build, memory, latency, index settings), for the report."""
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
