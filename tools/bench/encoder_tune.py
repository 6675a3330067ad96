"""The `--tune` sweep of `vitrine bench encoder`: the tuning variants of the served config, the points that
measure them in interleaved rounds, and the per-variant summary lines of the result.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from tools.bench.encoder_load import Point
from tools.bench.models import Variant

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


def tuning_points(triton_model: str, concurrency: int, rounds: int) -> list[Point]:
    """The sweep points of the tuning runs: `rounds` rounds (numbered from 1), each measuring the exported
    config (mode "tune:batching", model `<triton_model>_batching`) and then every `TUNING_VARIANTS` entry
    (mode "tune:<suffix>", model `<triton_model>_<suffix>`) at `concurrency` clients."""
    points: list[Point] = []
    for round_ in range(1, rounds + 1):
        points.extend((f"tune:{v.suffix}", f"{triton_model}_{v.suffix}", concurrency, round_)
                      for v in (Variant("batching"), *TUNING_VARIANTS))
    return points


def variant_name(mode: str) -> str:
    """The result's "variant" of a served row's mode: "exported" for "tune:batching", the suffix for another
    "tune:<suffix>", else the mode itself ("batching", "nobatch")."""
    if mode == "tune:batching":
        return "exported"
    return mode.removeprefix("tune:") if mode.startswith("tune:") else mode


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
