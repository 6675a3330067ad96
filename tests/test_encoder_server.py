"""The encoder server (Triton via PyTriton, ONNX Runtime inside) and the retrieval service's encoder client.

Real parts only: a ViT-B-32 repository exported with random weights by `export.export_repository`, a real
tritonserver on free loopback ports (one per module, stopped at the end), real tritonclient gRPC/HTTP
calls, and `python -m encoder_server` as a subprocess for the no-torch and SIGTERM checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from encoder_server import EncoderServer, ModelRepositoryError
from encoder_server.__main__ import READY_MARKER
from encoder_server.runtime import (
    CPU,
    CUDA,
    TENSORRT,
    RuntimeOptions,
    create_session,
    runtime_options_from_config,
    select_providers,
)
from vitrine.triton_config import read_model_config
from retrieval_service.adapters.triton.encoder import EncoderClient, EncoderMismatchError
from retrieval_service.errors import DependencyUnavailableError, InvalidInputError
from vitrine.manifest import Manifest

ROOT = Path(__file__).resolve().parents[1]
MAX_BATCH_SIZE = 8  # small, so that splitting and warmup stay cheap on 2 CPU cores
VOCAB_SIZE = 49408  # open_clip ViT-B-32 tokenizer vocabulary


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports that were free on 127.0.0.1 a moment ago."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Manifest]:
    from export import export_repository

    path = tmp_path_factory.mktemp("encoder") / "model_repository"
    manifest = export_repository(
        "ViT-B-32",
        path,
        pretrained=None,
        max_batch_size=MAX_BATCH_SIZE,
        preferred_batch_sizes=(4, MAX_BATCH_SIZE),
    )
    return path, manifest


@dataclasses.dataclass
class Running:
    """The module's server plus what was observed around its start."""

    server: EncoderServer
    manifest: Manifest
    ready_before_start: bool


@pytest.fixture(scope="module")
async def running(repository: tuple[Path, Manifest]) -> AsyncIterator[Running]:
    path, manifest = repository
    http_port, grpc_port, metrics_port = free_ports(3)
    server = EncoderServer(path, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port)
    async with EncoderClient(server.grpc_url, manifest, timeout_s=5) as client:
        before = await client.ready()
    # Started from the main thread, not a worker thread (see EncoderServer.start on PR_SET_PDEATHSIG).
    server.start()
    try:
        yield Running(server, manifest, before)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def reference_sessions(repository: tuple[Path, Manifest]) -> dict[str, object]:
    """The same ONNX files run in-process with ONNX Runtime (CPU), keyed by Triton model name."""
    path, manifest = repository
    return {
        name: create_session(path / name / "1" / "model.onnx", RuntimeOptions(providers=[CPU]))
        for name in (manifest.image.triton_model, manifest.text.triton_model)
    }


def random_pixels(manifest: Manifest, batch: int, seed: int = 0) -> np.ndarray:
    height, width = manifest.image.size
    return np.random.default_rng(seed).integers(0, 256, size=(batch, height, width, 3), dtype=np.uint8)


def random_ids(manifest: Manifest, batch: int, seed: int = 0) -> np.ndarray:
    shape = (batch, manifest.text.context_length)
    return np.random.default_rng(seed).integers(1, VOCAB_SIZE, size=shape).astype(np.int64)


async def settled_statistics(client: EncoderClient, model: str, inference_count: int):
    """The model's statistics once Triton has recorded `inference_count` inferences.

    Triton updates the statistics after it has sent the responses, so a reader can briefly see the
    previous counts; wait (at most 10 s) until the expected count shows.
    """
    deadline = time.monotonic() + 10
    while True:
        stats = await client.model_statistics(model)
        if stats.inference_count >= inference_count or time.monotonic() > deadline:
            return stats
        await asyncio.sleep(0.02)


# ------------------------------------------------------------------------------------------------ runtime
def test_select_providers_prefers_tensorrt_then_cuda_then_cpu() -> None:
    available = [CPU, CUDA, TENSORRT, "AzureExecutionProvider"]
    chosen = select_providers(RuntimeOptions(fp16=True, device_id=1), available)
    assert [name for name, _ in chosen] == [TENSORRT, CUDA, CPU]
    assert chosen[0][1]["trt_fp16_enable"] is True and chosen[0][1]["device_id"] == 1
    assert [name for name, _ in select_providers(RuntimeOptions(), [CPU, CUDA])] == [CUDA, CPU]
    assert [name for name, _ in select_providers(RuntimeOptions(gpu=False), available)] == [CPU]
    assert [name for name, _ in select_providers(RuntimeOptions(providers=[CPU]), available)] == [CPU]
    with pytest.raises(ValueError, match="CUDAExecutionProvider"):
        select_providers(RuntimeOptions(providers=[CUDA]), [CPU])


def test_runtime_options_follow_triton_onnxruntime_config(repository: tuple[Path, Manifest]) -> None:
    path, manifest = repository
    config = read_model_config(path / manifest.image.triton_model / "config.pbtxt")
    options = runtime_options_from_config(config, intra_op_threads=2)
    assert options.intra_op_threads == 2
    assert options.gpu is False  # export writes KIND_CPU instances without --gpu
    config.optimization.graph.level = -1
    config.parameters["intra_op_thread_count"].string_value = "1"
    accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
    accelerator.parameters["precision_mode"] = "FP16"
    options = runtime_options_from_config(config)
    assert options.intra_op_threads == 1
    assert options.graph_optimization_level.name == "ORT_ENABLE_BASIC"
    assert options.fp16 is True
    config.optimization.graph.level = 7
    with pytest.raises(ValueError, match="graph.level"):
        runtime_options_from_config(config)


def test_server_refuses_a_folder_without_models(tmp_path: Path) -> None:
    with pytest.raises(ModelRepositoryError, match="no model"):
        EncoderServer(tmp_path, grpc_port=free_ports(1)[0]).start()


# ------------------------------------------------------------------------------------------------- server
async def test_ready_only_after_start(running: Running) -> None:
    assert running.ready_before_start is False
    async with EncoderClient(running.server.grpc_url, running.manifest) as client:
        assert await client.ready() is True  # start() returned, so every model is loaded and warm
    timings = running.server.startup_timings
    assert timings["total"] >= timings["triton"] > 0
    assert set(running.server.describe()["models"]) == {
        running.manifest.image.triton_model,
        running.manifest.text.triton_model,
    }
    print(f"\nencoder server startup: {json.dumps({k: round(v, 2) for k, v in timings.items()})}")


@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("tower", ["image", "text"])
def test_tritonclient_infer_matches_in_process_onnxruntime(
    running: Running, reference_sessions: dict[str, object], protocol: str, tower: str
) -> None:
    manifest = running.manifest
    spec = manifest.image if tower == "image" else manifest.text
    data = random_pixels(manifest, 3, seed=1) if tower == "image" else random_ids(manifest, 3, seed=1)
    datatype = "UINT8" if tower == "image" else "INT64"
    module = grpcclient if protocol == "grpc" else httpclient
    url = running.server.grpc_url if protocol == "grpc" else running.server.http_url
    client = module.InferenceServerClient(url)
    try:
        infer_input = module.InferInput(spec.input_name, list(data.shape), datatype)
        infer_input.set_data_from_numpy(data)
        requested = [module.InferRequestedOutput(spec.output_name)]
        result = client.infer(spec.triton_model, [infer_input], outputs=requested)
    finally:
        client.close()
    served = result.as_numpy(spec.output_name)
    expected = reference_sessions[spec.triton_model].run([spec.output_name], {spec.input_name: data})[0]
    assert served.dtype == np.float32 and served.shape == (3, manifest.embedding_dim)
    np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(served, expected, atol=1e-5, rtol=0)


async def test_dynamic_batching_merges_concurrent_requests(
    running: Running, reference_sessions: dict[str, object]
) -> None:
    manifest = running.manifest
    model = manifest.image.triton_model
    pixels = random_pixels(manifest, 64, seed=2)
    async with EncoderClient(running.server.grpc_url, manifest) as client:
        before = await client.model_statistics(model)
        # Baseline: one single-row request at a time (no merging possible).
        sequential = 8
        t0 = time.perf_counter()
        for i in range(sequential):
            await client.encode_images(pixels[i : i + 1])
        batch1_rate = sequential / (time.perf_counter() - t0)
        middle = await settled_statistics(client, model, before.inference_count + sequential)
        # 64 concurrent single-row requests: Triton's dynamic batcher merges them.
        t0 = time.perf_counter()
        rows = await asyncio.gather(*(client.encode_images(pixels[i : i + 1]) for i in range(64)))
        concurrent_rate = 64 / (time.perf_counter() - t0)
        after = await settled_statistics(client, model, middle.inference_count + 64)

    assert middle.inference_count - before.inference_count == sequential
    assert middle.execution_count - before.execution_count == sequential
    inferences = after.inference_count - middle.inference_count
    executions = after.execution_count - middle.execution_count
    assert inferences == 64
    assert executions < inferences, f"no request was merged: {executions} executions for {inferences} rows"
    assert all(b.batch_size <= MAX_BATCH_SIZE for b in after.batch_stats)
    feeds = {manifest.image.input_name: pixels}
    expected = reference_sessions[model].run([manifest.image.output_name], feeds)[0]
    np.testing.assert_allclose(np.concatenate(rows), expected, atol=1e-5, rtol=0)
    print(
        f"\nimage tower: batch-1 sequential {batch1_rate:.1f} items/s, 64 concurrent single-row requests "
        f"{concurrent_rate:.1f} items/s; inference_count {inferences} vs execution_count {executions}; "
        f"batch sizes run: {sorted((b.batch_size, b.compute_infer.count) for b in after.batch_stats)}"
    )


async def test_client_splits_batches_larger_than_max_batch_size(
    running: Running, reference_sessions: dict[str, object]
) -> None:
    manifest = running.manifest
    model = manifest.text.triton_model
    ids = random_ids(manifest, 2 * MAX_BATCH_SIZE + 3, seed=3)
    # The server itself refuses such a batch ...
    direct = grpcclient.InferenceServerClient(running.server.grpc_url)
    try:
        infer_input = grpcclient.InferInput(manifest.text.input_name, list(ids.shape), "INT64")
        infer_input.set_data_from_numpy(ids)
        with pytest.raises(InferenceServerException, match="batch"):
            direct.infer(model, [infer_input])
    finally:
        direct.close()
    # ... so the client splits it into chunks of at most max_batch_size and joins the answers in order.
    async with EncoderClient(running.server.grpc_url, manifest) as client:
        before = await client.model_statistics(model)
        embeddings = await client.encode_texts(ids)
        after = await settled_statistics(client, model, before.inference_count + ids.shape[0])
    assert embeddings.shape == (ids.shape[0], manifest.embedding_dim) and embeddings.dtype == np.float32
    assert after.inference_count - before.inference_count == ids.shape[0]
    assert after.execution_count - before.execution_count >= 3  # ceil(19 / 8) chunks at least
    expected = reference_sessions[model].run([manifest.text.output_name], {manifest.text.input_name: ids})[0]
    np.testing.assert_allclose(embeddings, expected, atol=1e-5, rtol=0)


async def test_text_tower_serves_each_length_bucket_and_batches_within_it(
    running: Running, reference_sessions: dict[str, object]
) -> None:
    """config dims [-1]: requests of 8 and 16 tokens are served as sent; concurrent ones of one length merge."""
    manifest = running.manifest
    model, spec = manifest.text.triton_model, manifest.text
    assert spec.dynamic_length and 8 in spec.buckets and 16 in spec.buckets
    rng = np.random.default_rng(5)
    async with EncoderClient(running.server.grpc_url, manifest) as client:
        before = await client.model_statistics(model)
        requests = [rng.integers(1, VOCAB_SIZE, size=(1, length)).astype(np.int64)
                    for length in [8] * 12 + [16] * 12]
        rows = await asyncio.gather(*(client.encode_texts(ids) for ids in requests))
        after = await settled_statistics(client, model, before.inference_count + len(requests))
    assert after.inference_count - before.inference_count == len(requests)
    assert after.execution_count - before.execution_count < len(requests)  # merged within a length
    for ids, row in zip(requests, rows):
        expected = reference_sessions[model].run([spec.output_name], {spec.input_name: ids})[0]
        np.testing.assert_allclose(row, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("tower", "make", "message"),
    [
        ("image", lambda m: np.zeros((2, *m.image.size), np.uint8), "shape"),
        ("image", lambda m: np.zeros((1, 32, 32, 3), np.uint8), "shape"),
        ("image", lambda m: np.zeros((1, *m.image.size, 3), np.float32), "dtype"),
        ("image", lambda m: [[0]], "numpy array"),
        ("text", lambda m: np.zeros((m.text.context_length,), np.int64), "shape"),
        ("text", lambda m: np.zeros((1, m.text.context_length + 1), np.int64), "shape"),
        ("text", lambda m: np.zeros((1, 1), np.int64), "shape"),
        ("text", lambda m: np.zeros((1, m.text.context_length), np.int32), "dtype"),
    ],
)
async def test_bad_input_raises_invalid_input_error_before_sending(
    repository: tuple[Path, Manifest], tower: str, make, message: str
) -> None:
    _, manifest = repository
    # Nothing listens on this port: the error must come from validation, not from the network.
    async with EncoderClient(f"127.0.0.1:{free_ports(1)[0]}", manifest, timeout_s=5) as client:
        encode = client.encode_images if tower == "image" else client.encode_texts
        with pytest.raises(InvalidInputError, match=message):
            await encode(make(manifest))


async def test_empty_batch_returns_empty_embeddings(repository: tuple[Path, Manifest]) -> None:
    _, manifest = repository
    async with EncoderClient(f"127.0.0.1:{free_ports(1)[0]}", manifest, timeout_s=5) as client:
        out = await client.encode_texts(np.zeros((0, manifest.text.context_length), np.int64))
    assert out.shape == (0, manifest.embedding_dim) and out.dtype == np.float32


async def test_manifest_that_does_not_match_the_served_models_is_refused(running: Running) -> None:
    manifest = running.manifest
    wrong = manifest.model_copy(update={"embedding_dim": 256})
    async with EncoderClient(running.server.grpc_url, wrong) as client:
        with pytest.raises(EncoderMismatchError, match="embedding_dim is 256"):
            await client.encode_texts(random_ids(manifest, 1))
        assert await client.ready() is False


async def test_client_against_no_server_is_dependency_unavailable(repository: tuple[Path, Manifest]) -> None:
    _, manifest = repository
    async with EncoderClient(f"127.0.0.1:{free_ports(1)[0]}", manifest, timeout_s=5) as client:
        assert await client.ready() is False
        with pytest.raises(DependencyUnavailableError) as caught:
            await client.encode_images(random_pixels(manifest, 1))
        assert caught.value.dependency == "encoder"


# -------------------------------------------------------------------------------------------- the process
def _descendants(pid: int) -> list[int]:
    """`pid` and every process below it (read from /proc/*/stat)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def _alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _torch_libraries(pid: int) -> list[str]:
    """Shared objects of torch (libtorch*, libc10*) mapped into process `pid`."""
    with contextlib.suppress(OSError):
        maps = Path(f"/proc/{pid}/maps").read_text()
        lines = maps.splitlines()
        return sorted({line.split()[-1] for line in lines if "libtorch" in line or "libc10" in line})
    return []


async def test_cli_process_never_imports_torch_and_stops_on_sigterm(
    repository: tuple[Path, Manifest],
) -> None:
    path, manifest = repository
    http_port, grpc_port, metrics_port = free_ports(3)
    url = f"127.0.0.1:{grpc_port}"
    async with EncoderClient(url, manifest, timeout_s=5) as client:
        assert await client.ready() is False  # nothing started yet
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "encoder_server", "--repository", str(path),
            "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port),
            cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        lines: list[str] = []
        try:
            status = None
            deadline = time.monotonic() + 180
            while status is None:
                remaining = max(deadline - time.monotonic(), 1)
                line = await asyncio.wait_for(process.stdout.readline(), timeout=remaining)
                if not line:
                    pytest.fail("encoder server exited before it was ready:\n" + "".join(lines[-40:]))
                text = line.decode(errors="replace")
                lines.append(text)
                if text.startswith(READY_MARKER):
                    status = json.loads(text[len(READY_MARKER) :])
            drain = asyncio.create_task(process.stdout.read())  # keep the pipe from filling up

            assert status["pid"] == process.pid
            assert status["heavy_modules"] == []  # torch / open_clip / torchvision not in sys.modules
            tree = _descendants(process.pid)
            assert len(tree) >= 2, "tritonserver should run as a child of the encoder server"
            assert {pid: _torch_libraries(pid) for pid in tree} == {pid: [] for pid in tree}
            assert await client.ready() is True
            embeddings = await client.encode_texts(random_ids(manifest, 2))
            assert embeddings.shape == (2, manifest.embedding_dim)

            process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(process.wait(), timeout=90) == 0
            await drain
            assert not [pid for pid in tree if _alive(pid)], "tritonserver outlived the encoder server"
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        assert await client.ready() is False
        with pytest.raises(DependencyUnavailableError):
            await client.encode_texts(random_ids(manifest, 1))
