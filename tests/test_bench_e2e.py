"""The search and ingest benchmark tools, each run once on a tiny setting against a real private stack.

Not benchmarks: these prove the tools run end to end (Triton + retrieval service subprocesses, Milvus Lite) and
that their output parses and is consistent. No timing assertions.
"""

from __future__ import annotations

import csv
import json

import pytest
from typer.testing import CliRunner

from tools.bench.report import read_result
from tools.cli import app

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _csv_rows(path):
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_search_bench_tiny(demo, tmp_path):
    from tools.bench.search import FILTER, run_search_bench

    out = tmp_path / "out"
    result = run_search_bench(repository=demo.repository, images_dir=demo.dataset, out=out, limit=40,
                              concurrency=(1, 2), duration_s=0.6, warmup_s=0.2, encode_repeats=5,
                              log=lambda _msg: None)

    loaded = read_result(out / "search.json")
    assert loaded.name == "search" and loaded.config["filter"] == FILTER
    assert loaded.config["collection_images"] == 40
    points = {(r["query"], r["filter"], r["concurrency"]) for r in loaded.rows}
    assert points == {(k, f, c) for k in ("text", "image") for f in ("off", "on") for c in (1, 2)}
    for row in loaded.rows:
        assert row["errors"] == 0, row
        assert row["requests"] > 0 and row["qps"] > 0, row
        assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"], row
        # repeated queries are query embedding cache hits (encode_ms 0) after their first round
        assert row["server_encode_ms"] >= 0 and row["server_search_ms"] > 0, row
    assert loaded.config["text_encode_p50_ms"] > 0
    names = [t.name for t in loaded.targets]
    assert any("p50 at 1 client, filter off" in n for n in names)
    assert any("p50 at 1 client, filter on" in n for n in names)
    interleaved = loaded.config["interleaved_p50_ms"]
    assert set(interleaved) == {"off", "on"}
    assert all(v["text_encode"] > 0 and v["text_search"] > 0 for v in interleaved.values())
    assert any("text search p99 / p50 at 2 clients" in n for n in names)
    for target in loaded.targets:
        assert target.value > 0 and target.met == (target.value <= target.goal)
    assert len(_csv_rows(out / "search.csv")) == len(result.rows) == 8
    assert loaded.plots == ["search.png"] and (out / "search.png").read_bytes()[:8] == PNG_MAGIC

    text = read_result(out / "search_text.json")
    buckets = demo.manifest.text.buckets
    towers = [r for r in text.rows if r["point"].startswith("text tower seq")]
    assert [r["point"] for r in towers] == [f"text tower seq {b}" for b in buckets]
    for row in towers:
        assert row["ort_batch1_p50_ms"] > 0 and row["ort_batch32_texts_per_s"] > 0, row
        assert row["served_p50_ms"] > 0 and row["served_32_clients_texts_per_s"] > 0, row
    searches = {r["point"]: r for r in text.rows if r["point"].startswith("text search")}
    assert len(searches) == 3 and all(r["errors"] == 0 and r["requests"] > 0 for r in searches.values())
    unique = [r for name, r in searches.items() if "unique" in name]
    assert all(r["hit_rate"] == 0 for r in unique)  # never-repeated texts never hit the cache
    (zipf,) = [r for name, r in searches.items() if "head of 50" in name]
    assert zipf["hit_rate"] > 0.3
    assert len(text.targets) == 3 and all(t.value > 0 for t in text.targets)


def test_ingest_bench_cli_tiny(demo, tmp_path):
    out = tmp_path / "out"
    count = 24
    res = CliRunner().invoke(app, ["bench", "ingest", "--repository", str(demo.repository), "--images",
                                   str(demo.dataset), "--count", str(count), "--repeats", "1", "--batch-size", "8",
                                   "--inflight", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "wrote" in res.output

    loaded = read_result(out / "ingest.json")
    assert loaded.config["ingest_batch_size"] == 8 and loaded.config["ingest_max_inflight_batches"] == 2
    by_mode: dict[str, list[dict]] = {}
    for row in loaded.rows:
        by_mode.setdefault(row["mode"], []).append(row)
    assert sorted(by_mode) == ["baseline", "encoder", "encoder_batch1", "stream"]
    assert sorted(r["concurrency"] for r in by_mode["encoder"]) == [1, 2]
    (stream,), (baseline,) = by_mode["stream"], by_mode["baseline"]
    # every image of the run is a new row in both the service's collection and the baseline's
    assert stream["inserted"] == baseline["inserted"] == count
    for row in loaded.rows:
        assert row["images"] == count and row["images_per_s"] > 0 and row["seconds"] > 0, row
    assert 0 < stream["mean_exec_batch"] <= 64  # Triton statistics were read (max_batch_size 64)
    ratios = {t.name: t.value for t in loaded.targets}
    assert ratios["stream ingest / per-image baseline"] == pytest.approx(
        stream["images_per_s"] / baseline["images_per_s"])
    assert len(_csv_rows(out / "ingest.csv")) == 5
    assert (out / "ingest.png").read_bytes()[:8] == PNG_MAGIC
    json.loads((out / "ingest.json").read_text())  # plain JSON (NaN allowed by Python's reader)


@pytest.mark.parametrize("args, message", [
    (["bench", "search", "--filters", "maybe"], "--filters"),
    (["bench", "search", "--concurrency", "1,x"], "--concurrency"),
    (["bench", "ingest", "--model", "ViT-B-32", "--repository", "x"], "not both"),
])
def test_bench_cli_rejects_bad_options(args, message):
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2
    assert message in res.output
