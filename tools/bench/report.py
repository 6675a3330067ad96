"""The common result format of every benchmark tool, and the machine description that goes with it.

A tool builds a `BenchResult` (flat `rows` of numbers, one per measured point, plus a `summary` of the ratios
and targets it checks), then `write_result` stores `<out_dir>/<name>.json` and `<name>.csv`; plots are written
by the tool beside them and listed in `result.plots` (file names relative to `out_dir`).
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import psutil


@dataclasses.dataclass
class Target:
    """One goal a benchmark checks, e.g. "served/raw throughput at 32 clients >= 0.9".

    Attributes:
        name: what is compared, in words.
        value: the measured value.
        goal: the threshold.
        higher_is_better: True for ">= goal", False for "<= goal".
        note: what bounds the value when the goal is missed (free text, may be empty).
    """

    name: str
    value: float
    goal: float
    higher_is_better: bool = True
    note: str = ""

    @property
    def met(self) -> bool:
        """True when `value` reaches `goal` in the right direction."""
        return self.value >= self.goal if self.higher_is_better else self.value <= self.goal


@dataclasses.dataclass
class BenchResult:
    """What one benchmark run measured.

    Attributes:
        name: file stem and section id, e.g. "encoder", "search", "ingest", "scale".
        title: section heading for docs/benchmarks.md.
        config: the settings of the run (model, durations, sweep points...), JSON-serialisable.
        rows: one dict per measured point; the same keys in every row (CSV columns).
        targets: the goals checked by this run.
        plots: PNG file names relative to the output folder.
        notes: free-text observations (tuning choices, what bounds a number).
        machine: `machine_info()` at run time.
        started_at: ISO-8601 UTC timestamp.
    """

    name: str
    title: str
    config: dict[str, Any]
    rows: list[dict[str, Any]]
    targets: list[Target] = dataclasses.field(default_factory=list)
    plots: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    machine: dict[str, Any] = dataclasses.field(default_factory=lambda: machine_info())
    started_at: str = dataclasses.field(
        default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    )

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (targets carry their `met` flag)."""
        data = dataclasses.asdict(self)
        data["targets"] = [{**dataclasses.asdict(t), "met": t.met} for t in self.targets]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "BenchResult":
        """Inverse of `to_json`. Raises KeyError/TypeError on a malformed document."""
        targets = [Target(**{k: v for k, v in t.items() if k != "met"}) for t in data.get("targets", [])]
        return cls(**{**data, "targets": targets})


def percentiles(samples_ms: Sequence[float] | np.ndarray, qs: Iterable[int] = (50, 90, 99)) -> dict[str, float]:
    """Latency summary of `samples_ms` (milliseconds): {"p50_ms": ..., "p90_ms": ..., "p99_ms": ..., "mean_ms": ...}.

    Percentiles use numpy's default linear interpolation. Raises ValueError on an empty sample.
    """
    values = np.asarray(samples_ms, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no latency samples")
    out = {f"p{q}_ms": float(np.percentile(values, q)) for q in qs}
    out["mean_ms"] = float(values.mean())
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpus() -> list[str]:
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def _version(module: str) -> str:
    try:
        return version(module)
    except PackageNotFoundError:
        return "absent"


def machine_info() -> dict[str, Any]:
    """CPU model, usable cores, RAM (GiB), GPUs, Python, and the versions that set the numbers.

    `cores` is the CPU affinity count (what this process may use), not the host's total.
    """
    # onnxruntime: the [serve]/[gpu] extra, and ~30 MiB of RSS that the Milvus-only `bench scale` workers
    # (which import this module and whose RSS is measured) do not otherwise load.
    import onnxruntime as ort  # noqa: PLC0415

    return {
        "cpu": _cpu_model(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpus": _gpus(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "ort_providers": ort.get_available_providers(),
        "nvidia-pytriton": _version("nvidia-pytriton"),
        "tritonclient": _version("tritonclient"),
        "pymilvus": _version("pymilvus"),
        "milvus-lite": _version("milvus-lite"),
        "numpy": np.__version__,
    }


def write_result(result: BenchResult, out_dir: Path) -> tuple[Path, Path]:
    """Write `<out_dir>/<name>.json` (everything) and `<out_dir>/<name>.csv` (the rows); return both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{result.name}.json"
    json_path.write_text(json.dumps(result.to_json(), indent=2, ensure_ascii=False) + "\n")
    csv_path = out_dir / f"{result.name}.csv"
    columns: list[str] = []
    for row in result.rows:
        columns.extend(k for k in row if k not in columns)
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(result.rows)
    return json_path, csv_path


def read_result(path: Path) -> BenchResult:
    """Load a result written by `write_result` (the .json file)."""
    return BenchResult.from_json(json.loads(path.read_text()))
