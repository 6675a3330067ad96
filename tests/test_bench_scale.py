"""`vitrine bench scale` on a tiny setting: it runs against real Milvus Lite / server and its output parses.

These check behaviour, not speed: FLAT is exact (recall@10 == 1), HNSW at the default ef finds nearly all true
neighbours, IVF_FLAT recall grows with nprobe (so the sweep really changes the search parameters), memory is
measured. Timing numbers are only checked to be present and positive.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from tools.bench.cli import bench_app
from tools.bench.report import read_result
from tools.bench.scale import ScaleConfig, parse_sizes, run_scale
from tools.bench.scale_data import Mixture, exact_top_k, recall_at_k

TINY = dict(sizes=(2000,), dim=32, queries=40, sweep_queries=40, nprobe_sweep=(1, 4, 16, 64),
            ef_sweep=(10, 64))


def _check_files(out: Path) -> list[dict]:
    result = read_result(out / "scale.json")
    assert result.name == "scale" and result.plots == ["scale.png"]
    assert (out / "scale.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with (out / "scale.csv").open() as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(result.rows)
    for row in result.rows:
        for key in ("search_p50_ms", "search_p99_ms", "recall_at_10"):
            assert isinstance(row[key], float) and math.isfinite(row[key]), (key, row)
        assert 0 < row["search_p50_ms"] <= row["search_p99_ms"]
        if row["point"] == "default":
            assert row["insert_s"] > 0 and row["build_s"] > 0
            assert row["rss_mib"] > 0 and row["peak_rss_mib"] > 0
    assert result.targets and all(t.name for t in result.targets)
    return result.rows


def test_mixture_is_normalised_clustered_and_seeded() -> None:
    mix = Mixture(64, seed=3)
    x = mix.sample(3000, stream=1)
    assert x.dtype == np.float32 and x.shape == (3000, 64)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(x, Mixture(64, seed=3).sample(3000, stream=1))
    assert not np.array_equal(x[:10], mix.sample(10, stream=2))
    sims = x[:100] @ x.T
    nearest = np.sort(sims, axis=1)[:, -2]  # best neighbour other than itself
    assert nearest.mean() > 0.7 > abs(float(np.median(sims)))  # clustered, unlike uniform random vectors


def test_exact_top_k_and_recall() -> None:
    rng = np.random.default_rng(0)
    v = rng.standard_normal((1234, 16)).astype(np.float32)
    q = rng.standard_normal((7, 16)).astype(np.float32)
    truth = exact_top_k(v, q, k=10, chunk=100)  # several chunks
    np.testing.assert_array_equal(truth, np.argsort(-(q @ v.T), axis=1)[:, :10])
    assert recall_at_k(truth.tolist(), truth) == 1.0
    assert recall_at_k([list(t[:5]) + [-1] * 5 for t in truth], truth) == 0.5


def test_parse_sizes() -> None:
    assert parse_sizes("10k, 100000,1M,2.5k") == (10_000, 100_000, 1_000_000, 2_500)
    with pytest.raises(ValueError, match="not a number"):
        parse_sizes("ten")
    with pytest.raises(ValueError, match="top_k"):
        parse_sizes("5")


def test_cli_rejects_bad_options() -> None:
    runner = CliRunner()
    for args, word in ((["--sizes", "lots"], "lots"), (["--backends", "cloud"], "backends"),
                       (["--indexes", "IVF_PQ"], "index types")):
        res = runner.invoke(bench_app, ["scale", *args, "--out", "/nonexistent/never-written"])
        assert res.exit_code == 2, res.output
        assert word in res.output


def test_scale_lite_tiny(tmp_path: Path) -> None:
    cfg = ScaleConfig(backends=("lite",), **TINY)
    run_scale(cfg, tmp_path / "out", work_dir=tmp_path / "work", progress=lambda _line: None)
    rows = _check_files(tmp_path / "out")
    default = {r["index"]: r for r in rows if r["point"] == "default"}
    assert set(default) == {"FLAT", "IVF_FLAT", "HNSW"}
    assert default["FLAT"]["recall_at_10"] >= 0.999  # exhaustive search
    assert default["HNSW"]["recall_at_10"] >= 0.9
    ivf = sorted((r["nprobe"], r["recall_at_10"]) for r in rows if r["index"] == "IVF_FLAT")
    assert [p for p, _ in ivf] == [1, 4, 16, 64]
    recalls = [rc for _, rc in ivf]
    # more clusters probed can only add candidates (exact distances inside each list)
    assert all(b >= a - 1e-9 for a, b in zip(recalls, recalls[1:])) and recalls[-1] > recalls[0]
    assert {r["ef"] for r in rows if r["index"] == "HNSW"} == {10, 64}
    assert not list((tmp_path / "work").glob("lite-*")), "Milvus Lite folders are removed after each case"


@pytest.mark.milvus_server
def test_scale_server_tiny(tmp_path: Path) -> None:
    cfg = ScaleConfig(backends=("server",), index_types=("FLAT", "HNSW"), **{**TINY, "ef_sweep": ()})
    run_scale(cfg, tmp_path / "out", work_dir=tmp_path / "work", progress=lambda _line: None)
    rows = _check_files(tmp_path / "out")
    default = {r["index"]: r for r in rows if r["point"] == "default"}
    assert default["FLAT"]["recall_at_10"] >= 0.999
    assert default["HNSW"]["recall_at_10"] >= 0.9
    # the Milvus server process tree (hundreds of MiB), not the benchmark process
    assert all(r["rss_mib"] > 50 for r in default.values())
