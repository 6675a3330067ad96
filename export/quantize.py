"""int8 exports: ONNX Runtime dynamic quantization of an exported float32 tower.

`quantize_onnx` rewrites a float32 ONNX graph with `onnxruntime.quantization.quantize_dynamic`
(https://onnxruntime.ai/docs/performance/model-optimizations/quantization.html): weights are stored
as int8 with a float scale (per output channel here); activations are quantized to uint8 at run time
(DynamicQuantizeLinear), and the products run as integer kernels (MatMulInteger, fused by ONNX
Runtime into DynamicQuantizeMatMul). The graph keeps its inputs (uint8 pixels / int64 ids) and its
float32 L2-normalized output, so the Triton model repository contract does not change.

Chosen settings (`INT8`), measured on these 2 Zen 4 cores (AVX-512 VNNI) with ONNX Runtime 1.32, batch 32,
2 threads (see `vitrine bench quantization` for the current numbers):

- op types MatMul + Gemm (every linear layer of the ViT / text transformer: attention in/out projections,
  MLPs, final projections): ViT-B-32 image tower 42 -> 107 images/s, 335 -> 91 MiB.
- Gather (the text tower's token-embedding table, 49,408 rows): 4x smaller text tower (demo 26.6 -> 6.9
  MiB); the table lookup is dequantized, no speed change; demo text min cosine vs fp32 0.9988.
- Conv (the patch embedding) is NOT quantized: ConvInteger made the ViT-B-32 image tower slower (86
  vs 107 images/s) for a 7 MiB smaller file and a lower cosine.
- per_channel=True: one scale per output channel; slightly better cosine (random ViT-B-32 image tower
  min cosine 0.99984 vs 0.99978 per tensor) at the same speed.
- reduce_range=False, int8 weights (QInt8): the CPU has VNNI, so 7-bit weights are not needed
  (ORT docs: reduce_range helps on non-VNNI machines); uint8 weights (QUInt8) ran at 60 images/s.
These are also the settings Sentence Transformers uses for its `qint8_avx512_vnni` exports.

This module imports neither torch nor open_clip.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from export import ExportError

log = logging.getLogger(__name__)

#: Node types that show a graph computes or stores in 8-bit integers (dynamic and static quantization).
INT8_NODE_TYPES: frozenset[str] = frozenset({
    "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul", "QuantizeLinear",
    "DequantizeLinear", "QLinearMatMul", "QLinearConv", "QGemm", "QAttention",
})


@dataclasses.dataclass(frozen=True)
class QuantizationSettings:
    """Arguments of `onnxruntime.quantization.quantize_dynamic` for one export.

    Attributes:
        op_types: ONNX op types to quantize (`op_types_to_quantize`).
        per_channel: one weight scale per output channel instead of one per tensor.
        reduce_range: 7-bit weights (for CPUs without VNNI).
        weight_type: "QInt8" (signed) or "QUInt8" (unsigned) weights.
    """

    op_types: tuple[str, ...] = ("MatMul", "Gemm", "Gather")
    per_channel: bool = True
    reduce_range: bool = False
    weight_type: str = "QInt8"

    def describe(self) -> str:
        """One line for the manifest / reports, e.g. "onnxruntime quantize_dynamic: weights QInt8
        per_channel=True reduce_range=False ops=MatMul,Gemm,Gather".
        """
        return (f"onnxruntime quantize_dynamic: weights {self.weight_type} per_channel={self.per_channel} "
                f"reduce_range={self.reduce_range} ops={','.join(self.op_types)}")


#: The settings `vitrine export --precision int8` uses (see the module docstring for the measurements).
INT8 = QuantizationSettings()


def quantize_onnx(source: Path | str, target: Path | str, settings: QuantizationSettings = INT8) -> Path:
    """Write a dynamically quantized copy of the float32 ONNX graph `source` to `target`.

    The result has the same inputs and outputs (names, dtypes, dynamic batch axis) as `source`.

    Args:
        source: a float32 ONNX model file (e.g. `<repo>/clip_image/1/model.onnx` of an fp32 export).
        target: the file to write (its folder is created); must differ from `source`.
        settings: what to quantize and how.

    Returns:
        `target`.

    Raises:
        ExportError: `source` is missing, `settings.weight_type` is unknown, quantization failed, or the
            quantized graph fails `onnx.checker` or holds no int8 node.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic  # noqa: PLC0415 - heavy import

    source, target = Path(source), Path(target)
    if not source.is_file():
        raise ExportError(f"cannot quantize {source}: no such file")
    if source.resolve() == target.resolve():
        raise ExportError(f"quantize_onnx target must differ from the source {source}")
    try:
        weight_type = QuantType[settings.weight_type]
    except KeyError as exc:
        raise ExportError(f"unknown weight_type {settings.weight_type!r}: expected QInt8 or QUInt8") from exc
    target.parent.mkdir(parents=True, exist_ok=True)
    root_logger = logging.getLogger()
    root_level = root_logger.level
    # quantize_dynamic logs a line per tensor on the root logger at INFO; keep it to warnings.
    root_logger.setLevel(max(root_level, logging.WARNING))
    try:
        quantize_dynamic(
            source,
            target,
            op_types_to_quantize=list(settings.op_types),
            per_channel=settings.per_channel,
            reduce_range=settings.reduce_range,
            weight_type=weight_type,
        )
        onnx.checker.check_model(str(target))
    except (ValueError, RuntimeError, onnx.checker.ValidationError) as exc:
        raise ExportError(f"dynamic quantization of {source} failed: {exc}") from exc
    finally:
        root_logger.setLevel(root_level)
    counts = int8_node_counts(target)
    if not counts:
        raise ExportError(f"quantizing {source} with {settings.describe()} produced no int8 node")
    log.info("quantized %s -> %s (%.1f -> %.1f MiB): %s", source.name, target,
             source.stat().st_size / 2**20, target.stat().st_size / 2**20, dict(counts))
    return target


def int8_node_counts(path: Path | str) -> dict[str, int]:
    """How many nodes of each `INT8_NODE_TYPES` type the ONNX graph at `path` holds ({} for a float graph).

    Raises:
        ExportError: the file is missing or not an ONNX model.
    """
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (OSError, DecodeError) as exc:
        raise ExportError(f"cannot read ONNX model {path}: {exc}") from exc
    counts = collections.Counter(n.op_type for n in model.graph.node if n.op_type in INT8_NODE_TYPES)
    return dict(sorted(counts.items()))


def int8_weight_bytes(path: Path | str) -> int:
    """Total bytes of the int8 / uint8 initializers (stored quantized weights) of the ONNX graph at `path`."""
    model = onnx.load(str(path), load_external_data=False)
    eight_bit = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8}
    return sum(len(t.raw_data) for t in model.graph.initializer if t.data_type in eight_bit)
