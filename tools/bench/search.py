"""`vitrine bench search`: end-to-end SearchImages over gRPC, text and image queries, concurrency sweep, filter on/off.

The collection is populated first (the images streamed through IngestImages, each tagged with
`metadata["bench_shard"] = i % 10`). Then, for every (query kind, filter, concurrency) point, `concurrency`
closed-loop workers in this process (one grpc.aio channel; the service and Triton are other processes) send
SearchImages with top_k 10 for a warm-up period (not recorded) and then for `duration_s` seconds. Per point:
QPS (answers completed in the window / window), latency p50/p90/p99 (ms, client side, each call from send to
answer), and the service's own `encode_ms` / `search_ms` (means) from the responses.

Queries: text from `TEXT_QUERIES` in turn; images are the ingested images in turn (query by example, bytes sent).
Filter on: `metadata["bench_shard"] == 3` (about a tenth of the rows).

The reference for the latency target is the text tower alone: one tokenized query sent to Triton with
tritonclient (batch 1, one at a time) — "text-encode p50". For the target it is measured interleaved with text
SearchImages calls at one client (encode, search, encode, search, ...), so both see the same load on shared cores.
The text queries of the sweep repeat TEXT_QUERIES, so after the first round they are query embedding cache hits
(encode_ms 0); the no-hit text path, the length buckets and the cache are measured by tools/bench/search_text.py
(result "search_text").

Targets (issue 5): text search p50 at one client <= text-encode p50 + 10 ms (filter off and on); p99 <= 2x p50 at
32 concurrent clients (the sweep's highest point; text and image queries, filter off).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import tritonclient.grpc as triton_grpc

from retrieval_service.usecases.preprocess import ImageLimits, preprocess_batch
from tools.bench.report import BenchResult, Target, percentiles, write_result
from tools.bench.search_text import text_points
from tools.bench.stack import (
    BenchImage,
    BenchStack,
    bench_stack,
    drop_run_rows,
    load_images,
    resolve_model,
    stream_ingest,
)
from tools.results import metadata_dict
from vitrine.client import VitrineClient
from vitrine.tokenizer import TextTokenizer
from vitrine.v1 import retrieval_service_pb2 as pb
from vitrine.v1 import retrieval_service_pb2_grpc as pb_grpc

TOP_K = 10
FILTER = 'metadata["bench_shard"] == 3'
FILTER_SHARD = 3
DEFAULT_CONCURRENCY = (1, 4, 16, 32)
#: Images ingested by --quick (the search collection).
QUICK_IMAGES = 200
#: Text queries, used in turn (different lengths, so tokenization and the text tower see varied inputs).
TEXT_QUERIES = (
    "a handwritten digit seven",
    "the number three written by hand",
    "red silk cape with gold trim",
    "a photo of a cat sitting on a laptop keyboard",
    "手写数字七",
    "a scanned zero with a thick stroke",
    "blue denim jacket with silver buttons, spring summer collection",
    "two",
    "an eight drawn quickly with a pen on white paper",
    "product shot of a leather handbag on a marble table",
    "手写的阿拉伯数字2",
    "a digit nine slightly rotated to the left",
)


@dataclass
class PointResult:
    """One measured point. Latencies in ms; `errors` counts failed calls by gRPC status code name."""

    kind: str
    filtered: bool
    concurrency: int
    latencies_ms: list[float]
    seconds: float
    encode_ms: list[float] = field(default_factory=list)
    search_ms: list[float] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    first_error: str = ""

    def row(self) -> dict[str, Any]:
        """The CSV/JSON row of this point."""
        lat = percentiles(self.latencies_ms) if self.latencies_ms else {
            "p50_ms": float("nan"), "p90_ms": float("nan"), "p99_ms": float("nan"), "mean_ms": float("nan")}
        return {"query": self.kind, "filter": "on" if self.filtered else "off", "concurrency": self.concurrency,
                "requests": len(self.latencies_ms), "errors": sum(self.errors.values()), "window_s": self.seconds,
                "qps": len(self.latencies_ms) / self.seconds if self.seconds > 0 else 0.0, **lat,
                "server_encode_ms": float(np.mean(self.encode_ms)) if self.encode_ms else float("nan"),
                "server_search_ms": float(np.mean(self.search_ms)) if self.search_ms else float("nan")}


def _request(kind: str, i: int, images: Sequence[BenchImage], filtered: bool) -> pb.SearchImagesRequest:
    req = pb.SearchImagesRequest(top_k=TOP_K, filter=FILTER if filtered else "")
    if kind == "text":
        req.text = TEXT_QUERIES[i % len(TEXT_QUERIES)]
    else:
        req.image = images[i % len(images)].content
    return req


async def measure_point(target: str, kind: str, filtered: bool, concurrency: int, images: Sequence[BenchImage],
                        *, duration_s: float, warmup_s: float, min_requests: int = 0,
                        max_s: float = 120.0) -> PointResult:
    """Closed-loop load: `concurrency` workers send SearchImages back to back; one measured window.

    Warm-up: at least `warmup_s` seconds and until every worker has had one answer (steady state). The window
    then lasts at least `duration_s` seconds and until `min_requests` answers were recorded (slow models at
    high concurrency need more than `duration_s` for a sample), at most until `max_s` seconds after the start.
    Recorded: calls that end inside the window; QPS = recorded / window length. Failed calls in the window are
    counted in `errors` (never raised).
    """
    point = PointResult(kind, filtered, concurrency, [], duration_s)
    requests = [_request(kind, i, images, filtered) for i in range(max(len(TEXT_QUERIES), min(len(images), 256)))]
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        stub = pb_grpc.RetrievalServiceStub(channel)
        await channel.channel_ready()
        loop = asyncio.get_running_loop()
        began = loop.time()
        answered: set[int] = set()  # workers that had an answer (warm-up)
        window: dict[str, float] = {}  # "start", then "end"

        def done(now: float) -> bool:
            if "end" in window:
                return True
            if now >= began + max_s:
                window.setdefault("start", now)
                window["end"] = now
            elif "start" not in window:
                if now >= began + warmup_s and len(answered) == concurrency:
                    window["start"] = now
            elif now >= window["start"] + duration_s and len(point.latencies_ms) >= min_requests:
                window["end"] = now
            return "end" in window

        async def worker(w: int) -> None:
            i = w
            while not done(loop.time()):
                t0 = time.perf_counter()
                try:
                    resp = await stub.SearchImages(requests[i % len(requests)], timeout=max_s)
                    error = None
                except grpc.aio.AioRpcError as exc:
                    error = exc
                ms = (time.perf_counter() - t0) * 1e3
                i += concurrency
                answered.add(w)
                if "start" not in window or "end" in window:
                    continue
                if error is not None:
                    point.errors[error.code().name] += 1
                    point.first_error = point.first_error or f"{error.code().name}: {error.details()}"
                else:
                    point.latencies_ms.append(ms)
                    point.encode_ms.append(resp.encode_ms)
                    point.search_ms.append(resp.search_ms)

        await asyncio.gather(*(worker(w) for w in range(concurrency)))
    point.seconds = window["end"] - window["start"]
    return point


def check_results(target: str, images: Sequence[BenchImage]) -> list[str]:
    """One text, one image and one filtered search; return problems found (empty when all is well).

    Checks: top_k results each, filtered results all carry bench_shard == FILTER_SHARD, and an ingested image
    finds itself first (score ~1).
    """
    problems = []
    with VitrineClient(target) as client:
        want = min(TOP_K, len(images))
        resp = client.search(text=TEXT_QUERIES[0], top_k=TOP_K)
        if len(resp.results) != want:
            problems.append(f"text search returned {len(resp.results)} results, expected {want}")
        resp = client.search(image=images[0].content, top_k=TOP_K)
        if not resp.results or resp.results[0].score < 0.99:
            top = resp.results[0].score if resp.results else None
            problems.append(f"an ingested image does not find itself first (top score {top})")
        resp = client.search(text=TEXT_QUERIES[0], top_k=TOP_K, filter=FILTER)
        shards = {metadata_dict(r.image).get("bench_shard") for r in resp.results}
        if not resp.results or shards != {FILTER_SHARD}:
            problems.append(f"filtered search returned shards {sorted(map(str, shards))}, expected {FILTER_SHARD}")
    return problems


def text_encode_ms(stack: BenchStack, repeats: int) -> list[float]:
    """Latency (ms) of the text tower alone: one tokenized query per tritonclient call (batch 1, sequential).

    5 untimed calls first. Raises InferenceServerException when Triton fails.
    """
    tower = stack.manifest.text
    ids = TextTokenizer.from_repository(stack.repository, stack.manifest).encode_batch([TEXT_QUERIES[0]])
    client = triton_grpc.InferenceServerClient(stack.encoder_url)
    try:
        out = []
        for i in range(repeats + 5):
            inp = triton_grpc.InferInput(tower.input_name, list(ids.shape), "INT64")
            inp.set_data_from_numpy(ids)
            t0 = time.perf_counter()
            client.infer(tower.triton_model, [inp], outputs=[triton_grpc.InferRequestedOutput(tower.output_name)])
            if i >= 5:
                out.append((time.perf_counter() - t0) * 1e3)
        return out
    finally:
        client.close()


def paired_text_ms(stack: BenchStack, repeats: int, filtered: bool) -> tuple[list[float], list[float]]:
    """Alternate one text-tower call (tritonclient, batch 1) and one text SearchImages (top_k 10), same query.

    Returns (encode latencies ms, search latencies ms), `repeats` each, measured interleaved so that both see
    the same load on shared cores (what the p50 target compares). 3 untimed pairs first.
    """
    tower = stack.manifest.text
    tokenizer = TextTokenizer.from_repository(stack.repository, stack.manifest)
    client = triton_grpc.InferenceServerClient(stack.encoder_url)
    encode, search = [], []
    try:
        with VitrineClient(stack.target) as service:
            for i in range(repeats + 3):
                text = TEXT_QUERIES[i % len(TEXT_QUERIES)]
                ids = tokenizer.encode_batch([text])
                inp = triton_grpc.InferInput(tower.input_name, list(ids.shape), "INT64")
                inp.set_data_from_numpy(ids)
                t0 = time.perf_counter()
                client.infer(tower.triton_model, [inp],
                             outputs=[triton_grpc.InferRequestedOutput(tower.output_name)])
                t1 = time.perf_counter()
                service.search(text=text, top_k=TOP_K, filter=FILTER if filtered else "")
                t2 = time.perf_counter()
                if i >= 3:
                    encode.append((t1 - t0) * 1e3)
                    search.append((t2 - t1) * 1e3)
    finally:
        client.close()
    return encode, search


def image_encode_ms(stack: BenchStack, image: BenchImage, repeats: int) -> list[float]:
    """Latency (ms) of decode + preprocess + the image tower alone (batch 1, sequential), 3 untimed calls first."""
    tower = stack.manifest.image
    client = triton_grpc.InferenceServerClient(stack.encoder_url)
    try:
        out = []
        for i in range(repeats + 3):
            t0 = time.perf_counter()
            (px,) = preprocess_batch([image.content], stack.manifest.image, ImageLimits())
            inp = triton_grpc.InferInput(tower.input_name, [1, *px.shape], "UINT8")
            inp.set_data_from_numpy(px[None])
            client.infer(tower.triton_model, [inp], outputs=[triton_grpc.InferRequestedOutput(tower.output_name)])
            if i >= 3:
                out.append((time.perf_counter() - t0) * 1e3)
        return out
    finally:
        client.close()


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """QPS (left) and p50 / p99 latency (right) vs concurrency, one line per (query, filter); PNG at `path`."""
    import matplotlib  # noqa: PLC0415 - matplotlib: a [dev] extra, not in the serving image

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 - after choosing the Agg backend

    fig, (ax_qps, ax_lat) = plt.subplots(1, 2, figsize=(11, 4))
    series: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        series.setdefault((row["query"], row["filter"]), []).append(row)
    for (kind, filt), points in series.items():
        points = sorted(points, key=lambda r: r["concurrency"])
        x = [p["concurrency"] for p in points]
        label = f"{kind}, filter {filt}"
        line, = ax_qps.plot(x, [p["qps"] for p in points], marker="o", label=label)
        ax_lat.plot(x, [p["p50_ms"] for p in points], marker="o", color=line.get_color(), label=f"{label} p50")
        ax_lat.plot(x, [p["p99_ms"] for p in points], marker="x", linestyle="--", color=line.get_color(),
                    label=f"{label} p99")
    ticks = sorted({row["concurrency"] for row in rows})
    for ax in (ax_qps, ax_lat):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("concurrent clients")
        ax.grid(True, alpha=0.3)
    ax_qps.set_ylabel("queries/s")
    ax_lat.set_ylabel("latency, ms")
    ax_lat.set_yscale("log")
    ax_qps.legend(fontsize=8)
    ax_lat.legend(fontsize=7, ncol=2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _find(rows: list[dict[str, Any]], kind: str, filt: str, concurrency: int) -> dict[str, Any] | None:
    for row in rows:
        if (row["query"], row["filter"], row["concurrency"]) == (kind, filt, concurrency):
            return row
    return None


def run_search_bench(*, repository: Path | None = None, images_dir: Path | None = None,
                     out: Path = Path("bench_out"), cache_dir: Path = Path(".cache"),
                     concurrency: Sequence[int] = DEFAULT_CONCURRENCY, kinds: Sequence[str] = ("text", "image"),
                     filters: Sequence[bool] = (False, True), duration_s: float | None = None,
                     warmup_s: float | None = None, encode_repeats: int | None = None, quick: bool = False,
                     limit: int | None = None, min_requests_per_client: int | None = None,
                     target: str | None = None, encoder_url: str | None = None,
                     log: Callable[[str], None] = print) -> BenchResult:
    """Run the search benchmark (see module docstring); write `<out>/search.{json,csv,png}`; return the result.

    Args:
        repository / images_dir: model repository and images (defaults: demo model, demo digits).
        concurrency: concurrent clients per point (default 1, 4, 16, 32).
        kinds: "text" and/or "image" queries. filters: False (no filter) and/or True (FILTER).
        duration_s / warmup_s: measuring window and untimed warm-up per point, seconds (quick: 2 / 0.5;
            else 10 / 2).
        encode_repeats: text-encode calls for the reference p50 (quick 30, else 200).
        limit: ingest at most this many images (default: QUICK_IMAGES with `quick`, else all in the folder).
        min_requests_per_client: a point's window also lasts until concurrency x this many answers were
            recorded (quick 1, else 3), so slow models at high concurrency still get a sample.
        target / encoder_url: a running stack instead of a private one (the run's rows are deleted afterwards).

    Raises:
        ValueError: unknown kind or concurrency < 1; RuntimeError: population or result checks failed.
    """
    if set(kinds) - {"text", "image"} or not kinds:
        raise ValueError(f"kinds must be 'text' and/or 'image', got {list(kinds)}")
    if not concurrency or min(concurrency) < 1:
        raise ValueError(f"concurrency values must be >= 1, got {list(concurrency)}")
    duration_s = duration_s or (2.0 if quick else 10.0)
    warmup_s = warmup_s if warmup_s is not None else (0.5 if quick else 2.0)
    encode_repeats = encode_repeats or (30 if quick else 200)
    limit = limit or (QUICK_IMAGES if quick else None)
    per_client = min_requests_per_client or (1 if quick else 3)
    repository, images_dir = resolve_model(repository, images_dir, cache_dir)
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    with bench_stack(repository, target=target, encoder_url=encoder_url) as stack:
        images = load_images(images_dir, limit, salt="" if stack.local else stack.run_id)
        log(f"search bench: model {stack.manifest.model_id}, {len(images)} images from {images_dir}, "
            f"stack {stack.target}")
        populated = stream_ingest(stack.target, images)
        stored = populated.outcomes.get("INSERTED", 0) + populated.outcomes.get("ALREADY_PRESENT", 0)
        if stored != len(images):
            raise RuntimeError(f"populating the collection failed: {dict(populated.outcomes)} {populated.first_error}")
        log(f"  populated: {len(images)} images in {populated.seconds:.1f} s")
        problems = check_results(stack.target, images)
        if problems:
            raise RuntimeError("search results are wrong: " + "; ".join(problems))
        text_ms = percentiles(text_encode_ms(stack, encode_repeats))
        paired = {}
        for filtered in filters:
            enc_ms, search_ms = paired_text_ms(stack, encode_repeats, filtered)
            filt = "on" if filtered else "off"
            paired[filt] = (percentiles(enc_ms)["p50_ms"], percentiles(search_ms)["p50_ms"])
            log(f"  interleaved, filter {filt}: text tower alone p50 {paired[filt][0]:.2f} ms, text search p50 "
                f"{paired[filt][1]:.2f} ms")
        image_ms = percentiles(image_encode_ms(stack, images[0], max(10, encode_repeats // 3)))
        log(f"  text tower alone p50 {text_ms['p50_ms']:.2f} ms; decode + image tower alone p50 "
            f"{image_ms['p50_ms']:.2f} ms")
        text_rows, text_targets, text_notes = text_points(stack, repeats=encode_repeats, duration_s=duration_s,
                                                          warmup_s=warmup_s, log=log)
        for kind in kinds:
            for filtered in filters:
                for conc in concurrency:
                    point = asyncio.run(measure_point(stack.target, kind, filtered, conc, images,
                                                      duration_s=duration_s, warmup_s=warmup_s,
                                                      min_requests=per_client * conc))
                    row = point.row()
                    rows.append(row)
                    if point.errors:
                        notes.append(f"{kind} filter {row['filter']} x{conc}: {dict(point.errors)} errors, first: "
                                     f"{point.first_error}")
                    log(f"  {kind:5s} filter {row['filter']:3s} x{conc:<3d} {row['qps']:8.1f} QPS  p50 "
                        f"{row['p50_ms']:7.2f}  p99 {row['p99_ms']:7.2f} ms  (service: encode "
                        f"{row['server_encode_ms']:.2f}, milvus {row['server_search_ms']:.2f} ms)")
        if not stack.local:
            notes.append(f"ran against {stack.target}; deleted its {drop_run_rows(stack.target, stack.run_id)} "
                         "bench rows afterwards")
        model_name, model_id = stack.manifest.model_name, stack.manifest.model_id

    targets = _targets(rows, paired, concurrency)
    notes.insert(0, f"reference: text tower alone (tritonclient, batch 1) p50 {text_ms['p50_ms']:.2f} ms, p99 "
                    f"{text_ms['p99_ms']:.2f} ms; decode + image tower alone p50 {image_ms['p50_ms']:.2f} ms. "
                    f"Collection: {len(images)} images. server_encode_ms / server_search_ms are the service's own "
                    f"timings (encoder call incl. tokenize or decode; Milvus search); the rest of a call's latency "
                    f"is gRPC, the client and queueing.")
    result = BenchResult(
        name="search", title="Search: SearchImages end to end",
        config={"model_id": model_id, "repository": str(repository), "images_dir": str(images_dir),
                "collection_images": len(images), "top_k": TOP_K, "filter": FILTER, "concurrency": list(concurrency),
                "kinds": list(kinds), "duration_s": duration_s, "warmup_s": warmup_s, "quick": quick,
                "text_encode_p50_ms": text_ms["p50_ms"], "image_encode_p50_ms": image_ms["p50_ms"],
                "interleaved_p50_ms": {f: {"text_encode": e, "text_search": q} for f, (e, q) in paired.items()},
                "target": target or "local stack (Milvus Lite)"},
        rows=rows, targets=targets, notes=notes)
    out.mkdir(parents=True, exist_ok=True)
    result.plots.append(plot(rows, out / "search.png", f"SearchImages, {model_name}, {len(images)} images, "
                                                       f"top_k {TOP_K}").name)
    write_result(result, out)
    write_result(BenchResult(
        name="search_text", title="Search: text queries by length bucket, and the query embedding cache",
        config={"model_id": model_id, "buckets": list(stack.manifest.text.buckets), "duration_s": duration_s,
                "repeats": encode_repeats, "quick": quick},
        rows=text_rows, targets=text_targets, notes=text_notes), out)
    return result


_LITE_JSON_FILTER_NOTE = (
    "; with the filter, Milvus Lite (3.2.2) evaluates metadata[...] on a declared JSON field row by row in Python "
    "(milvus_lite/search/filter/eval/python_backend.py), about 0.1 ms per stored row here, so the filtered search "
    "grows with the collection (a Milvus server evaluates it natively)")


def _targets(rows: list[dict[str, Any]], paired: dict[str, tuple[float, float]],
             concurrency: Sequence[int]) -> list[Target]:
    """Targets from the sweep rows and the paired (interleaved) text-encode / text-search p50s per filter."""
    targets = []
    low, high = min(concurrency), max(concurrency)
    for filt, (text_p50, search_p50) in paired.items():
        row = _find(rows, "text", filt, low) or {"server_encode_ms": float("nan"), "server_search_ms": float("nan")}
        extra = search_p50 - text_p50
        targets.append(Target(
            f"text search p50 at 1 client, filter {filt} (ms) <= text-encode p50 + 10 ms (interleaved calls)",
            search_p50, text_p50 + 10.0, higher_is_better=False,
            note=f"{extra:.1f} ms over the text tower alone ({text_p50:.1f} ms); at {low} client(s) in the sweep the "
                 f"service reports encode {row['server_encode_ms']:.1f} ms (incl. tokenize + Triton batching delay) "
                 f"and Milvus {row['server_search_ms']:.1f} ms, the rest is gRPC + Python on 2 shared cores"
                 + (_LITE_JSON_FILTER_NOTE if filt == "on" else "")))
    for kind in ("text", "image"):
        row = _find(rows, kind, "off", high)
        if row is not None and row["p50_ms"] > 0:
            targets.append(Target(
                f"{kind} search p99 / p50 at {high} clients, filter off", row["p99_ms"] / row["p50_ms"], 2.0,
                higher_is_better=False,
                note=f"p50 {row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms at {row['qps']:.0f} QPS: the tail is "
                     f"queueing behind one encoder instance and the service's event loop on 2 shared cores"))
    return targets
