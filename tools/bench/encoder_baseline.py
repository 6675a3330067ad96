"""The raw ceiling of `vitrine bench encoder`: the tower's ONNX file run in-process with ONNX Runtime.

Same session options as the server (`encoder_server.runtime.runtime_options_from_config` of the batching
variant: intra-op threads, graph optimization level; one session per instance), over a small batch sweep
plus the batch sizes the server actually executed; the best items/s is the raw ceiling the serving path is
compared with.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from tritonclient.grpc import model_config_pb2

from encoder_server.runtime import create_session, runtime_options_from_config
from tools.bench.encoder_load import TowerInput
from tools.bench.report import percentiles

#: ORT baseline batch sweep (rows); the batch sizes the server executed most often are added to it.
BASELINE_BATCH_SIZES: tuple[int, ...] = (1, 8, 16, 32)


def instance_count(config: model_config_pb2.ModelConfig) -> int:
    """Model instances `config` asks for: the sum over its instance groups (each >= 1), 1 without any."""
    return sum(max(g.count, 1) for g in config.instance_group) or 1


def baseline_batch_sizes(served: Iterable[dict[str, Any]], max_batch_size: int,
                         items_per_request: int) -> list[int]:
    """The baseline's batch sizes (rows), ascending: `BASELINE_BATCH_SIZES` up to `max_batch_size`, the three
    batch sizes the "batching" rows of `served` executed most often (their "triton_batch_sizes"
    "size:count" pairs), and `items_per_request`."""
    executed: Counter[int] = Counter()
    for row in served:
        if row["mode"] == "batching":
            for pair in (row["triton_batch_sizes"] or "").split():
                size, count = pair.split(":")
                executed[int(size)] += int(count)
    return sorted({b for b in BASELINE_BATCH_SIZES if b <= max_batch_size}
                  | {b for b, _ in executed.most_common(3)} | {items_per_request})


def ort_baseline(model_path: Path, config: model_config_pb2.ModelConfig, tower_input: TowerInput,
                 batch_sizes: Sequence[int], seconds_per_batch: float,
                 ort_threads: int | None = None) -> list[dict[str, Any]]:
    """Raw in-process ONNX Runtime throughput of `model_path` at each batch size (rows).

    Uses the session options the encoder server derives from `config` (`runtime_options_from_config`:
    intra-op threads, graph optimization level, providers) and one session per configured instance, run
    concurrently from as many threads (ORT releases the GIL in `run`), as the server's instances run.

    Returns:
        One dict per batch size: {"batch_size", "runs", "throughput_items_s", "cpu_ms_per_item" (this
        process's CPU ms per row), "p50_ms", "p99_ms", ...} (latency of one `session.run`, ms).
    """
    options = runtime_options_from_config(config, intra_op_threads=ort_threads)
    sessions = [create_session(model_path, options) for _ in range(instance_count(config))]
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

        def loop(session: ort.InferenceSession) -> None:
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
