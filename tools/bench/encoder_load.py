"""The client side of `vitrine bench encoder`: request inputs, the closed-loop load generator, Triton
statistics deltas and one measured (model, concurrency) point, swept over a list of points.

Each point: `concurrency` asyncio clients (`tritonclient.grpc.aio`) send requests of `items_per_request`
rows back to back, first for `warmup_s`, then for `duration_s` (or until `requests` requests); Triton's
statistics (`get_inference_statistics`) are read before and after the measured window, and the difference
gives queue time, compute time per execution and the executed batch sizes. The server's CPU time (its
process tree, `process_tree_cpu_seconds`) over the window gives CPU ms per item.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import tritonclient.grpc as triton_grpc
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from encoder_server.repository import numpy_dtype
from tools.bench.models import tower_model_dir
from tools.bench.report import percentiles
from vitrine.tokenizer import TextTokenizer
from vitrine.triton_config import read_model_config

log = logging.getLogger(__name__)

#: One point of a sweep: (mode, Triton model, concurrency, tuning round; 0 outside the tuning runs).
Point = tuple[str, str, int, int]


class EncoderBenchError(RuntimeError):
    """The benchmark could not run (server did not start, a request failed, a model is missing)."""


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
    def from_proto(cls, response: service_pb2.ModelStatisticsResponse) -> TritonStats:
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


async def _drive(client: triton_aio.InferenceServerClient, model: str, tower_input: TowerInput,
                 concurrency: int, *, duration_s: float | None, requests: int | None) -> LoadRun:
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


async def _statistics(client: triton_aio.InferenceServerClient, model: str) -> TritonStats:
    try:
        return TritonStats.from_proto(await client.get_inference_statistics(model))
    except InferenceServerException as exc:
        raise EncoderBenchError(
            f"cannot read Triton statistics of {model} ({exc}); the statistics endpoint must be open "
            "(EncoderServer on loopback opens it)"
        ) from exc


async def _settled(client: triton_aio.InferenceServerClient, model: str, before: TritonStats, rows: int,
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


async def measure_point(client: triton_aio.InferenceServerClient, model: str, tower_input: TowerInput,
                        concurrency: int, *, duration_s: float | None, requests: int | None, warmup_s: float,
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


# ----------------------------------------------------------------------------------------------- sweep
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


async def sweep(url: str, points: Sequence[Point], tower_input: TowerInput, *, duration_s: float,
                requests: int | None, warmup_s: float, server_pid: int | None = None) -> list[dict[str, Any]]:
    """Measure every (mode, model, concurrency, round) point in order against `url` (gRPC host:port).

    Args:
        duration_s: measured seconds per point (ignored when `requests` is set).
        requests: measured requests per point instead of a duration (None = use `duration_s`).
        warmup_s: seconds of unmeasured load before each point.
        server_pid: process id of the server when it is the benchmark's own child: the rows then get
            `cpu_ms_per_item` from its process tree (None = not measured).

    Returns:
        One row per point: {"mode", "model", "concurrency", "round", "items_per_request",
        `measure_point`'s fields, "loadavg_1m"}.

    Raises:
        EncoderBenchError: a model is not ready on `url`, a request or the statistics call failed.
    """
    client = triton_aio.InferenceServerClient(url)
    rows = []
    try:
        for mode, model, concurrency, round_ in points:
            if not await client.is_model_ready(model):
                raise EncoderBenchError(f"model {model!r} is not ready on {url}")
            fields = await measure_point(client, model, tower_input, concurrency,
                                         duration_s=None if requests else duration_s,
                                         requests=requests, warmup_s=warmup_s,
                                         cpu_seconds=(lambda: process_tree_cpu_seconds(server_pid))
                                         if server_pid else None)
            row = {"mode": mode, "model": model, "concurrency": concurrency, "round": round_,
                   "items_per_request": tower_input.rows.shape[0], **fields,
                   "loadavg_1m": round(os.getloadavg()[0], 2)}
            log.info("%s c=%d: %.1f items/s, p50 %.1f ms, p99 %.1f ms, mean batch %.1f", mode, concurrency,
                     row["throughput_items_s"], row["p50_ms"], row["p99_ms"], row["triton_mean_batch"])
            rows.append(row)
    finally:
        await client.close()
    return rows

