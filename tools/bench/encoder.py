"""`vitrine bench encoder`: load-test a tower on Triton's KServe v2 gRPC endpoint against raw ONNX Runtime.

What one run does:

1. Writes a variant model repository (`tools.bench.models.batching_variants`): the tower's ONNX file
   served as `<tower model>_batching` (its exported config.pbtxt, dynamic batching on) and
   `<tower model>_nobatch` (same file, no `dynamic_batching`), plus optional tuning variants.
2. Starts `vitrine serve-encoder` over it as a child process (so the load generator and the server never
   share a GIL), or targets `--url` of a running Triton that serves those model names.
3. For each variant and each concurrency: `concurrency` asyncio clients (`tritonclient.grpc.aio`) send
   requests of `items_per_request` rows back to back, first for `warmup_s`, then for `duration_s` (or
   until `requests` requests); Triton's statistics (`get_inference_statistics`) are read before and after
   the measured window, and the difference gives queue time, compute time per execution and the executed
   batch sizes.
4. Runs the same ONNX file in-process with ONNX Runtime, with the same session options as the server
   (`encoder_server.runtime.runtime_options_from_config` of the batching variant: intra-op threads, graph
   optimization level; one session per instance), over a small batch sweep plus the batch sizes the
   server actually executed; the best items/s is the raw ceiling the serving path is compared with.
5. Writes `encoder.json` / `encoder.csv` (`tools.bench.report.write_result`) and `encoder.png`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import tritonclient.grpc as triton_grpc
import tritonclient.grpc.aio as triton_aio
from tritonclient.utils import InferenceServerException

from encoder_server.repository import numpy_dtype
from encoder_server.runtime import create_session, runtime_options_from_config
from tools.bench.models import (
    BATCHING_ON_OFF,
    Variant,
    batching_variants,
    latest_model_file,
    tower_model_dir,
)
from tools.bench.report import BenchResult, Target, percentiles, write_result
from tools.processes import Ports, spawn
from vitrine.manifest import Manifest
from vitrine.tokenizer import TextTokenizer
from vitrine.triton_config import read_model_config

log = logging.getLogger(__name__)

DEFAULT_CONCURRENCY: tuple[int, ...] = (1, 4, 16, 32, 64)
#: ORT baseline batch sweep (rows); the batch sizes the server executed most often are added to it.
BASELINE_BATCH_SIZES: tuple[int, ...] = (1, 8, 16, 32)
#: The served/raw target is read at this many concurrent clients (issue 5).
TARGET_CONCURRENCY = 32
SERVED_OVER_RAW_GOAL = 0.9
BATCHING_OVER_NOBATCH_GOAL = 1.0
#: fp32 arithmetic ceiling of ViT-B/32 on the project's 2 Zen 4 cores (docs: ~4.4 GFLOP/image, ~200 GFLOP/s).
VIT_B32_FP32_CEILING_IMAGES_S = 45.0

#: Tuning variants (`--tune`), each measured with dynamic batching at `tune_concurrency` clients, in
#: `tune_rounds` interleaved rounds together with the exported config ("exported", the `_batching` model), so
#: each variant is compared with the exported config measured moments apart (robust to a drifting load).
#: ORT's default intra-op thread count is one per physical core (2 here), so "exported" is the 2-thread case.
TUNING_VARIANTS: tuple[Variant, ...] = (
    Variant("threads1", intra_op_threads=1),
    Variant("inst2_threads1", instance_count=2, intra_op_threads=1),
    Variant("graph_extended", graph_level=1),
    Variant("graph_basic", graph_level=-1),
    Variant("pbs_none", preferred_batch_sizes=()),
    Variant("pbs32", preferred_batch_sizes=(32,)),
    Variant("delay0", max_queue_delay_microseconds=0),
    Variant("delay10ms", max_queue_delay_microseconds=10000),
)


class EncoderBenchError(RuntimeError):
    """The benchmark could not run (server did not start, a request failed, a model is missing)."""


@dataclasses.dataclass
class EncoderBenchConfig:
    """Settings of one `vitrine bench encoder` run.

    Attributes:
        repository: Vitrine model repository (manifest + towers) whose tower is benchmarked.
        tower: "image" (uint8 [B, H, W, 3]) or "text" (int64 [B, context_length]).
        concurrency: concurrent clients per point, e.g. (1, 4, 16, 32, 64).
        items_per_request: rows per request (images or texts).
        duration_s: measured seconds per point (ignored when `requests` is set).
        requests: measured requests per point instead of a duration (None = use `duration_s`).
        warmup_s: seconds of unmeasured load before each point.
        url: host:port of a running Triton serving `<tower model>_batching` / `_nobatch` (or the tower model
            itself); None starts `vitrine serve-encoder` over a variant repository.
        out: output folder (encoder.json, encoder.csv, encoder.png, logs/).
        baseline_s: seconds of in-process ORT runs per baseline batch size.
        tune: also measure `TUNING_VARIANTS` at `tune_concurrency` clients (needs a local server).
        tune_concurrency: clients for the tuning runs.
        tune_rounds: interleaved rounds of the tuning runs (the median over rounds is reported).
        server_timeout_s: how long to wait for the encoder server to be ready, seconds.
    """

    repository: Path
    tower: str = "image"
    concurrency: tuple[int, ...] = DEFAULT_CONCURRENCY
    items_per_request: int = 1
    duration_s: float = 10.0
    requests: int | None = None
    warmup_s: float = 2.0
    url: str | None = None
    out: Path = Path("bench_out")
    baseline_s: float = 3.0
    tune: bool = False
    tune_concurrency: int = TARGET_CONCURRENCY
    tune_rounds: int = 3
    server_timeout_s: float = 300.0

    def validate(self) -> None:
        """Raise ValueError naming the bad setting (tower, concurrency, sizes, durations, --tune + --url)."""
        if self.tower not in ("image", "text"):
            raise ValueError(f"tower must be 'image' or 'text', got {self.tower!r}")
        if not self.concurrency or min(self.concurrency) < 1:
            raise ValueError(f"concurrency must be positive integers, got {self.concurrency}")
        if self.items_per_request < 1:
            raise ValueError(f"items_per_request must be >= 1, got {self.items_per_request}")
        if self.requests is None and self.duration_s <= 0:
            raise ValueError(f"duration_s must be > 0, got {self.duration_s}")
        if self.requests is not None and self.requests < 1:
            raise ValueError(f"requests must be >= 1, got {self.requests}")
        if self.warmup_s < 0 or self.baseline_s <= 0:
            raise ValueError("warmup_s must be >= 0 and baseline_s > 0")
        if self.tune_rounds < 1:
            raise ValueError(f"tune_rounds must be >= 1, got {self.tune_rounds}")
        if self.tune and self.url is not None:
            raise ValueError("--tune needs the benchmark's own server (it writes the variant configs); "
                             "drop --url")


QUICK = dict(duration_s=3.0, warmup_s=1.0, baseline_s=1.5)


# ------------------------------------------------------------------------------------------- statistics
@dataclasses.dataclass(frozen=True)
class TritonStats:
    """Cumulative Triton statistics of one model (from `get_inference_statistics`), or a difference of two.

    Attributes:
        inference_count: rows inferred (a request of B rows counts B).
        execution_count: model executions (one per executed batch).
        request_count: successful requests.
        queue_ns: total time requests waited in the scheduler queue, ns (summed per request).
        compute_ns_by_batch: executed batch size -> (executions, total compute input+infer+output ns).
    """

    inference_count: int
    execution_count: int
    request_count: int
    queue_ns: int
    compute_ns_by_batch: dict[int, tuple[int, int]]

    @classmethod
    def from_proto(cls, response: Any) -> TritonStats:
        """From a `ModelStatisticsResponse` holding one model (tritonclient `as_json=False`)."""
        if not response.model_stats:
            raise EncoderBenchError("Triton returned no statistics for the model")
        s = response.model_stats[0]
        by_batch: dict[int, tuple[int, int]] = {}
        for b in s.batch_stats:
            ns = b.compute_input.ns + b.compute_infer.ns + b.compute_output.ns
            by_batch[int(b.batch_size)] = (int(b.compute_infer.count), int(ns))
        return cls(int(s.inference_count), int(s.execution_count), int(s.inference_stats.success.count),
                   int(s.inference_stats.queue.ns), by_batch)

    def minus(self, before: TritonStats) -> TritonStats:
        """`self - before`, field by field (the statistics of the window between two readings)."""
        by_batch = {}
        for size, (count, ns) in self.compute_ns_by_batch.items():
            c0, n0 = before.compute_ns_by_batch.get(size, (0, 0))
            if count - c0 > 0:
                by_batch[size] = (count - c0, ns - n0)
        return TritonStats(self.inference_count - before.inference_count,
                           self.execution_count - before.execution_count,
                           self.request_count - before.request_count, self.queue_ns - before.queue_ns,
                           by_batch)

    def summary(self) -> dict[str, Any]:
        """Row fields: executions, mean executed batch (rows), queue ms per request, compute ms per execution,
        and the executed batch sizes as "size:count" pairs (most frequent first)."""
        executions = sum(c for c, _ in self.compute_ns_by_batch.values())
        compute_ns = sum(ns for _, ns in self.compute_ns_by_batch.values())
        batches = sorted(self.compute_ns_by_batch.items(), key=lambda kv: (-kv[1][0], kv[0]))
        return {
            "triton_inference_count": self.inference_count,
            "triton_execution_count": self.execution_count,
            "triton_mean_batch": (round(self.inference_count / self.execution_count, 2)
                                  if self.execution_count else 0.0),
            "triton_queue_ms": (round(self.queue_ns / self.request_count / 1e6, 3)
                                if self.request_count else 0.0),
            "triton_compute_ms_per_execution": round(compute_ns / executions / 1e6, 3) if executions else 0.0,
            "triton_batch_sizes": " ".join(f"{size}:{count}" for size, (count, _) in batches),
        }


# ---------------------------------------------------------------------------------------------- inputs
@dataclasses.dataclass(frozen=True)
class TowerInput:
    """The served tower's input as the load generator fills it (name, Triton datatype, one request's rows)."""

    name: str
    datatype: str
    rows: np.ndarray  # [items_per_request, *dims]


def make_tower_input(repository: Path, tower: str, items: int, seed: int = 0) -> TowerInput:
    """One request's input: random uint8 pixels [items, H, W, 3], or tokenized captions int64 [items, L].

    Text rows are real captions through the repository's tokenizer.json (`vitrine.tokenizer`), so
    the token count is realistic. Raises FileNotFoundError/ValueError on a repository without that tower.
    """
    config = read_model_config(tower_model_dir(repository, tower))
    spec = config.input[0]
    dtype = numpy_dtype(spec.data_type)
    if tower == "image":
        rng = np.random.default_rng(seed)
        rows = rng.integers(0, 256, size=(items, *spec.dims), dtype=np.uint8).astype(dtype)
    else:
        captions = ["red silk cape with gold trim", "a handwritten digit seven", "手写数字七",
                    "a photo of a cat sitting on a wooden table next to a cup of coffee"]
        tokenizer = TextTokenizer.from_repository(repository)
        rows = tokenizer.encode_batch([captions[i % len(captions)] for i in range(items)]).astype(dtype)
    datatype = {np.dtype(np.uint8): "UINT8", np.dtype(np.int64): "INT64", np.dtype(np.int32): "INT32",
                np.dtype(np.float32): "FP32", np.dtype(np.float16): "FP16"}[np.dtype(dtype)]
    return TowerInput(spec.name, datatype, rows)


# -------------------------------------------------------------------------------------------- load test
@dataclasses.dataclass
class LoadRun:
    """What one measured window produced: latencies (ms), completed requests/items, wall time (s)."""

    latencies_ms: list[float]
    items: int
    elapsed_s: float


async def _drive(client: Any, model: str, tower_input: TowerInput, concurrency: int, *,
                 duration_s: float | None, requests: int | None) -> LoadRun:
    """Run `concurrency` closed-loop clients until `duration_s` passed (no new request after) or `requests`
    were sent; latencies in ms."""
    latencies: list[float] = []
    remaining = [requests if requests is not None else -1]
    start = time.perf_counter()
    deadline = start + duration_s if requests is None and duration_s is not None else None

    async def worker() -> None:
        infer_input = triton_grpc.InferInput(tower_input.name, list(tower_input.rows.shape),
                                             tower_input.datatype)
        infer_input.set_data_from_numpy(tower_input.rows)
        while True:
            if deadline is not None and time.perf_counter() >= deadline:
                return
            if requests is not None:
                if remaining[0] <= 0:
                    return
                remaining[0] -= 1
            t0 = time.perf_counter()
            try:
                await client.infer(model, [infer_input])
            except InferenceServerException as exc:
                raise EncoderBenchError(f"request to {model} failed: {exc}") from exc
            latencies.append((time.perf_counter() - t0) * 1e3)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    return LoadRun(latencies, len(latencies) * tower_input.rows.shape[0], elapsed)


async def _statistics(client: Any, model: str) -> TritonStats:
    try:
        return TritonStats.from_proto(await client.get_inference_statistics(model))
    except InferenceServerException as exc:
        raise EncoderBenchError(
            f"cannot read Triton statistics of {model} ({exc}); the statistics endpoint must be open "
            "(EncoderServer on loopback opens it)"
        ) from exc


async def _settled(client: Any, model: str, before: TritonStats, rows: int,
                   timeout_s: float = 5.0) -> TritonStats:
    """The model's cumulative statistics once Triton has recorded `rows` more inferences than `before`.

    Triton updates the statistics after it has sent the responses, so a reading taken right after the last
    response can miss the last executions; waiting for the count keeps windows from bleeding into each other.
    Returns the last reading after `timeout_s` seconds even if the count was not reached.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        now = await _statistics(client, model)
        if now.inference_count - before.inference_count >= rows or time.monotonic() > deadline:
            return now
        await asyncio.sleep(0.02)


async def measure_point(client: Any, model: str, tower_input: TowerInput, concurrency: int, *,
                        duration_s: float | None, requests: int | None, warmup_s: float,
                        cpu_seconds: Callable[[], float] | None = None) -> dict[str, Any]:
    """Warm up, then measure one (model, concurrency) point; returns the row fields.

    Args:
        cpu_seconds: returns the server's cumulative CPU time (s); when given, the row gets
            `cpu_ms_per_item`, the server's CPU milliseconds per inferred row over the measured window
            (a contention-robust efficiency figure: on a quiet machine items/s <= cores * 1000 / it).

    Returns:
        {"requests", "items", "elapsed_s", "throughput_items_s", "p50_ms", "p90_ms", "p99_ms", "mean_ms",
         "cpu_ms_per_item", plus `TritonStats.summary()` of the measured window}.

    Raises:
        EncoderBenchError: a request or the statistics call failed.
    """
    before = await _statistics(client, model)
    if warmup_s > 0:
        warm = await _drive(client, model, tower_input, concurrency, duration_s=warmup_s, requests=None)
        before = await _settled(client, model, before, warm.items)
    cpu0 = cpu_seconds() if cpu_seconds else None
    run = await _drive(client, model, tower_input, concurrency, duration_s=duration_s, requests=requests)
    cpu1 = cpu_seconds() if cpu_seconds else None
    delta = (await _settled(client, model, before, run.items)).minus(before)
    return {
        "cpu_ms_per_item": (round((cpu1 - cpu0) * 1e3 / run.items, 3)
                            if cpu0 is not None and cpu1 is not None and run.items else None),
        "requests": len(run.latencies_ms),
        "items": run.items,
        "elapsed_s": round(run.elapsed_s, 3),
        "throughput_items_s": round(run.items / run.elapsed_s, 3),
        **{k: round(v, 3) for k, v in percentiles(run.latencies_ms).items()},
        **delta.summary(),
    }


# ------------------------------------------------------------------------------------------ ORT baseline
def ort_baseline(model_path: Path, config: Any, tower_input: TowerInput, batch_sizes: Sequence[int],
                 seconds_per_batch: float, ort_threads: int | None = None) -> list[dict[str, Any]]:
    """Raw in-process ONNX Runtime throughput of `model_path` at each batch size (rows).

    Uses the session options the encoder server derives from `config` (`runtime_options_from_config`:
    intra-op threads, graph optimization level, providers) and one session per configured instance, run
    concurrently from as many threads (ORT releases the GIL in `run`), as the server's instances run.

    Returns:
        One dict per batch size: {"batch_size", "runs", "throughput_items_s", "cpu_ms_per_item" (this
        process's CPU ms per row), "p50_ms", "p99_ms", ...} (latency of one `session.run`, ms).
    """
    options = runtime_options_from_config(config, intra_op_threads=ort_threads)
    instances = sum(max(g.count, 1) for g in config.instance_group) or 1
    sessions = [create_session(model_path, options) for _ in range(instances)]
    output = [o.name for o in sessions[0].get_outputs()]
    rows: list[dict[str, Any]] = []
    for batch in batch_sizes:
        reps = -(-batch // tower_input.rows.shape[0])
        feed = {tower_input.name: np.concatenate([tower_input.rows] * reps)[:batch]}
        for session in sessions:  # warm the kernels for this shape
            session.run(output, feed)
        latencies: list[float] = []
        lock = threading.Lock()
        stop_at = time.perf_counter() + seconds_per_batch

        def loop(session: Any) -> None:
            done = 0
            while done < 2 or time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                session.run(output, feed)
                with lock:
                    latencies.append((time.perf_counter() - t0) * 1e3)
                done += 1

        started, cpu_started = time.perf_counter(), time.process_time()
        threads = [threading.Thread(target=loop, args=(s,)) for s in sessions]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        rows.append({"batch_size": batch, "runs": len(latencies),
                     "cpu_ms_per_item": round(cpu * 1e3 / (len(latencies) * batch), 3),
                     "throughput_items_s": round(len(latencies) * batch / elapsed, 3),
                     **{k: round(v, 3) for k, v in percentiles(latencies).items()}})
    return rows


# ------------------------------------------------------------------------------------------------ server
@contextlib.contextmanager
def _encoder_server(repository: Path, models: Sequence[str], log_dir: Path,
                    timeout_s: float) -> Iterator[tuple[str, int]]:
    """`vitrine serve-encoder --repository REPO` as a child on free loopback ports; yields (gRPC host:port,
    its process id) once the server and every one of `models` report ready (PyTriton loads the models after
    tritonserver itself is up, so server readiness alone is not enough)."""
    ports = Ports.free()
    child = spawn("encoder_bench_server", ["serve-encoder", "--repository", str(repository),
                                           "--http-port", str(ports.encoder_http),
                                           "--grpc-port", str(ports.encoder_grpc),
                                           "--metrics-port", str(ports.encoder_metrics)], log_dir)
    url = f"127.0.0.1:{ports.encoder_grpc}"
    try:
        client = triton_grpc.InferenceServerClient(url)
        deadline = time.monotonic() + timeout_s
        while True:
            if not child.alive():
                raise EncoderBenchError(
                    f"encoder server exited with code {child.proc.returncode}:\n{child.tail()}")
            try:
                if client.is_server_ready() and all(client.is_model_ready(m) for m in models):
                    break
            except InferenceServerException:
                pass
            if time.monotonic() > deadline:
                raise EncoderBenchError(f"encoder server not ready after {timeout_s:.0f} s:\n{child.tail()}")
            time.sleep(0.3)
        client.close()
        yield url, child.proc.pid
    finally:
        child.stop()


# -------------------------------------------------------------------------------------------------- run
def process_tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` and its live descendants (the encoder server, tritonserver,
    its Python backend stubs). Raises psutil.NoSuchProcess when `pid` is gone."""
    root = psutil.Process(pid)
    total = 0.0
    for proc in (root, *root.children(recursive=True)):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


async def _sweep(url: str, points: Sequence[tuple[str, str, int, int]], tower_input: TowerInput,
                 cfg: EncoderBenchConfig, server_pid: int | None = None) -> list[dict[str, Any]]:
    """Measure every (mode, model, concurrency, round) point in order against `url`."""
    client = triton_aio.InferenceServerClient(url)
    rows = []
    try:
        for mode, model, concurrency, round_ in points:
            if not await client.is_model_ready(model):
                raise EncoderBenchError(f"model {model!r} is not ready on {url}")
            fields = await measure_point(client, model, tower_input, concurrency,
                                         duration_s=None if cfg.requests else cfg.duration_s,
                                         requests=cfg.requests, warmup_s=cfg.warmup_s,
                                         cpu_seconds=(lambda: process_tree_cpu_seconds(server_pid))
                                         if server_pid else None)
            row = {"mode": mode, "model": model, "concurrency": concurrency, "round": round_,
                   "items_per_request": cfg.items_per_request, **fields,
                   "loadavg_1m": round(os.getloadavg()[0], 2)}
            log.info("%s c=%d: %.1f items/s, p50 %.1f ms, p99 %.1f ms, mean batch %.1f", mode, concurrency,
                     row["throughput_items_s"], row["p50_ms"], row["p99_ms"], row["triton_mean_batch"])
            rows.append(row)
    finally:
        await client.close()
    return rows


async def _served_models(url: str) -> set[str]:
    client = triton_aio.InferenceServerClient(url)
    try:
        index = await client.get_model_repository_index()
        return {m.name for m in index.models}
    finally:
        await client.close()


def _row(fields: dict[str, Any]) -> dict[str, Any]:
    """A CSV row with every column (missing ones None), in one order for all modes."""
    columns = ("mode", "model", "variant", "round", "concurrency", "items_per_request", "batch_size",
               "requests", "items", "elapsed_s", "throughput_items_s", "p50_ms", "p90_ms", "p99_ms",
               "mean_ms", "served_over_raw", "batching_over_nobatch", "triton_inference_count",
               "triton_execution_count",
               "triton_mean_batch", "triton_queue_ms", "triton_compute_ms_per_execution",
               "triton_batch_sizes", "runs", "cpu_ms_per_item", "loadavg_1m")
    return {c: fields.get(c) for c in columns}


def run_encoder_bench(cfg: EncoderBenchConfig) -> BenchResult:
    """Run the whole encoder benchmark and write `encoder.json`, `encoder.csv`, `encoder.png` into `cfg.out`.

    Returns:
        The result (rows: one per served point with mode "batching"/"nobatch"/"tune:<variant>", one per
        ORT baseline batch size with mode "ort_raw").

    Raises:
        ValueError: invalid settings (`EncoderBenchConfig.validate`).
        EncoderBenchError: the server did not start, a model is missing at `--url`, or a request failed.
        FileNotFoundError: the repository or its tower is missing.
    """
    cfg.validate()
    started = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = Manifest.read(cfg.repository)
    source_dir = tower_model_dir(cfg.repository, cfg.tower)
    source_config = read_model_config(source_dir)
    tower_input = make_tower_input(cfg.repository, cfg.tower, cfg.items_per_request)
    tuning = TUNING_VARIANTS if cfg.tune else ()
    points: list[tuple[str, str, int, int]] = []  # (mode, Triton model, concurrency, tuning round)
    notes: list[str] = []
    with contextlib.ExitStack() as stack:
        if cfg.url is None:
            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vitrine-bench-")))
            variant_dir = scratch / "models"
            batching_variants(cfg.repository, variant_dir, (*BATCHING_ON_OFF, *tuning), towers=(cfg.tower,))
            models = {f"{source_dir.name}_{v.suffix}" for v in (*BATCHING_ON_OFF, *tuning)}
            url, server_pid = stack.enter_context(_encoder_server(variant_dir, sorted(models), out / "logs",
                                                                  cfg.server_timeout_s))
            baseline_config = read_model_config(variant_dir / f"{source_dir.name}_batching")
        else:
            url, server_pid = cfg.url, None
            models = asyncio.run(_served_models(url))
            baseline_config = source_config
        modes = [(mode, f"{source_dir.name}_{mode}") for mode in ("batching", "nobatch")
                 if f"{source_dir.name}_{mode}" in models]
        if not modes:
            if source_dir.name not in models:
                raise EncoderBenchError(f"{url} serves none of {source_dir.name}_batching, "
                                        f"{source_dir.name}_nobatch or {source_dir.name} "
                                        f"(it serves {sorted(models)})")
            modes = [("batching", source_dir.name)]
            notes.append(f"--url {url} serves only {source_dir.name}: measured as configured there "
                         "(no on/off pair)")
        for c in cfg.concurrency:
            points.extend((mode, model, c, 0) for mode, model in modes)
        if tuning:
            for round_ in range(1, cfg.tune_rounds + 1):
                points.extend((f"tune:{v.suffix}", f"{source_dir.name}_{v.suffix}", cfg.tune_concurrency,
                               round_) for v in (Variant("batching"), *tuning))
        served = asyncio.run(_sweep(url, points, tower_input, cfg, server_pid))

    # raw ORT: the small sweep plus the batch sizes the batching runs executed most often
    executed: Counter[int] = Counter()
    for row in served:
        if row["mode"] == "batching":
            for pair in (row["triton_batch_sizes"] or "").split():
                size, count = pair.split(":")
                executed[int(size)] += int(count)
    batch_sizes = sorted({b for b in BASELINE_BATCH_SIZES if b <= source_config.max_batch_size}
                         | {b for b, _ in executed.most_common(3)} | {cfg.items_per_request})
    model_path = latest_model_file(source_dir, source_config.default_model_filename or "model.onnx")
    raw_rows = ort_baseline(model_path, baseline_config, tower_input, batch_sizes, cfg.baseline_s)
    raw_best = max(raw_rows, key=lambda r: r["throughput_items_s"])
    raw = raw_best["throughput_items_s"]

    by_point = {(r["mode"], r["concurrency"]): r for r in served}
    rows = []
    for r in served:
        ratio_nb = None
        if r["mode"] == "batching" and ("nobatch", r["concurrency"]) in by_point:
            off = by_point[("nobatch", r["concurrency"])]
            ratio_nb = round(r["throughput_items_s"] / off["throughput_items_s"], 3)
        variant = r["mode"].removeprefix("tune:") if r["mode"].startswith("tune:") else r["mode"]
        if r["mode"] == "tune:batching":
            variant = "exported"
        rows.append(_row({**r, "variant": variant, "served_over_raw": round(r["throughput_items_s"] / raw, 3),
                          "batching_over_nobatch": ratio_nb}))
    for r in raw_rows:
        rows.append(_row({**r, "mode": "ort_raw", "model": model_path.parent.parent.name,
                          "variant": "ort_raw", "items_per_request": r["batch_size"]}))

    targets = _targets(rows, raw)
    notes.extend(_notes(rows, raw_best, baseline_config, cfg, manifest.model_name))
    result = BenchResult(
        name="encoder",
        title=f"Encoder server: {manifest.model_name} {cfg.tower} tower on Triton vs raw ONNX Runtime",
        config={"model_id": manifest.model_id, "tower": cfg.tower, "triton_model": source_dir.name,
                "concurrency": list(cfg.concurrency), "items_per_request": cfg.items_per_request,
                "duration_s": None if cfg.requests else cfg.duration_s, "requests": cfg.requests,
                "warmup_s": cfg.warmup_s, "baseline_s": cfg.baseline_s,
                "url": cfg.url or "own server (child process)", "baseline_batch_sizes": batch_sizes,
                "raw_items_s": raw, "raw_best_batch": raw_best["batch_size"],
                "served_config": _describe_config(baseline_config),
                "tuning_variants": {v.suffix: v.describe() for v in tuning},
                "wall_s": round(time.perf_counter() - started, 1),
                "loadavg_1m_at_end": round(os.getloadavg()[0], 2)},
        rows=rows, targets=targets, notes=notes)
    result.plots = [_plot(rows, raw, out, result.title)]
    write_result(result, out)
    return result


def _describe_config(config: Any) -> dict[str, Any]:
    db = config.dynamic_batching
    return {"max_batch_size": config.max_batch_size, "preferred_batch_size": list(db.preferred_batch_size),
            "max_queue_delay_microseconds": db.max_queue_delay_microseconds,
            "instances": sum(max(g.count, 1) for g in config.instance_group) or 1,
            "intra_op_thread_count": config.parameters["intra_op_thread_count"].string_value
            if "intra_op_thread_count" in config.parameters else "ORT default (one per core)",
            "graph_level": config.optimization.graph.level}


def _targets(rows: list[dict[str, Any]], raw: float) -> list[Target]:
    targets = []
    batching = {r["concurrency"]: r for r in rows if r["mode"] == "batching"}
    if batching:
        c = min(batching, key=lambda k: (abs(k - TARGET_CONCURRENCY), -k))
        ratio = batching[c]["served_over_raw"]
        bound = ""
        if ratio < SERVED_OVER_RAW_GOAL:
            bound = (f"served {batching[c]['throughput_items_s']:.1f} vs raw {raw:.1f} items/s "
                     f"({(SERVED_OVER_RAW_GOAL - ratio) * 100:.0f} points short); mean executed batch "
                     f"{batching[c]['triton_mean_batch']}, queue {batching[c]['triton_queue_ms']} ms/request")
        targets.append(Target(f"served/raw throughput at {c} clients", ratio, SERVED_OVER_RAW_GOAL,
                              note=bound))
    ratios = {r["concurrency"]: r["batching_over_nobatch"] for r in rows
              if r["batching_over_nobatch"] is not None}
    if ratios:
        worst = min(ratios, key=ratios.get)
        note = "" if ratios[worst] >= BATCHING_OVER_NOBATCH_GOAL else (
            f"lowest at {worst} clients; per concurrency: "
            + ", ".join(f"{c}: {v}" for c, v in sorted(ratios.items())))
        targets.append(Target("batching on/off throughput, minimum over concurrency", ratios[worst],
                              BATCHING_OVER_NOBATCH_GOAL, note=note))
    return targets


def _notes(rows: list[dict[str, Any]], raw_best: dict[str, Any], config: Any, cfg: EncoderBenchConfig,
           model_name: str) -> list[str]:
    notes = [f"raw ONNX Runtime best: {raw_best['throughput_items_s']:.1f} items/s at batch "
             f"{raw_best['batch_size']} "
             f"(served config: {_describe_config(config)})"]
    loads = [r["loadavg_1m"] for r in rows if r.get("loadavg_1m") is not None]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if loads and max(loads) > cores:
        notes.append(f"the machine was busy with other work: 1-minute load average up to {max(loads):.1f} on "
                     f"{cores} cores during the sweep (column loadavg_1m); numbers are noisy, rerun on a "
                     "quiet machine before comparing settings")
    if model_name == "ViT-B-32" and cfg.tower == "image":
        notes.append(f"fp32 arithmetic ceiling of ViT-B/32 on 2 Zen 4 cores "
                     f"~{VIT_B32_FP32_CEILING_IMAGES_S:.0f} "
                     f"images/s (4.4 GFLOP/image, ~200 GFLOP/s); raw reaches "
                     f"{raw_best['throughput_items_s'] / VIT_B32_FP32_CEILING_IMAGES_S:.0%} of it")
    raw_cpu = [r for r in rows if r["mode"] == "ort_raw" and r.get("cpu_ms_per_item")]
    served_cpu = [r for r in rows if r["mode"] in ("batching", "nobatch") and r.get("cpu_ms_per_item")]
    if raw_cpu and served_cpu:
        best = min(raw_cpu, key=lambda r: r["cpu_ms_per_item"])
        notes.append(
            f"CPU cost per item (robust to other load; quiet-machine items/s <= {cores} cores x 1000 / "
            f"it): raw ORT best {best['cpu_ms_per_item']:.1f} ms at batch {best['batch_size']}; served "
            "(server process tree, client excluded) "
            + ", ".join(f"{r['mode']}@{r['concurrency']} {r['cpu_ms_per_item']:.1f} ms "
                        f"({best['cpu_ms_per_item'] / r['cpu_ms_per_item']:.2f}x raw efficiency)"
                        for r in served_cpu))
    notes.extend(tuning_summary(rows))
    return notes


def tuning_summary(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One line per tuning variant: median items/s and p99 (ms) over rounds, and the median over rounds of
    its throughput divided by the exported config's in the same round (>1 = better than exported)."""
    tune = [r for r in rows if str(r["mode"]).startswith("tune:")]
    reference = {r["round"]: r for r in tune if r["variant"] == "exported"}
    lines = []
    for variant in dict.fromkeys(r["variant"] for r in tune):
        mine = [r for r in tune if r["variant"] == variant]
        ratios = [r["throughput_items_s"] / reference[r["round"]]["throughput_items_s"] for r in mine
                  if r["round"] in reference and reference[r["round"]]["throughput_items_s"] > 0]
        cpu = [r["cpu_ms_per_item"] for r in mine if r.get("cpu_ms_per_item")]
        cpu_ratios = [reference[r["round"]]["cpu_ms_per_item"] / r["cpu_ms_per_item"] for r in mine
                      if r.get("cpu_ms_per_item") and r["round"] in reference
                      and reference[r["round"]].get("cpu_ms_per_item")]
        cpu_text = ""
        if cpu:
            cpu_text = f"; server CPU {float(np.median(cpu)):.1f} ms/item"
            if cpu_ratios and variant != "exported":
                cpu_text += f" ({float(np.median(cpu_ratios)):.2f}x exported's CPU efficiency)"
        lines.append(
            f"tuning {variant} at {mine[0]['concurrency']} clients, {len(mine)} round(s): median "
            f"{float(np.median([r['throughput_items_s'] for r in mine])):.1f} items/s, p99 "
            f"{float(np.median([r['p99_ms'] for r in mine])):.0f} ms, mean batch "
            f"{float(np.median([r['triton_mean_batch'] for r in mine])):.1f}"
            + (f", {float(np.median(ratios)):.2f}x exported (per round: "
               + ", ".join(f"{x:.2f}" for x in ratios) + ")" if ratios and variant != "exported" else "")
            + cpu_text)
    return lines


def _plot(rows: list[dict[str, Any]], raw: float, out: Path, title: str) -> str:
    """Throughput and p99 latency vs concurrency (batching on, off, raw ORT line); returns the PNG name."""
    import matplotlib  # noqa: PLC0415 - matplotlib: a [dev] extra, not in the serving image

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 - after choosing the Agg backend

    fig, (ax_t, ax_l) = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode, style in (("batching", "o-"), ("nobatch", "s--")):
        pts = sorted((r["concurrency"], r["throughput_items_s"], r["p99_ms"])
                     for r in rows if r["mode"] == mode)
        if pts:
            xs, ys, p99 = zip(*pts)
            label = "dynamic batching on" if mode == "batching" else "dynamic batching off"
            ax_t.plot(xs, ys, style, label=label)
            ax_l.plot(xs, p99, style, label=label)
    ax_t.axhline(raw, color="gray", linestyle=":", label=f"raw ONNX Runtime ({raw:.1f}/s)")
    ax_t.axhline(0.9 * raw, color="gray", linestyle="-.", linewidth=0.8, label="0.9 x raw (target)")
    clients = sorted({r["concurrency"] for r in rows if r["mode"] in ("batching", "nobatch")})
    for ax, ylabel in ((ax_t, "throughput (items/s)"), (ax_l, "p99 latency (ms)")):
        ax.set_xscale("log", base=2)
        if clients:
            ax.set_xticks(clients, [str(c) for c in clients])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    ax_t.set_ylim(bottom=0)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    name = "encoder.png"
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name
