"""docs/benchmarks.md generation from benchmark results (tools.bench.report + tools.bench.docs)."""

from __future__ import annotations

import csv

import pytest

from tools.bench.docs import load_results, write_docs
from tools.bench.report import BenchResult, Target, percentiles, read_result, write_result


def _result(name: str, value: float) -> BenchResult:
    return BenchResult(
        name=name, title=f"{name} title", config={"duration_s": 2.0},
        rows=[{"concurrency": 1, "items_per_s": value}, {"concurrency": 4, "items_per_s": value * 3, "extra": "x|y"}],
        targets=[Target("served/raw", value, 0.9, note="2-core fp32 ceiling"), Target("p99/p50", 1.5, 2.0, False)],
        plots=[f"{name}.png"], notes=[f"note of {name}"],
    )


def test_result_round_trips_through_json_and_csv(tmp_path):
    result = _result("encoder", 0.5)
    json_path, csv_path = write_result(result, tmp_path)
    back = read_result(json_path)
    assert back == result
    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    assert [r["concurrency"] for r in rows] == ["1", "4"]
    assert rows[1]["extra"] == "x|y" and rows[0]["extra"] == ""


def test_docs_page_has_sections_in_order_targets_and_plots(tmp_path):
    out = tmp_path / "out"
    for name, value in (("scale", 1.0), ("encoder", 0.45), ("custom", 2.0)):
        write_result(_result(name, value), out)
        (out / f"{name}.png").write_bytes(b"\x89PNG fake")
    page = write_docs(out, tmp_path / "docs" / "benchmarks.md").read_text()
    assert page.index("## encoder title") < page.index("## scale title") < page.index("## custom title")
    assert "missed by 0.45 (50%)" in page and "2-core fp32 ceiling" in page
    assert page.count("| met |") >= 2  # p99/p50 targets (lower is better) are met
    assert "x\\|y" in page  # pipes in cells are escaped
    assert (tmp_path / "docs" / "benchmarks" / "encoder.png").is_file()
    assert "](benchmarks/encoder.png)" in page
    assert "## GPU" in page


def test_docs_without_results_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no benchmark results"):
        load_results(tmp_path)


def test_percentiles():
    stats = percentiles([1.0, 2.0, 3.0, 4.0, 100.0])
    assert stats["p50_ms"] == 3.0 and stats["p99_ms"] > 90 and stats["mean_ms"] == 22.0
    with pytest.raises(ValueError):
        percentiles([])
