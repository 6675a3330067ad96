"""Start the two servers as child processes for local use (`vitrine up`, `vitrine demo`) and stop them cleanly.

Each server runs in its own process (`python -m tools.cli serve-encoder` / `serve`), so the serving processes
never import torch even when the caller (e.g. the demo, which trains a model) did.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import tritonclient.grpc as triton_grpc

from vitrine.client import VitrineClient

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free on `host` a moment ago."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class Ports:
    """Ports of a local stack: Triton HTTP / gRPC / metrics, and the retrieval gRPC service."""

    encoder_http: int = 8000
    encoder_grpc: int = 8001
    encoder_metrics: int = 8002
    service: int = 50051

    @classmethod
    def free(cls) -> "Ports":
        return cls(free_port(), free_port(), free_port(), free_port())


@dataclass
class Child:
    """A child server process with its log file."""

    name: str
    proc: subprocess.Popen
    log_path: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout_s: float = 20.0) -> int:
        """SIGTERM, wait up to `timeout_s` seconds, then SIGKILL; return the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0f s; killing it", self.name, timeout_s)
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def spawn(name: str, args: list[str], log_dir: Path, env: dict[str, str] | None = None) -> Child:
    """Start `python -m tools.cli <args>` with output to `<log_dir>/<name>.log`."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    out = open(log_path, "wb")  # noqa: SIM115 - owned by the child for its lifetime
    proc = subprocess.Popen([sys.executable, "-m", "tools.cli", *args], stdout=out, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})}, start_new_session=True)
    return Child(name, proc, log_path)


@dataclass
class LocalStack:
    """The encoder server and the retrieval service running as children."""

    ports: Ports
    children: list[Child] = field(default_factory=list)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.ports.service}"

    def stop(self) -> None:
        for child in reversed(self.children):
            code = child.stop()
            log.info("%s stopped (exit code %d)", child.name, code)


def _wait(child: Child, ready, timeout_s: float) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not child.alive():
            raise RuntimeError(f"{child.name} exited with code {child.proc.returncode}:\n{child.tail()}")
        if ready():
            return
        time.sleep(0.3)
    raise TimeoutError(f"{child.name} not ready after {timeout_s:.0f} s:\n{child.tail()}")


@contextmanager
def local_stack(repository: Path, *, ports: Ports, milvus_uri: str, blob_dir: Path, log_dir: Path,
                timeout_s: float = 180.0, service_env: dict[str, str] | None = None) -> Iterator[LocalStack]:
    """Start encoder server + retrieval service, wait until SERVING, yield, then stop both (SIGTERM).

    `service_env` adds environment variables (e.g. VITRINE_GENERATION__BASE_URL) to the retrieval service.
    """
    stack = LocalStack(ports)
    try:
        enc = spawn("encoder", ["serve-encoder", "--repository", str(repository),
                                "--http-port", str(ports.encoder_http), "--grpc-port", str(ports.encoder_grpc),
                                "--metrics-port", str(ports.encoder_metrics)], log_dir)
        stack.children.append(enc)
        triton = triton_grpc.InferenceServerClient(f"127.0.0.1:{ports.encoder_grpc}")

        def encoder_ready() -> bool:
            try:
                return bool(triton.is_server_ready())
            except Exception:  # noqa: BLE001 - not up yet
                return False

        _wait(enc, encoder_ready, timeout_s)
        triton.close()
        svc = spawn("retrieval", ["serve", "--repository", str(repository), "--port", str(ports.service),
                                  "--encoder-url", f"127.0.0.1:{ports.encoder_grpc}", "--milvus-uri", milvus_uri,
                                  "--blob-dir", str(blob_dir)], log_dir, env=service_env)
        stack.children.append(svc)
        with VitrineClient(stack.target) as client:
            _wait(svc, lambda: _serving(client), timeout_s)
        yield stack
    finally:
        stack.stop()


def _serving(client: VitrineClient) -> bool:
    try:
        client.wait_serving(timeout_s=0.5)
        return True
    except TimeoutError:
        return False
