"""ONNX Runtime sessions for the towers of a Vitrine model repository.

One `onnxruntime.InferenceSession` per Triton model instance. The execution providers are chosen at
run time from `onnxruntime.get_available_providers()`, best first: TensorRT (fp16 when the model config
asks for it) -> CUDA -> CPU. The CPU wheel of onnxruntime offers only the CPU provider; installing
`onnxruntime-gpu` (the `gpu` extra) makes the GPU providers appear without any code change.

The knobs follow the Triton ONNX Runtime backend's model-config conventions
(https://github.com/triton-inference-server/onnxruntime_backend, README "Other Optimization Options"
and "ONNX Runtime with TensorRT optimization"), so a config.pbtxt means the same thing here as under
stock `tritonserver` with the onnxruntime backend:

- `optimization { graph { level: L } }`: absent/0 -> ORT_ENABLE_ALL, -1 -> ORT_ENABLE_BASIC,
  1 -> ORT_ENABLE_EXTENDED, 2 -> ORT_DISABLE_ALL.
- `parameters { key: "intra_op_thread_count" ... }`, `inter_op_thread_count`.
- `optimization { execution_accelerators { gpu_execution_accelerator [ { name: "tensorrt"
  parameters { key: "precision_mode" value: "FP16" } } ] } }` -> TensorRT EP with trt_fp16_enable.
- `instance_group [ { kind: KIND_CPU } ]` -> CPU provider only (Triton's meaning of KIND_CPU).

This module imports neither torch nor open_clip.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import onnxruntime as ort
from tritonclient.grpc import model_config_pb2

LOGGER = logging.getLogger(__name__)

TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
#: Preference order of the providers this module knows, best first.
PROVIDER_PREFERENCE: tuple[str, ...] = (TENSORRT, CUDA, CPU)

# Triton onnxruntime backend: optimization.graph.level -> ORT level (README, "Model Config Options").
_TRITON_GRAPH_LEVELS: dict[int, ort.GraphOptimizationLevel] = {
    0: ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    -1: ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    1: ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    2: ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}
# Triton onnxruntime backend TensorRT parameter keys that are renamed for the ORT TensorRT EP.
_TRT_KEY_MAP = {"max_workspace_size_bytes": "trt_max_workspace_size"}

ProviderSpec = tuple[str, dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class RuntimeOptions:
    """How to build the ONNX Runtime session of one model instance.

    Attributes:
        intra_op_threads: threads used inside one operator; None or 0 lets ORT pick (one per core).
        inter_op_threads: threads across independent operators (only used by parallel execution mode);
            None or 0 lets ORT pick.
        graph_optimization_level: ORT graph optimization level (default ORT_ENABLE_ALL).
        fp16: let the TensorRT provider build fp16 engines (`trt_fp16_enable`); ignored by CUDA/CPU.
        device_id: GPU ordinal for the TensorRT/CUDA providers.
        gpu: False restricts the session to the CPU provider (Triton's KIND_CPU).
        tensorrt_options: extra TensorRT EP options (`trt_*` keys of the ORT TensorRT EP).
        cuda_options: extra CUDA EP options.
        providers: explicit provider names to allow, in preference order; None allows every provider
            in `PROVIDER_PREFERENCE` that this onnxruntime build offers.
    """

    intra_op_threads: int | None = None
    inter_op_threads: int | None = None
    graph_optimization_level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    fp16: bool = False
    device_id: int = 0
    gpu: bool = True
    tensorrt_options: Mapping[str, str] = dataclasses.field(default_factory=dict)
    cuda_options: Mapping[str, str] = dataclasses.field(default_factory=dict)
    providers: Sequence[str] | None = None


def select_providers(options: RuntimeOptions, available: Sequence[str] | None = None) -> list[ProviderSpec]:
    """Choose the execution providers for a session, best first, each with its options.

    Args:
        options: the runtime options (fp16, device id, GPU allowed, explicit provider allow-list).
        available: provider names this onnxruntime build offers; default
            `onnxruntime.get_available_providers()`.

    Returns:
        `[(provider_name, provider_options), ...]` in the order TensorRT -> CUDA -> CPU restricted
        to the available (and allowed) ones; the CPU provider is always last so that operators a GPU
        provider cannot run fall back to it.

    Raises:
        ValueError: `options.providers` names a provider this onnxruntime build does not offer, or one
            this module does not know.
    """
    available = list(ort.get_available_providers() if available is None else available)
    if options.providers is not None:
        unknown = [p for p in options.providers if p not in PROVIDER_PREFERENCE]
        if unknown:
            raise ValueError(f"unknown execution provider(s) {unknown}; known: {list(PROVIDER_PREFERENCE)}")
        missing = [p for p in options.providers if p not in available]
        if missing:
            raise ValueError(
                f"execution provider(s) {missing} requested but this onnxruntime build offers only "
                f"{available} (install onnxruntime-gpu for TensorRT/CUDA)"
            )
        wanted = [p for p in PROVIDER_PREFERENCE if p in options.providers]
    else:
        wanted = [p for p in PROVIDER_PREFERENCE if p in available]
    if not options.gpu:
        wanted = [p for p in wanted if p == CPU]
    if CPU not in wanted:
        wanted.append(CPU)

    chosen: list[ProviderSpec] = []
    for name in wanted:
        if name == TENSORRT:
            trt: dict[str, Any] = {"device_id": options.device_id, "trt_fp16_enable": bool(options.fp16)}
            trt.update(options.tensorrt_options)
            chosen.append((TENSORRT, trt))
        elif name == CUDA:
            cuda: dict[str, Any] = {"device_id": options.device_id}
            cuda.update(options.cuda_options)
            chosen.append((CUDA, cuda))
        else:
            chosen.append((CPU, {}))
    return chosen


def create_session(model_path: Path | str, options: RuntimeOptions | None = None) -> ort.InferenceSession:
    """Build an ONNX Runtime session for `model_path` with providers chosen by `select_providers`.

    Args:
        model_path: the `model.onnx` file (e.g. `<repo>/<model>/1/model.onnx`).
        options: runtime options; default `RuntimeOptions()` (all cores, ORT_ENABLE_ALL, best provider).

    Returns:
        The session. `session.get_providers()` tells which providers were actually registered.

    Raises:
        FileNotFoundError: `model_path` does not exist.
        onnxruntime.capi.onnxruntime_pybind11_state.Fail (and other ORT errors): the model is invalid.
    """
    options = options or RuntimeOptions()
    path = Path(model_path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model {path} not found")
    session_options = ort.SessionOptions()
    if options.intra_op_threads:
        session_options.intra_op_num_threads = int(options.intra_op_threads)
    if options.inter_op_threads:
        session_options.inter_op_num_threads = int(options.inter_op_threads)
    session_options.graph_optimization_level = options.graph_optimization_level
    providers = select_providers(options)
    session = ort.InferenceSession(
        str(path),
        sess_options=session_options,
        providers=[name for name, _ in providers],
        provider_options=[opts for _, opts in providers],
    )
    LOGGER.info(
        "ONNX Runtime session for %s: providers=%s intra_op_threads=%s graph_optimization_level=%s",
        path,
        session.get_providers(),
        options.intra_op_threads or "auto",
        options.graph_optimization_level.name,
    )
    return session


def _parameter(config: model_config_pb2.ModelConfig, key: str) -> str | None:
    if key in config.parameters:
        return config.parameters[key].string_value
    return None


def runtime_options_from_config(
    config: model_config_pb2.ModelConfig,
    *,
    intra_op_threads: int | None = None,
    providers: Sequence[str] | None = None,
) -> RuntimeOptions:
    """Derive the `RuntimeOptions` a Triton model config asks for (Triton onnxruntime-backend meaning).

    Args:
        config: the parsed config.pbtxt.
        intra_op_threads: overrides the config's `intra_op_thread_count` parameter when not None.
        providers: explicit provider allow-list (see `RuntimeOptions.providers`).

    Returns:
        The options: graph optimization level from `optimization.graph.level`, thread counts from the
        `intra_op_thread_count` / `inter_op_thread_count` parameters, fp16 and TensorRT/CUDA options from
        `optimization.execution_accelerators.gpu_execution_accelerator`, GPU use and device id from
        `instance_group` (all groups KIND_CPU -> CPU only).

    Raises:
        ValueError: an unknown `optimization.graph.level`, or a non-integer thread-count parameter.
    """
    level = config.optimization.graph.level
    if level not in _TRITON_GRAPH_LEVELS:
        raise ValueError(
            f"model {config.name!r}: optimization.graph.level {level} is not one of "
            f"{sorted(_TRITON_GRAPH_LEVELS)} (Triton onnxruntime backend levels)"
        )

    def _int_parameter(key: str) -> int | None:
        raw = _parameter(config, key)
        if raw is None or raw == "":
            return None
        try:
            return int(raw)
        except ValueError as exc:
            raise ValueError(f"model {config.name!r}: parameter {key}={raw!r} is not an integer") from exc

    fp16 = False
    tensorrt_options: dict[str, str] = {}
    cuda_options: dict[str, str] = {}
    for accelerator in config.optimization.execution_accelerators.gpu_execution_accelerator:
        params = dict(accelerator.parameters)
        if accelerator.name == "tensorrt":
            precision = params.pop("precision_mode", "FP32").upper()
            fp16 = precision == "FP16"
            if precision == "INT8":
                tensorrt_options["trt_int8_enable"] = "True"
            for key, value in params.items():
                tensorrt_options[_TRT_KEY_MAP.get(key, key)] = value
        elif accelerator.name == "cuda":
            cuda_options.update(params)

    groups = list(config.instance_group)
    gpu = not groups or any(g.kind != model_config_pb2.ModelInstanceGroup.KIND_CPU for g in groups)
    device_id = next((g.gpus[0] for g in groups if g.gpus), 0)

    if intra_op_threads is None:
        intra_op_threads = _int_parameter("intra_op_thread_count")
    return RuntimeOptions(
        intra_op_threads=intra_op_threads,
        inter_op_threads=_int_parameter("inter_op_thread_count"),
        graph_optimization_level=_TRITON_GRAPH_LEVELS[level],
        fp16=fp16,
        device_id=device_id,
        gpu=gpu,
        tensorrt_options=tensorrt_options,
        cuda_options=cuda_options,
        providers=providers,
    )
