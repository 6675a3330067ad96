"""`vitrine bench ingest`: streaming IngestImages throughput against the per-image baseline and the raw encoder.

Three measurements on the same images, the same Triton encoder and the same Milvus engine, one after another:

* **encoder** (the ceiling): the images, decoded and preprocessed beforehand (`retrieval_service.usecases.preprocess`),
  sent to the image tower with tritonclient in batches of the service's `ingest_batch_size`, one batch at a
  time and `ingest_max_inflight_batches` batches at a time; the faster of the two is "encoder throughput".
  Also one image per request (SINGLE_IMAGES images): what batching alone is worth on this model and CPU.
* **stream**: the images (bytes in memory) streamed through `IngestImages` on one gRPC stream, timed from
  opening the stream to the last answer; every item must come back INSERTED (a fresh collection per run).
* **baseline**: what the seed notebooks do (/work/shared/seeds 000 and 003): for each image, decode + preprocess
  it, encode it alone (a tritonclient call with batch 1), insert one row with pymilvus (`MilvusClient.upsert`
  through `VectorStore.insert`, same schema and index as the service) into a separate Milvus Lite file (or
  `--baseline-milvus-uri`), repeat; one flush at the end (included in the time).

Targets (issue 5): stream >= 0.9x encoder throughput; stream >= 3x baseline.
During the stream run the Triton statistics of the image tower give how busy the encoder was (compute time /
wall time) and the executed batch sizes, which says what bounds the stream when a target is missed.
"""

from __future__ import annotations

import asyncio
import hashlib
import statistics
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as triton_grpc
import tritonclient.grpc.aio as triton_aio

from retrieval_service.adapters.milvus import IndexSettings, Row, VectorStore
from retrieval_service.usecases.preprocess import ImageLimits, preprocess_batch
from tools.bench.report import BenchResult, Target, write_result
from tools.bench.stack import (
    BenchImage,
    BenchStack,
    bench_stack,
    drop_run_rows,
    load_images,
    resolve_model,
    salted,
    stream_ingest,
)

QUICK_IMAGES = 200
#: Images timed one per request for the encoder's batch-1 throughput (the per-image baseline's ceiling).
SINGLE_IMAGES = 64
FULL_IMAGES = 1000


def preprocessor(stack: BenchStack) -> Callable[[Sequence[bytes]], list[Any]]:
    """The service's preprocessing for this model: list of encoded images -> list of uint8 [H, W, 3] (or errors)."""
    return partial(preprocess_batch, spec=stack.manifest.image, limits=ImageLimits())


def pixels_of(stack: BenchStack, images: Sequence[BenchImage]) -> np.ndarray:
    """uint8 [N, H, W, 3] model input of `images`. Raises ValueError when an image does not decode."""
    decoded = preprocessor(stack)([img.content for img in images])
    bad = [img.filename for img, px in zip(images, decoded) if isinstance(px, Exception)]
    if bad:
        raise ValueError(f"{len(bad)} image(s) do not decode, e.g. {bad[:3]}")
    return np.stack(decoded)


def _infer_input(stack: BenchStack, batch: np.ndarray, module: Any) -> Any:
    tower = stack.manifest.image
    infer_input = module.InferInput(tower.input_name, list(batch.shape), "UINT8")
    infer_input.set_data_from_numpy(np.ascontiguousarray(batch))
    return infer_input


def encoder_throughput(stack: BenchStack, pixels: np.ndarray, batch_size: int, concurrency: int) -> float:
    """Images/s of the image tower on `pixels` (uint8 [N, H, W, 3]) sent in batches of `batch_size`, with
    `concurrency` batches in flight (tritonclient grpc.aio, one channel). Raises InferenceServerException."""
    tower = stack.manifest.image
    batches = [pixels[i:i + batch_size] for i in range(0, len(pixels), batch_size)]

    async def run() -> float:
        client = triton_aio.InferenceServerClient(stack.encoder_url)
        try:
            queue = list(reversed(batches))

            async def worker() -> None:
                while queue:
                    batch = queue.pop()
                    await client.infer(tower.triton_model, [_infer_input(stack, batch, triton_aio)],
                                       outputs=[triton_aio.InferRequestedOutput(tower.output_name)])

            start = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return len(pixels) / (time.perf_counter() - start)
        finally:
            await client.close()

    return asyncio.run(run())


def warm_up_encoder(stack: BenchStack, pixels: np.ndarray, batch_size: int) -> None:
    """A few untimed calls at batch 1 and `batch_size` (ORT allocations, Triton and gRPC connections)."""
    tower = stack.manifest.image
    client = triton_grpc.InferenceServerClient(stack.encoder_url)
    try:
        for batch in (pixels[:1], pixels[:batch_size], pixels[:1]):
            client.infer(tower.triton_model, [_infer_input(stack, batch, triton_grpc)])
    finally:
        client.close()


def baseline_ingest(stack: BenchStack, images: Sequence[BenchImage], milvus_uri: str) -> tuple[float, int]:
    """The seeds' loop (see module docstring) over `images`; return (seconds, rows counted afterwards).

    The collection `bench_baseline_<run_id>` is created fresh in `milvus_uri` and dropped afterwards.
    Raises DependencyUnavailableError (Milvus) / InferenceServerException (Triton).
    """
    tower = stack.manifest.image
    preprocess = preprocessor(stack)
    store = VectorStore(milvus_uri, f"bench_baseline_{stack.run_id}", stack.manifest.embedding_dim,
                        IndexSettings(), model_id=stack.manifest.model_id)
    store.open()
    client = triton_grpc.InferenceServerClient(stack.encoder_url)
    try:
        start = time.perf_counter()
        for img in images:
            (px,) = preprocess([img.content])
            result = client.infer(tower.triton_model, [_infer_input(stack, px[None], triton_grpc)],
                                  outputs=[triton_grpc.InferRequestedOutput(tower.output_name)])
            vec = result.as_numpy(tower.output_name)[0]
            store.insert([Row(id=hashlib.sha256(img.content).hexdigest(), embedding=vec, filename=img.filename,
                              ingest_time_ms=int(time.time() * 1000), metadata=img.metadata)])
        store.flush()
        seconds = time.perf_counter() - start
        rows = store.count()
        store._ready().drop_collection(store.collection)  # noqa: SLF001 - the bench's own throwaway collection
        return seconds, rows
    finally:
        client.close()
        store.close()


def _image_stats(stack: BenchStack) -> dict[str, float]:
    """Cumulative Triton statistics of the image tower: items, executions, compute ns (input+infer+output).

    Compute time is summed over `batch_stats` (once per execution); `inference_stats` would count a merged
    execution once per request in it.
    """
    client = triton_grpc.InferenceServerClient(stack.encoder_url)
    try:
        stats = client.get_inference_statistics(stack.manifest.image.triton_model).model_stats[0]
    finally:
        client.close()
    compute_ns = sum(b.compute_input.ns + b.compute_infer.ns + b.compute_output.ns for b in stats.batch_stats)
    return {"items": float(stats.inference_count), "executions": float(stats.execution_count),
            "compute_ns": float(compute_ns)}


def _safe_stats(stack: BenchStack) -> dict[str, float] | None:
    try:
        return _image_stats(stack)
    except Exception:  # noqa: BLE001 - statistics endpoint may be restricted on a foreign target
        return None


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Bar chart of images/s per mode (median over repeats) as PNG at `path`."""
    import matplotlib  # noqa: PLC0415 - matplotlib: a [dev] extra, not in the serving image

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 - after choosing the Agg backend

    labels: list[str] = []
    values: list[float] = []
    for row in rows:
        if row["label"] not in labels:
            labels.append(row["label"])
    for label in labels:
        values.append(statistics.median(r["images_per_s"] for r in rows if r["label"] == label))
    fig, ax = plt.subplots(figsize=(8, 4))
    bars = ax.barh(labels[::-1], values[::-1], color=["#4c72b0", "#55a868", "#8172b2", "#c44e52", "#dd8452"][:len(labels)])
    ax.bar_label(bars, fmt="%.1f", padding=3)
    ax.margins(x=0.15)
    ax.set_xlabel("images/s (higher is better)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_ingest_bench(*, repository: Path | None = None, images_dir: Path | None = None, out: Path = Path("bench_out"),
                     cache_dir: Path = Path(".cache"), count: int | None = None, quick: bool = False,
                     repeats: int | None = None, target: str | None = None, encoder_url: str | None = None,
                     baseline_milvus_uri: str | None = None, ingest_batch_size: int | None = None,
                     ingest_max_inflight_batches: int | None = None, skip_baseline: bool = False,
                     log: Callable[[str], None] = print) -> BenchResult:
    """Run the ingest benchmark (see module docstring), write `<out>/ingest.{json,csv,png}`, return the result.

    Args:
        repository / images_dir: model repository and image folder (defaults: demo model, demo digits).
        count: images per run (default QUICK_IMAGES with `quick`, else FULL_IMAGES); images are reused
            (salted to new bytes) when the folder holds fewer.
        repeats: runs per mode (default 1 with `quick`, else 3); the targets use the medians.
        target / encoder_url: benchmark a running stack instead of starting one (rows are deleted afterwards).
        baseline_milvus_uri: Milvus for the baseline (default: a Milvus Lite file in the run's temp folder).
        ingest_batch_size / ingest_max_inflight_batches: service settings for the private stack.
        skip_baseline: leave the per-image baseline out (its target is then not checked).

    Raises:
        FileNotFoundError / ValueError: bad repository or image folder; RuntimeError: a server did not start.
    """
    count = count or (QUICK_IMAGES if quick else FULL_IMAGES)
    repeats = repeats or (1 if quick else 3)
    repository, images_dir = resolve_model(repository, images_dir, cache_dir)
    source = load_images(images_dir)
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    with bench_stack(repository, target=target, encoder_url=encoder_url,
                     ingest_batch_size=ingest_batch_size,
                     ingest_max_inflight_batches=ingest_max_inflight_batches) as stack:
        batch, inflight = stack.ingest_batch_size, stack.ingest_max_inflight_batches
        log(f"ingest bench: {count} images from {images_dir} ({len(source)} files), model "
            f"{stack.manifest.model_id}, batch {batch}, inflight {inflight}, stack {stack.target}")

        def run_images(tag: str) -> list[BenchImage]:
            """`count` images with bytes unique to this run and tag (a fresh id for every row)."""
            salt = f"{stack.run_id}-{tag}"
            return [BenchImage(salted(source[i % len(source)].content, f"{salt}-{i // len(source)}"),
                               source[i % len(source)].filename,
                               {**source[i % len(source)].metadata, "bench_run": stack.run_id})
                    for i in range(count)]

        pixels = pixels_of(stack, run_images("pixels"))
        warm_up_encoder(stack, pixels, batch)
        warm = stream_ingest(stack.target, run_images("warmup")[:min(count, batch)])
        if warm.outcomes.get("INSERTED", 0) == 0:
            raise RuntimeError(f"warm-up ingest inserted nothing: {dict(warm.outcomes)} {warm.first_error}")
        baseline_uri = baseline_milvus_uri or str(stack.workdir / "baseline.db")
        for rep in range(repeats):
            for conc in sorted({1, inflight}):
                ips = encoder_throughput(stack, pixels, batch, conc)
                rows.append({"label": f"encoder only, batch {batch}, {conc} in flight", "mode": "encoder",
                             "repeat": rep, "images": count, "batch_size": batch, "concurrency": conc,
                             "seconds": count / ips, "images_per_s": ips, "inserted": 0,
                             "encoder_busy": float("nan"), "mean_exec_batch": float("nan")})
                log(f"  encoder batch {batch} x{conc}: {ips:.1f} images/s")
            single = pixels[:min(count, SINGLE_IMAGES)]
            ips = encoder_throughput(stack, single, 1, 1)
            rows.append({"label": "encoder only, batch 1, 1 in flight", "mode": "encoder_batch1", "repeat": rep,
                         "images": len(single), "batch_size": 1, "concurrency": 1, "seconds": len(single) / ips,
                         "images_per_s": ips, "inserted": 0, "encoder_busy": float("nan"), "mean_exec_batch": 1.0})
            log(f"  encoder batch 1 x1: {ips:.1f} images/s")
            before = _safe_stats(stack)
            res = stream_ingest(stack.target, run_images(f"stream{rep}"))
            after = _safe_stats(stack)
            busy = mean_batch = float("nan")
            if before and after:
                busy = (after["compute_ns"] - before["compute_ns"]) / 1e9 / res.seconds
                execs = after["executions"] - before["executions"]
                mean_batch = (after["items"] - before["items"]) / execs if execs else float("nan")
            inserted = res.outcomes.get("INSERTED", 0)
            if inserted != count:
                raise RuntimeError(f"streaming ingest inserted {inserted} of {count}: {dict(res.outcomes)} "
                                   f"{res.first_error}")
            rows.append({"label": "IngestImages stream", "mode": "stream", "repeat": rep, "images": count,
                         "batch_size": batch, "concurrency": inflight, "seconds": res.seconds,
                         "images_per_s": res.images_per_s, "inserted": inserted, "encoder_busy": busy,
                         "mean_exec_batch": mean_batch})
            log(f"  stream: {res.images_per_s:.1f} images/s ({res.seconds:.2f} s; encoder busy {busy:.0%}, "
                f"mean executed batch {mean_batch:.1f})")
            if not skip_baseline:
                seconds, stored = baseline_ingest(stack, run_images(f"base{rep}"), baseline_uri)
                rows.append({"label": "per-image baseline (seeds)", "mode": "baseline", "repeat": rep,
                             "images": count, "batch_size": 1, "concurrency": 1, "seconds": seconds,
                             "images_per_s": count / seconds, "inserted": stored, "encoder_busy": float("nan"),
                             "mean_exec_batch": 1.0})
                log(f"  baseline: {count / seconds:.1f} images/s ({seconds:.2f} s, {stored} rows)")
        if not stack.local:
            notes.append(f"ran against {stack.target}; deleted its {drop_run_rows(stack.target, stack.run_id)} "
                         "bench rows afterwards")

    def median(mode: str) -> float:
        return statistics.median(r["images_per_s"] for r in rows if r["mode"] == mode)

    # encoder throughput: the faster of "one batch at a time" and "inflight batches at a time" (medians)
    enc = max(statistics.median(r["images_per_s"] for r in rows if r["label"] == label)
              for label in {r["label"] for r in rows if r["mode"] == "encoder"})
    stream = median("stream")
    busy = statistics.median(r["encoder_busy"] for r in rows if r["mode"] == "stream")
    targets = [Target("stream ingest / encoder throughput at the ingest batch size", stream / enc, 0.9,
                      note=_encoder_note(stack, stream, enc, busy))]
    summary_base = ""
    if not skip_baseline:
        base = median("baseline")
        targets.append(Target("stream ingest / per-image baseline", stream / base, 3.0,
                              note=_baseline_note(base, enc, median("encoder_batch1"))))
        summary_base = f", baseline {base:.1f} images/s ({stream / base:.1f}x)"
    notes.append(f"{count} images per run, {repeats} run(s) per mode; medians. Stream: {stream:.1f} images/s, "
                 f"encoder alone {enc:.1f} images/s ({stream / enc:.0%}; at batch 1: {median('encoder_batch1'):.1f})"
                 f"{summary_base}. Encoder busy during the "
                 f"stream: {busy:.0%} of wall time (Triton compute statistics).")
    result = BenchResult(
        name="ingest", title="Ingest: IngestImages stream vs the per-image baseline",
        config={"model_id": stack.manifest.model_id, "repository": str(repository), "images_dir": str(images_dir),
                "images": count, "repeats": repeats, "ingest_batch_size": batch,
                "ingest_max_inflight_batches": inflight, "quick": quick, "target": target or "local stack",
                "milvus": baseline_milvus_uri or "Milvus Lite (separate files for service and baseline)"},
        rows=rows, targets=targets, notes=notes)
    out.mkdir(parents=True, exist_ok=True)
    result.plots.append(plot(rows, out / "ingest.png",
                             f"ingest, {stack.manifest.model_name}, {count} images, batch {batch}").name)
    write_result(result, out)
    return result


def _encoder_note(stack: BenchStack, stream: float, enc: float, busy: float) -> str:
    if stream >= 0.9 * enc:
        return ""
    where = ("decode + preprocess, gRPC, blob writes, Milvus Lite (in the service process) upsert + flush per batch"
             if stack.local else "the service's own work")
    if busy >= 0.9:
        return (f"the stream reaches {stream / enc:.0%} of the encoder's {enc:.0f} images/s with the encoder busy "
                f"{busy:.0%} of the stream's wall time: encoder-bound; the gap is the CPU the rest of the pipeline "
                f"({where}) takes from the encoder on the same cores")
    return (f"the stream reaches {stream / enc:.0%} of the encoder's {enc:.0f} images/s; the encoder was busy only "
            f"{busy:.0%} of the stream's wall time: bound by per-batch work outside the encoder ({where}), which "
            f"a model this fast cannot hide")


def _baseline_note(base: float, enc: float, enc1: float) -> str:
    return (f"the baseline pays one encoder call (batch 1) and one Milvus write per image: {1e3 / base:.1f} ms per "
            f"image vs {1e3 / enc:.1f} ms for the encoder alone at the ingest batch size; batching itself only "
            f"gives {enc / enc1:.1f}x on this model and CPU (encoder alone at batch 1: {enc1:.1f} images/s), which "
            f"bounds stream/baseline unless the baseline's per-image overheads are large")
