"""Reading a Vitrine/Triton model repository into ONNX Runtime sessions, before any Triton is involved.

What lives here: the repository layout (`<repo>/<model>/config.pbtxt`, `<repo>/<model>/<version>/model.onnx`,
`<repo>/<model>/warmup/<file>`), `discover_models` (every model directory and its parsed config),
`load_model` (latest version, one ORT session per Triton instance, the graph checked against the config),
`numpy_dtype` (Triton `DataType` -> numpy) with the ORT tensor-type table, and Triton's `model_warmup`
semantics (`warmup_inputs`, `run_warmup`). `encoder_server.server` binds what this module loads to PyTriton.

This module imports neither torch, open_clip nor pytriton.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import triton_to_np_dtype

from encoder_server.runtime import create_session, runtime_options_from_config
from vitrine.triton_config import read_model_config  # torch-free: config.pbtxt <-> ModelConfig

LOGGER = logging.getLogger(__name__)

CONFIG_FILE = "config.pbtxt"
DEFAULT_MODEL_FILENAME = "model.onnx"
WARMUP_DIR = "warmup"  # Triton: model_warmup input_data_file is relative to <model>/warmup/


class ModelRepositoryError(ValueError):
    """The model repository (or one model's config.pbtxt / model.onnx) cannot be served as it is."""


def numpy_dtype(data_type: int) -> np.dtype:
    """Map a Triton `DataType` enum value (e.g. TYPE_UINT8) to the numpy dtype Triton uses for it.

    Raises:
        ModelRepositoryError: TYPE_INVALID or a type without a numpy equivalent.
    """
    name = model_config_pb2.DataType.Name(data_type)
    np_type = triton_to_np_dtype(name.removeprefix("TYPE_"))
    if np_type is None:
        raise ModelRepositoryError(f"Triton data type {name} has no numpy equivalent")
    return np.dtype(np_type)


# ONNX Runtime's tensor type strings for the numpy dtypes a Vitrine tower uses (ORT NodeArg.type).
_ORT_TYPE_NAMES = {
    np.dtype(np.uint8): "tensor(uint8)",
    np.dtype(np.int8): "tensor(int8)",
    np.dtype(np.int32): "tensor(int32)",
    np.dtype(np.int64): "tensor(int64)",
    np.dtype(np.float16): "tensor(float16)",
    np.dtype(np.float32): "tensor(float)",
    np.dtype(np.float64): "tensor(double)",
    np.dtype(np.bool_): "tensor(bool)",
}


@dataclasses.dataclass
class ServedModel:
    """One tower as this server serves it.

    Attributes:
        name: Triton model name (== the model directory name).
        version: model version directory served (highest numeric one holding the model file).
        config: the parsed config.pbtxt.
        model_path: the ONNX file.
        sessions: one ONNX Runtime session per Triton instance.
        warmup_seconds: wall time spent running `model_warmup`, seconds.
    """

    name: str
    version: int
    config: model_config_pb2.ModelConfig
    model_path: Path
    sessions: list[ort.InferenceSession]
    warmup_seconds: float = 0.0


def discover_models(repository: Path) -> list[tuple[Path, model_config_pb2.ModelConfig]]:
    """List `(model_dir, config)` for every directory of `repository` that holds a config.pbtxt, by name.

    Raises:
        ValueError: a config.pbtxt is not a valid ModelConfig (from
            `vitrine.triton_config.read_model_config`).
        ModelRepositoryError: `repository` is not a directory, holds no model, a config's `name`
            differs from its directory name (Triton requires them equal), or a model does not batch
            (max_batch_size 0).
    """
    if not repository.is_dir():
        raise ModelRepositoryError(f"model repository {repository} is not a directory")
    found = []
    for model_dir in sorted(p for p in repository.iterdir() if (p / CONFIG_FILE).is_file()):
        config = read_model_config(model_dir / CONFIG_FILE)
        if config.name and config.name != model_dir.name:
            raise ModelRepositoryError(
                f"{model_dir / CONFIG_FILE}: name {config.name!r} differs from its directory name "
                f"{model_dir.name!r}"
            )
        if not config.name:
            config.name = model_dir.name
        if config.max_batch_size <= 0:
            raise ModelRepositoryError(
                f"{model_dir / CONFIG_FILE}: max_batch_size must be > 0 (the encoder server serves batching "
                "models only; dims then exclude the batch dimension)"
            )
        found.append((model_dir, config))
    if not found:
        raise ModelRepositoryError(
            f"no model in {repository}: expected <model>/{CONFIG_FILE} directories "
            "(create a repository with `vitrine export`)"
        )
    return found


def latest_version(model_dir: Path, filename: str) -> tuple[int, Path]:
    """`(version, model file)` of the highest numeric `<model_dir>/<version>/` that holds `filename`.

    Raises:
        ModelRepositoryError: no version directory holds `filename`.
    """
    versions = sorted(
        (int(p.name), p / filename)
        for p in model_dir.iterdir()
        if p.name.isdigit() and (p / filename).is_file()
    )
    if not versions:
        raise ModelRepositoryError(f"{model_dir}: no <version>/{filename} (e.g. {model_dir}/1/{filename})")
    return versions[-1]


def instance_count(config: model_config_pb2.ModelConfig) -> int:
    """Total instances over all instance groups (Triton: count defaults to 1 per group; no group -> 1)."""
    if not config.instance_group:
        return 1
    return sum(max(group.count, 1) for group in config.instance_group)


def check_signature(name: str, config: model_config_pb2.ModelConfig, session: ort.InferenceSession) -> None:
    """Raise ModelRepositoryError when the ONNX graph's inputs/outputs disagree with the config.

    Checked per config input/output: the name exists in the graph, the ORT tensor type matches the
    config's data type, and the shape is compatible with `[batch] + dims` (-1 or a symbolic graph
    dimension matches anything; the batch dimension is prepended when max_batch_size > 0).
    """
    graph = {arg.name: arg for arg in [*session.get_inputs(), *session.get_outputs()]}
    batched = config.max_batch_size > 0
    for kind, tensors in (("input", config.input), ("output", config.output)):
        for tensor in tensors:
            arg = graph.get(tensor.name)
            if arg is None:
                raise ModelRepositoryError(
                    f"model {name!r}: config {kind} {tensor.name!r} is not a tensor of the ONNX graph "
                    f"(graph has {sorted(graph)})"
                )
            want_type = _ORT_TYPE_NAMES.get(numpy_dtype(tensor.data_type))
            if want_type is not None and arg.type != want_type:
                raise ModelRepositoryError(
                    f"model {name!r}: {kind} {tensor.name!r} is {arg.type} in the ONNX graph but "
                    f"{model_config_pb2.DataType.Name(tensor.data_type)} in config.pbtxt"
                )
            dims = ([-1] if batched else []) + list(tensor.dims)
            graph_dims = [d if isinstance(d, int) else -1 for d in arg.shape]
            compatible = len(graph_dims) == len(dims) and all(
                g == c or g == -1 or c == -1 for g, c in zip(graph_dims, dims)
            )
            if not compatible:
                raise ModelRepositoryError(
                    f"model {name!r}: {kind} {tensor.name!r} has shape {arg.shape} in the ONNX graph but "
                    f"dims {dims} in config.pbtxt (-1 = any, first = batch when max_batch_size > 0)"
                )


def load_model(
    model_dir: Path,
    config: model_config_pb2.ModelConfig,
    *,
    ort_threads: int | None = None,
    providers: Sequence[str] | None = None,
) -> ServedModel:
    """Open one model of the repository: its latest version, one ORT session per Triton instance.

    Args:
        model_dir: `<repo>/<model>` (as listed by `discover_models`).
        config: its parsed config.pbtxt (`default_model_filename`, instance groups, ORT knobs).
        ort_threads: ONNX Runtime intra-op threads per session; None -> the config's
            `intra_op_thread_count` parameter, else ORT's default.
        providers: execution-provider allow-list (see `encoder_server.runtime.RuntimeOptions.providers`).

    Returns:
        The served model (warm-up not run yet; see `run_warmup`).

    Raises:
        ModelRepositoryError: no version holds the model file, or the graph disagrees with the config.
        ValueError: invalid ORT knobs in the config or an unavailable provider (`encoder_server.runtime`).
    """
    filename = config.default_model_filename or DEFAULT_MODEL_FILENAME
    version, model_path = latest_version(model_dir, filename)
    options = runtime_options_from_config(config, intra_op_threads=ort_threads, providers=providers)
    sessions = [create_session(model_path, options) for _ in range(instance_count(config))]
    check_signature(config.name, config, sessions[0])
    return ServedModel(config.name, version, config, model_path, sessions)


def warmup_inputs(
    model_dir: Path, config: model_config_pb2.ModelConfig, warmup: model_config_pb2.ModelWarmup
) -> dict[str, np.ndarray]:
    """Build one warmup sample's input arrays following Triton's ModelWarmup semantics.

    Shape: [batch_size, *dims] when the model batches (max_batch_size > 0), else dims. zero_data ->
    zeros; random_data -> uniform random values; input_data_file -> the raw row-major tensor bytes of
    `<model_dir>/warmup/<file>`.

    Raises:
        ModelRepositoryError: an input sets none of zero_data, random_data, input_data_file.
    """
    rng = np.random.default_rng(0)
    arrays = {}
    for input_name, spec in warmup.inputs.items():
        dtype = numpy_dtype(spec.data_type)
        shape = ([max(warmup.batch_size, 1)] if config.max_batch_size > 0 else []) + list(spec.dims)
        which = spec.WhichOneof("input_data_type")
        if which == "zero_data":
            array = np.zeros(shape, dtype=dtype)
        elif which == "random_data":
            if np.issubdtype(dtype, np.integer):
                high = min(np.iinfo(dtype).max, 256)
                array = rng.integers(0, high, size=shape).astype(dtype)
            else:
                array = rng.random(size=shape).astype(dtype)
        elif which == "input_data_file":
            raw = (model_dir / WARMUP_DIR / spec.input_data_file).read_bytes()
            array = np.frombuffer(raw, dtype=dtype).reshape(shape)
        else:
            raise ModelRepositoryError(
                f"model {config.name!r}: warmup {warmup.name!r} input {input_name!r} sets none of "
                "zero_data, random_data, input_data_file"
            )
        arrays[input_name] = array
    return arrays


def run_warmup(model_dir: Path, served: ServedModel) -> None:
    """Run every `model_warmup` sample of the config `count` times (0 -> once) on every instance.

    Sets `served.warmup_seconds` (wall time, seconds). PyTriton 0.7 accepts but never runs
    model_warmup, so the encoder server calls this before Triton starts.
    """
    started = time.perf_counter()
    outputs = [t.name for t in served.config.output]
    for warmup in served.config.model_warmup:
        feeds = warmup_inputs(model_dir, served.config, warmup)
        for session in served.sessions:
            for _ in range(max(warmup.count, 1)):
                session.run(outputs, feeds)
    served.warmup_seconds = time.perf_counter() - started
    if served.config.model_warmup:
        LOGGER.info(
            "model %s: %d warmup sample(s) on %d instance(s) in %.2f s",
            served.name,
            len(served.config.model_warmup),
            len(served.sessions),
            served.warmup_seconds,
        )
