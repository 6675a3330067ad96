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

The pieces: `tools.bench.encoder_load` (inputs, load generator, Triton statistics deltas, the sweep),
`tools.bench.encoder_target` (the child server / `--url`), `tools.bench.encoder_baseline` (raw ORT),
`tools.bench.encoder_tune` (`--tune` variants), `tools.bench.encoder_report` (rows, targets, notes, plot).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import tempfile
import time
from pathlib import Path

from tools.bench.encoder_baseline import baseline_batch_sizes, ort_baseline
from tools.bench.encoder_load import EncoderBenchError, Point, make_tower_input, sweep
from tools.bench.encoder_report import (
    TARGET_CONCURRENCY,
    describe_config,
    encoder_notes,
    encoder_targets,
    plot_encoder,
    result_rows,
)
from tools.bench.encoder_target import own_encoder_server, served_models
from tools.bench.encoder_tune import TUNING_VARIANTS, tuning_points
from tools.bench.models import BATCHING_ON_OFF, batching_variants, latest_model_file, tower_model_dir
from tools.bench.report import BenchResult, write_result
from vitrine.manifest import Manifest
from vitrine.triton_config import read_model_config

DEFAULT_CONCURRENCY: tuple[int, ...] = (1, 4, 16, 32, 64)


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
    points: list[Point] = []
    notes: list[str] = []
    with contextlib.ExitStack() as stack:
        if cfg.url is None:
            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vitrine-bench-")))
            variant_dir = scratch / "models"
            batching_variants(cfg.repository, variant_dir, (*BATCHING_ON_OFF, *tuning), towers=(cfg.tower,))
            models = {f"{source_dir.name}_{v.suffix}" for v in (*BATCHING_ON_OFF, *tuning)}
            url, server_pid = stack.enter_context(
                own_encoder_server(variant_dir, sorted(models), out / "logs", cfg.server_timeout_s))
            baseline_config = read_model_config(variant_dir / f"{source_dir.name}_batching")
        else:
            url, server_pid = cfg.url, None
            models = asyncio.run(served_models(url))
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
            points.extend(tuning_points(source_dir.name, cfg.tune_concurrency, cfg.tune_rounds))
        served = asyncio.run(sweep(url, points, tower_input, duration_s=cfg.duration_s, requests=cfg.requests,
                                   warmup_s=cfg.warmup_s, server_pid=server_pid))

    # raw ORT: the small sweep plus the batch sizes the batching runs executed most often
    batch_sizes = baseline_batch_sizes(served, source_config.max_batch_size, cfg.items_per_request)
    model_path = latest_model_file(source_dir, source_config.default_model_filename or "model.onnx")
    raw_rows = ort_baseline(model_path, baseline_config, tower_input, batch_sizes, cfg.baseline_s)
    raw_best = max(raw_rows, key=lambda r: r["throughput_items_s"])
    raw = raw_best["throughput_items_s"]

    rows = result_rows(served, raw_rows, raw, raw_model=model_path.parent.parent.name)
    targets = encoder_targets(rows, raw)
    notes.extend(encoder_notes(rows, raw_best, baseline_config, cfg.tower, manifest.model_name))
    result = BenchResult(
        name="encoder",
        title=f"Encoder server: {manifest.model_name} {cfg.tower} tower on Triton vs raw ONNX Runtime",
        config={"model_id": manifest.model_id, "tower": cfg.tower, "triton_model": source_dir.name,
                "concurrency": list(cfg.concurrency), "items_per_request": cfg.items_per_request,
                "duration_s": None if cfg.requests else cfg.duration_s, "requests": cfg.requests,
                "warmup_s": cfg.warmup_s, "baseline_s": cfg.baseline_s,
                "url": cfg.url or "own server (child process)", "baseline_batch_sizes": batch_sizes,
                "raw_items_s": raw, "raw_best_batch": raw_best["batch_size"],
                "served_config": describe_config(baseline_config),
                "tuning_variants": {v.suffix: v.describe() for v in tuning},
                "wall_s": round(time.perf_counter() - started, 1),
                "loadavg_1m_at_end": round(os.getloadavg()[0], 2)},
        rows=rows, targets=targets, notes=notes)
    result.plots = [plot_encoder(rows, raw, out, result.title)]
    write_result(result, out)
    return result

