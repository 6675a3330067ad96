"""The Triton under test of `vitrine bench encoder`: `vitrine serve-encoder` started as a child process over
a variant repository (so the load generator and the server never share a GIL), or the model names a running
Triton at `--url` serves.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import tritonclient.grpc as triton_grpc
import tritonclient.grpc.aio as triton_aio
from tritonclient.utils import InferenceServerException

from tools.bench.encoder_load import EncoderBenchError
from tools.processes import Ports, spawn


@contextlib.contextmanager
def own_encoder_server(repository: Path, models: Sequence[str], log_dir: Path,
                       timeout_s: float) -> Iterator[tuple[str, int]]:
    """`vitrine serve-encoder --repository REPO` as a child on free loopback ports; yields (gRPC host:port,
    its process id) once the server and every one of `models` report ready (PyTriton loads the models after
    tritonserver itself is up, so server readiness alone is not enough). The child's log goes to `log_dir`;
    it is stopped on exit.

    Raises:
        EncoderBenchError: the server exited, or was not ready after `timeout_s` seconds (with its log tail).
    """
    ports = Ports.free()
    child = spawn("encoder_bench_server", ["serve-encoder", "--repository", str(repository),
                                           "--http-port", str(ports.encoder_http),
                                           "--grpc-port", str(ports.encoder_grpc),
                                           "--metrics-port", str(ports.encoder_metrics)], log_dir)
    url = f"127.0.0.1:{ports.encoder_grpc}"
    try:
        client = triton_grpc.InferenceServerClient(url)
        deadline = time.monotonic() + timeout_s
        while True:
            if not child.alive():
                raise EncoderBenchError(
                    f"encoder server exited with code {child.proc.returncode}:\n{child.tail()}")
            try:
                if client.is_server_ready() and all(client.is_model_ready(m) for m in models):
                    break
            except InferenceServerException:
                pass
            if time.monotonic() > deadline:
                raise EncoderBenchError(f"encoder server not ready after {timeout_s:.0f} s:\n{child.tail()}")
            time.sleep(0.3)
        client.close()
        yield url, child.proc.pid
    finally:
        child.stop()


async def served_models(url: str) -> set[str]:
    """Names of the models in the repository index of the Triton at `url` (gRPC host:port)."""
    client = triton_aio.InferenceServerClient(url)
    try:
        index = await client.get_model_repository_index()
        return {m.name for m in index.models}
    finally:
        await client.close()
