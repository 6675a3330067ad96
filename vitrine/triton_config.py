"""Triton `config.pbtxt` files, built as tritonclient `ModelConfig` protobuf messages.

Writing goes through `google.protobuf.text_format`, so the file is exactly what stock tritonserver
parses (schema: triton-inference-server/common protobuf/model_config.proto). Dims never include the
batch dimension: with max_batch_size > 0 Triton prepends it, and the ONNX graphs have a dynamic
first axis. This module imports neither torch nor open_clip (the encoder server uses
`read_model_config`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

CONFIG_FILE = "config.pbtxt"
ONNX_PLATFORM = "onnxruntime_onnx"
ONNX_BACKEND = "onnxruntime"
DEFAULT_TRT_WORKSPACE_BYTES = 1 << 30  # 1 GiB TensorRT builder workspace


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output as Triton sees it.

    Attributes:
        name: tensor name in the ONNX graph.
        data_type: Triton `DataType` name, e.g. 'TYPE_UINT8', 'TYPE_INT64', 'TYPE_FP32'.
        dims: shape without the batch dimension, e.g. (224, 224, 3); -1 = any size (e.g. a text tower's
            sequence length).
        warmup_dims: the concrete shape of this input's warm-up samples (inputs with a -1 dim need it); None =
            `dims`.
    """

    name: str
    data_type: str
    dims: tuple[int, ...]
    warmup_dims: tuple[int, ...] | None = None

    def data_type_enum(self) -> int:
        """The `DataType` enum value; raises ValueError for an unknown name."""
        try:
            return mc.DataType.Value(self.data_type)
        except ValueError as exc:
            raise ValueError(f"unknown Triton data type {self.data_type!r} for tensor {self.name!r}") from exc


def check_batching(max_batch_size: int, preferred_batch_sizes: Sequence[int], max_queue_delay_microseconds: int,
                   instance_count: int) -> list[int]:
    """Validate the batching settings of a model config; return the preferred sizes sorted, without repeats.

    Raises:
        ValueError: max_batch_size < 1, a preferred batch size outside 1..max_batch_size, a negative queue delay
            (microseconds) or instance_count < 1; the message names the setting.
    """
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    preferred = sorted(set(int(b) for b in preferred_batch_sizes))
    bad = [b for b in preferred if not 1 <= b <= max_batch_size]
    if bad:
        raise ValueError(f"preferred_batch_sizes {bad} are outside 1..max_batch_size ({max_batch_size})")
    if max_queue_delay_microseconds < 0:
        raise ValueError(f"max_queue_delay_microseconds must be >= 0, got {max_queue_delay_microseconds}")
    if instance_count < 1:
        raise ValueError(f"instance_count must be >= 1, got {instance_count}")
    return preferred


def build_model_config(
    name: str,
    *,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    max_batch_size: int = 64,
    preferred_batch_sizes: Sequence[int] = (8, 16, 32),
    max_queue_delay_microseconds: int = 2000,
    instance_count: int = 1,
    gpu: bool = False,
    tensorrt_workspace_bytes: int = DEFAULT_TRT_WORKSPACE_BYTES,
) -> mc.ModelConfig:
    """Config of one ONNX model served by Triton's onnxruntime backend.

    Contents: platform onnxruntime_onnx / backend onnxruntime, `max_batch_size`, inputs/outputs,
    dynamic batching (`preferred_batch_sizes`, `max_queue_delay_microseconds`), one instance group
    (KIND_GPU when `gpu`, else KIND_CPU, `instance_count` instances), zero-data warm-up at batch 1
    and at the largest preferred batch size, and, when `gpu`, the TensorRT execution accelerator
    (precision_mode FP16, max_workspace_size_bytes `tensorrt_workspace_bytes`).

    Raises:
        ValueError: empty name, max_batch_size < 1, a preferred batch size outside
            1..max_batch_size, negative queue delay, instance_count < 1, or an unknown data type.
    """
    if not name:
        raise ValueError("model name must not be empty")
    preferred = check_batching(max_batch_size, preferred_batch_sizes, max_queue_delay_microseconds, instance_count)

    config = mc.ModelConfig(
        name=name,
        platform=ONNX_PLATFORM,
        backend=ONNX_BACKEND,
        max_batch_size=max_batch_size,
    )
    for spec in inputs:
        config.input.add(name=spec.name, data_type=spec.data_type_enum(), dims=list(spec.dims))
    for spec in outputs:
        config.output.add(name=spec.name, data_type=spec.data_type_enum(), dims=list(spec.dims))
    config.dynamic_batching.preferred_batch_size.extend(preferred)
    config.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_microseconds
    config.instance_group.add(
        kind=mc.ModelInstanceGroup.KIND_GPU if gpu else mc.ModelInstanceGroup.KIND_CPU,
        count=instance_count,
    )
    warmup_sizes = sorted({1, max(preferred, default=1)})
    for batch_size in warmup_sizes:
        warmup = config.model_warmup.add(name=f"zero_batch_{batch_size}", batch_size=batch_size)
        for spec in inputs:
            warmup.inputs[spec.name].CopyFrom(
                mc.ModelWarmup.Input(data_type=spec.data_type_enum(), dims=list(spec.warmup_dims or spec.dims),
                                     zero_data=True)
            )
    if gpu:
        accelerators = config.optimization.execution_accelerators.gpu_execution_accelerator
        accelerator = accelerators.add(name="tensorrt")
        accelerator.parameters["precision_mode"] = "FP16"
        accelerator.parameters["max_workspace_size_bytes"] = str(int(tensorrt_workspace_bytes))
    return config


def write_model_config(config: mc.ModelConfig, model_dir: Path) -> Path:
    """Write `config` as `<model_dir>/config.pbtxt` (protobuf text format); returns the path."""
    path = Path(model_dir) / CONFIG_FILE
    path.write_text(text_format.MessageToString(config), encoding="utf-8")
    return path


def read_model_config(path: Path | str) -> mc.ModelConfig:
    """Parse a Triton `config.pbtxt` (or the model folder holding one) into a `ModelConfig`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a valid ModelConfig in protobuf text format.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"Triton model config {path} not found")
    try:
        return text_format.Parse(path.read_text(encoding="utf-8"), mc.ModelConfig())
    except text_format.ParseError as exc:
        raise ValueError(f"{path} is not a valid Triton model config: {exc}") from exc
