"""`vitrine bench encoder` end to end on the demo model (real Triton child process, real ONNX Runtime), and
the variant repository it serves. Speed is not asserted: only that the tool runs, its outputs parse, and its
numbers agree with what was sent (Triton's own statistics vs the client's request count)."""

from __future__ import annotations

import csv
import json

import pytest
from typer.testing import CliRunner

from vitrine.triton_config import read_model_config
from tools.bench.encoder import EncoderBenchConfig
from tools.bench.models import BATCHING_ON_OFF, Variant, batching_variants, tower_model_dir
from tools.bench.report import read_result
from tools.cli import app

ITEMS = 2  # rows per request, so Triton's inference_count (rows) and request count differ


@pytest.fixture(scope="module")
def bench_run(demo, tmp_path_factory):
    """One tiny run of the CLI: demo image tower, 1 and 4 clients, ~1 s per point."""
    out = tmp_path_factory.mktemp("bench_encoder")
    result = CliRunner().invoke(app, [
        "bench", "encoder", "--repository", str(demo.repository), "--concurrency", "1,4",
        "--items-per-request", str(ITEMS), "--duration-s", "1", "--warmup-s", "0.3", "--baseline-s", "0.3",
        "--out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return out


def test_outputs_parse(bench_run):
    result = read_result(bench_run / "encoder.json")
    assert result.name == "encoder"
    assert {r["mode"] for r in result.rows} == {"batching", "nobatch", "ort_raw"}
    with (bench_run / "encoder.csv").open() as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(result.rows)
    for column in ("mode", "concurrency", "throughput_items_s", "p50_ms", "p90_ms", "p99_ms",
                   "served_over_raw", "triton_execution_count", "triton_queue_ms",
                   "triton_compute_ms_per_execution",
                   "triton_batch_sizes"):
        assert column in csv_rows[0]
    png = bench_run / "encoder.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.plots == ["encoder.png"]
    assert {t.name.split(" at ")[0] for t in result.targets} == {
        "served/raw throughput", "batching on/off throughput, minimum over concurrency"}
    json.dumps(result.to_json())  # still serialisable after the round trip


def test_served_numbers_agree_with_triton_statistics(bench_run):
    rows = read_result(bench_run / "encoder.json").rows
    served = {(r["mode"], r["concurrency"]): r for r in rows if r["mode"] != "ort_raw"}
    assert set(served) == {("batching", 1), ("batching", 4), ("nobatch", 1), ("nobatch", 4)}
    for (mode, concurrency), r in served.items():
        assert r["requests"] > 0 and r["throughput_items_s"] > 0
        assert r["items"] == ITEMS * r["requests"]
        assert r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
        # Triton saw exactly the measured window: warm-up excluded, every row counted
        assert r["triton_inference_count"] == r["items"], (mode, concurrency, r)
        assert r["triton_execution_count"] > 0
        assert r["cpu_ms_per_item"] > 0  # the server's process tree was found and measured
        executed = sum(int(p.split(":")[1]) for p in r["triton_batch_sizes"].split())
        assert executed == r["triton_execution_count"]
    for concurrency in (1, 4):
        # without dynamic batching every request executes alone, with its own rows only
        nobatch = served[("nobatch", concurrency)]
        assert nobatch["triton_execution_count"] == nobatch["requests"]
        assert nobatch["triton_batch_sizes"] == f"{ITEMS}:{nobatch['requests']}"
    # with it, concurrent requests are merged into larger executions
    batching = served[("batching", 4)]
    assert batching["triton_execution_count"] < batching["requests"]
    assert batching["triton_mean_batch"] > ITEMS
    assert served[("batching", 4)]["batching_over_nobatch"] == pytest.approx(
        batching["throughput_items_s"] / served[("nobatch", 4)]["throughput_items_s"], rel=1e-2)


def test_raw_baseline_covers_executed_batch_sizes(bench_run):
    result = read_result(bench_run / "encoder.json")
    raw = [r for r in result.rows if r["mode"] == "ort_raw"]
    assert raw
    assert all(r["throughput_items_s"] > 0 and r["runs"] >= 2 and r["cpu_ms_per_item"] > 0 for r in raw)
    assert result.config["raw_items_s"] == max(r["throughput_items_s"] for r in raw)
    measured = {r["batch_size"] for r in raw}
    assert {1, 8, 16, 32, ITEMS} <= measured
    batching = next(r for r in result.rows if r["mode"] == "batching" and r["concurrency"] == 4)
    most_common = int(batching["triton_batch_sizes"].split()[0].split(":")[0])
    assert most_common in measured


def test_batching_variants_share_one_onnx_file(demo, tmp_path):
    variants = (*BATCHING_ON_OFF, Variant("tuned", preferred_batch_sizes=(4,), max_queue_delay_microseconds=0,
                                          instance_count=2, intra_op_threads=1, graph_level=1))
    repo = batching_variants(demo.repository, tmp_path / "variants", variants, towers=("image", "text"))
    source = tower_model_dir(demo.repository, "image")
    names = sorted(p.name for p in repo.iterdir())
    assert names == sorted(f"{tower_model_dir(demo.repository, t).name}_{v.suffix}"
                           for t in ("image", "text") for v in variants)
    onnx = (source / "1" / "model.onnx").resolve()
    for suffix in ("batching", "nobatch", "tuned"):
        assert (repo / f"{source.name}_{suffix}" / "1" / "model.onnx").resolve() == onnx
    on = read_model_config(repo / f"{source.name}_batching")
    off = read_model_config(repo / f"{source.name}_nobatch")
    tuned = read_model_config(repo / f"{source.name}_tuned")
    assert on.name == f"{source.name}_batching" and on.HasField("dynamic_batching")
    assert not off.HasField("dynamic_batching") and off.max_batch_size == on.max_batch_size
    assert list(tuned.dynamic_batching.preferred_batch_size) == [4]
    assert tuned.dynamic_batching.max_queue_delay_microseconds == 0
    assert tuned.instance_group[0].count == 2 and tuned.optimization.graph.level == 1
    assert tuned.parameters["intra_op_thread_count"].string_value == "1"


def test_bad_settings_are_named(demo, tmp_path):
    with pytest.raises(ValueError, match="preferred_batch_sizes"):
        batching_variants(demo.repository, tmp_path / "v", [Variant("big", preferred_batch_sizes=(10_000,))])
    with pytest.raises(ValueError, match="unique"):
        batching_variants(demo.repository, tmp_path / "v", [Variant("a"), Variant("a")])
    with pytest.raises(ValueError, match="tower"):
        EncoderBenchConfig(demo.repository, tower="audio").validate()
    with pytest.raises(ValueError, match="concurrency"):
        EncoderBenchConfig(demo.repository, concurrency=(0, 4)).validate()
    result = CliRunner().invoke(app, ["bench", "encoder", "--repository", str(demo.repository),
                                      "--concurrency", "1,x", "--out", str(tmp_path / "o")])
    assert result.exit_code != 0 and "--concurrency" in result.output
