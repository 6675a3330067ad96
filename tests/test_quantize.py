"""int8 exports (ONNX Runtime dynamic quantization) of the trained demo model; `vitrine bench quantization`.

The demo model's checkpoint is cached by the `demo` fixture; the int8 export is made once per module.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from export import ExportError
from export.demo import MODEL_NAME
from export.demo.cache import ensure_checkpoint
from export.onnx_export import export_repository
from export.parity import PARITY_THRESHOLDS, ParityReport, heldout_set, retrieval_parity
from export.quantize import INT8, int8_node_counts, int8_weight_bytes, quantize_onnx
from vitrine.triton_config import read_model_config
from tools.bench.report import read_result
from vitrine.manifest import Manifest

#: The retrieval loss an int8 demo export may have against float32 PyTorch (precision@10 on held-out digits).
MAX_PRECISION_LOSS = 0.01
TOWERS = ("image", "text")


@pytest.fixture(scope="module")
def int8_repo(demo, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    checkpoint = ensure_checkpoint(cache_dir, progress=False)
    repo = tmp_path_factory.mktemp("int8") / "repo"
    export_repository(MODEL_NAME, repo, checkpoint=checkpoint, precision="int8")
    return repo


def _onnx(repo: Path, tower: str) -> Path:
    return repo / f"clip_{tower}" / "1" / "model.onnx"


@pytest.mark.slow
def test_int8_graphs_hold_int8_weights_and_are_smaller(int8_repo: Path, demo) -> None:
    for tower in TOWERS:
        counts = int8_node_counts(_onnx(int8_repo, tower))
        assert counts.get("MatMulInteger", 0) >= 12, counts  # 3 layers x 4 linear layers, + projection
        assert counts.get("DynamicQuantizeLinear", 0) >= 1, counts
        assert int8_weight_bytes(_onnx(int8_repo, tower)) > 0
        assert int8_node_counts(_onnx(demo.repository, tower)) == {}  # the fp32 export has none
    int8_total = sum(_onnx(int8_repo, t).stat().st_size for t in TOWERS)
    fp32_total = sum(_onnx(demo.repository, t).stat().st_size for t in TOWERS)
    assert int8_total < fp32_total / 3, (int8_total, fp32_total)


@pytest.mark.slow
def test_int8_keeps_the_repository_contract(int8_repo: Path, demo) -> None:
    manifest = Manifest.read(int8_repo)
    assert manifest.precision == "int8"
    assert manifest.exporter["quantization"] == INT8.describe()
    assert manifest.model_id == demo.manifest.model_id
    for tower in TOWERS:  # same Triton signature as the fp32 export
        ours = read_model_config(int8_repo / f"clip_{tower}")
        theirs = read_model_config(demo.repository / f"clip_{tower}")
        assert list(ours.input) == list(theirs.input) and list(ours.output) == list(theirs.output)
    rng = np.random.default_rng(0)
    height, width = manifest.image.size
    ids = rng.integers(1, 1000, (3, manifest.text.context_length), dtype=np.int64)
    inputs = {
        "image": {manifest.image.input_name: rng.integers(0, 256, (3, height, width, 3), dtype=np.uint8)},
        "text": {manifest.text.input_name: ids},
    }
    for tower in TOWERS:
        session = ort.InferenceSession(str(_onnx(int8_repo, tower)), providers=["CPUExecutionProvider"])
        out = session.run(None, inputs[tower])[0]
        assert out.dtype == np.float32 and out.shape == (3, manifest.embedding_dim)
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-4)


@pytest.mark.slow
def test_int8_parity_and_heldout_retrieval(int8_repo: Path) -> None:
    manifest = Manifest.read(int8_repo)
    report = ParityReport.read(int8_repo)
    assert report is not None and report.precision == "int8" and report.quantization == INT8.describe()
    for tower in TOWERS:
        parity = manifest.parity[tower]
        assert parity.threshold == PARITY_THRESHOLDS["int8"]
        assert PARITY_THRESHOLDS["int8"] <= parity.min_cosine < 1.0  # quantized: close, not identical
        assert report.towers[tower]["min_cosine"] == parity.min_cosine
    retrieval = report.retrieval
    assert retrieval is not None and retrieval.k == 10 and retrieval.num_items == 397
    assert retrieval.precision_loss <= MAX_PRECISION_LOSS, retrieval
    assert retrieval.precision_at_k >= 0.95 and retrieval.recall_at_k >= 0.9, retrieval


def test_int8_is_cpu_only_and_bf16_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="CPU export"):
        export_repository(MODEL_NAME, tmp_path / "a", precision="int8", gpu=True)
    with pytest.raises(ExportError, match="precision must be one of"):
        export_repository(MODEL_NAME, tmp_path / "b", precision="bf16")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_quantize_onnx_bad_arguments(tmp_path: Path, demo) -> None:
    with pytest.raises(ExportError, match="no such file"):
        quantize_onnx(tmp_path / "absent.onnx", tmp_path / "out.onnx")
    source = _onnx(demo.repository, "image")
    with pytest.raises(ExportError, match="differ"):
        quantize_onnx(source, source)
    not_onnx = tmp_path / "junk.onnx"
    not_onnx.write_bytes(b"\xff" * 64)
    with pytest.raises(ExportError, match="cannot read ONNX"):
        int8_node_counts(not_onnx)


def test_retrieval_parity_measures_neighbour_overlap() -> None:
    heldout = heldout_set(MODEL_NAME)
    assert heldout is not None and heldout_set("ViT-B-32") is None
    rng = np.random.default_rng(0)
    text = rng.normal(size=(len(heldout.texts), 8))
    image = rng.normal(size=(len(heldout.images), 8))
    same = retrieval_parity(heldout, text, image, text, image)
    assert same.recall_at_k == 1.0 and same.precision_loss == 0.0
    other = retrieval_parity(heldout, -text, image, text, image)  # reversed ranking: no shared neighbours
    assert other.recall_at_k == 0.0
    with pytest.raises(ValueError, match="candidate_text"):
        retrieval_parity(heldout, text[:5], image, text, image)


@pytest.mark.slow
def test_bench_quantization_tiny(tmp_path: Path, demo) -> None:
    """The bench tool end to end on a tiny setting (random-weight demo architecture); its output parses."""
    from tools.cli import app

    out = tmp_path / "out"
    result = CliRunner().invoke(app, [
        "bench", "quantization", "--model", MODEL_NAME, "--demo-repository", str(demo.repository),
        "--batch-size", "4", "--threads", "1", "--repeats", "1", "--out", str(out),
        "--cache-dir", str(tmp_path),
    ])
    assert result.exit_code == 0, result.output
    assert "MET" in result.output or "MISSED" in result.output
    parsed = read_result(out / "quantization.json")
    assert parsed.name == "quantization" and (out / "quantization.png").stat().st_size > 0
    rows = {(r["part"], r["precision"]): r for r in parsed.rows}
    assert set(rows) == {(p, q) for p in ("throughput", "demo_retrieval") for q in ("fp32", "int8")}
    assert rows["throughput", "int8"]["file_mib"] < rows["throughput", "fp32"]["file_mib"]
    assert all(rows["throughput", q]["images_per_s"] > 0 for q in ("fp32", "int8"))
    assert rows["demo_retrieval", "int8"]["precision_at_10_loss"] <= MAX_PRECISION_LOSS
    assert {t["name"].split(" ")[0] for t in parsed.to_json()["targets"]} == {"int8/fp32", "demo"}
    csv_header = (out / "quantization.csv").read_text().splitlines()[0].split(",")
    assert {"part", "precision", "images_per_s", "precision_at_10", "recall_at_10_vs_fp32"} <= set(csv_header)
    json.loads((out / "quantization.json").read_text())  # plain JSON
