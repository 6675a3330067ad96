"""`vitrine bench ...`: the benchmark commands. Each writes JSON + CSV + PNG under --out (default bench_out/)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Optional

import typer

from export import ExportError

# Each command imports its benchmark module when it runs: `import tools.cli` (every `vitrine` command, and the
# spawned `bench scale` workers) loads this module, and the benchmark modules load numpy, tritonclient, pymilvus
# and onnxruntime (0.3-2 s; onnxruntime is the [serve]/[gpu] extra).

bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks and load tests; results as JSON/CSV/PNG.")

# Options every tool (or several) takes.
OutDir = Annotated[Path, typer.Option(help="output folder")]
Quick = Annotated[bool, typer.Option(help="the short version used by `make bench`")]
EncoderUrl = Annotated[Optional[str], typer.Option(help="Triton gRPC host:port (with --target)")]


def _print_targets(result) -> None:  # noqa: ANN001 - tools.bench.report.BenchResult
    """Print each target as MET or MISSED, with what bounds it when missed."""
    for target in result.targets:
        typer.echo(f"{'MET   ' if target.met else 'MISSED'} {target.name}: {target.value:.3f} (goal {target.goal:.3f})"
                   + (f" - {target.note}" if target.note and not target.met else ""))


@contextlib.contextmanager
def _tool_errors(name: str, failures: tuple[type[BaseException], ...] = (RuntimeError, TimeoutError)) -> Iterator[None]:
    """Bad arguments (ValueError, FileNotFoundError) -> usage error; `failures` -> message and exit code 1."""
    try:
        yield
    except (ValueError, FileNotFoundError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    except failures as exc:
        typer.echo(f"{name} benchmark failed: {exc}", err=True)
        raise typer.Exit(1) from exc


def _wrote(out: Path, name: str) -> None:
    typer.echo(f"wrote {out / (name + '.json')}, {name}.csv, {name}.png")


# --- encoder (tools/bench/encoder.py) ---------------------------------------------------------------------

@bench_app.command("encoder")
def encoder(
    repository: Annotated[Optional[Path], typer.Option(
        help="Vitrine model repository; default: open_clip ViT-B-32 with random weights, exported once into "
             "<cache-dir>/bench/ViT-B-32/model_repository")] = None,
    tower: Annotated[str, typer.Option(help="image or text")] = "image",
    concurrency: Annotated[str, typer.Option(help="comma-separated concurrent clients")] = "1,4,16,32,64",
    items_per_request: Annotated[int, typer.Option(help="rows (images/texts) per request")] = 1,
    duration_s: Annotated[Optional[float], typer.Option(
        help="measured seconds per point [default 10, --quick 3]")] = None,
    requests: Annotated[Optional[int], typer.Option(
        help="measured requests per point instead of a duration")] = None,
    warmup_s: Annotated[Optional[float], typer.Option(
        help="warm-up seconds per point [default 2, --quick 1]")] = None,
    url: Annotated[Optional[str], typer.Option(help="host:port of a running Triton serving <model>_batching/"
                                                    "_nobatch (or <model>); default: start our own")] = None,
    out: OutDir = Path("bench_out"),
    baseline_s: Annotated[Optional[float], typer.Option(
        help="seconds of raw ORT runs per baseline batch size [default 3, --quick 1.5]")] = None,
    cache_dir: Annotated[Path, typer.Option(help="cache for the default bench model")] = Path(".cache"),
    tune: Annotated[bool, typer.Option(help="also measure ORT threads / graph level / instances / preferred "
                                            "batch sizes / max_queue_delay variants at 32 clients")] = False,
    tune_rounds: Annotated[int, typer.Option(help="interleaved rounds of the --tune runs (median reported)")] = 3,
    quick: Quick = False,
) -> None:
    """Load-test a tower on Triton (KServe v2 gRPC), batching on/off vs raw ONNX Runtime; JSON/CSV/PNG."""
    from tools.bench.encoder import (  # noqa: PLC0415 - tritonclient, onnxruntime: see the top
        QUICK,
        EncoderBenchConfig,
        run_encoder_bench,
    )
    from tools.bench.encoder_load import EncoderBenchError  # noqa: PLC0415 - tritonclient
    from tools.bench.models import ensure_bench_repository  # noqa: PLC0415 - tritonclient

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        clients = tuple(int(x) for x in concurrency.split(",") if x.strip())
    except ValueError as exc:
        raise typer.BadParameter(
            f"--concurrency expects comma-separated integers, got {concurrency!r}") from exc
    defaults = QUICK if quick else {}
    cfg = EncoderBenchConfig(
        repository=repository or ensure_bench_repository(cache_dir),
        tower=tower, concurrency=clients, items_per_request=items_per_request,
        duration_s=duration_s if duration_s is not None else defaults.get("duration_s", 10.0),
        requests=requests,
        warmup_s=warmup_s if warmup_s is not None else defaults.get("warmup_s", 2.0),
        baseline_s=baseline_s if baseline_s is not None else defaults.get("baseline_s", 3.0),
        url=url, out=out, tune=tune, tune_rounds=tune_rounds,
    )
    with _tool_errors("encoder", (EncoderBenchError,)):
        result = run_encoder_bench(cfg)
    for row in result.rows:
        if row["mode"] in ("batching", "nobatch"):
            typer.echo(f"{row['mode']:>8} c={row['concurrency']:>3}: "
                       f"{row['throughput_items_s']:8.1f} items/s  "
                       f"p50 {row['p50_ms']:7.1f} ms  p99 {row['p99_ms']:7.1f} ms  mean batch "
                       f"{row['triton_mean_batch']}  served/raw {row['served_over_raw']}")
    _print_targets(result)
    _wrote(out, "encoder")


# --- quantization (tools/bench/quantization.py) ------------------------------------------------------------

@bench_app.command("quantization")
def quantization(
    model: Annotated[str, typer.Option(help="open_clip model (random weights) for the speed part")] = "ViT-B-32",
    repository: Annotated[Optional[Path], typer.Option(help="fp32 model repository to time instead of the "
                                                            "random-weight export of --model")] = None,
    demo_repository: Annotated[Optional[Path], typer.Option(help="fp32 demo model repository; default: "
                                                                 "prepare_demo under <cache-dir>/demo")] = None,
    batch_size: Annotated[int, typer.Option(help="images per timed run")] = 32,
    threads: Annotated[int, typer.Option(help="ONNX Runtime intra-op threads")] = 2,
    repeats: Annotated[Optional[int], typer.Option(help="timed runs per precision [default 10, --quick 3]")] = None,
    out: OutDir = Path("bench_out"),
    cache_dir: Annotated[Path, typer.Option(help="cache for the bench model, int8 copies, demo model")] = Path(".cache"),
    quick: Quick = False,
) -> None:
    """fp32 vs int8 towers in ONNX Runtime: image-tower images/s, file size, demo precision@10 / recall@10."""
    from tools.bench.quantization import run_quantization_bench  # noqa: PLC0415 - onnxruntime, tritonclient

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with _tool_errors("quantization", (ExportError,)):
        result = run_quantization_bench(out, cache_dir=cache_dir, model=model, repository=repository,
                                        demo_repository=demo_repository, batch_size=batch_size, threads=threads,
                                        repeats=repeats, quick=quick)
    for row in result.rows:
        if row["part"] == "throughput":
            typer.echo(f"{row['model']} image {row['precision']}: {row['images_per_s']:7.1f} images/s "
                       f"(batch {row['batch_size']}, {row['threads']} threads), {row['file_mib']:.1f} MiB, "
                       f"min cosine vs fp32 {row['min_cosine_vs_fp32']:.5f}")
        else:
            typer.echo(f"{row['model']} {row['precision']}: text->image precision@10 {row['precision_at_10']:.4f}, "
                       f"recall@10 vs fp32 {row['recall_at_10_vs_fp32']:.4f}, {row['file_mib']:.1f} MiB")
    _print_targets(result)
    _wrote(out, "quantization")


# --- search and ingest (tools/bench/search.py, tools/bench/ingest.py) -------------------------------------

def _bench_repository(repository: Optional[Path], model: Optional[str], cache_dir: Path) -> Optional[Path]:
    """--repository, else the random-weight export of --model, else None (the demo model)."""
    if repository is not None and model is not None:
        raise typer.BadParameter("give --repository or --model, not both")
    if model is not None:
        from tools.bench.models import ensure_bench_repository  # noqa: PLC0415 - tritonclient

        return ensure_bench_repository(cache_dir, model)
    return repository


_REPOSITORY_HELP = ("Vitrine model repository; default: the offline demo model (trained/exported once under "
                    "<cache-dir>/demo)")
_MODEL_HELP = "open_clip model with random weights instead, e.g. ViT-B-32 (exported once under <cache-dir>/bench)"
_IMAGES_HELP = "folder of images (+ optional metadata.jsonl); default: the demo's held-out digit PNGs"
_TARGET_HELP = "a running retrieval service host:port instead of a private stack (needs --encoder-url)"


@bench_app.command("search")
def search(
    repository: Annotated[Optional[Path], typer.Option(help=_REPOSITORY_HELP)] = None,
    model: Annotated[Optional[str], typer.Option(help=_MODEL_HELP)] = None,
    images: Annotated[Optional[Path], typer.Option(help=_IMAGES_HELP)] = None,
    limit: Annotated[Optional[int], typer.Option(help="ingest at most this many images")] = None,
    concurrency: Annotated[str, typer.Option(help="comma-separated concurrent clients")] = "1,4,16,32",
    queries: Annotated[str, typer.Option(help="comma-separated query kinds: text, image")] = "text,image",
    filters: Annotated[str, typer.Option(help="comma-separated filter settings: off, on")] = "off,on",
    duration_s: Annotated[Optional[float], typer.Option(help="measured seconds per point [default 10, --quick 2]")] = None,
    warmup_s: Annotated[Optional[float], typer.Option(help="warm-up seconds per point [default 2, --quick 0.5]")] = None,
    target: Annotated[Optional[str], typer.Option(help=_TARGET_HELP)] = None,
    encoder_url: EncoderUrl = None,
    out: OutDir = Path("bench_out"),
    cache_dir: Annotated[Path, typer.Option(help="cache for the demo / bench models")] = Path(".cache"),
    quick: Quick = False,
) -> None:
    """End-to-end SearchImages over gRPC: text/image queries x filter off/on x concurrency; QPS, p50/p90/p99."""
    from tools.bench.search import run_search_bench  # noqa: PLC0415 - tritonclient, pymilvus

    try:
        clients = tuple(int(x) for x in concurrency.split(",") if x.strip())
    except ValueError as exc:
        raise typer.BadParameter(f"--concurrency expects comma-separated integers, got {concurrency!r}") from exc
    kinds = tuple(k.strip() for k in queries.split(",") if k.strip())
    filter_flags = tuple(f.strip() for f in filters.split(",") if f.strip())
    if set(filter_flags) - {"off", "on"} or not filter_flags:
        raise typer.BadParameter(f"--filters expects off and/or on, got {filters!r}")
    with _tool_errors("search"):
        result = run_search_bench(
            repository=_bench_repository(repository, model, cache_dir), images_dir=images, out=out,
            cache_dir=cache_dir, concurrency=clients, kinds=kinds, filters=tuple(f == "on" for f in filter_flags),
            duration_s=duration_s, warmup_s=warmup_s, quick=quick, limit=limit, target=target,
            encoder_url=encoder_url)
    _print_targets(result)
    _wrote(out, "search")


@bench_app.command("ingest")
def ingest(
    repository: Annotated[Optional[Path], typer.Option(help=_REPOSITORY_HELP)] = None,
    model: Annotated[Optional[str], typer.Option(help=_MODEL_HELP)] = None,
    images: Annotated[Optional[Path], typer.Option(help=_IMAGES_HELP)] = None,
    count: Annotated[Optional[int], typer.Option(help="images per run [default 1000, --quick 200]; the folder's "
                                                      "images are reused with unique bytes when it holds fewer")] = None,
    repeats: Annotated[Optional[int], typer.Option(help="runs per mode [default 3, --quick 1]")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="the service's ingest_batch_size [default: settings]")] = None,
    inflight: Annotated[Optional[int], typer.Option(
        help="the service's ingest_max_inflight_batches [default: settings]")] = None,
    skip_baseline: Annotated[bool, typer.Option(help="leave out the per-image baseline")] = False,
    baseline_milvus_uri: Annotated[Optional[str], typer.Option(
        help="Milvus for the baseline; default: a Milvus Lite file in the run's temp folder")] = None,
    target: Annotated[Optional[str], typer.Option(help=_TARGET_HELP)] = None,
    encoder_url: EncoderUrl = None,
    out: OutDir = Path("bench_out"),
    cache_dir: Annotated[Path, typer.Option(help="cache for the demo / bench models")] = Path(".cache"),
    quick: Quick = False,
) -> None:
    """Streaming IngestImages (images/s) vs the seeds' per-image loop and the encoder alone; JSON/CSV/PNG."""
    from tools.bench.ingest import run_ingest_bench  # noqa: PLC0415 - tritonclient, pymilvus

    with _tool_errors("ingest"):
        result = run_ingest_bench(
            repository=_bench_repository(repository, model, cache_dir), images_dir=images, out=out,
            cache_dir=cache_dir, count=count, quick=quick, repeats=repeats, target=target, encoder_url=encoder_url,
            baseline_milvus_uri=baseline_milvus_uri, ingest_batch_size=batch_size,
            ingest_max_inflight_batches=inflight, skip_baseline=skip_baseline)
    _print_targets(result)
    _wrote(out, "ingest")


# --- scale (tools/bench/scale.py) -------------------------------------------------------------------------

@bench_app.command("scale")
def scale(
    sizes: Annotated[Optional[str], typer.Option(
        help="comma-separated collection sizes, e.g. 10k,100k,1M "
             "[default 10k,100k,1M; --quick 10k,20k]")] = None,
    dim: Annotated[int, typer.Option(help="vector dimension")] = 512,
    backends: Annotated[str, typer.Option(help="comma-separated: lite (Milvus Lite file), server (`milvus` "
                                               "package standalone server)")] = "lite,server",
    indexes: Annotated[str, typer.Option(help="comma-separated index types")] = "FLAT,IVF_FLAT,HNSW",
    queries: Annotated[Optional[int], typer.Option(
        help="measured single queries per point [default 1000, --quick 100]")] = None,
    sweep: Annotated[bool, typer.Option(help="also sweep nprobe (IVF_FLAT) and ef (HNSW)")] = True,
    nlist: Annotated[int, typer.Option(help="IVF_FLAT nlist")] = 128,
    nprobe: Annotated[int, typer.Option(help="IVF_FLAT nprobe at the default point")] = 16,
    m: Annotated[int, typer.Option("--M", help="HNSW M")] = 16,
    ef_construction: Annotated[int, typer.Option("--ef-construction", help="HNSW efConstruction")] = 200,
    ef: Annotated[int, typer.Option(help="HNSW ef at the default point")] = 64,
    seed: Annotated[int, typer.Option(help="seed of the synthetic data and queries")] = 0,
    work_dir: Annotated[Optional[Path], typer.Option(
        help="datasets and Milvus data (1M x 512 needs several GB); default: a temporary folder")] = None,
    out: OutDir = Path("bench_out"),
    quick: Quick = False,
) -> None:
    """Milvus Lite vs server, FLAT/IVF_FLAT/HNSW at 10k->1M synthetic vectors: insert/build time, search
    p50/p99, recall@10 vs exact search, RSS; JSON/CSV/PNG."""
    from tools.bench.scale import QUICK, ScaleConfig, parse_sizes, run_scale  # noqa: PLC0415 - pymilvus

    base = QUICK if quick else ScaleConfig()
    try:
        cfg = dataclasses.replace(
            base,
            sizes=parse_sizes(sizes) if sizes else base.sizes, dim=dim,
            backends=tuple(b.strip() for b in backends.split(",") if b.strip()),
            index_types=tuple(i.strip().upper() for i in indexes.split(",") if i.strip()),
            queries=queries if queries is not None else base.queries,
            sweep_queries=base.sweep_queries if sweep else 0,
            nlist=nlist, nprobe=nprobe, M=m, efConstruction=ef_construction, ef=ef, seed=seed,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    with _tool_errors("scale"):
        result = run_scale(cfg, out, work_dir=work_dir, progress=typer.echo)
    _print_targets(result)
    _wrote(out, "scale")


# --- docs/benchmarks.md (tools/bench/docs.py) -------------------------------------------------------------

@bench_app.command("docs")
def docs(
    out: Annotated[Path, typer.Option(help="folder of benchmark results (*.json, *.png)")] = Path("bench_out"),
    page: Annotated[Path, typer.Option(help="the Markdown page to regenerate")] = Path("docs/benchmarks.md"),
) -> None:
    """Regenerate docs/benchmarks.md (tables, targets, plots, machine) from the results in --out."""
    from tools.bench.docs import write_docs  # noqa: PLC0415 - numpy

    try:
        written = write_docs(out, page)
    except FileNotFoundError as exc:
        raise typer.BadParameter(str(exc)) from exc
    typer.echo(f"wrote {written} (plots in {written.parent / 'benchmarks'})")
