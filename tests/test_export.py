"""export_repository on real open_clip models with random weights: ViT-B-32 and the demo model.

The ViT-B-32 repository is exported once per module (seeded, so the test can rebuild the same
PyTorch model and compare it with ONNX Runtime at other batch sizes).
"""

from __future__ import annotations

import logging
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import onnx
import onnxruntime as ort
import open_clip
import pytest
import torch
import torch.nn.functional as F
from tritonclient.grpc import model_config_pb2 as mc

from export import ExportError
from export import parity as parity_mod
from export.loading import load_open_clip, register_demo_configs, state_dict_sha256
from export.onnx_export import export_repository
from vitrine.triton_config import TensorSpec, build_model_config, read_model_config, write_model_config
from vitrine.tokenizer import TextTokenizer
from vitrine.manifest import Manifest

SEED = 1234
TINY = "vitrine-digits-tiny"


@pytest.fixture(scope="module")
def vit_b32(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Manifest]:
    repo = tmp_path_factory.mktemp("export") / "repo"
    torch.manual_seed(SEED)
    manifest = export_repository("ViT-B-32", repo)
    return repo, manifest


@pytest.fixture(scope="module")
def vit_b32_torch(vit_b32):
    """The same random ViT-B-32 as exported (same seed), checked by the weights hash."""
    torch.manual_seed(SEED)
    loaded = load_open_clip("ViT-B-32")
    assert loaded.weights_sha256 == vit_b32[1].weights_sha256
    return loaded


@pytest.fixture(scope="module")
def vit_b32_sessions(vit_b32) -> dict[str, ort.InferenceSession]:
    repo = vit_b32[0]
    return {
        tower: ort.InferenceSession(
            str(repo / f"clip_{tower}" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
        )
        for tower in ("image", "text")
    }


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.slow
def test_layout_and_parity_recorded(vit_b32) -> None:
    repo, manifest = vit_b32
    for name in ("clip_image", "clip_text"):
        assert (repo / name / "config.pbtxt").is_file()
        assert (repo / name / "1" / "model.onnx").is_file()
    assert (repo / "tokenizer.json").is_file()
    assert not list(repo.parent.glob(".repo.*"))  # staging folder gone
    assert set(manifest.parity) == {"image", "text"}
    for tower in manifest.parity.values():
        assert tower.min_cosine >= 0.99999
        assert tower.threshold == 0.99999
        assert tower.max_abs_diff < 1e-4
        assert tower.batch_size >= 8
    assert {"torch", "open_clip", "onnx", "onnxruntime", "opset"} <= set(manifest.exporter)


@pytest.mark.slow
def test_manifest_round_trip(vit_b32) -> None:
    repo, manifest = vit_b32
    read = Manifest.read(repo)
    assert read == manifest
    assert read.model_name == "ViT-B-32"
    assert read.pretrained == "random"
    assert read.model_id == f"ViT-B-32/random@sha256:{read.weights_sha256[:16]}"
    assert len(read.weights_sha256) == 64
    assert read.embedding_dim == 512
    assert read.precision == "fp32"
    assert read.image.size == (224, 224)
    assert read.image.mean == pytest.approx(open_clip.OPENAI_DATASET_MEAN)
    assert read.image.std == pytest.approx(open_clip.OPENAI_DATASET_STD)
    assert (read.image.resize_mode, read.image.interpolation) == ("shortest", "bicubic")
    assert read.text.context_length == 77
    assert read.text.pad_id == 0


@pytest.mark.slow
def test_config_pbtxt_fields(vit_b32) -> None:
    repo, manifest = vit_b32
    image = read_model_config(repo / "clip_image" / "config.pbtxt")
    text = read_model_config(repo / "clip_text")
    expected_io = [
        (image, ("pixels", mc.TYPE_UINT8, [224, 224, 3])),
        (text, ("input_ids", mc.TYPE_INT64, [-1])),  # dynamic sequence length
    ]
    warmup_dims = {"pixels": [224, 224, 3], "input_ids": [77]}  # concrete: the longest text shape
    for config, (name, dtype, dims) in expected_io:
        assert config.backend == "onnxruntime"
        assert config.platform == "onnxruntime_onnx"
        assert config.max_batch_size == 64
        assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [(name, dtype, dims)]
        outputs = [(o.name, o.data_type, list(o.dims)) for o in config.output]
        assert outputs == [("embedding", mc.TYPE_FP32, [512])]
        assert list(config.dynamic_batching.preferred_batch_size) == [8, 16, 32]
        assert config.dynamic_batching.max_queue_delay_microseconds == 2000
        assert [(g.kind, g.count) for g in config.instance_group] == [(mc.ModelInstanceGroup.KIND_CPU, 1)]
        assert [w.batch_size for w in config.model_warmup] == [1, 32]
        for warmup in config.model_warmup:
            assert warmup.inputs[name].zero_data and list(warmup.inputs[name].dims) == warmup_dims[name]
        assert not config.optimization.execution_accelerators.gpu_execution_accelerator
    assert image.name == manifest.image.triton_model == "clip_image"
    assert text.name == manifest.text.triton_model == "clip_text"


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 3])
def test_dynamic_batch_matches_pytorch(vit_b32, vit_b32_torch, vit_b32_sessions, batch: int) -> None:
    repo, manifest = vit_b32
    loaded = vit_b32_torch
    image_path = repo / "clip_image" / "1" / "model.onnx"
    graph_input = onnx.load(str(image_path), load_external_data=False).graph.input[0]
    assert graph_input.type.tensor_type.shape.dim[0].dim_param == "batch"

    images = parity_mod.sample_images(num_digits=3)[-batch:]
    pixels, reference_input = parity_mod.image_batch(images, loaded.preprocess.eval_transform())
    got = vit_b32_sessions["image"].run(["embedding"], {"pixels": pixels})[0]
    assert got.shape == (batch, 512) and got.dtype == np.float32
    with torch.no_grad():
        expected = F.normalize(loaded.model.encode_image(reference_input), dim=-1).numpy()
    assert _cosines(got, expected).min() >= 0.99999

    texts = ["a photo of a cat", "手写数字七", "🌅 sunset"][:batch]
    ids = TextTokenizer.from_repository(repo, manifest).encode_batch(texts)
    np.testing.assert_array_equal(ids, loaded.tokenizer(texts).numpy())
    got = vit_b32_sessions["text"].run(["embedding"], {"input_ids": ids})[0]
    assert got.shape == (batch, 512)
    assert np.linalg.norm(got, axis=1) == pytest.approx(1.0, abs=1e-5)
    with torch.no_grad():
        expected = loaded.model.encode_text(torch.from_numpy(ids), normalize=True).numpy()
    assert _cosines(got, expected).min() >= 0.99999


@pytest.mark.slow
def test_text_graph_takes_every_length_like_padded_pytorch(vit_b32, vit_b32_torch, vit_b32_sessions) -> None:
    """One graph, any 2..77 tokens: the first L positions give open_clip's embedding of the padded 77."""
    repo, manifest = vit_b32
    assert manifest.text.dynamic_length and manifest.text.buckets == (8, 16, 32, 77)
    assert manifest.parity["text"].batch_size > len(parity_mod.PARITY_TEXTS)  # gated at several lengths
    graph_input = onnx.load(str(repo / "clip_text" / "1" / "model.onnx")).graph.input[0]
    assert [d.dim_param or d.dim_value for d in graph_input.type.tensor_type.shape.dim][1] != 77
    texts = ["red silk cape with gold trim", "手写数字七", "a " * 80]  # the last is truncated to 77
    tokenizer = TextTokenizer.from_repository(repo, manifest)
    padded = tokenizer.encode_batch(texts)
    with torch.no_grad():
        expected = vit_b32_torch.model.encode_text(torch.from_numpy(padded), normalize=True).numpy()
    counts = (padded != manifest.text.pad_id).sum(1)
    for length in (2, 5, 8, 13, 16, 32, 50, 76, 77):
        rows = np.flatnonzero(counts <= length)
        if not len(rows):
            continue
        got = vit_b32_sessions["text"].run(["embedding"], {"input_ids": padded[rows, :length]})[0]
        assert _cosines(got, expected[rows]).min() >= 0.99999, length
    batch = tokenizer.encode_padded(texts[:2], manifest.text.buckets)
    assert batch.ids.shape == (2, 16) and batch.truncated.tolist() == [False, False]
    short = vit_b32_sessions["text"].run(["embedding"], {"input_ids": batch.ids})[0]
    assert _cosines(short, expected[:2]).min() >= 0.99999


@pytest.mark.slow
def test_fixed_length_text_export_on_request(tmp_path: Path) -> None:
    register_demo_configs()
    manifest = export_repository(TINY, tmp_path / "repo", dynamic_length=False)
    assert not manifest.text.dynamic_length and manifest.text.buckets == (manifest.text.context_length,)
    config = read_model_config(tmp_path / "repo" / "clip_text")
    assert list(config.input[0].dims) == [manifest.text.context_length]
    with pytest.raises(ExportError, match="outside"):
        export_repository(TINY, tmp_path / "other", text_buckets=(1, 8))


@pytest.mark.slow
def test_checkpoint_export_label_and_hash(tmp_path: Path) -> None:
    register_demo_configs()
    torch.manual_seed(7)
    model = open_clip.create_model(TINY)
    checkpoint = tmp_path / "tiny-weights.pt"
    torch.save(model.state_dict(), checkpoint)
    manifest = export_repository(TINY, tmp_path / "repo", checkpoint=checkpoint, name_prefix="digits")
    assert manifest.pretrained == "file:tiny-weights.pt"
    assert manifest.weights_sha256 == state_dict_sha256(model)
    assert manifest.model_id.startswith(f"{TINY}/file:tiny-weights.pt@sha256:")
    assert manifest.image.triton_model == "digits_image"
    assert manifest.text.context_length == open_clip.get_tokenizer(TINY).context_length
    assert (tmp_path / "repo" / "digits_text" / "1" / "model.onnx").is_file()


@pytest.mark.slow
def test_failed_parity_gate_leaves_no_repository(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(parity_mod.PARITY_THRESHOLDS, "fp32", 1.5)  # unreachable: cosine <= 1
    output = tmp_path / "repo"
    with pytest.raises(ExportError, match="parity gate"):
        export_repository(TINY, output)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_failed_export_keeps_existing_repository(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    output = tmp_path / "repo"
    first = export_repository(TINY, output)
    monkeypatch.setitem(parity_mod.PARITY_THRESHOLDS, "fp32", 1.5)
    with pytest.raises(ExportError, match="parity gate"):
        export_repository(TINY, output, overwrite=True)
    assert Manifest.read(output) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]


@pytest.mark.slow
def test_fp16_is_gpu_only_and_passes_its_gate(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ExportError, match="GPU-only"):
        export_repository(TINY, tmp_path / "cpu16", precision="fp16")
    with caplog.at_level(logging.INFO, logger="export.parity"):
        manifest = export_repository(TINY, tmp_path / "gpu16", precision="fp16", gpu=True)
    assert manifest.precision == "fp16"
    assert all(p.threshold == 0.999 and p.min_cosine >= 0.999 for p in manifest.parity.values())
    assert "parity image tower" in caplog.text and "parity text tower" in caplog.text
    config = read_model_config(tmp_path / "gpu16" / "clip_image")
    assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU


def test_missing_pretrained_offline_names_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Offline mode (what HF_HUB_OFFLINE=1 sets at import) and an empty hub cache: the download fails at once.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ExportError, match="--checkpoint") as error:
        export_repository("ViT-B-32", tmp_path / "repo", pretrained="openai")
    assert "HF_HUB_CACHE" in str(error.value)
    assert not (tmp_path / "repo").exists()


def test_unknown_names_and_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="unknown pretrained tag 'nope'.*openai"):
        export_repository("ViT-B-32", tmp_path / "a", pretrained="nope")
    with pytest.raises(ExportError, match="unknown open_clip model"):
        export_repository("ViT-Nope", tmp_path / "b")
    with pytest.raises(ExportError, match="not found"):
        export_repository(TINY, tmp_path / "c", checkpoint=tmp_path / "absent.pt")
    with pytest.raises(ExportError, match="either"):
        export_repository(TINY, tmp_path / "d", pretrained="openai", checkpoint=tmp_path / "absent.pt")
    with pytest.raises(ExportError, match="preferred_batch_sizes"):
        export_repository(TINY, tmp_path / "e", max_batch_size=8, preferred_batch_sizes=(4, 16))
    with pytest.raises(ExportError, match="precision"):
        export_repository(TINY, tmp_path / "f", precision="bf16")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not empty"):
        export_repository(TINY, occupied)
    with pytest.raises(ExportError, match="refusing"):
        export_repository(TINY, occupied, overwrite=True)
    assert (occupied / "notes.txt").read_text() == "keep me"


def test_checkpoint_that_does_not_fit(tmp_path: Path) -> None:
    checkpoint = tmp_path / "other.pt"
    torch.save({"visual.proj": torch.zeros(3, 3)}, checkpoint)
    with pytest.raises(ExportError, match="does not load"):
        load_open_clip(TINY, checkpoint=checkpoint)


def test_gpu_config_has_tensorrt_fp16(tmp_path: Path) -> None:
    config = build_model_config(
        "m",
        inputs=[TensorSpec("input_ids", "TYPE_INT64", (32,))],
        outputs=[TensorSpec("embedding", "TYPE_FP32", (128,))],
        max_batch_size=16,
        preferred_batch_sizes=(4, 8),
        instance_count=2,
        gpu=True,
    )
    read = read_model_config(write_model_config(config, tmp_path))
    assert read == config
    assert [(g.kind, g.count) for g in read.instance_group] == [(mc.ModelInstanceGroup.KIND_GPU, 2)]
    (accelerator,) = read.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt"
    assert accelerator.parameters["precision_mode"] == "FP16"
    assert int(accelerator.parameters["max_workspace_size_bytes"]) > 0
    assert [w.batch_size for w in read.model_warmup] == [1, 8]


def test_config_validation_and_parse_errors(tmp_path: Path) -> None:
    spec = [TensorSpec("x", "TYPE_FP32", (1,))]
    with pytest.raises(ValueError, match="outside"):
        build_model_config("m", inputs=spec, outputs=spec, max_batch_size=4, preferred_batch_sizes=(8,))
    with pytest.raises(ValueError, match="unknown Triton data type"):
        build_model_config("m", inputs=[TensorSpec("x", "TYPE_FLOAT", (1,))], outputs=spec)
    (tmp_path / "config.pbtxt").write_text("name: 'm'\nmax_batch_size: lots\n")
    with pytest.raises(ValueError, match="not a valid Triton model config"):
        read_model_config(tmp_path)
    with pytest.raises(FileNotFoundError):
        read_model_config(tmp_path / "absent")
