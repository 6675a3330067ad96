"""The result of `vitrine bench encoder`: its CSV rows, the targets it checks (served/raw at 32 clients,
batching on/off), the notes that explain the numbers, and `encoder.png`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tritonclient.grpc import model_config_pb2

from tools.bench.encoder_baseline import instance_count
from tools.bench.encoder_tune import tuning_summary, variant_name
from tools.bench.report import Target

#: The served/raw target is read at this many concurrent clients (issue 5).
TARGET_CONCURRENCY = 32
SERVED_OVER_RAW_GOAL = 0.9
BATCHING_OVER_NOBATCH_GOAL = 1.0
#: fp32 arithmetic ceiling of ViT-B/32 on the project's 2 Zen 4 cores (docs: ~4.4 GFLOP/image, ~200 GFLOP/s).
VIT_B32_FP32_CEILING_IMAGES_S = 45.0


def _row(fields: dict[str, Any]) -> dict[str, Any]:
    """A CSV row with every column (missing ones None), in one order for all modes."""
    columns = ("mode", "model", "variant", "round", "concurrency", "items_per_request", "batch_size",
               "requests", "items", "elapsed_s", "throughput_items_s", "p50_ms", "p90_ms", "p99_ms",
               "mean_ms", "served_over_raw", "batching_over_nobatch", "triton_inference_count",
               "triton_execution_count",
               "triton_mean_batch", "triton_queue_ms", "triton_compute_ms_per_execution",
               "triton_batch_sizes", "runs", "cpu_ms_per_item", "loadavg_1m")
    return {c: fields.get(c) for c in columns}


def result_rows(served: list[dict[str, Any]], raw_rows: list[dict[str, Any]], raw: float,
                raw_model: str) -> list[dict[str, Any]]:
    """The result's rows: each served point (`encoder_load.sweep`) with its "variant", "served_over_raw"
    (its items/s over `raw`, the best raw items/s) and, for "batching" points with a "nobatch" point at the
    same concurrency, "batching_over_nobatch"; then each ORT baseline row as mode "ort_raw" of model
    `raw_model`."""
    by_point = {(r["mode"], r["concurrency"]): r for r in served}
    rows = []
    for r in served:
        ratio_nb = None
        if r["mode"] == "batching" and ("nobatch", r["concurrency"]) in by_point:
            off = by_point[("nobatch", r["concurrency"])]
            ratio_nb = round(r["throughput_items_s"] / off["throughput_items_s"], 3)
        rows.append(_row({**r, "variant": variant_name(r["mode"]),
                          "served_over_raw": round(r["throughput_items_s"] / raw, 3),
                          "batching_over_nobatch": ratio_nb}))
    for r in raw_rows:
        rows.append(_row({**r, "mode": "ort_raw", "model": raw_model,
                          "variant": "ort_raw", "items_per_request": r["batch_size"]}))
    return rows


def describe_config(config: model_config_pb2.ModelConfig) -> dict[str, Any]:
    """The served settings that bound throughput: max_batch_size, preferred batch sizes, queue delay (us),
    instances, intra-op threads, graph optimization level."""
    db = config.dynamic_batching
    return {"max_batch_size": config.max_batch_size, "preferred_batch_size": list(db.preferred_batch_size),
            "max_queue_delay_microseconds": db.max_queue_delay_microseconds,
            "instances": instance_count(config),
            "intra_op_thread_count": config.parameters["intra_op_thread_count"].string_value
            if "intra_op_thread_count" in config.parameters else "ORT default (one per core)",
            "graph_level": config.optimization.graph.level}


def encoder_targets(rows: list[dict[str, Any]], raw: float) -> list[Target]:
    """Served/raw throughput with batching at the concurrency nearest `TARGET_CONCURRENCY` (goal
    `SERVED_OVER_RAW_GOAL`), and the lowest batching-on/off ratio over concurrency (goal
    `BATCHING_OVER_NOBATCH_GOAL`); a missed target's note says what bounds it."""
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


def encoder_notes(rows: list[dict[str, Any]], raw_best: dict[str, Any],
                  config: model_config_pb2.ModelConfig, tower: str, model_name: str) -> list[str]:
    """Lines that explain the numbers: the raw best and the served config, a busy machine (load average
    above the core count), the fp32 ceiling of ViT-B/32 images, CPU ms per item served vs raw, and
    `tuning_summary`."""
    notes = [f"raw ONNX Runtime best: {raw_best['throughput_items_s']:.1f} items/s at batch "
             f"{raw_best['batch_size']} "
             f"(served config: {describe_config(config)})"]
    loads = [r["loadavg_1m"] for r in rows if r.get("loadavg_1m") is not None]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if loads and max(loads) > cores:
        notes.append(f"the machine was busy with other work: 1-minute load average up to {max(loads):.1f} on "
                     f"{cores} cores during the sweep (column loadavg_1m); numbers are noisy, rerun on a "
                     "quiet machine before comparing settings")
    if model_name == "ViT-B-32" and tower == "image":
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


def plot_encoder(rows: list[dict[str, Any]], raw: float, out: Path, title: str) -> str:
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
